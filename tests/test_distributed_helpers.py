"""The helpers of :mod:`mfa.distributed` one at a time: single-process checks of the launch,
the timeout, the error wrapping and the samplers.
"""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest
import torch
from torch.utils.data import BatchSampler, SequentialSampler

from mfa import distributed

# ---------------------------------------------------------------------- launch and timeout


@pytest.mark.parametrize("env, launched", [
    ({}, False),
    ({"RANK": "0"}, False),  # no WORLD_SIZE: one process
    ({"RANK": "0", "WORLD_SIZE": "1"}, False),  # torchrun --nproc-per-node 1
    ({"RANK": "1", "WORLD_SIZE": "2"}, True),
    ({"WORLD_SIZE": "2"}, False),  # no RANK: not a launch
])
def test_a_multi_process_launch_needs_a_rank_and_more_than_one_process(monkeypatch, env,
                                                                      launched):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert distributed.launched_by_torchrun() is launched


@pytest.fixture
def fake_group(monkeypatch):
    """init_from_env on a torchrun environment without CUDA, recording what it passes to
    ``init_process_group`` (no group is made)."""
    calls: list = []
    monkeypatch.setattr(distributed, "launched_by_torchrun", lambda: True)
    monkeypatch.setattr(distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda backend, timeout: calls.append((backend, timeout)))
    monkeypatch.setattr(distributed, "get_rank", lambda: 0)
    monkeypatch.setattr(distributed, "get_world_size", lambda: 2)
    monkeypatch.delenv("MFA_DIST_TIMEOUT", raising=False)
    return calls


def test_the_process_groups_timeout_is_ten_minutes_the_environments_or_the_arguments(
        fake_group, monkeypatch):
    """docs/distributed.md: 10 minutes by default, else MFA_DIST_TIMEOUT seconds, else
    init_from_env's timeout= (which wins over the environment)."""
    assert distributed.init_from_env() is True
    monkeypatch.setenv("MFA_DIST_TIMEOUT", "90")
    assert distributed.init_from_env() is True
    assert distributed.init_from_env(timeout=timedelta(seconds=5)) is True
    assert fake_group == [("gloo", timedelta(seconds=600)), ("gloo", timedelta(seconds=90)),
                          ("gloo", timedelta(seconds=5))]


def test_an_existing_process_group_is_kept(fake_group, monkeypatch):
    monkeypatch.setattr(distributed, "is_initialized", lambda: True)
    assert distributed.init_from_env() is False
    assert fake_group == []


@pytest.mark.parametrize("text", ["0", "0.0", "nan", "-inf"])
def test_a_timeout_of_zero_or_nan_seconds_is_refused_by_name(monkeypatch, text):
    monkeypatch.setenv("MFA_DIST_TIMEOUT", text)
    with pytest.raises(ValueError, match="MFA_DIST_TIMEOUT must be positive"):
        distributed._timeout()


def test_shutdown_of_a_broken_group_logs_its_error(monkeypatch, caplog):
    """cli_fit shuts the group down in a ``finally``: a raise there hid the run's own error."""
    destroyed = []

    def broken():
        destroyed.append(1)
        raise RuntimeError("connection closed by peer")

    monkeypatch.setattr(distributed.dist, "destroy_process_group", broken)
    distributed.shutdown()  # no group: nothing to destroy
    assert destroyed == []
    monkeypatch.setattr(distributed, "is_initialized", lambda: True)
    with caplog.at_level(logging.WARNING, logger="mfa.distributed"):
        distributed.shutdown()
    assert destroyed == [1]
    assert "destroying the process group failed: connection closed by peer" in caplog.text


def test_a_failed_collective_names_the_operation_and_this_rank():
    error = RuntimeError("Connection reset by peer\n")
    with pytest.raises(distributed.DistributedError) as caught:
        with distributed._collective("the all-reduce of a sum"):
            raise error
    assert str(caught.value).startswith("rank 0 of 1: the all-reduce of a sum failed; another "
                                        "process has probably crashed")
    assert str(caught.value).endswith("RuntimeError: Connection reset by peer")
    assert caught.value.__cause__ is error
    # A DistributedError passes unchanged; errors that are no collective's are not wrapped.
    inner = distributed.DistributedError("rank 0 failed: ValueError: bad")
    for raised in (inner, ValueError("bad config"), KeyError("x")):
        with pytest.raises(type(raised)) as caught:
            with distributed._collective("the broadcast of f"):
                raise raised
        assert caught.value is raised


# ---------------------------------------------------------------------- samplers


def test_shard_sampler_length_is_its_rows_and_a_bool_is_no_count():
    for n, world in ((7, 2), (7, 3), (2, 3), (0, 2)):
        for rank in range(world):
            sampler = distributed.ShardSampler(n, rank, world)
            assert len(sampler) == len(list(sampler))
    assert [len(distributed.ShardSampler(7, r, 3)) for r in range(3)] == [2, 2, 3]
    with pytest.raises(TypeError, match="number of rows or a sized dataset, got bool"):
        distributed.ShardSampler(True, 0, 1)


def test_shard_batch_is_this_ranks_contiguous_part(monkeypatch):
    monkeypatch.setattr(distributed, "get_world_size", lambda: 2)
    batch = torch.tensor([9, 4, 7, 1, 3])
    parts = []
    for rank in range(2):
        monkeypatch.setattr(distributed, "get_rank", lambda rank=rank: rank)
        parts.append(distributed.shard_batch(batch).tolist())
    assert parts == [[9, 4], [7, 1, 3]]


class _EpochSampler(SequentialSampler):
    """A sampler that records ``set_epoch`` (as DistributedSampler has it)."""

    def __init__(self, data):
        super().__init__(data)
        self.epochs: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)


def test_shard_batch_sampler_has_the_global_batch_count_and_passes_set_epoch_on():
    inner = _EpochSampler(range(9))
    batches = distributed.ShardBatchSampler(BatchSampler(inner, 4, drop_last=False), 1, 3)
    assert len(batches) == 3 == len(list(batches))  # 9 rows in batches of 4: 4, 4, 1
    assert list(batches) == [[1], [5], []]
    batches.set_epoch(4)
    assert inner.epochs == [4]
    direct = _EpochSampler(range(3))  # a batch sampler that has set_epoch itself
    distributed.ShardBatchSampler(direct, 0, 2).set_epoch(2)
    assert direct.epochs == [2]
    distributed.ShardBatchSampler(BatchSampler(range(3), 2, False), 0, 2).set_epoch(1)
