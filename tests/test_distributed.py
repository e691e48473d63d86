"""Data-parallel EM and Adam on torch.distributed (mfa.distributed), on CPU with gloo.

Two processes are spawned on 127.0.0.1 and their models are compared with single-process
fits of the same data and seed: EM equal to 1e-10 (the all-reduced float64 sums differ only
in their order of addition), Adam to 1e-6; resumed equal to uninterrupted; the torchrun
launch of ``mfa train``; and a crashed rank that must not leave the other waiting forever.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import traceback
import warnings
from collections import namedtuple
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import distributed as dist
from torch.utils.data import BatchSampler, DataLoader, TensorDataset

from mfa import MixtureOfFactorAnalyzers, distributed, training
from mfa._data_stream import DataSource
from mfa.checkpoint import load_checkpoint
from mfa.cli import main
from mfa.data import QuantizedRows
from mfa.em import EMConfig, EMTrainer
from mfa.hierarchical import HierarchicalConfig, HierarchicalTrainer
from mfa.hierarchical_run import HierarchicalRunTrainer
from mfa.metrics import mean_log_likelihood
from mfa.sgd import SGDConfig, SGDTrainer
from mfa.tempering import MIN_ROWS

pytestmark = pytest.mark.filterwarnings("ignore::mfa.training.ConvergenceWarning")

ROOT = Path(__file__).resolve().parent.parent
WORLD = 2


# ---------------------------------------------------------------------- scenarios


def _data() -> torch.Tensor:
    """301 float64 rows (odd: the shards differ in size) from two shifted clusters."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(301, 6, generator=g, dtype=torch.float64)
    x[:150] += 3.0
    x[:, :2] *= 2.0
    return x


def _model() -> MixtureOfFactorAnalyzers:
    return MixtureOfFactorAnalyzers(3, 6, 2, generator=torch.Generator().manual_seed(1)).double()


def _params(model) -> dict:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


class _Stop(Exception):
    """Ends a fit from a callback, as a kill after that iteration's checkpoint would."""


def _em(max_iter: int, data, validation, n_init: int = 1, trainer_state=None, params=None,
        saves: list | None = None, stop_after: int | None = None):
    model = _model()
    if params is not None:
        model.load_state_dict(params)
    trainer = EMTrainer(EMConfig(max_iter=max_iter, batch_size=32, tol=0.0, n_init=n_init,
                                 kmeans_iter=5, complete_iter=2, checkpoint_every=1,
                                 progress=False))
    if trainer_state is not None:
        trainer.load_state_dict(trainer_state)

    def save(trainer_, model_):
        if saves is not None:
            saves.append((trainer_.state_dict(), _params(model_)))

    def stop(trainer_, model_, record):
        if stop_after is not None and record["iteration"] == stop_after:
            raise _Stop

    try:
        trainer.fit(model, data, validation, callbacks=[stop], checkpoint_fn=save)
    except _Stop:
        return None
    return _params(model), trainer.history


def _adam(epochs: int, data, trainer_state=None, params=None, saves: list | None = None,
          validation=None):
    model = _model()
    if params is not None:
        model.load_state_dict(params)
    trainer = SGDTrainer(SGDConfig(epochs=epochs, batch_size=30, lr=1e-2, patience=2,
                                   kmeans_iter=5, complete_iter=2, checkpoint_every=1,
                                   progress=False))
    if trainer_state is not None:
        trainer.load_state_dict(trainer_state)

    def save(trainer_, model_):
        if saves is not None:
            saves.append((trainer_.state_dict(), _params(model_)))

    trainer.fit(model, data, validation, checkpoint_fn=save)
    return _params(model), trainer.history


def _scenarios() -> dict:
    """Every fit compared below; run alike by one process and by each of two."""
    x = _data()
    train, val = x[:251], x[251:]
    out = {
        "em_tensor": _em(6, train, val),
        "em_dataset": _em(6, TensorDataset(train), TensorDataset(val), n_init=2),
        "em_loader": _em(4, DataLoader(TensorDataset(train), batch_size=40), val),
        "adam_tensor": _adam(4, x),
        "adam_dataset": _adam(4, TensorDataset(x)),
        # A shuffled loader: the start's pass (one EM step, s₀ chosen on validation) moved
        # its generator by one permutation on one process and by none on two, so every
        # epoch's order differed (parameters 1e-2 apart).
        "adam_loader": _adam(4, DataLoader(TensorDataset(train), batch_size=30, shuffle=True,
                                           generator=torch.Generator().manual_seed(3)),
                             validation=val),
        # drop_last=True: refused by the initialisation's every-row-once check for EM.
        "adam_loader_drop_last": _adam(
            4, DataLoader(TensorDataset(train), batch_size=40, shuffle=True, drop_last=True,
                          generator=torch.Generator().manual_seed(4)), validation=val),
    }
    # uint8 rows made float per batch: sharded by rows as a tensor is
    pixels = ((x - x.min()) / (x.max() - x.min()) * 255).round().to(torch.uint8)
    rows = QuantizedRows(pixels, dequantize=True, seed=0)
    out["em_quantized"] = _em(6, rows.subset(torch.arange(251)),
                              rows.subset(torch.arange(251, 301)))
    out["adam_quantized"] = _adam(4, rows)
    # One row: rank 0's shard is empty, its statistics are the sums over no rows.
    model = _model()
    stats = EMTrainer.e_step(model, DataSource(train[:1], model, 32, shard=True))
    out["stats_one_row"] = {name: value for name, value in vars(stats).items()}
    # Several temperatures in one pass: one all-reduce each, the empty shard's included.
    out["stats_tempered"] = [
        {name: value for name, value in vars(part).items()}
        for rows in (train[:1], train)
        for part in EMTrainer.e_step(model, DataSource(rows, model, 32, shard=True), "auto",
                                     [1.0, 30.0])]
    out["val_one_row"] = EMTrainer.evaluate(model, DataSource(val[:1], model, 32, shard=True))
    # Interrupted after 3 iterations / 2 epochs (killed after that checkpoint), then resumed
    # on every rank from rank 0's saved state.
    saves: list = []
    _em(6, train, val, saves=saves, stop_after=3)  # saves[2]: the checkpoint of iteration 3
    state, params = _exchange(saves[2] if saves else None)
    out["em_resumed"] = _em(6, train, val, trainer_state=state, params=params)
    out["em_saves"] = len(saves)
    saves = []
    _adam(2, x, saves=saves)  # saves[1]: the checkpoint of epoch 2
    state, params = _exchange(saves[1] if saves else None)
    out["adam_resumed"] = _adam(4, x, trainer_state=state, params=params)
    return out


def _exchange(value):
    """Rank 0's ``value`` on every rank (a checkpoint read back by all of them)."""
    return distributed.broadcast_from_main(lambda: value)


# ---------------------------------------------------------------------- process harness


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, job: str, out_dir: str, timeout_s: float):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    try:
        result = globals()[job](rank)
        torch.save(result, Path(out_dir) / f"{job}-{rank}.pt")
    finally:
        distributed.shutdown()


def _spawn(job: str, out_dir: Path, timeout_s: float = 30.0, limit_s: float = 90.0) -> list:
    """Run ``job`` in ``WORLD`` processes; fail (not hang) if they take over ``limit_s``.

    Forked, not spawned: a spawned child re-imports torch (~3 s here) and builds Adam's
    machinery again (~3 s); the children set one intra-op thread before any work.
    """
    context = mp.start_processes(_entry, args=(WORLD, _free_port(), job, str(out_dir),
                                               timeout_s),
                                 nprocs=WORLD, start_method="fork", join=False)
    deadline = time.monotonic() + limit_s
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{job}: the {WORLD} processes did not finish in {limit_s} s")
    return [torch.load(out_dir / f"{job}-{rank}.pt", weights_only=False)
            for rank in range(WORLD)]


def _scenarios_job(rank: int) -> dict:
    return _scenarios()


def _crash_job(rank: int) -> dict:
    """Rank 1 fails in its second EM iteration and stays alive (the worst case: its socket
    stays open); rank 0 must give up within the process group's timeout."""
    x = _data()

    def fail(trainer, model, record):
        if rank == 1 and record["iteration"] == 1:
            raise ValueError("rank 1 broke down")

    started = time.perf_counter()
    try:
        EMTrainer(EMConfig(max_iter=20, batch_size=64, tol=0.0, kmeans_iter=2,
                           complete_iter=0, progress=False)).fit(_model(), x, callbacks=[fail])
    except Exception as error:  # recorded for the test
        result = {"type": type(error).__name__, "message": str(error),
                  "seconds": time.perf_counter() - started}
        if rank == 1:
            time.sleep(4.0)  # alive and silent: rank 0 must not wait for it
        return result
    return {"type": None, "message": "", "seconds": time.perf_counter() - started,
            "trace": traceback.format_stack()}


def _hierarchical_job(rank: int) -> dict:
    """A hierarchical fit into one checkpoint folder, then the same fit resumed from it: the
    stage files each rank wrote, each stage's "resumed" flag and the model, per attempt."""
    import mfa.hierarchical as hierarchical

    writes: list[str] = []
    save = hierarchical.save_checkpoint

    def spy(path, *args, **kwargs):
        writes.append(Path(path).name)
        return save(path, *args, **kwargs)

    hierarchical.save_checkpoint = spy
    em = EMConfig(max_iter=3, batch_size=64, kmeans_iter=3, complete_iter=1, progress=False,
                  patience=0)
    config = HierarchicalConfig(root_components=2, n_factors=2, rows_per_component=60,
                                max_child_components=2, root_em=em, child_em=em)
    out = {}
    for attempt in ("fresh", "resumed"):
        trainer = HierarchicalTrainer(config)
        model = trainer.fit(_data(), checkpoint_dir=Path(os.environ["MFA_TEST_HIERARCHY"]))
        out[attempt] = (list(writes), [r["resumed"] for r in trainer.history], _params(model))
        writes.clear()
    return out


def _sharded_reseed(val_rows: int):
    """EM with re-seeding rounds over per-process loaders of train and validation rows (what
    docs/distributed.md recommends): ``(parameters, [(run, iteration)])``."""
    x = _data()
    train, val = TensorDataset(x[:240]), TensorDataset(x[240:240 + val_rows])
    loaders = [DataLoader(d, batch_size=32, sampler=distributed.ShardSampler(d))
               for d in (train, val)]
    model = MixtureOfFactorAnalyzers(4, 6, 2, generator=torch.Generator().manual_seed(1)).double()
    trainer = EMTrainer(EMConfig(max_iter=15, batch_size=32, kmeans_iter=5, complete_iter=2,
                                 progress=False, patience=2, reseed_rounds=3, tol=0.0))
    trainer.fit(model, *loaders)
    return _params(model), [(r["run"], r["iteration"]) for r in trainer.history]


def _digits_7x7(n: int = 600) -> torch.Tensor:
    """The embedded digits pooled to 7 × 7, float64 (the tempered step pays there)."""
    from mfa.data.sources.embedded import embedded_mnist_pools

    images = embedded_mnist_pools().images["all"][:n].double() / 255
    return torch.nn.functional.avg_pool2d(images, 4).reshape(n, 49)


def _tempered_over_shuffled_validation() -> tuple:
    """A default fit whose validation is each process's own loader of its rows with a
    SubsetRandomSampler (one process: all 60): ``(tempered step, parameters)``."""
    from torch.utils.data import SubsetRandomSampler

    x = _digits_7x7()
    start, end = distributed.shard_range(60)
    validation = DataLoader(TensorDataset(x[540:]), batch_size=16, sampler=SubsetRandomSampler(
        range(start, end), generator=torch.Generator().manual_seed(7)))
    model = MixtureOfFactorAnalyzers(8, 49, 2, generator=torch.Generator().manual_seed(1))
    model = model.double()
    trainer = EMTrainer(EMConfig(progress=False))
    trainer.fit(model, x[:540], validation)
    return trainer.tempered, _params(model)


class _Noisy(torch.utils.data.Dataset):
    """Rows with fresh noise at every read (dequantisation done per access)."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i] + 1e-3 * torch.rand(self.rows.shape[1], dtype=self.rows.dtype)


class _Dicts(_Noisy):
    def __getitem__(self, i):
        return {"x": self.rows[i]}


class _Flipped(_Noisy):
    """Rows reversed with probability ½ at every read (a random augmentation)."""

    def __getitem__(self, i):
        return self.rows[i].flip(0) if torch.rand(()) < 0.5 else self.rows[i]


def _read_flipped(rows, seed: int) -> int:
    """The rows this process reads of a sharded loader over ``_Flipped(rows)``."""
    torch.manual_seed(seed)
    return sum(b.shape[0] for b in DataSource(DataLoader(_Flipped(rows), batch_size=8),
                                              _model(), 8, "data", shard=True))


def _check_own_rows(x, rank: int, nan_row: int) -> str:
    """check_same_dataset of a Dataset of this process's own 10 rows, one NaN in row
    ``nan_row``: "refused" or "accepted"."""
    rows = x[10 * rank:10 * (rank + 1)].clone()
    rows[nan_row, 1] = float("nan")
    try:
        distributed.check_same_dataset(TensorDataset(rows), "the DataLoader's Dataset")
    except ValueError:
        return "refused"
    return "accepted"


def _stack_dicts(items):
    return torch.stack([item["x"] for item in items])


def _edges_job(rank: int) -> dict:
    """Review cases under two processes, each recorded (not raised) for the tests below."""
    x = _data()
    out = {}

    class Recording(SGDTrainer):
        seen: list = []

        @staticmethod
        def penalty(model, prior, n_train):
            Recording.seen.append(n_train)
            return SGDTrainer.penalty(model, prior, n_train)

    # Adam with a prior on each process's own rows (150 and 151): the penalty's 1/N was
    # 1/150 on one process and 1/151 on the other, and their parameters drifted apart.
    data = TensorDataset(x)
    loader = DataLoader(data, batch_size=31, sampler=distributed.ShardSampler(data))
    model = _model()
    Recording(SGDConfig(epochs=2, batch_size=31, lr=1e-2, patience=0, kmeans_iter=3,
                        complete_iter=1, progress=False, noise_prior_strength=50.0,
                        noise_prior_variance=1.0)).fit(model, loader, x[:40])
    out["adam_prior"] = (sorted(set(Recording.seen)), _params(model))
    # The same batches through a batch_sampler of the process's shard: its loader's
    # `sampler` is a default one over the whole Dataset, and the prior counted 602 rows.
    Recording.seen = []
    batches = DataLoader(data, batch_sampler=BatchSampler(distributed.ShardSampler(data), 31,
                                                          False))
    model = _model()
    Recording(SGDConfig(epochs=2, batch_size=31, lr=1e-2, patience=0, kmeans_iter=3,
                        complete_iter=1, progress=False, noise_prior_strength=50.0,
                        noise_prior_variance=1.0)).fit(model, batches, x[:40])
    out["adam_prior_batch_sampler"] = (sorted(set(Recording.seen)), _params(model))
    # A batch of no rows on every process at one step (each process its own list of
    # batches): a momentum step on zero gradients moved the parameters, and as the first
    # batch its loss (-0) became the divergence reference.
    mine = x[150 * rank:150 * (rank + 1)].float()
    empty = {}
    for case, parts in {"with": [mine[:0], mine[:40], mine[40:40], mine[40:]],
                        "without": [mine[:40], mine[40:]]}.items():
        fitted = SGDTrainer(SGDConfig(epochs=2, progress=False, seed=0, kmeans_iter=3,
                                      complete_iter=1, schedule="constant")).fit(
            MixtureOfFactorAnalyzers(3, 6, 2, generator=torch.Generator().manual_seed(1)),
            parts)
        empty[case] = _params(fitted)
    out["adam_empty_global_batch"] = empty
    # The run's hierarchical trainer: rank 0 alone writes the run's checkpoint (every rank
    # wrote it, racing for one file).
    written: list[int] = []
    em = EMConfig(max_iter=2, batch_size=64, kmeans_iter=3, complete_iter=1, progress=False,
                  patience=0)
    HierarchicalRunTrainer(HierarchicalConfig(
        root_components=3, n_factors=2, rows_per_component=60, max_child_components=2,
        root_em=em, child_em=em)).fit(_model(), x, checkpoint_fn=lambda *_: written.append(1))
    out["hierarchical_run_checkpoints"] = len(written)
    for case, fit in {
        # drop_last: single-process EM sums 240 of 251 rows; the shards summed all 251
        "em_drop_last": lambda: _em(2, DataLoader(TensorDataset(x[:251]), batch_size=40,
                                                  drop_last=True), x[251:]),
        # 5 batches of 30 on one process, 6 on the other: gloo aborted the process
        "adam_unequal": lambda: SGDTrainer(SGDConfig(epochs=1, batch_size=30, progress=False,
                                                     kmeans_iter=2, complete_iter=0)).fit(
            _model(), DataLoader(data, batch_size=30, sampler=distributed.ShardSampler(data))),
        # re-seeding rounds judged the components on rank 0's validation rows alone (results
        # 0.7-1.4 apart from one process's), and failed where its shard was empty
        "em_sharded_reseed": lambda: _sharded_reseed(61),
        "em_sharded_reseed_one_val_row": lambda: _sharded_reseed(1),
        # one validation row: rank 0's shard is empty; its tempered step failed on no batches
        "tempered_one_val_row": lambda: EMTrainer(EMConfig(
            max_iter=3, batch_size=32, kmeans_iter=2, complete_iter=0, progress=False)).fit(
            _model(), x[:60], x[60:61]).weights.tolist(),
        # each process its own tensor (rows 0-149, 150-299): each kept half of its own
        "em_own_tensor": lambda: _em(2, x[150 * rank:150 * (rank + 1)], None),
        "adam_own_tensor": lambda: _adam(1, x[150 * rank:150 * (rank + 1)]),
        # each process a loader over a Dataset of its own rows: re-made over its shard of
        # "the" Dataset, each read half of its own rows, silently
        "em_own_loader": lambda: _em(2, DataLoader(TensorDataset(
            x[150 * rank:150 * (rank + 1)]), batch_size=32), None),
        "adam_own_loader": lambda: _adam(1, DataLoader(TensorDataset(
            x[150 * rank:150 * (rank + 1)]), batch_size=30, shuffle=True,
            generator=torch.Generator().manual_seed(3))),
        # validation as each process's own shuffled loader: the tempered step paired other
        # rows across passes (standard error 7.9 against one process's 0.92, not applied)
        "tempered_shuffled_val": _tempered_over_shuffled_validation,
        # ... but a Dataset whose items are noisy per read, or dicts for a collate_fn, is the
        # same Dataset on both: each process reads its half (the check refused the first and
        # failed on the second)
        "noisy_rows": lambda: sum(b.shape[0] for b in DataSource(DataLoader(
            _Noisy(x[:40]), batch_size=8), _model(), 8, "data", shard=True)),
        "dict_rows": lambda: sum(b.shape[0] for b in DataSource(DataLoader(
            _Dicts(x[:40]), batch_size=8, collate_fn=_stack_dicts), _model(), 8, "data",
            shard=True)),
        # a random flip (probability ½) of its own draw on each process: read alike twice on
        # one process and not on the other, and refused as another Dataset (5 of 8 seeds)
        "flipped_rows": lambda: [_read_flipped(x[:40], 100 * seed + rank)
                                 for seed in range(8)],
        # each process its own rows, with a missing entry (NaN) in a compared row: NaN != NaN
        # took them for rows noisy per read, and the Datasets that differ passed
        "own_rows_with_nan": lambda: [_check_own_rows(x, rank, nan_row) for nan_row in (0, 5)],
        # a NaN at item 200: rank 1 named "batch 1, row 18" of its shard, no item (a pass
        # over the shards, without the fit's collectives, which rank 0 alone would enter)
        "nan_item": lambda: len(list(DataSource(TensorDataset(torch.cat(
            [x[:200], torch.full((1, 6), float("nan"), dtype=x.dtype), x[201:]])),
            _model(), 32, "data", shard=True))),
    }.items():
        try:
            out[case] = ("ok", fit())
        except ValueError as error:
            out[case] = ("ValueError", str(error))
    # Adam from init="none" and a start of each process's own: each trained its own model
    # with the shared gradients (rank 0's start is everyone's now).
    torch.manual_seed(100 + rank)
    model = MixtureOfFactorAnalyzers(3, 6, 2, dtype=torch.float64)
    SGDTrainer(SGDConfig(epochs=2, batch_size=30, init="none", progress=False)).fit(model, x)
    out["adam_init_none"] = _params(model)
    # a Dataset of namedtuples: rank 0's empty part of the last global batch (301 = 10·30 + 1)
    # failed in the collate function
    item = namedtuple("Item", "x label")

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return len(x)

        def __getitem__(self, i):
            return item(x[i], i)

    out["adam_namedtuple"] = _adam(1, Items())[0]
    # An empty Dataset (or a loader of one) on every process: torch's errors before
    # ("num_samples should be a positive integer", "torch.cat(): expected a non-empty list")
    empty = TensorDataset(x[:0])
    for case, fit in (
        ("em_empty_dataset", lambda: EMTrainer(EMConfig(max_iter=1, progress=False)).fit(
            _model(), empty, x[:20])),
        ("em_empty_loader", lambda: EMTrainer(EMConfig(max_iter=1, progress=False)).fit(
            _model(), DataLoader(empty, batch_size=4), x[:20])),
        ("adam_empty_dataset", lambda: SGDTrainer(SGDConfig(epochs=1, progress=False)).fit(
            _model(), empty, x[:20])),
    ):
        try:
            fit()
            out[case] = "fitted"
        except ValueError as error:
            out[case] = str(error)
    return out


def _timed(fit) -> tuple:
    """``("ok" or the error's type, the result or the error's message, seconds)``."""
    started = time.perf_counter()
    try:
        result = fit()
    except Exception as error:  # recorded for the tests
        return type(error).__name__, str(error), time.perf_counter() - started
    return "ok", result, time.perf_counter() - started


def _agreement_job(rank: int) -> dict:
    """Processes given different fits (each case recorded, not raised): gloo aborted the
    process, a process waited for the timeout, or they mixed into one wrong model."""
    x = _data()
    em = {"max_iter": 2, "batch_size": 64, "kmeans_iter": 3, "complete_iter": 1,
          "progress": False}
    adam = {"epochs": 1, "batch_size": 30, "kmeans_iter": 3, "complete_iter": 1,
            "progress": False}

    def em_fit(model=None, validation=None, **config):
        model = _model() if model is None else model
        return _params(EMTrainer(EMConfig(**{**em, **config})).fit(
            model, x.to(model.dtype), validation))

    def adam_fit(validation=None, **config):
        return _params(SGDTrainer(SGDConfig(**{**adam, **config})).fit(_model(), x, validation))

    def resumed(make, saves):
        """Rank 0 resumes from the second of rank 0's ``saves``, rank 1 from the first."""
        second = _exchange(saves[1] if saves else None)
        first = _exchange(saves[0] if saves else None)
        state, params = second if rank == 0 else first
        trainer = make()
        trainer.load_state_dict(state)
        return _params(trainer.fit(_loaded(params), x))

    out = {
        "em_seed": _timed(lambda: em_fit(seed=rank)),  # seed=rank, the DDP idiom
        "adam_lr": _timed(lambda: adam_fit(lr=0.01 * (1 + rank))),
        "em_n_components": _timed(lambda: em_fit(MixtureOfFactorAnalyzers(3 + rank, 6, 2)
                                                 .double())),
        "em_dtype": _timed(lambda: em_fit(_model() if rank else _model().float())),
        "em_max_iter": _timed(lambda: em_fit(max_iter=2 + 2 * rank, tol=0.0, patience=0)),
        "em_validation_on_rank_0": _timed(lambda: em_fit(validation=None if rank else x[:40],
                                                         val_fraction=0.0)),
        "adam_validation_on_rank_0": _timed(lambda: adam_fit(
            validation=None if rank else x[:40], val_fraction=0.0)),
        # device, progress and checkpoint_every may differ: the same fit on both
        "em_per_process_fields": _timed(lambda: em_fit(
            device=None if rank else "cpu", progress=bool(rank), checkpoint_every=rank)),
        "adam_per_process_fields": _timed(lambda: adam_fit(
            device=None if rank else "cpu", progress=bool(rank), checkpoint_every=rank)),
    }
    # Rank 1 resumed from an older checkpoint than rank 0 (a stale copy of the run folder).
    saves: list = []
    EMTrainer(EMConfig(**{**em, "max_iter": 3, "tol": 0.0, "checkpoint_every": 1})).fit(
        _model(), x, checkpoint_fn=lambda t, m: saves.append((t.state_dict(), _params(m))))
    out["em_resumed"] = _timed(lambda: resumed(
        lambda: EMTrainer(EMConfig(**{**em, "max_iter": 3, "tol": 0.0})), saves))
    saves = []
    SGDTrainer(SGDConfig(**{**adam, "epochs": 2, "checkpoint_every": 1})).fit(
        _model(), x, checkpoint_fn=lambda t, m: saves.append((t.state_dict(), _params(m))))
    out["adam_resumed"] = _timed(lambda: resumed(
        lambda: SGDTrainer(SGDConfig(**{**adam, "epochs": 2})), saves))
    # Scores of each process's own validation rows: its shard's, or with across_processes
    # every process's (as fit computes them)
    out["scored_model"] = em_fit()
    model = _loaded(out["scored_model"])
    val = TensorDataset(x[251:])
    loader = DataLoader(val, batch_size=16, sampler=distributed.ShardSampler(val))
    out["scores"] = {across: _timed(lambda across=across: [
        training.evaluate(model, loader, across_processes=across),
        EMTrainer.evaluate(model, loader, across_processes=across),
        mean_log_likelihood(model, loader, across_processes=across)])
        for across in (False, True)}
    return out


def _loaded(params: dict) -> MixtureOfFactorAnalyzers:
    model = _model()
    model.load_state_dict(params)
    return model


# ---------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """(single-process results, [rank 0 results, rank 1 results])."""
    out_dir = tmp_path_factory.mktemp("dist")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _scenarios()
    finally:
        torch.set_num_threads(before)
    return single, _spawn("_scenarios_job", out_dir)


def _assert_close(got: dict, want: dict, rtol: float, what: str) -> None:
    for name, value in want.items():
        scale = value.abs().max().clamp_min(1.0)
        err = ((got[name] - value).abs().max() / scale).item()
        assert err <= rtol, f"{what}: {name} differs by {err:.3g} (relative) > {rtol:g}"


@pytest.mark.parametrize("case", ["em_tensor", "em_dataset", "em_loader", "em_quantized"])
def test_two_process_em_equals_one_process(two_processes, case):
    single, ranks = two_processes
    params, history = single[case]
    for rank, result in enumerate(ranks):
        _assert_close(result[case][0], params, 1e-10, f"{case} rank {rank}")
        # The validation log-likelihood is summed over both shards.
        got = [r["val_log_likelihood"] for r in result[case][1]]
        want = [r["val_log_likelihood"] for r in history]
        assert got == pytest.approx(want, rel=1e-12)
    # Every rank holds the same model, bit for bit.
    for name in params:
        assert torch.equal(ranks[0][case][0][name], ranks[1][case][0][name])


@pytest.mark.parametrize("case", ["adam_tensor", "adam_dataset", "adam_quantized",
                                  "adam_loader", "adam_loader_drop_last"])
def test_two_process_adam_equals_one_process(two_processes, case):
    single, ranks = two_processes
    params, history = single[case]
    for rank, result in enumerate(ranks):
        _assert_close(result[case][0], params, 1e-6, f"{case} rank {rank}")
        assert len(result[case][1]) == len(history)  # the same early stop
        for got, want in zip(result[case][1], history, strict=True):
            assert got["train_log_likelihood"] == pytest.approx(want["train_log_likelihood"],
                                                                rel=1e-9)
            assert got["val_log_likelihood"] == pytest.approx(want["val_log_likelihood"],
                                                              rel=1e-9)


@pytest.mark.parametrize("case, uninterrupted", [("em_resumed", "em_tensor"),
                                                 ("adam_resumed", "adam_tensor")])
def test_resumed_distributed_run_equals_uninterrupted(two_processes, case, uninterrupted):
    single, ranks = two_processes
    for result in ranks:
        _assert_close(result[case][0], result[uninterrupted][0], 1e-12, case)
        assert [r["train_log_likelihood"] for r in result[case][1]] == pytest.approx(
            [r["train_log_likelihood"] for r in result[uninterrupted][1]], rel=1e-12)
    _assert_close(ranks[0][case][0], single[uninterrupted][0], 1e-6, case)


def test_a_rank_without_rows_adds_nothing(two_processes):
    single, ranks = two_processes
    for result in ranks:
        for name, value in single["stats_one_row"].items():
            assert torch.allclose(result["stats_one_row"][name], value, rtol=1e-12,
                                  atol=1e-12), name
        assert result["val_one_row"] == pytest.approx(single["val_one_row"], rel=1e-12)
    assert single["stats_one_row"]["n_rows"].item() == 1


def test_several_temperatures_sum_every_process_rows(two_processes):
    """A pass with a sequence of temperatures adds each temperature's sums over the
    processes (one row: rank 0's shard empty; all rows), as one process computes them."""
    single, ranks = two_processes
    assert len(single["stats_tempered"]) == 4
    for result in ranks:
        for got, want in zip(result["stats_tempered"], single["stats_tempered"], strict=True):
            for name, value in want.items():
                assert torch.allclose(got[name], value, rtol=1e-10, atol=1e-10), name
    one_row, all_rows = single["stats_tempered"][:2], single["stats_tempered"][2:]
    assert one_row[0]["n_rows"].item() == one_row[1]["n_rows"].item() == 1
    assert not torch.equal(all_rows[0]["sum_x"], all_rows[1]["sum_x"])  # T changes the sums


def test_only_rank_zero_checkpoints(two_processes):
    single, ranks = two_processes
    assert single["em_saves"] == 3  # one per iteration until the stop after iteration 3
    assert [r["em_saves"] for r in ranks] == [3, 0]


def test_hierarchical_stage_files_are_written_by_rank_zero_and_resumed_by_all(tmp_path,
                                                                             monkeypatch):
    """Every rank wrote the stage files, or loaded another's half-written one, as the race of
    their folder checks went; now rank 0 writes them and every rank resumes from its view."""
    monkeypatch.setenv("MFA_TEST_HIERARCHY", str(tmp_path / "hierarchy"))
    rank0, rank1 = _spawn("_hierarchical_job", tmp_path)
    assert rank0["fresh"][0] == ["root.pt", "child-00000.pt", "child-00001.pt", "model.pt"]
    assert rank1["fresh"][0] == [] and rank0["resumed"][0] == rank1["resumed"][0] == []
    for rank in (rank0, rank1):
        assert not any(rank["fresh"][1]) and all(rank["resumed"][1])
        for name, value in rank0["fresh"][2].items():
            assert torch.equal(rank["fresh"][2][name], value), name
            assert torch.equal(rank["resumed"][2][name], value), name


def test_crashed_rank_does_not_hang_the_other(tmp_path):
    started = time.perf_counter()
    rank0, rank1 = _spawn("_crash_job", tmp_path, timeout_s=2.0)
    assert rank1["type"] == "ValueError" and "rank 1 broke down" in rank1["message"]
    assert rank0["type"] == "DistributedError", rank0
    assert "another process has probably crashed" in rank0["message"]
    assert "all-reduce of the EM statistics" in rank0["message"]
    assert rank0["seconds"] < 10.0
    assert time.perf_counter() - started < 25.0


@pytest.fixture(scope="module")
def edges(tmp_path_factory):
    return _spawn("_edges_job", tmp_path_factory.mktemp("edges"))


def test_adam_prior_over_per_process_loaders_counts_every_process_rows(edges):
    """The prior's 1/N is the global 301 rows on both processes, whose parameters stay
    identical (they were 150 and 151, and the parameters 1.1e-4 apart)."""
    (seen0, params0), (seen1, params1) = edges[0]["adam_prior"], edges[1]["adam_prior"]
    assert seen0 == seen1 == [301]
    for name, value in params0.items():
        assert torch.equal(value, params1[name]), name


def test_adam_prior_over_a_batch_sampler_of_a_shard_counts_every_process_rows(edges):
    """A BatchSampler over a ShardSampler gives each process the batches of the sampler
    form above: the same 1/N (it was 602, each row counted twice) and the same fit."""
    for rank in edges:
        seen, params = rank["adam_prior_batch_sampler"]
        assert seen == [301]
        for name, value in rank["adam_prior"][1].items():
            assert torch.equal(params[name], value), name


def test_a_batch_of_no_rows_on_every_process_is_skipped(edges):
    for rank in edges:
        got = rank["adam_empty_global_batch"]
        for name, value in got["without"].items():
            assert torch.equal(got["with"][name], value), name


def test_empty_data_is_refused_by_name_on_every_process(edges):
    for rank in edges:
        for case in ("em_empty_dataset", "em_empty_loader", "adam_empty_dataset"):
            assert rank[case] == "data is empty (0 rows)", (case, rank[case])


def test_only_rank_zero_writes_a_hierarchical_runs_checkpoint(edges):
    assert edges[0]["hierarchical_run_checkpoints"] > 0  # the root, each child, the end
    assert edges[1]["hierarchical_run_checkpoints"] == 0


def test_processes_start_adam_from_one_model_and_take_namedtuple_items(edges):
    for name, value in edges[0]["adam_init_none"].items():
        assert torch.equal(value, edges[1]["adam_init_none"][name]), name
    for name, value in edges[0]["adam_namedtuple"].items():
        assert torch.equal(value, edges[1]["adam_namedtuple"][name]), name


def test_a_tensor_that_differs_between_processes_is_refused(edges):
    for rank in edges:
        for case in ("em_own_tensor", "adam_own_tensor"):
            kind, message = rank[case]
            assert kind == "ValueError" and "data differs between the processes" in message


def test_a_loader_over_each_processs_own_rows_is_refused(edges):
    for rank in edges:
        for case in ("em_own_loader", "adam_own_loader"):
            kind, message = rank[case]
            assert kind == "ValueError", (case, message)
            assert "the DataLoader's Dataset differs between the processes" in message


def test_datasets_of_each_processs_own_rows_with_missing_entries_are_refused(edges):
    for rank in edges:
        assert rank["own_rows_with_nan"] == ("ok", ["refused", "refused"])


def test_a_dataset_noisy_per_read_or_of_dicts_is_one_dataset(edges):
    for rank in edges:
        assert rank["noisy_rows"] == ("ok", 20) and rank["dict_rows"] == ("ok", 20)
        assert rank["flipped_rows"] == ("ok", [20] * 8)


def test_per_process_shuffled_validation_pairs_the_same_rows(edges):
    """Each process's own shuffled validation loader is read in a fixed order for the
    tempered step's paired gains: the step of one process, on both."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        step, params = _tempered_over_shuffled_validation()
    finally:
        torch.set_num_threads(before)
    assert step.applied  # (the case this is about)
    for rank in edges:
        kind, (got, got_params) = rank["tempered_shuffled_val"]
        assert kind == "ok"
        assert (got.applied, got.temperature, got.noise_prior_variance) == (
            step.applied, step.temperature, step.noise_prior_variance)
        assert got.standard_error == pytest.approx(step.standard_error, rel=1e-9)
        _assert_close(got_params, params, 1e-10, "tempered_shuffled_val")


def test_a_bad_value_is_named_by_its_item_on_any_process(edges):
    assert edges[0]["nan_item"] == ("ok", 5)  # 150 rows in batches of 32
    kind, message = edges[1]["nan_item"]  # (rank 1's shard holds item 200)
    assert kind == "ValueError" and "batch 1, row 18 (item 200 of the TensorDataset)" in message


def test_em_refuses_a_loader_whose_epoch_is_not_every_row_once(edges):
    for rank in edges:
        kind, message = rank["em_drop_last"]
        assert kind == "ValueError"
        assert "drop_last=True drops the last 11 of its 251 rows" in message


def test_adam_refuses_per_process_loaders_of_unequal_length(edges):
    for rank in edges:
        kind, message = rank["adam_unequal"]
        assert kind == "ValueError"
        assert "yield between 5 and 6 (this process:" in message


@pytest.mark.parametrize("case, val_rows", [("em_sharded_reseed", 61),
                                            ("em_sharded_reseed_one_val_row", 1)])
def test_reseeding_rounds_over_per_process_validation_equal_one_process(edges, case, val_rows):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        params, history = _sharded_reseed(val_rows)
    finally:
        torch.set_num_threads(before)
    # A re-seeding round ran (what this is about); on one validation row none runs (fewer
    # than the rows a choice needs), on every process alike.
    assert (max(run for run, _ in history) >= 1) is (val_rows >= MIN_ROWS)
    for rank in edges:
        kind, result = rank[case]
        assert kind == "ok", result
        _assert_close(result[0], params, 1e-10, f"{case} rank")
        assert result[1] == history


def test_tempered_step_with_an_empty_validation_shard(edges):
    """One validation row: the process without it takes the step too, and both end with the
    same model."""
    assert edges[0]["tempered_one_val_row"][0] == "ok"
    assert edges[0]["tempered_one_val_row"] == edges[1]["tempered_one_val_row"]


@pytest.fixture(scope="module")
def agreement(tmp_path_factory):
    """The cases of ``_agreement_job``, under a process-group timeout of 5 s: a process that
    waits for the other fails in seconds (gloo aborted some cases' processes: no result)."""
    return _spawn("_agreement_job", tmp_path_factory.mktemp("agreement"), timeout_s=5.0)


@pytest.mark.parametrize("case, difference", [
    ("em_seed", "EMConfig.seed is 0 on rank 0; 1 on rank 1"),
    ("adam_lr", "SGDConfig.lr is 0.01 on rank 0; 0.02 on rank 1"),
    ("em_n_components", "n_components is 3 on rank 0; 4 on rank 1"),
    ("em_dtype", "the model's dtype is 'float32' on rank 0; 'float64' on rank 1"),
    ("em_max_iter", "EMConfig.max_iter is 2 on rank 0; 4 on rank 1"),
    ("em_validation_on_rank_0", "validation data is 'given' on rank 0; 'none' on rank 1"),
    ("adam_validation_on_rank_0", "validation data is 'given' on rank 0; 'none' on rank 1"),
    ("em_resumed", "the resumed state is 'run 0, iteration 2' on rank 0; 'run 0, iteration 1' "
                   "on rank 1"),
    ("adam_resumed", "the resumed state is 'epoch 2, step 20' on rank 0; 'epoch 1, step 10' "
                     "on rank 1"),
])
def test_processes_given_different_fits_all_refuse_it_by_name(agreement, case, difference):
    """Each process gets the same ValueError at once, naming the key and both values: the
    processes mixed seed=rank or two learning rates into wrong models, gloo aborted them on
    another K, dtype or resumed state, or one waited for the timeout (max_iter, validation
    on rank 0 only)."""
    for rank in agreement:
        kind, message, seconds = rank[case]
        assert kind == "ValueError", (case, message)
        assert f"was given a different fit on the processes: {difference}." in message
        assert seconds < 3.0
    assert "a seed per process is not needed" in agreement[0]["em_seed"][1]


def test_only_device_progress_and_checkpoint_every_may_differ(agreement):
    for case in ("em_per_process_fields", "adam_per_process_fields"):
        (kind0, params0, _), (kind1, params1, _) = (rank[case] for rank in agreement)
        assert kind0 == kind1 == "ok", (params0, params1)
        for name, value in params0.items():
            assert torch.equal(params1[name], value), (case, name)
    assert "(only checkpoint_every, device, progress may differ)" in agreement[1]["adam_lr"][1]


def test_scores_across_processes_of_per_process_loaders_are_every_processs_rows(agreement):
    """training.evaluate, EMTrainer.evaluate and mean_log_likelihood of a loader over each
    process's ShardSampler: that shard's mean, or with across_processes=True the mean over
    all 50 rows, as one process scores them (log_prob)."""
    model = _loaded(agreement[0]["scored_model"])
    rows = _data()[251:]
    with torch.no_grad():
        per_row = model.log_prob(rows)
    for rank, result in enumerate(agreement):
        kind, scores, _ = result["scores"][True]
        assert kind == "ok", scores
        assert scores == pytest.approx([per_row.mean().item()] * 3, rel=1e-12)
        start, end = distributed.shard_range(50, rank, WORLD)
        kind, scores, _ = result["scores"][False]
        assert scores == pytest.approx([per_row[start:end].mean().item()] * 3, rel=1e-12)


@pytest.mark.parametrize("method", ["em", "adam"])
def test_a_fit_under_torchrun_without_a_process_group_warns(monkeypatch, method):
    """torchrun's environment without init_from_env: every process fitted all the rows and
    wrote the checkpoint, without a word."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not distributed.is_initialized()
    trainer = (EMTrainer(EMConfig(max_iter=1, kmeans_iter=2, progress=False))
               if method == "em" else SGDTrainer(SGDConfig(epochs=1, kmeans_iter=2,
                                                           progress=False)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(_model(), _data())
    said = [w for w in caught if "without a process group" in str(w.message)]
    assert len(said) == 1, [str(w.message) for w in caught]
    assert "call mfa.distributed.init_from_env() before fit" in str(said[0].message)
    assert said[0].filename == __file__  # (the line of the fit)


def test_shards_tile_the_rows_without_padding():
    for n in (0, 1, 5, 301):
        for world in (1, 2, 3, 7):
            ranges = [distributed.shard_range(n, r, world) for r in range(world)]
            rows = [i for start, end in ranges for i in range(start, end)]
            assert rows == list(range(n))
            sizes = [end - start for start, end in ranges]
            assert max(sizes) - min(sizes) <= 1
            parts = [list(distributed.ShardSampler(n, r, world)) for r in range(world)]
            assert sum(parts, []) == list(range(n))
    # a dataset, as DistributedSampler(dataset) takes it (it failed on `dataset * int`)
    rows = torch.utils.data.TensorDataset(torch.zeros(7, 2))
    assert list(distributed.ShardSampler(rows, 1, 2)) == list(distributed.ShardSampler(7, 1, 2))
    with pytest.raises(TypeError, match="number of rows or a sized dataset, got object"):
        distributed.ShardSampler(object(), 0, 1)


def test_shard_batch_sampler_splits_each_global_batch():
    from torch.utils.data import BatchSampler, RandomSampler

    def batches(rank, world):
        inner = BatchSampler(RandomSampler(range(11), generator=torch.Generator()
                                           .manual_seed(3)), 4, drop_last=False)
        return list(distributed.ShardBatchSampler(inner, rank, world))

    single = batches(0, 1)
    parts = [batches(r, 3) for r in range(3)]
    assert len(single) == 3 and all(len(p) == 3 for p in parts)
    for i, batch in enumerate(single):
        assert sum((p[i] for p in parts), []) == batch


def test_single_process_helpers_are_identities():
    assert not distributed.is_active() and distributed.is_main_process()
    fn = object()
    assert distributed.main_process_only(fn) is fn
    assert distributed.sum_across_processes(2.5, 3) == [2.5, 3.0]
    assert distributed.broadcast_from_main(lambda: 7) == 7
    assert distributed.init_from_env() is False  # no torchrun environment here


def test_a_row_read_twice_is_the_same_with_nan_and_complex_entries():
    """The re-read check of check_same_dataset: NaN equals NaN (a missing entry), a complex
    entry's parts compare on their own (nan+1j is not nan+5j), and a pending conjugate is
    read (view_as_real refused it)."""
    same = distributed._same
    row = torch.tensor([1.0, float("nan"), 3.0])
    assert same(row, row.clone()) and not same(row, torch.tensor([1.0, 2.0, 3.0]))
    assert not same(row, row.double()) and same(torch.arange(3), torch.arange(3))
    z = torch.tensor([complex(float("nan"), 1.0), 2 + 2j])
    assert same(z, z.clone()) and not same(z, torch.tensor([complex(float("nan"), 5.0), 2 + 2j]))
    w = torch.tensor([1 + 2j, 3 - 1j])
    assert same(w.conj(), w.conj().clone()) and not same(w.conj(), w)


@pytest.mark.parametrize("device, backend", [
    (None, "nccl"), ("auto", "nccl"), ("cuda", "nccl"), ("cpu", "gloo")])
def test_the_backend_follows_the_runs_device(monkeypatch, device, backend):
    """On a machine with CUDA, a run with device cpu takes gloo and leaves the GPUs alone: it
    took NCCL and cuda:LOCAL_RANK, which failed where there were fewer GPUs than processes."""
    calls = {}
    monkeypatch.setattr(distributed, "launched_by_torchrun", lambda: True)
    monkeypatch.setattr(distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.setdefault("set_device", i))
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda backend, timeout: calls.setdefault("backend", backend))
    monkeypatch.setattr(distributed, "get_rank", lambda: 0)
    monkeypatch.setattr(distributed, "get_world_size", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert distributed.init_from_env(device=device) is True
    assert calls["backend"] == backend
    assert calls.get("set_device") == (3 if backend == "nccl" else None)


def test_timeout_from_environment_is_checked(monkeypatch):
    monkeypatch.setenv("MFA_DIST_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="MFA_DIST_TIMEOUT must be a number of seconds"):
        distributed._timeout()
    monkeypatch.setenv("MFA_DIST_TIMEOUT", "-1")
    with pytest.raises(ValueError, match="MFA_DIST_TIMEOUT must be positive"):
        distributed._timeout()
    for text in ("inf", "1e20"):  # an OverflowError that did not name the variable
        monkeypatch.setenv("MFA_DIST_TIMEOUT", text)
        with pytest.raises(ValueError, match="MFA_DIST_TIMEOUT must be a finite number"):
            distributed._timeout()
    monkeypatch.setenv("MFA_DIST_TIMEOUT", "90")
    assert distributed._timeout() == timedelta(seconds=90)


TINY = """\
model: {n_components: 3, n_factors: 2}
data: {name: embedded-mnist, limit: 301}
train:
  method: em
  em: {max_iter: 3, batch_size: 64, init_samples: 200, kmeans_iter: 3, complete_iter: 1,
       progress: false}
output: {n_samples: 0, n_inpaint: 0, n_factor_components: 0, plot: false}
device: cpu
"""


@pytest.mark.slow
def test_torchrun_launch_of_mfa_train(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "MFA_DIST_TIMEOUT": "60"}
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
         str(WORLD), "-m", "mfa", "train", "--config", str(config), "--no-figures",
         "--set", f"output.dir={tmp_path / 'two'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    folders = list((tmp_path / "two").iterdir())
    assert [f.name for f in folders] == ["001-embedded-mnist"]
    assert launched.stdout.count("run folder:") == 1  # printed by rank 0 only
    metrics = json.loads((folders[0] / "metrics.json").read_text())
    assert len(json.loads((folders[0] / "history.json").read_text())) == 3

    assert main(["train", "--config", str(config), "--no-figures",
                 "--set", f"output.dir={tmp_path / 'one'}"]) == 0  # one process
    one = load_checkpoint(tmp_path / "one" / "001-embedded-mnist" / "checkpoint.pt").model
    two = load_checkpoint(folders[0] / "checkpoint.pt").model
    # A float32 model with float64 sums: the parameters agree to float32 rounding (the raw
    # noise parameter, log(exp(d − min_noise) − 1), magnifies it for d near min_noise, so the
    # variances themselves are compared, relative to their size).
    for name in ("weights", "means", "factor_loadings"):
        a, b = getattr(one, name).detach(), getattr(two, name).detach()
        err = (b - a).abs().max() / a.abs().max().clamp_min(1.0)
        assert err.item() < 1e-5, name
    rel = ((two.noise_variance - one.noise_variance) / one.noise_variance).abs().max()
    assert rel.item() < 1e-4
    assert metrics["val_log_likelihood"] == pytest.approx(
        json.loads((tmp_path / "one" / "001-embedded-mnist" / "metrics.json").read_text())
        ["val_log_likelihood"], rel=1e-6)


def test_a_resumed_cpu_run_takes_gloo(monkeypatch, tmp_path):
    """`mfa train --resume` read no config before the process group: a CPU run resumed on a
    machine with GPUs took NCCL and cuda:LOCAL_RANK (invalid with more processes than
    GPUs), whatever its saved device or --set device=cpu said."""
    from mfa import cli, cli_fit
    from mfa.config import load_config, save_config

    run = tmp_path / "run"
    run.mkdir()
    save_config(load_config(cli.DEFAULT_CONFIG, overrides=["device=cpu"]), run / "config.yaml")
    seen = []
    monkeypatch.setattr(distributed, "init_from_env", lambda device=None: seen.append(device))
    monkeypatch.setattr(cli_fit, "_train", lambda args, config, overrides, main: 0)
    assert main(["train", "--resume", str(run)]) == 0
    assert main(["train", "--resume", str(run), "--set", "device=auto"]) == 0
    assert main(["train", "--resume", str(tmp_path / "none")]) == 0  # (reported by _train)
    assert seen == ["cpu", "auto", None]
