"""The helpers of :mod:`mfa.distributed` one at a time: single-process checks of the launch,
the timeout, the error wrapping and the samplers, and one short two-process gloo job for the
collectives (each compared with a hand count or a single-process autograd reference).
"""

from __future__ import annotations

import logging
import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import distributed as dist
from torch.utils.data import BatchSampler, SequentialSampler, TensorDataset

from mfa import MixtureOfFactorAnalyzers, distributed
from mfa._data_stream import DataSource
from mfa.em import EMTrainer

WORLD = 2


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


# ---------------------------------------------------------------------- collectives


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows(rank: int) -> torch.Tensor:
    """Rank 0: 3 rows, rank 1: 4 rows (values name their rank and row)."""
    n = 3 + rank
    return torch.arange(n * 2, dtype=torch.float64).reshape(n, 2) + 100.0 * rank


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    """A global batch of 5 rows and a weight vector: the per-row losses of a tiny model."""
    g = torch.Generator().manual_seed(0)
    return (torch.randn(5, 3, generator=g, dtype=torch.float64),
            torch.randn(3, generator=g, dtype=torch.float64))


def _losses(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((x @ w - 1.0) ** 2 + b.sum()).reshape(-1)


def _collectives_job(rank: int) -> dict:
    out: dict = {}
    out["sum"] = distributed.sum_across_processes(rank + 1, 0.25)
    out["range"] = distributed.range_across_processes(5.0 * rank - 2.0)
    local = _rows(rank)
    out["concat"] = {max_rows: distributed.concat_rows(local, max_rows)
                     for max_rows in (2, 3, 5, 100)}
    out["concat_empty_first"] = distributed.concat_rows(local if rank else local[:0], 100)
    model = torch.nn.Linear(3, 2).double()
    with torch.no_grad():
        model.weight.fill_(float(rank + 1))
        model.bias.fill_(-float(rank + 1))
    model.register_buffer("scale", torch.full((2,), 10.0 * (rank + 1)))
    distributed.broadcast_model(model)
    out["model"] = {k: v.clone() for k, v in model.state_dict().items()}
    out["main"] = distributed.broadcast_from_main(lambda: ("from", rank))

    def fail():
        if rank == 0:
            raise KeyError("no such run folder")
        return "rank 1 computed it"

    try:
        out["main_error"] = ("ok", distributed.broadcast_from_main(fail))
    except Exception as error:  # recorded for the test
        out["main_error"] = (type(error).__name__, str(error))
    # The gradient of the mean loss over a global batch of 5 rows, split 2 + 3 (one frozen
    # parameter, which gets none).
    x, w0 = _batch()
    start, end = distributed.shard_range(5)
    w = w0.clone().requires_grad_(True)
    b = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    frozen = torch.ones(2, dtype=torch.float64)
    loss, rows = distributed.backward_mean(_losses(x[start:end], w, b), [w, b, frozen])
    out["backward"] = (loss, rows, w.grad.clone(), b.grad.clone(), frozen.grad)
    # check_same_rows: equal tensors pass; tensors equal in rows 0 and n-1 but not in the
    # middle row, or of other sizes, are refused.
    same = torch.arange(12.0).reshape(6, 2)
    middle = same.clone()
    middle[3] += rank
    shorter = same[: 6 - rank]
    missing = same.clone()  # the same rows with missing entries (NaN) in each compared row
    missing[[0, 3, 5], 1] = float("nan")
    for case, check in (("same", lambda: distributed.check_same_rows(same, "data")),
                        ("middle", lambda: distributed.check_same_rows(middle, "data")),
                        ("shorter", lambda: distributed.check_same_rows(shorter, "data")),
                        ("middle_dataset", lambda: distributed.check_same_dataset(
                            TensorDataset(middle), "the DataLoader's Dataset")),
                        ("missing", lambda: distributed.check_same_rows(missing, "data")),
                        ("missing_dataset", lambda: distributed.check_same_dataset(
                            TensorDataset(missing), "the DataLoader's Dataset"))):
        try:
            check()
            out[case] = "accepted"
        except ValueError as error:
            out[case] = str(error)
    # A pass over per-process iterables that are empty on every process: no sums over no rows.
    model = MixtureOfFactorAnalyzers(2, 3, 1, generator=torch.Generator().manual_seed(0))
    for case, temperature in (("empty_pass", None), ("empty_tempered_pass", [1.0, 2.0])):
        try:
            args = () if temperature is None else ("auto", temperature)
            EMTrainer.e_step(model, DataSource([], model, 8, shard=True), *args)
            out[case] = "summed"
        except ValueError as error:
            out[case] = str(error)
    return out


def _entry(rank: int, port: int, job: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=20))
    try:
        torch.save(globals()[job](rank), Path(out_dir) / f"{job}-{rank}.pt")
    finally:
        distributed.shutdown()


@pytest.fixture(scope="module")
def collectives(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("collectives")
    context = mp.start_processes(_entry, args=(_free_port(), "_collectives_job", str(out_dir)),
                                 nprocs=WORLD, start_method="fork", join=False)
    deadline = time.monotonic() + 60.0
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the collectives job did not finish in 60 s")
    return [torch.load(out_dir / f"_collectives_job-{r}.pt", weights_only=False)
            for r in range(WORLD)]


def test_sums_and_ranges_over_processes(collectives):
    for rank in collectives:
        assert rank["sum"] == [3.0, 0.5]  # 1 + 2, 0.25 + 0.25
        assert rank["range"] == (-2.0, 3.0)  # min and max of -2 and 3


def test_concat_rows_takes_the_first_rows_in_rank_order(collectives):
    both = torch.cat([_rows(0), _rows(1)])  # 3 + 4 rows
    for rank in collectives:
        for max_rows, got in rank["concat"].items():
            assert torch.equal(got, both[:max_rows]), max_rows
        assert torch.equal(rank["concat_empty_first"], _rows(1))  # rank 0 had none


def test_broadcast_model_copies_rank_zeros_parameters_and_buffers(collectives):
    for rank in collectives:
        model = rank["model"]
        assert torch.equal(model["weight"], torch.ones(2, 3, dtype=torch.float64))
        assert torch.equal(model["bias"], -torch.ones(2, dtype=torch.float64))
        assert torch.equal(model["scale"], torch.full((2,), 10.0))


def test_broadcast_from_main_sends_rank_zeros_result_and_error(collectives):
    assert [r["main"] for r in collectives] == [("from", 0), ("from", 0)]
    # rank 0 raises its own error; the other learns of it by name (and takes no result)
    assert collectives[0]["main_error"] == ("KeyError", "'no such run folder'")
    assert collectives[1]["main_error"] == (
        "DistributedError", "rank 0 failed: KeyError: 'no such run folder'")


def test_backward_mean_is_the_single_process_gradient_of_the_global_mean(collectives):
    x, w0 = _batch()
    w = w0.clone().requires_grad_(True)
    b = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    want = _losses(x, w, b).mean()
    want.backward()
    for rank in collectives:
        loss, rows, w_grad, b_grad, frozen_grad = rank["backward"]
        assert rows == 5
        assert loss.item() == pytest.approx(want.item(), rel=1e-14)
        assert torch.allclose(w_grad, w.grad, rtol=1e-14, atol=0)
        assert torch.allclose(b_grad, b.grad, rtol=1e-14, atol=0)
        assert frozen_grad is None


def test_check_same_rows_compares_the_first_middle_and_last_rows(collectives):
    for rank in collectives:
        assert rank["same"] == "accepted"
        assert rank["middle"].startswith("data differs between the processes (6 to 6 rows")
        assert rank["shorter"].startswith("data differs between the processes (5 to 6 rows")
        assert rank["middle_dataset"].startswith(
            "the DataLoader's Dataset differs between the processes (6 to 6 rows")
        # missing entries (NaN) in the same rows are the same rows
        assert rank["missing"] == rank["missing_dataset"] == "accepted"


def test_a_pass_over_no_rows_on_every_process_is_refused(collectives):
    for rank in collectives:
        for case in ("empty_pass", "empty_tempered_pass"):
            assert rank[case] == "the data is empty on all 2 processes", case
