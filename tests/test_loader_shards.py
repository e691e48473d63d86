"""DataLoaders under torch.distributed (:mod:`mfa.loader_shards`): the checks that need no
process group (the two-process behaviour is in ``test_distributed.py``)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from mfa import loader_shards


def test_padding_sampler_is_refused():
    """Outside a process group nothing is sharded; the check itself is plain."""
    data = TensorDataset(torch.zeros(5, 2))
    loader = DataLoader(data, sampler=DistributedSampler(data, num_replicas=2, rank=0,
                                                         shuffle=False))
    with pytest.raises(ValueError, match="pads by repeating rows to make 5 rows 6"):
        loader_shards._check_no_padding(loader)
    dropping = DataLoader(data, sampler=DistributedSampler(data, num_replicas=2, rank=0,
                                                           shuffle=False, drop_last=True))
    with pytest.raises(ValueError, match="drops rows to make 5 rows 4"):
        loader_shards._check_no_padding(dropping)
    even = TensorDataset(torch.zeros(6, 2))
    loader_shards._check_no_padding(DataLoader(even, sampler=DistributedSampler(
        even, num_replicas=2, rank=0)))  # 3 + 3 rows: nothing padded or dropped


def test_a_loader_whose_epoch_is_not_every_row_once_is_refused_for_em():
    data = TensorDataset(torch.zeros(10, 2))
    with pytest.raises(ValueError, match="drop_last=True drops the last 2 of its 10 rows"):
        loader_shards._check_every_row_once(DataLoader(data, batch_size=4, drop_last=True))
    drawn = RandomSampler(data, replacement=True, num_samples=6)
    with pytest.raises(ValueError, match="draws 6 of 10 rows with replacement"):
        loader_shards._check_every_row_once(DataLoader(data, batch_size=4, sampler=drawn))
    # every row once: drop_last with batches that divide the rows drops nothing
    loader_shards._check_every_row_once(DataLoader(data, batch_size=5, drop_last=True))
    loader_shards._check_every_row_once(DataLoader(data, batch_size=4, shuffle=True))


def test_padding_sampler_inside_a_batch_sampler_is_refused():
    """A DistributedSampler wrapped in a BatchSampler: the loader's own sampler is the default
    sequential one, and the padding passed unnoticed (302 rows summed for 301)."""
    data = TensorDataset(torch.zeros(301, 2))
    inner = DistributedSampler(data, num_replicas=2, rank=0, shuffle=False)
    loader = DataLoader(data, batch_sampler=BatchSampler(inner, 32, drop_last=False))
    with pytest.raises(ValueError, match="pads by repeating rows to make 301 rows 302"):
        loader_shards._check_no_padding(loader)
    even = TensorDataset(torch.zeros(300, 2))
    loader_shards._check_no_padding(DataLoader(even, batch_sampler=BatchSampler(
        DistributedSampler(even, num_replicas=2, rank=0), 32, drop_last=False)))


def _opened(worker_id):  # (module level: worker processes pickle it)
    torch.utils.data.get_worker_info().dataset.handle = worker_id


class _NeedsHandle(Dataset):
    """A dataset that opens its handle in worker_init_fn, as HDF5/LMDB readers do."""

    handle = None

    def __len__(self):
        return 6

    def __getitem__(self, index):
        if self.handle is None:
            raise RuntimeError("worker_init_fn was not run: no handle")
        return torch.full((2,), float(index))


def test_a_remade_loader_keeps_the_loaders_settings():
    """_rebuild (the loader each process reads under torch.distributed) kept only workers,
    collation, pinning and the generator: a dataset opened in worker_init_fn failed."""
    generator = torch.Generator().manual_seed(0)
    loader = DataLoader(_NeedsHandle(), batch_size=4, num_workers=1, worker_init_fn=_opened,
                        persistent_workers=True, prefetch_factor=3, timeout=30.0,
                        generator=generator)
    remade = loader_shards._rebuild(loader, batch_size=2, sampler=[0, 1, 2])
    for name in ("num_workers", "worker_init_fn", "persistent_workers", "prefetch_factor",
                 "timeout", "generator", "pin_memory", "multiprocessing_context"):
        assert getattr(remade, name) == getattr(loader, name), name
    rows = torch.cat(list(remade))
    assert rows[:, 0].tolist() == [0.0, 1.0, 2.0]
    no_workers = loader_shards._rebuild(DataLoader(TensorDataset(torch.zeros(3, 2))),
                                        batch_size=2, sampler=[0, 1, 2])
    assert no_workers.num_workers == 0 and not no_workers.persistent_workers


def test_a_random_sampler_of_fewer_rows_without_replacement_is_refused_for_em():
    """num_samples below the rows drops some each epoch, with or without replacement."""
    data = TensorDataset(torch.zeros(10, 2))
    drawn = RandomSampler(data, num_samples=6)
    with pytest.raises(ValueError, match=r"draws 6 of 10 rows; pass a DataLoader"):
        loader_shards._check_every_row_once(DataLoader(data, batch_size=4, sampler=drawn))


def test_a_remade_loader_keeps_its_in_order_setting():
    loader = DataLoader(TensorDataset(torch.zeros(3, 2)), batch_size=2, in_order=False)
    remade = loader_shards._rebuild(loader, batch_size=2, sampler=[0, 1, 2])
    assert remade.in_order is False


def test_an_empty_part_of_a_global_batch_is_shaped_like_the_datasets_items():
    """A rank whose part of a global batch is empty gets zero rows of each field, in the
    type the collation gives (a tensor, a list of tensors, a namedtuple)."""
    from collections import namedtuple

    pixels, labels = torch.arange(12.0).reshape(4, 3), torch.arange(4)
    plain = loader_shards._EmptySafeCollate(torch.utils.data.default_collate, pixels)
    assert plain([]).shape == (0, 3) and plain([pixels[0]]).shape == (1, 3)
    pairs = TensorDataset(pixels, labels)
    empty = loader_shards._EmptySafeCollate(torch.utils.data.default_collate, pairs)([])
    assert [tuple(part.shape) for part in empty] == [(0, 3), (0,)]
    Item = namedtuple("Item", ["x", "y"])

    class Named(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            return Item(pixels[index], labels[index])

    empty = loader_shards._EmptySafeCollate(torch.utils.data.default_collate, Named())([])
    assert type(empty) is Item and empty.x.shape == (0, 3) and empty.y.shape == (0,)


def test_per_process_loaders_yielding_different_batch_counts_are_refused(monkeypatch):
    """The counts come from one all-reduce (stood in for here): equal ones pass, any spread
    is refused, naming it."""
    monkeypatch.setattr(loader_shards, "range_across_processes", lambda count: (4.0, 4.0))
    loader_shards.check_same_batch_count(4)
    monkeypatch.setattr(loader_shards, "range_across_processes", lambda count: (3.0, 5.0))
    with pytest.raises(ValueError, match=r"yield between 3 and 5 \(this process: 5\)"):
        loader_shards.check_same_batch_count(5)


def test_a_loader_of_ready_batches_is_not_a_whole_dataset_loader():
    """batch_size=None: each item is a batch already, which mfa cannot re-split by rows."""
    data = TensorDataset(torch.zeros(4, 2))
    assert loader_shards.reads_whole_dataset(DataLoader(data, batch_size=2))
    assert loader_shards.reads_whole_dataset(DataLoader(data, batch_size=2, shuffle=True))
    assert not loader_shards.reads_whole_dataset(DataLoader(data, batch_size=None))
    assert not loader_shards.reads_whole_dataset([torch.zeros(4, 2)])
