"""DataLoaders under :mod:`torch.distributed`: each process's rows of a loader, for sums over
rows (EM, evaluation), or its part of every global batch (Adam), so that the processes
together read exactly what one process reads (see :mod:`mfa.distributed`)."""

from __future__ import annotations

from torch import Tensor
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler
from torch.utils.data.distributed import DistributedSampler

from mfa.distributed import (
    ShardBatchSampler,
    ShardSampler,
    check_same_dataset,
    is_active,
    range_across_processes,
)

__all__ = ["check_same_batch_count", "reads_whole_dataset", "shard_global_batches",
           "shard_loader"]


class _EmptySafeCollate:
    """A collate function that turns an empty part of a global batch into a batch of zero
    rows shaped like the dataset's first item (so the rank still takes the step)."""

    def __init__(self, collate, dataset) -> None:
        self.collate, self.dataset = collate, dataset

    def __call__(self, items):
        if len(items):
            return self.collate(items)
        one = self.collate([self.dataset[0]])
        if isinstance(one, Tensor):
            return one[:0]
        parts = [part[:0] for part in one]
        # (a namedtuple takes its fields as arguments: one generator failed there)
        return type(one)(*parts) if hasattr(one, "_fields") else type(one)(parts)


def reads_whole_dataset(loader) -> bool:
    """Whether ``loader`` is a DataLoader that reads its whole map-style dataset (its
    sampler is torch's sequential or random one), so every process would see every row."""
    return (isinstance(loader, DataLoader) and loader.batch_size is not None
            and isinstance(loader.sampler, (SequentialSampler, RandomSampler)))


def _check_every_row_once(loader: DataLoader) -> None:
    """Refuse a whole-dataset ``loader`` whose epoch is not every row once: its shards could
    not add up to its rows (EM sums each process's shard of the Dataset)."""
    sampler, n = loader.sampler, len(loader.dataset)
    why = None
    if loader.drop_last and n % loader.batch_size:
        why = (f"drop_last=True drops the last {n % loader.batch_size} of its {n} rows each "
               "epoch")
    elif isinstance(sampler, RandomSampler) and (sampler.replacement or sampler.num_samples != n):
        why = (f"its RandomSampler draws {sampler.num_samples} of {n} rows"
               + (" with replacement" if sampler.replacement else ""))
    if why is not None:
        raise ValueError(
            f"under torch.distributed each process sums its shard of the DataLoader's "
            f"Dataset, but the DataLoader reads other rows: {why}; pass a DataLoader that "
            "reads every row once (drop_last=False, no replacement or num_samples), or give "
            "each process its own rows (mfa.distributed.ShardSampler)"
        )


def _samplers(loader):
    """The samplers ``loader`` draws through: its ``sampler`` and ``batch_sampler`` and
    whatever they wrap in a ``sampler`` attribute (e.g. a ``BatchSampler`` over a
    ``DistributedSampler``)."""
    todo = [getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)]
    seen: list = []
    while todo:
        sampler = todo.pop()
        if sampler is None or any(sampler is other for other in seen) or len(seen) > 16:
            continue
        seen.append(sampler)
        todo.append(getattr(sampler, "sampler", None))
    return seen


def _check_no_padding(loader) -> None:
    for sampler in _samplers(loader):
        if (isinstance(sampler, DistributedSampler)
                and sampler.total_size != len(sampler.dataset)):
            how = "drops rows to" if sampler.drop_last else "pads by repeating rows to"
            raise ValueError(
                f"the DataLoader's DistributedSampler {how} make {len(sampler.dataset)} rows "
                f"{sampler.total_size}, so rows would be counted twice or never; pass the "
                "Dataset itself (mfa shards it) or use mfa.distributed.ShardSampler"
            )


def _rebuild(loader: DataLoader, *, empty_safe: bool = True, generator=None,
             **sampling) -> DataLoader:
    """``loader`` over other samplers, with every other setting of it (workers and their
    ``worker_init_fn``, collation, pinning, the generator: ``generator`` instead when given).
    ``empty_safe``: its collation also makes empty parts of global batches (Adam)."""
    workers = {"num_workers": loader.num_workers, "worker_init_fn": loader.worker_init_fn,
               "timeout": loader.timeout,
               "multiprocessing_context": loader.multiprocessing_context}
    if loader.num_workers:  # (torch refuses these without workers)
        workers.update(persistent_workers=loader.persistent_workers,
                       prefetch_factor=loader.prefetch_factor)
    if hasattr(loader, "in_order"):  # (torch >= 2.6)
        workers["in_order"] = loader.in_order
    if getattr(loader, "pin_memory_device", ""):
        workers["pin_memory_device"] = loader.pin_memory_device
    collate = (_EmptySafeCollate(loader.collate_fn, loader.dataset) if empty_safe
               else loader.collate_fn)
    return DataLoader(
        loader.dataset, **sampling, **workers, collate_fn=collate,
        pin_memory=loader.pin_memory,
        generator=loader.generator if generator is None else generator,
    )


def shard_loader(loader):
    """For sums over rows (EM, evaluation): ``(this rank's loader, the whole loader or
    None)``.

    A ``DataLoader`` over a whole map-style dataset is re-made over this rank's
    :func:`shard_range` of it (same batch size, workers and collate function); the whole one
    comes back too, for reading initialisation rows as one process would. Any other iterable
    is taken as this rank's rows as they are (``None`` second); a ``DistributedSampler`` that
    pads or drops rows is refused, and so is a whole-dataset loader whose epoch is not every
    row once (``drop_last`` with a partial last batch, a ``RandomSampler`` with replacement
    or ``num_samples``: single-process EM sums the rows it yields, which no split of the
    Dataset reproduces).

    Raises:
        ValueError: the loader's ``DistributedSampler`` pads with repeated rows or drops rows;
            the loader does not read every row of its Dataset once.
    """
    if not is_active():
        return loader, loader
    if reads_whole_dataset(loader):
        _check_every_row_once(loader)
        check_same_dataset(loader.dataset, "the DataLoader's Dataset")
        shard = _rebuild(loader, batch_size=loader.batch_size,
                         sampler=ShardSampler(len(loader.dataset)))
        return shard, loader
    _check_no_padding(loader)
    return loader, None


def shard_global_batches(loader):
    """For Adam: a ``DataLoader`` over a whole dataset becomes one that yields this rank's
    part of each of its global batches, drawn from the same generator (so the global order is
    the single-process one); any other iterable is returned as it is (this rank's batches:
    every rank must then yield the same number of batches)."""
    if not is_active():
        return loader
    if reads_whole_dataset(loader):
        if isinstance(loader.sampler, RandomSampler) and loader.sampler.generator is None:
            raise ValueError(
                "a shuffled DataLoader needs a seeded generator= under torch.distributed, so "
                "that every process draws the same order of rows"
            )
        check_same_dataset(loader.dataset, "the DataLoader's Dataset")
        return _rebuild(loader, batch_sampler=ShardBatchSampler(loader.batch_sampler))
    _check_no_padding(loader)
    return loader


def check_same_batch_count(count: int) -> None:
    """Refuse per-process loaders that yield different numbers of batches an epoch (``count``:
    this process's): each Adam step is one all-reduce, and a process with a batch more would
    wait for the others until the timeout, or abort the process group. One all-reduce.

    Raises:
        ValueError: on every process, naming the range of counts."""
    low, high = range_across_processes(count)
    if low != high:
        raise ValueError(
            f"under torch.distributed every process's own DataLoader must yield the same "
            f"number of batches an epoch (each Adam step is one all-reduce), but they yield "
            f"between {low:.0f} and {high:.0f} (this process: {count}); pass the whole Dataset "
            "or a DataLoader over it (mfa gives each process its part of every global batch)"
        )
