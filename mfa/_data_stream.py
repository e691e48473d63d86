"""Turn what a user passes as data (a tensor, :class:`~mfa.data.QuantizedRows`, a Dataset or a
DataLoader) into validated batches ``[B, D]`` on a model's device and in its dtype."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
    Subset,
    SubsetRandomSampler,
    WeightedRandomSampler,
    default_collate,
)

from mfa import distributed
from mfa._validation import all_finite, all_not_inf
from mfa.data.quantized import QuantizedRows
from mfa.loader_shards import _rebuild, _samplers, shard_loader  # (its private tools)

#: Rows per batch of the streamed computations (evaluation, likelihoods, NDB binning).
DEFAULT_BATCH_SIZE = 4096


def reject_numpy(data, name: str) -> None:
    """Raise a TypeError that says how to convert ``data`` if it is a numpy array."""
    if type(data).__module__ == "numpy":
        raise TypeError(
            f"{name} is a numpy array; convert it with torch.from_numpy({name}).float()"
        )


class RowCollate:
    """``default_collate`` of a Dataset's items, refusing items that are batches ``[b, D]``
    (``b > 1``) rather than rows: stacking them failed in torch with "stack expects each
    tensor to be equal size", or stacked them into rows of ``b·D`` features."""

    def __init__(self, n_features: int, name: str) -> None:
        self.n_features, self.name = n_features, name

    def __call__(self, items):
        first = items[0] if items else None
        if isinstance(first, (tuple, list)) and first:
            first = first[0]
        if (isinstance(first, Tensor) and first.dim() == 2 and first.shape[0] > 1
                and first.shape[1] == self.n_features):
            raise ValueError(
                f"{self.name}: its Dataset yields batches of shape {tuple(first.shape)}, not "
                f"rows of {self.n_features} features; pass DataLoader(dataset, "
                "batch_size=None) to use them as batches, or yield one row per item")
        return default_collate(items)


class DataSource:
    """A re-iterable stream of batches ``[B, D]`` checked against ``model``.

    Args:
        data: a tensor ``[N, D]`` (or ``[N, C, H, W]``, flattened), a
            :class:`~mfa.data.QuantizedRows` (its uint8 pixels moved to the model's device
            once, made float one batch at a time), a ``Dataset`` whose items are rows or
            ``(row, label)`` tuples, or any iterable of such batches (e.g. a ``DataLoader``).
            ``tensor`` holds a tensor's rows or the ``QuantizedRows``: both are indexed by
            slices and index tensors into float rows.
        model: supplies ``n_features``, dtype and device.
        batch_size: rows per batch for tensors and datasets.
        name: used in error messages.
        shard: under :mod:`torch.distributed`, stream only this process's rows (see
            :func:`mfa.loader_shards.shard_loader`); ``sharded`` tells whether it does, and so
            whether sums over the stream must be added across processes.
        allow_missing: accept NaN as a missing entry (trainers with ``missing="allow"``, see
            :mod:`mfa.missing`); infinities are always refused.
    """

    def __init__(self, data, model, batch_size: int, name: str = "data",
                 shard: bool = False, allow_missing: bool = False) -> None:
        self.name = name
        self.dataset: Dataset | None = None  # the rows gather_rows draws from, if indexable
        self.in_order = False  # the pass reads self.dataset in order (errors name the item)
        self.allow_missing = allow_missing
        self.n_features = model.n_features
        self.dtype = model.dtype
        self.device = model.device
        self.batch_size = batch_size
        reject_numpy(data, name)
        if isinstance(data, Tensor):
            self.tensor: Tensor | QuantizedRows | None = self._prepare(data, 0)
            self.iterable: Iterable | None = None
        elif isinstance(data, QuantizedRows):
            if data.shape[1] != self.n_features:
                raise ValueError(f"{name} must have {self.n_features} features per row, got "
                                 f"QuantizedRows of shape {tuple(data.shape)}")
            self.tensor = data.to(self.device, self.dtype)  # uint8 values are always finite
            self.iterable = None
        elif isinstance(data, Dataset):
            self.tensor = None
            # (its own generator: iterating a DataLoader without one draws its base seed
            # from torch's global RNG, which a fit on a Dataset then moved)
            self.iterable = DataLoader(data, batch_size=batch_size, shuffle=False,
                                       collate_fn=RowCollate(self.n_features, name),
                                       generator=torch.Generator())
            if not isinstance(data, IterableDataset) and hasattr(data, "__len__"):
                self.dataset, self.in_order = data, True
        elif isinstance(data, Iterable):
            self.tensor = None
            self.iterable = data
            self.dataset = _whole_dataset(data)
        else:
            raise TypeError(
                f"{name} must be a torch.Tensor, a Dataset or a DataLoader, "
                f"got {type(data).__name__}"
            )
        if self.tensor is not None and self.tensor.shape[0] == 0:
            raise ValueError(f"{name} is empty (0 rows)")
        self.sharded = shard and distributed.is_active()
        self.whole = self.iterable  # every process's rows, or None (for gather_rows)
        self.offset = 0  # the index of this process's first row in the Dataset it reads
        if self.sharded and self.iterable is not None:
            self.iterable, self.whole = shard_loader(self.iterable)
            sampler = getattr(self.iterable, "sampler", None)
            self.offset = (sampler.start if isinstance(sampler, distributed.ShardSampler)
                           else None)

    def in_fixed_order(self) -> DataSource:
        """This source, or a copy that reads the same rows in the same order on every pass.
        For comparisons of rows across passes (the tempered step's paired per-row gains,
        :mod:`mfa.tempering`): a shuffled validation loader paired other rows (the standard
        error of one model against itself came out 8.6 nats, not 0, and the step was
        refused where it paid).

        A ``DataLoader`` whose sampler (or whose ``BatchSampler``'s) draws the same rows in
        a new order each pass is rebuilt with every other setting of it over those rows in
        order: a ``RandomSampler`` without replacement over its whole Dataset (``shuffle=
        True``) reads the Dataset in order, a ``SubsetRandomSampler`` its indices sorted.
        Tensors and loaders that draw nothing at random (such as the shards mfa makes under
        torch.distributed) come back as they are; a loader that draws other rows each pass
        (with replacement, ``num_samples``, weights) or through another batch sampler raises
        ``ValueError``.
        Other iterables are taken to yield the same rows in the same order each pass."""
        loader = self.iterable
        # (sharded too: a loader mfa re-made over a ShardSampler draws nothing at random, but
        # each process's own shuffled loader did, and paired other rows on every process)
        if self.tensor is not None or not isinstance(loader, DataLoader):
            return self
        drawn = [s for s in _samplers(loader)
                 if isinstance(s, (RandomSampler, SubsetRandomSampler, WeightedRandomSampler))]
        if not drawn:
            return self
        batches = loader.batch_sampler
        custom = loader.batch_size is None and batches is not None  # (a batch_sampler given)
        order = _in_order(batches.sampler if custom and type(batches) is BatchSampler
                          else None if custom else loader.sampler)
        if order is None:
            raise ValueError(
                f"{self.name} is a DataLoader that draws its rows at random each pass "
                f"({', '.join(type(s).__name__ for s in drawn)}: with replacement, a number "
                "of samples, weights, or through a batch sampler of its own), but validation "
                "rows are compared row by row across passes: pass one that reads the same "
                "rows each pass (shuffle=True or a SubsetRandomSampler are read in order here)")
        sampling = ({"batch_sampler": BatchSampler(order, batches.batch_size, batches.drop_last)}
                    if custom else {"batch_size": loader.batch_size, "sampler": order,
                                    "drop_last": loader.drop_last})
        fixed = copy.copy(self)
        fixed.iterable = _rebuild(loader, empty_safe=False, generator=torch.Generator(),
                                  **sampling)
        fixed.whole = self.whole if self.sharded else fixed.iterable  # (a shard: not the whole)
        fixed.in_order = False  # (errors name no Dataset item: the order is not the Dataset's)
        return fixed

    def _item(self, index: int, row: int) -> str:
        """Where row ``row`` of batch ``index`` of this source's own pass lies in the Dataset
        it reads in order (through any ``Subset``, e.g. the rows :func:`hold_out` left for
        training; under torch.distributed, past this process's shard's start), or ``""`` for
        other sources."""
        if not self.in_order or self.offset is None:
            return ""
        item, data = self.offset + index * self.batch_size + row, self.dataset
        while isinstance(data, Subset):
            item, data = int(data.indices[item]), data.dataset
        return f" (item {item} of the {type(data).__name__})"

    def _prepare(self, batch, index: int, in_order: bool = False) -> Tensor:
        """Batch ``index`` as float rows ``[n, D]`` in the model's dtype and device, checked;
        ``in_order``: it comes from this source's own pass (errors then name the item)."""
        if isinstance(batch, (tuple, list)):
            batch = batch[0]
        if not isinstance(batch, Tensor):
            raise TypeError(
                f"{self.name} batch {index} must be a tensor (or a (tensor, label) tuple), "
                f"got {type(batch).__name__}"
            )
        if batch.dim() < 1:
            raise ValueError(f"{self.name} batch {index} is a 0-d tensor")
        rows = batch.reshape(batch.shape[0], -1) if batch.dim() != 2 else batch
        if rows.shape[1] != self.n_features:
            raise ValueError(
                f"{self.name} must have {self.n_features} features per row, got batch {index} "
                f"of shape {tuple(batch.shape)}"
            )
        if not rows.is_floating_point():
            raise TypeError(
                f"{self.name} must be floating point (scale images to [0, 1] first), got "
                f"{rows.dtype} in batch {index}"
            )
        rows = rows.to(device=self.device, dtype=self.dtype)
        clean = all_not_inf(rows) if self.allow_missing else all_finite(rows)
        if not clean:
            bad = torch.isinf(rows) if self.allow_missing else ~torch.isfinite(rows)
            row, col = (int(i) for i in bad.nonzero()[0])
            hint = ("" if self.allow_missing else
                    "; to train on incomplete data with NaN marking the missing entries, set "
                    "missing='allow' (EMConfig.missing or SGDConfig.missing)")
            where = self._item(index, row) if in_order else ""
            what = ("an infinite value (NaN marks a missing entry; an observed one must be "
                    "finite)" if self.allow_missing else "non-finite values (NaN or inf)")
            raise ValueError(
                f"{self.name} contains {what}: batch {index}, row {row}{where}, feature {col}{hint}"
            )
        return rows

    def __iter__(self) -> Iterator[Tensor]:
        if self.tensor is not None:
            start, end = (distributed.shard_range(self.tensor.shape[0]) if self.sharded
                          else (0, self.tensor.shape[0]))
            for i in range(start, end, self.batch_size):
                yield self.tensor[i : min(i + self.batch_size, end)]
            return
        empty = not self.sharded  # an empty shard is fine; the sums say whether all are
        for index, batch in enumerate(self.iterable):
            empty = False
            yield self._prepare(batch, index, in_order=True)
        if empty:
            raise ValueError(f"{self.name} is empty")


def gather_rows(source: DataSource, max_rows: int, seed: int) -> Tensor:
    """Up to ``max_rows`` rows for initialisation: a seeded random subset of a tensor or of a
    sized map-style ``Dataset`` (the same rows for the same data, so a class-sorted folder
    does not initialise from its first classes), also of the one a ``DataLoader`` reads whole
    (in order or shuffled: a shuffled loader's first rows changed with torch's global seed),
    or the first ``max_rows`` rows of another stream."""
    if source.tensor is not None:
        n = source.tensor.shape[0]
        if n <= max_rows:
            return source.tensor[0:n]
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randperm(n, generator=gen)[:max_rows].to(source.device)
        return source.tensor[idx]
    if source.dataset is not None and (len(source.dataset) > max_rows or not source.in_order):
        rows = source.dataset
        if len(rows) > max_rows:
            gen = torch.Generator().manual_seed(seed)
            rows = Subset(rows, torch.randperm(len(rows), generator=gen)[:max_rows].tolist())
        loader = DataLoader(rows, batch_size=source.batch_size, generator=torch.Generator(),
                            collate_fn=RowCollate(source.n_features, source.name))
        batches = list(_rebatch(source, loader))
        if not batches:  # (torch.cat said "expected a non-empty list of Tensors")
            raise ValueError(f"{source.name} is empty (0 rows)")
        return torch.cat(batches)
    rows, count = [], 0
    # A sharded stream reads the whole data as one process would, where it can; otherwise
    # (each process's own iterable) its first rows are joined across processes in rank order.
    whole = source.sharded and source.whole is not None
    stream = _rebatch(source, source.whole) if whole else source
    for batch in stream:
        rows.append(batch)
        count += batch.shape[0]
        if count >= max_rows:
            break
    local = torch.cat(rows)[:max_rows] if rows else torch.empty(
        0, source.n_features, dtype=source.dtype, device=source.device)
    if source.sharded and not whole:
        return distributed.concat_rows(local, max_rows)
    return local


def _whole_dataset(loader: Iterable) -> Dataset | None:
    """The sized map-style Dataset a ``DataLoader`` reads every item of once, in order or
    shuffled, with the default collation (its rows are then the Dataset's); else ``None``."""
    if not isinstance(loader, DataLoader) or loader.collate_fn is not default_collate:
        return None
    data, sampler = loader.dataset, loader.sampler
    if isinstance(data, IterableDataset) or not hasattr(data, "__len__"):
        return None
    whole = isinstance(sampler, SequentialSampler) or (
        isinstance(sampler, RandomSampler) and not sampler.replacement
        and sampler.num_samples == len(data))
    return data if whole else None


def _in_order(sampler) -> Sampler | list[int] | None:
    """The indices ``sampler`` draws each pass, in a fixed order, where it draws the same
    ones each pass in a new order (``None`` where it does not)."""
    if (isinstance(sampler, RandomSampler) and not sampler.replacement
            and sampler.num_samples == len(sampler.data_source)):
        return SequentialSampler(sampler.data_source)
    if isinstance(sampler, SubsetRandomSampler):
        return sorted(int(i) for i in sampler.indices)
    if isinstance(sampler, SequentialSampler):
        return sampler
    return None


def _rebatch(source: DataSource, iterable: Iterable) -> Iterator[Tensor]:
    for index, batch in enumerate(iterable):
        yield source._prepare(batch, index)
