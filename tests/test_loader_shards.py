"""DataLoaders under torch.distributed (:mod:`mfa.loader_shards`): the checks that need no
process group (the two-process behaviour is in ``test_distributed.py``)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, RandomSampler, TensorDataset
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
