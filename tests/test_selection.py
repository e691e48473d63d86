"""Model selection sweeps (mfa.selection) and the ``mfa select`` command.

Every number of a row is recomputed independently from the fitted model (mean log p of the
validation rows, the bits/dim formula, BIC from the parameter count formula) and the marks
are checked against an argmin/argmax over those recomputed values.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from mfa import cli
from mfa.em import EMConfig, EMTrainer
from mfa.model import MixtureOfFactorAnalyzers
from mfa.selection import COLUMNS, sweep_models

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::mfa.em.ConvergenceWarning")]

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "embedded-mnist.yaml"


@pytest.fixture(scope="module")
def data():
    """Rows from a known 3-component MFA (D=6, L=1), train/val split."""
    gen = torch.Generator().manual_seed(0)
    truth = MixtureOfFactorAnalyzers.from_parameters(
        torch.tensor([0.3, 0.3, 0.4], dtype=torch.float64),
        6.0 * torch.randn(3, 6, generator=gen, dtype=torch.float64),  # well separated
        2.0 * torch.randn(3, 6, 1, generator=gen, dtype=torch.float64),
        torch.full((3, 6), 0.1, dtype=torch.float64),
    )
    x, _ = truth.sample(900, generator=torch.Generator().manual_seed(1))
    return x[:600], x[600:]


def fitter(train, store):
    def fit(k, lat):
        model = MixtureOfFactorAnalyzers(k, train.shape[1], lat, dtype=torch.float64,
                                         generator=torch.Generator().manual_seed(k * 10 + lat))
        EMTrainer(EMConfig(max_iter=15, progress=False, seed=0)).fit(model, train)
        store[(k, lat)] = model
        return model
    return fit


def test_sweep_rows_are_recomputed_from_the_models(data, tmp_path):
    train, val = data
    models = {}
    sweep = sweep_models(train, val, [1, 3, 5], [0, 1], fitter(train, models), scale=256)
    assert [(r["K"], r["L"]) for r in sweep.rows] == [(1, 0), (3, 0), (5, 0), (1, 1), (3, 1),
                                                      (5, 1)]
    n, d = train.shape
    for row in sweep.rows:
        model = models[(row["K"], row["L"])]
        with torch.no_grad():
            val_ll = model.log_prob(val).double().mean().item()
            train_sum = model.log_prob(train).double().sum().item()
        k, lat = row["K"], row["L"]
        params = k * (d * lat - lat * (lat - 1) // 2 + 2 * d) + k - 1
        assert row["n_params"] == params
        assert row["val_log_likelihood"] == pytest.approx(val_ll, rel=1e-9)
        assert row["train_log_likelihood"] == pytest.approx(train_sum / n, rel=1e-9)
        assert row["val_bits_per_dim"] == pytest.approx(
            -(val_ll - d * math.log(256)) / (d * math.log(2)), rel=1e-9)
        assert row["bic"] == pytest.approx(-2 * train_sum + params * math.log(n), rel=1e-9)
        assert row["fit_seconds"] > 0
    best_val = max(sweep.rows, key=lambda r: r["val_log_likelihood"])
    best_bic = min(sweep.rows, key=lambda r: r["bic"])
    assert sweep.best_by_val is best_val and sweep.best_by_bic is best_bic
    assert [r["best_val"] for r in sweep.rows].count(True) == 1 and best_val["best_val"]
    assert [r["best_bic"] for r in sweep.rows].count(True) == 1 and best_bic["best_bic"]
    assert sweep.best_model is models[(best_val["K"], best_val["L"])]
    # The data come from 3 components with one factor: BIC finds them.
    assert (best_bic["K"], best_bic["L"]) == (3, 1)


def test_sweep_files(data, tmp_path):
    train, val = data
    sweep = sweep_models(train, val, [1, 3], [1], fitter(train, {}))
    assert not sweep.has_bits_per_dim  # no scale: no bits/dim
    paths = sweep.save(tmp_path / "sel", metadata={"dataset": "synthetic"})
    assert [p.name for p in paths] == ["selection.csv", "selection.md", "selection.json",
                                       "selection.png"]
    with open(paths[0], newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(COLUMNS)
    for saved, row in zip(rows, sweep.rows, strict=True):
        assert float(saved["bic"]) == pytest.approx(row["bic"], rel=1e-12)
        assert saved["best_val"] == str(row["best_val"])
    record = json.loads(paths[2].read_text())
    assert record["dataset"] == "synthetic"
    assert record["best_by_val"] == {"K": sweep.best_by_val["K"], "L": sweep.best_by_val["L"]}
    assert record["rows"][1]["val_bits_per_dim"] is None
    lines = paths[1].read_text().splitlines()
    assert lines[0].startswith("| K | L | params | val log-lik | BIC")
    assert len(lines) == 2 + len(sweep.rows)
    assert "<- val" in lines[2 + sweep.rows.index(sweep.best_by_val)]
    with Image.open(paths[3]) as image:
        assert image.format == "PNG" and image.size == (600, 400)


def test_sweep_errors(data):
    train, val = data
    fit = fitter(train, {})
    with pytest.raises(ValueError, match="components must not be empty"):
        sweep_models(train, val, [], [1], fit)
    with pytest.raises(ValueError, match="factors must be >= 0, got -1"):
        sweep_models(train, val, [2], [-1], fit)
    with pytest.raises(TypeError, match="components must be a sequence of ints"):
        sweep_models(train, val, 3, [1], fit)
    with pytest.raises(ValueError, match="needs validation data"):
        sweep_models(train, None, [2], [1], fit)
    # refused before the first fit (they failed after it), naming the argument
    calls = []

    def counted(k, lat):
        calls.append((k, lat))
        return fit(k, lat)

    batches = lambda t: (t[i : i + 100] for i in range(0, len(t), 100))  # noqa: E731
    with pytest.raises(TypeError, match="validation is a one-shot iterator"):
        sweep_models(train, batches(val), [1, 3], [1], counted)
    with pytest.raises(ValueError, match="train has 6 features but validation has 4"):
        sweep_models(train, val[:, :4], [1, 3], [1], counted)
    bad = val.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="validation must hold finite"):
        sweep_models(train, bad, [1, 3], [1], counted)
    assert calls == []
    # a list of batches is read once per model
    sweep = sweep_models(list(batches(train)), list(batches(val)), [1], [1], counted)
    assert [(r["K"], r["L"]) for r in sweep.rows] == [(1, 1)]


def test_sweep_takes_images_as_the_trainers_and_metrics_do(data):
    """``[N, C, H, W]`` tensors (what an image dataset holds) are scored as their flattened
    rows: the trainers and the likelihood metrics flatten them, the sweep refused them."""
    train, val = data
    models = {}
    flat = sweep_models(train, val, [1, 3], [1], fitter(train, models))
    images = sweep_models(train.view(-1, 1, 2, 3), val.view(-1, 1, 2, 3), [1, 3], [1],
                          lambda k, lat: models[(k, lat)])
    for a, b in zip(flat.rows, images.rows, strict=True):
        for key in ("val_log_likelihood", "train_log_likelihood", "bic", "aic"):
            assert b[key] == a[key]
    assert images.n_features == 6


def test_sweep_times_each_fit_asked_for_even_when_models_differ(data, monkeypatch):
    """A fit_fn may return another K or L than asked (a hierarchical fit does): each row keeps
    its own fit's time, in grid order. The clock is a fake one that only the fit of K=4
    advances (a real sleep was outrun by a loaded machine)."""
    from mfa import selection

    train, val = data
    base = fitter(train, {})
    clock = [100.0]
    monkeypatch.setattr(selection.time, "perf_counter", lambda: clock[0])

    def fit(k, lat):
        if k == 4:
            clock[0] += 0.3
        return base(2, lat)  # K=2 whatever was asked

    sweep = sweep_models(train, val, [4, 8], [1], fit)
    assert [r["K"] for r in sweep.rows] == [2, 2]
    assert [r["fit_seconds"] for r in sweep.rows] == [pytest.approx(0.3), 0.0]
    assert sum(r["best_val"] for r in sweep.rows) == 1


# ---------------------------------------------------------------------------- mfa select

TINY = ["data.limit=120", "train.em.max_iter=2", "train.em.kmeans_iter=2",
        "train.em.progress=false", "train.em.variance_floor=1e-3", "device=cpu"]


def run_cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main([str(a) for a in argv])
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def sets(*overrides):
    return [a for o in overrides for a in ("--set", o)]


def test_mfa_select_on_the_embedded_digits(tmp_path):
    out = tmp_path / "sel"
    code, stdout, stderr = run_cli("select", "--config", CONFIG, *sets(*TINY),
                                   "--components", 2, 3, "--factors", 1, 2, "--out", out)
    assert code == 0, stderr
    lines = stdout.splitlines()
    assert lines[0].split() == ["K", "L", "params", "val", "bits/dim", "BIC", "train", "s",
                                "best"]
    assert [tuple(int(v) for v in line.split()[:2]) for line in lines[1:5]] == [
        (2, 1), (3, 1), (2, 2), (3, 2)]
    with open(out / "selection.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    best = max(rows, key=lambda r: float(r["val_log_likelihood"]))
    assert best["best_val"] == "True"
    assert float(best["val_bits_per_dim"]) == min(float(r["val_bits_per_dim"]) for r in rows)
    assert f"best by validation: K={best['K']}, L={best['L']}" in stdout
    by_bic = min(rows, key=lambda r: float(r["bic"]))
    assert f"best by BIC: K={by_bic['K']}, L={by_bic['L']}" in stdout
    for row in rows:  # digits in [0, 1): dequantised bits/dim between 0 and 8
        assert 0 < float(row["val_bits_per_dim"]) < 8
    record = json.loads((out / "selection.json").read_text())
    assert record["dataset"] == "embedded-mnist" and record["method"] == "em"
    assert record["n_features"] == 784
    assert all(str(out / name) in stdout for name in
               ("selection.csv", "selection.md", "selection.json", "selection.png"))
    # a second sweep into the same folder is refused (it replaced the first without a word)
    before = (out / "selection.csv").read_bytes()
    code, _, stderr = run_cli("select", "--config", CONFIG, *sets(*TINY),
                              "--components", 2, "--factors", 1, "--out", out)
    assert code == 2 and "already holds an earlier sweep" in stderr and "--overwrite" in stderr
    assert (out / "selection.csv").read_bytes() == before
    code, _, stderr = run_cli("select", "--config", CONFIG, *sets(*TINY),
                              "--components", 2, "--factors", 1, "--out", out, "--overwrite")
    assert code == 0, stderr
    assert len(list(csv.DictReader(open(out / "selection.csv", newline="")))) == 1


@pytest.mark.parametrize("method", ["em", "sgd"])
def test_mfa_select_feeds_a_large_set_as_mfa_train_does(tmp_path, monkeypatch, method):
    """Above STREAM_ABOVE values the sweep gave every trainer a CPU loader of EM's batch
    size: Adam then stepped on batches of 4,096 rows instead of its own 256. It now gets the
    data mfa train gives it (uint8 rows for Adam; a streamed loader for EM on the CPU)."""
    from mfa import workflow
    from mfa.data import QuantizedRows
    from mfa.sgd import SGDTrainer

    seen = []
    trainer = EMTrainer if method == "em" else SGDTrainer
    fit = trainer.fit

    def spy(self, model, data, validation=None, **kwargs):
        seen.append((type(data).__name__, type(validation).__name__))
        return fit(self, model, data, validation, **kwargs)

    monkeypatch.setattr(trainer, "fit", spy)
    monkeypatch.setattr(workflow, "STREAM_ABOVE", 0)
    code, _, stderr = run_cli("select", "--config", CONFIG, *sets(*TINY, "train.sgd.epochs=1",
                                                                  "train.sgd.progress=false"),
                              "--components", 2, "--factors", 1, "--method", method,
                              "--out", tmp_path)
    assert code == 0, stderr
    want = (QuantizedRows.__name__,) * 2 if method == "sgd" else ("DataLoader",) * 2
    assert seen == [want]


def test_mfa_select_resumes_a_streamed_sweep_whose_fits_all_failed(tmp_path, monkeypatch):
    """Streamed (above STREAM_ABOVE, as CelebA is), a sweep whose Adam fits all diverged
    saved n_features=null and its --resume was refused (n_features=None); the README says
    it fits them again."""
    from mfa import workflow

    monkeypatch.setattr(workflow, "STREAM_ABOVE", 0)
    argv = ["select", "--config", CONFIG, *sets(*TINY, "train.sgd.epochs=1",
                                                 "train.sgd.progress=false",
                                                 "train.sgd.lr=1e30"),
            "--components", 2, "--factors", 1, "--method", "sgd", "--out", tmp_path]
    code, _, stderr = run_cli(*argv)
    assert code == 1 and "1 of 1 fits failed" in stderr, stderr
    d = json.loads((tmp_path / "selection.json").read_text())["n_features"]
    assert d == math.prod(json.loads((tmp_path / "selection.json").read_text())["image_shape"])
    code, _, stderr = run_cli(*argv, "--resume")
    assert code == 1 and "1 of 1 fits failed" in stderr, stderr  # (fitted again, not refused)


@pytest.mark.parametrize("override, key", [
    ("model.n_components=5", "model.n_components"), ("model.n_factors=3", "model.n_factors"),
    ("output.n_samples=4", "output.n_samples"),
    ("model={n_components: 4, n_factors: 5}", "model.n_components, model.n_factors"),  # (the
    ("output={name: x}", "output.name"),  # mapping form got past the check, then ignored)
    ("train.em.checkpoint_every=2", "train.em.checkpoint_every"),  # (a sweep saves none)
    ("train.sgd.checkpoint_every=2", "train.sgd.checkpoint_every"),
])
def test_mfa_select_refuses_settings_it_does_not_use(tmp_path, override, key):
    """The grid sets K and L, and a sweep draws no figures: these were accepted and
    ignored."""
    code, _, stderr = run_cli("select", "--config", CONFIG, *sets(*TINY, override),
                              "--components", 2, "--factors", 1, "--out", tmp_path)
    assert code != 0 and f"mfa select does not use --set {key}" in stderr
    assert not any(tmp_path.iterdir())


def test_mfa_select_names_the_settings_of_a_trainer_it_does_not_use(tmp_path):
    """train.sgd.* in an EM sweep (and train.hierarchical.*) were ignored without a word,
    where mfa train warns."""
    code, _, stderr = run_cli("select", "--config", CONFIG,
                              *sets(*TINY, "train.sgd.lr=0.3", "train.hierarchical.seed=2"),
                              "--components", 2, "--factors", 1, "--out", tmp_path)
    assert code == 0, stderr
    assert ("warning: --set train.sgd.lr, train.hierarchical.seed are not used: this sweep "
            "trains with train.method=em, which reads train.em.* only") in stderr
    code, _, stderr = run_cli("select", "--config", CONFIG, *sets(*TINY), "--method", "sgd",
                              "--components", 2, "--factors", 1, "--out", tmp_path / "sgd",
                              *sets("train.sgd.epochs=1", "train.sgd.progress=false"))
    assert code == 0, stderr  # (--method sgd: now train.em.* is the other trainer's)
    assert ("warning: --set train.em.max_iter, train.em.kmeans_iter, train.em.progress, "
            "train.em.variance_floor are not used: this sweep trains with train.method=sgd"
            in stderr)


def test_mfa_select_refuses_what_the_data_cannot_take(tmp_path):
    code, _, stderr = run_cli("select", "--config", CONFIG, *sets(*TINY),
                              "--components", 2, "--factors", 800, "--out", tmp_path)
    assert code == 2 and "factors [800] exceed the 784 features" in stderr
    code, _, stderr = run_cli("select", "--config", CONFIG, *sets(*TINY),
                              "--components", 500, "--factors", 1, "--out", tmp_path)
    assert code == 2 and "components [500] exceed the 120 training images" in stderr
    code, _, stderr = run_cli("select", "--components", 0, "--factors", 1)
    assert code == 2 and "--components" in stderr and "must be >= 1" in stderr
    code, _, stderr = run_cli("select", "--components", 2, "--factors", 1,
                              "--method", "hierarchical")
    assert code == 2 and "invalid choice" in stderr
    assert not list(tmp_path.iterdir())
    # an --out that is a file, data.missing, a trainer device that is not here: refused
    # before anything is fitted
    afile = tmp_path / "afile"
    afile.write_text("mine")
    code, _, stderr = run_cli("select", "--config", CONFIG, *sets(*TINY),
                              "--components", 2, "--factors", 1, "--out", afile)
    assert code == 2 and "is a file" in stderr and "fitted" not in stderr
    assert afile.read_text() == "mine"
    code, _, stderr = run_cli("select", "--config", CONFIG,
                              *sets(*TINY, "data.missing.kind=random"),
                              "--components", 2, "--factors", 1, "--out", tmp_path / "m")
    assert code == 2 and "data.missing.kind='random' is not supported" in stderr
    if not torch.cuda.is_available():
        code, _, stderr = run_cli("select", "--config", CONFIG,
                                  *sets(*TINY, "train.em.device=cuda"),
                                  "--components", 2, "--factors", 1, "--out", tmp_path / "d")
        assert code == 2 and "invalid value for train.em.device" in stderr
        assert "use train.em.device=null (the run's device) or train.em.device=cpu" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.parametrize("option", ["--out", "--config"])
def test_mfa_select_refuses_an_empty_path(tmp_path, monkeypatch, option):
    """--out "" wrote the sweep's files into the working folder (Path("") is "."), -c ""
    swept the default config: "" (an unset shell variable) was taken for no option."""
    monkeypatch.chdir(tmp_path)
    other = ["--config", CONFIG] if option == "--out" else ["--out", tmp_path / "sweep"]
    code, _, stderr = run_cli("select", *other, option, "", *sets(*TINY),
                              "--components", 2, "--factors", 1)
    assert code == 2 and f"error: {option} is empty: give a path" in stderr, stderr
    assert list(tmp_path.iterdir()) == []
    from mfa.config import load_config
    from mfa.run_select import select_run

    with pytest.raises(ValueError, match="out_dir is empty"):
        select_run(load_config(CONFIG, TINY), [2], [1], "")
    assert list(tmp_path.iterdir()) == []


def test_mfa_select_holds_its_folder_and_removes_the_folders_it_made(tmp_path, monkeypatch):
    """Two sweeps into one folder each reported their files; the later replaced the
    other's. A sweep that fails leaves no folder it made."""
    from mfa.run_folder import RunFolderInUse, hold_run_folder

    out = tmp_path / "busy"
    out.mkdir()
    for holder in ("mfa select", "mfa train"):  # the message names the holder (it named
        with hold_run_folder(out, command=holder):  # the command refused)
            code, _, stderr = run_cli("select", "--config", CONFIG, *sets(*TINY),
                                      "--components", 2, "--factors", 1, "--out", out)
        assert code == 2 and f"{out} is in use by `{holder}` (pid {os.getpid()})" in stderr
    assert not list(out.glob("selection.*"))
    (out / "selection.csv").write_text("an earlier sweep")  # refused: leaves no .lock
    (out / ".lock").unlink()
    code, _, stderr = run_cli("select", "--config", CONFIG, *sets(*TINY),
                              "--components", 2, "--factors", 1, "--out", out)
    assert code == 2 and "already holds an earlier sweep" in stderr
    assert sorted(p.name for p in out.iterdir()) == ["selection.csv"]
    with pytest.raises(RunFolderInUse), hold_run_folder(out), hold_run_folder(out):
        pass  # (the same lock as mfa train's)
    def failing(*args, **kwargs):
        raise ValueError("a fit failed")

    monkeypatch.setattr("mfa.run_select._select", failing)
    afile = tmp_path / "afile"  # a folder that cannot be made was found after every fit
    afile.write_text("mine")
    code, _, stderr = run_cli("select", "--config", CONFIG, *sets(*TINY),
                              "--components", 2, "--factors", 1, "--out", afile / "sweep")
    assert code == 2 and "Not a directory" in stderr and "a fit failed" not in stderr
    afile.unlink()

    monkeypatch.setattr("mfa.run_select._select", failing)
    code, _, stderr = run_cli("select", "--config", CONFIG, *sets(*TINY),
                              "--components", 2, "--factors", 1,
                              "--out", tmp_path / "new" / "sweep")
    assert code == 2 and "a fit failed" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]


def test_sweep_refuses_a_grid_the_rows_cannot_take_before_any_fit(data):
    """L above D or K above N failed after the earlier candidates had been fitted."""
    train, val = data
    calls = []

    def fit(k, lat):
        calls.append((k, lat))
        return fitter(train, {})(k, lat)

    with pytest.raises(ValueError, match=r"factors \[7\] exceed the 6 features of train"):
        sweep_models(train, val, [2], [1, 7], fit)
    with pytest.raises(ValueError, match=r"components \[601\] exceed the 600 rows of train"):
        sweep_models(train, val, [2, 601], [1], fit)
    assert calls == []


@pytest.mark.parametrize("scale", [0, -256, "256", float("nan")])
def test_a_bad_scale_is_refused_before_any_fit(data, scale):
    """It was refused by bits_per_dim after every candidate had been fitted."""
    train, val = data
    fits = []

    def fit(k, lat):
        fits.append((k, lat))
        return fitter(train, {})(k, lat)

    with pytest.raises(ValueError, match="scale must be a finite number > 0"):
        sweep_models(train, val, [2, 3], [1], fit, scale=scale)
    assert fits == []


def test_grid_values_are_checked_before_duplicates_are_dropped(data):
    """``True == 1`` and ``2.0 == 2``: after an equal int they were dropped as duplicates
    (accepted), first in the grid they were refused."""
    train, val = data
    fit = fitter(train, {})
    for grid in ([1, True], [2, 2.0], [[2]]):
        with pytest.raises(TypeError, match="components must be an int"):
            sweep_models(train, val, grid, [1], fit)


class _Scored:
    """A stand-in model whose log-density of every row is ``value`` (D=6, L=0)."""

    n_features, n_factors, noise = 6, 0, "diagonal"

    def __init__(self, value, k=1):
        self.value, self.n_components = value, k

    def log_prob(self, x):
        return torch.full((x.shape[0],), self.value, dtype=torch.float64)


def test_a_fit_that_fails_is_a_row_and_the_sweep_goes_on(data, tmp_path):
    """One fit that raised (Adam diverging) lost every finished fit of the sweep."""
    train, val = data
    base, partial = fitter(train, {}), []

    def fit(k, lat):
        if k == 2:
            raise FloatingPointError("Adam diverged")
        return base(k, lat)

    sweep = sweep_models(train, val, [1, 2, 3], [1], fit,
                         on_row=lambda s: partial.append([r["K"] for r in s.rows]))
    assert [r["K"] for r in sweep.rows] == [1, 2, 3] and sweep.complete
    assert sweep.failed == [sweep.rows[1]]
    assert sweep.rows[1]["error"] == "FloatingPointError: Adam diverged"
    assert sweep.rows[1]["val_log_likelihood"] is None and not sweep.rows[1]["best_val"]
    assert sweep.best_by_val["K"] in (1, 3) and sweep.best_by_bic["K"] in (1, 3)
    assert "failed: FloatingPointError: Adam diverged" in sweep.table()
    assert partial == [[1], [1, 2]]  # the sweep so far, after each fit but the last
    paths = sweep.save(tmp_path)
    record = json.loads(paths[2].read_text())
    assert record["rows"][1]["error"] == "FloatingPointError: Adam diverged"
    assert record["complete"] is True


def test_a_streamed_sweep_whose_fits_all_fail_is_saved_with_its_d_and_resumed(data,
                                                                             tmp_path):
    """A sweep of loaders or QuantizedRows (as mfa select streams large sets) learnt D only
    from the first model a fit returned: every fit failing saved n_features=null, and the
    resume the README promises was refused by SelectionSweep.load."""
    from torch.utils.data import DataLoader

    from mfa.data import QuantizedRows
    from mfa.selection import SelectionSweep

    train, val = data

    def diverging(k, lat):
        raise FloatingPointError("Adam diverged")

    pixels = torch.randint(0, 256, (40, 6), dtype=torch.uint8, generator=torch.Generator())
    rows = QuantizedRows(pixels, dequantize=True)
    assert sweep_models(rows, rows, [1], [0], diverging, scale=256).n_features == 6
    with pytest.raises(ValueError, match="factors \\[7\\] exceed the 6 features of train"):
        sweep_models(rows, rows, [1], [7], diverging)
    loaders = DataLoader(train, batch_size=200), DataLoader(val, batch_size=200)
    with pytest.raises(ValueError, match="n_features=5 but the data have 6 features"):
        sweep_models(train, val, [1], [0], diverging, n_features=5)
    for given, saved_as in [(6, 6), (None, None)]:  # (None: nothing tells the library D)
        sweep = sweep_models(*loaders, [1, 2], [0], diverging, n_features=given)
        assert sweep.best_by_val is None and len(sweep.failed) == 2
        sweep.save(tmp_path / str(given))
        path = tmp_path / str(given) / "selection.json"
        assert json.loads(path.read_text())["n_features"] == saved_as
        finished = SelectionSweep.load(path)
        assert finished.n_features == saved_as
        resumed = sweep_models(*loaders, [1, 2], [0], fitter(train, {}), finished=finished,
                               n_features=given)
        assert not resumed.failed and resumed.n_features == 6 and resumed.n_reused == 0


@pytest.mark.parametrize("values", [(float("nan"), -5.0), (float("inf"), -5.0),
                                    (-float("inf"), -5.0)])
def test_non_finite_scores_are_never_the_best(data, tmp_path, values):
    """A NaN, +inf or -inf validation score was marked the best (NaN when every score was),
    and the JSON held bare NaN/Infinity, which strict parsers refuse."""
    train, val = data
    models = {1: _Scored(values[0], 1), 2: _Scored(values[1], 2)}
    sweep = sweep_models(train, val, [1, 2], [0], lambda k, lat: models[k], scale=256)
    assert sweep.best_by_val is sweep.rows[1] and sweep.best_model is models[2]
    assert sweep.best_by_bic is sweep.rows[1]
    text = sweep.save(tmp_path)[2].read_text()

    def refuse(name):
        raise ValueError(name)

    record = json.loads(text, parse_constant=refuse)  # strict JSON
    assert record["rows"][0]["bic"] is None and record["best_by_val"] == {"K": 2, "L": 0}
    # none finite: no best (it raised, and `mfa select` then kept none of the rows)
    none = sweep_models(train, val, [1], [0], lambda k, lat: _Scored(values[0]))
    assert none.best_by_val is None and none.best_model is None
    assert not none.rows[0]["best_val"]


def test_a_refused_sweep_leaves_the_folder_and_lock_of_the_sweep_that_holds_them(
        tmp_path, monkeypatch):
    """Two sweeps started together into one new folder: B made the folder, A took its lock
    before B could. B was refused (RunFolderInUse) and then removed A's .lock and folder
    while A ran, as its own; a third sweep was then let in and A replaced its files. Only
    a sweep that held the folder removes what it made."""
    import mfa.folder_lock as folder_lock
    from mfa.config import load_config
    from mfa.run_select import select_run

    real_hold, out = folder_lock.hold_run_folder, tmp_path / "new" / "sweep"
    with contextlib.ExitStack() as sweep_a:
        def a_first(folder, **kwargs):  # A takes the lock between B's mkdir and B's lock
            sweep_a.enter_context(real_hold(folder, command="mfa select"))
            return real_hold(folder, **kwargs)

        monkeypatch.setattr(folder_lock, "hold_run_folder", a_first)
        with pytest.raises(folder_lock.RunFolderInUse, match="in use by `mfa select`"):
            select_run(load_config(CONFIG, TINY), [2], [1], out)
        assert (out / ".lock").exists()
        assert folder_lock.holder_of(out) == f"`mfa select` (pid {os.getpid()})"


def test_mfa_select_keeps_the_finished_fits_when_one_fails_or_it_is_stopped(tmp_path,
                                                                            monkeypatch):
    """A failed fit or Ctrl-C after two fits left nothing (a new folder was removed)."""
    real_fit, calls = EMTrainer.fit, []

    def fit(self, model, *args, **kwargs):
        calls.append(model.n_components)
        if model.n_components == 3:
            raise FloatingPointError("EM diverged")
        if model.n_components == 4:
            raise KeyboardInterrupt
        return real_fit(self, model, *args, **kwargs)

    monkeypatch.setattr(EMTrainer, "fit", fit)
    out = tmp_path / "new" / "sweep"
    code, stdout, stderr = run_cli("select", "--config", CONFIG, *sets(*TINY),
                                   "--components", 1, 2, 3, "--factors", 1, "--out", out)
    assert code == 1 and "1 of 3 fits failed: K=3, L=1: FloatingPointError: EM diverged" \
        in stderr
    rows = list(csv.DictReader(open(out / "selection.csv", newline="")))
    assert [r["error"] for r in rows] == ["", "", "FloatingPointError: EM diverged"]
    out = tmp_path / "stopped"
    code, _, _ = run_cli("select", "--config", CONFIG, *sets(*TINY),
                         "--components", 1, 2, 4, "--factors", 1, "--out", out)
    assert code == 130
    record = json.loads((out / "selection.json").read_text())
    assert record["complete"] is False and [r["K"] for r in record["rows"]] == [1, 2]
    assert not (out / ".lock").exists()


def test_mfa_select_keeps_the_rows_when_every_fit_fails(tmp_path, monkeypatch, caplog):
    """Every fit failing left nothing (the new folder was removed) and exited 2, where the
    README says failed fits are failed: rows and the command exits 1. A --resume then fits
    them again."""
    real_fit = EMTrainer.fit

    def diverging(self, model, *args, **kwargs):
        raise FloatingPointError("EM diverged")

    monkeypatch.setattr(EMTrainer, "fit", diverging)
    out = tmp_path / "new" / "sweep"
    with caplog.at_level(logging.WARNING, logger="mfa"):
        code, stdout, stderr = run_cli("select", "--config", CONFIG, *sets(*TINY),
                                       "--components", 1, 2, "--factors", 1, "--out", out)
    assert code == 1 and "2 of 2 fits failed: K=1, L=1: FloatingPointError: EM diverged" \
        in stderr, stderr
    assert "best by validation: none" in stdout and "failed: FloatingPointError" in stdout
    assert "no (K, L) of the sweep gave a finite validation log-likelihood" in caplog.text
    rows = list(csv.DictReader(open(out / "selection.csv", newline="")))
    assert [r["error"] for r in rows] == ["FloatingPointError: EM diverged"] * 2
    record = json.loads((out / "selection.json").read_text())
    assert record["best_by_val"] is None and record["complete"] is True
    assert (out / "selection.png").is_file()
    monkeypatch.setattr(EMTrainer, "fit", real_fit)
    code, stdout, stderr = run_cli("select", "--config", CONFIG, *sets(*TINY),
                                   "--components", 1, 2, "--factors", 1, "--out", out,
                                   "--resume")
    assert code == 0, stderr
    assert "best by validation: K=" in stdout


def test_mfa_select_refuses_more_components_than_the_initialisation_gets(tmp_path):
    """mfa train refused K above init_samples up front; mfa select fitted the smaller K
    first and then failed."""
    code, _, stderr = run_cli("select", "--config", CONFIG,
                              *sets(*TINY, "train.em.init_samples=5"),
                              "--components", 2, 8, "--factors", 1, "--out", tmp_path / "s")
    assert code == 2 and "components [8] exceed the 5 training images the initialisation" \
        in stderr
    assert not (tmp_path / "s").exists()


def test_a_sweep_built_by_hand_still_draws_its_table():
    """Rows without the new "error" key (a SelectionSweep built before it) raised KeyError in
    table(), and without a scale it reported log-likelihoods though its rows held bits/dim."""
    from mfa.selection import SelectionSweep

    row = {"K": 2, "L": 1, "n_params": 17, "train_log_likelihood": -5.0,
           "val_log_likelihood": -5.1, "val_bits_per_dim": 9.9, "bic": 100.0, "aic": 90.0,
           "fit_seconds": 0.1, "best_val": True, "best_bic": True}
    sweep = SelectionSweep([row], row, row, None, 4)
    assert sweep.has_bits_per_dim and sweep.failed == []
    assert "9.9000" in sweep.table() and "<- val <- BIC" in sweep.table()


@pytest.mark.parametrize("criterion", ["bic", "aic", "val_log_lik"])
def test_select_model_ranks_a_non_finite_score_last(data, criterion):
    """A model whose log p is +inf (BIC and AIC -inf) was select_model's best, as
    sweep_models' had been."""
    from mfa.metrics import select_model

    train, val = data
    models = {1: _Scored(math.inf, 1), 2: _Scored(-5.0, 2)}
    result = select_model(train, [(1, 0), (2, 0)], lambda k, lat: models[k],
                          criterion=criterion, validation=val)
    assert result.best["K"] == 2 and result.best_model is models[2]
    assert [r["K"] for r in result.rows] == [2, 1]


def test_a_partial_sweep_keeps_its_marks_and_fit_seconds_time_the_fit_alone(data):
    """The partial sweeps given to on_row shared their row dicts with the later ones, which
    re-marked them (the first's best row lost its mark); and fit_seconds counted the scoring
    passes after the fit (0.4 s for a fit of none here)."""
    train, val = data
    partials = []
    sweep_models(train, val, [1, 2, 3], [0], lambda k, lat: _Scored({1: -9.0, 2: -5.0,
                                                                      3: -7.0}[k], k),
                 on_row=partials.append)
    assert [p.best_by_val["K"] for p in partials] == [1, 2]
    first = partials[0]
    assert first.rows[0]["best_val"] and first.best_by_val is first.rows[0]
    assert "<- val" in first.table().splitlines()[1]

    class Slow(_Scored):
        def log_prob(self, x):
            time.sleep(0.1)
            return super().log_prob(x)

    sweep = sweep_models(train, val, [1], [0], lambda k, lat: Slow(-1.0))
    assert sweep.rows[0]["fit_seconds"] < 0.1  # (the two scoring passes take 0.2 s)


# ---------------------------------------------------------------------------- resuming


def _without_time(rows):
    return [{key: value for key, value in row.items() if key != "fit_seconds"} for row in rows]


def test_a_resumed_sweep_fits_only_the_missing_cells_and_equals_an_uninterrupted_one(
        data, tmp_path):
    """An interrupted sweep kept its finished rows, but going on meant fitting them all
    again. Resumed from its saved JSON it fits only the cells missing (a failed one
    included) and ends with the uninterrupted sweep's rows, equal as floats."""
    from mfa.selection import SelectionSweep

    train, val = data
    base, calls = fitter(train, {}), []

    def fit(k, lat):
        calls.append((k, lat))
        return base(k, lat)

    whole = sweep_models(train, val, [1, 3], [0, 1], fit, scale=256)

    def stopped(k, lat):
        if (k, lat) == (3, 0):
            raise FloatingPointError("EM diverged")  # a failed row: fitted again on resume
        if (k, lat) == (3, 1):
            raise KeyboardInterrupt
        return fit(k, lat)

    partials = []
    with pytest.raises(KeyboardInterrupt):
        sweep_models(train, val, [1, 3], [0, 1], stopped, scale=256, on_row=partials.append)
    partials[-1].save(tmp_path)  # (as select_run saves each)
    finished = SelectionSweep.load(tmp_path / "selection.json")
    assert [(r["K"], r["L"], r["error"] is None) for r in finished.rows] == [
        (1, 0, True), (3, 0, False), (1, 1, True)]
    assert not finished.complete and finished.best_model is None
    calls.clear()
    before = [dict(r) for r in finished.rows]
    resumed = sweep_models(train, val, [1, 3], [0, 1], fit, scale=256, finished=finished)
    assert calls == [(3, 0), (3, 1)]
    assert resumed.complete and resumed.n_reused == 2 and resumed.outside_grid == []
    assert _without_time(resumed.rows) == _without_time(whole.rows)  # (==: equal floats)
    kept = {(r["K"], r["L"]): r["fit_seconds"] for r in finished.rows}
    assert [r["fit_seconds"] for r in resumed.rows if r["K"] == 1] == [kept[1, 0], kept[1, 1]]
    assert resumed.table().splitlines()[0] == whole.table().splitlines()[0]
    best = (resumed.best_by_val["K"], resumed.best_by_val["L"])
    assert best == (whole.best_by_val["K"], whole.best_by_val["L"])
    assert (resumed.best_model is None) is (best in kept)
    assert finished.rows == before  # (its marks too: the resumed sweep marks copies)


def test_a_resumed_sweep_takes_a_new_grid_and_keeps_the_cells_outside_it(data, tmp_path):
    """A larger grid fits only its new cells; the saved cells a smaller grid leaves out are
    kept (outside the table, in the JSON's outside_grid) and reused when a grid has them
    again."""
    from mfa.selection import SelectionSweep

    train, val = data
    base, calls = fitter(train, {}), []

    def fit(k, lat):
        calls.append((k, lat))
        return base(k, lat)

    first = sweep_models(train, val, [1, 3], [1], fit)
    calls.clear()
    larger = sweep_models(train, val, [1, 3, 5], [1], fit, finished=first)
    assert calls == [(5, 1)] and larger.rows[:2] == first.rows
    calls.clear()
    smaller = sweep_models(train, val, [3], [1], fit, finished=larger)
    assert calls == [] and [(r["K"], r["L"]) for r in smaller.rows] == [(3, 1)]
    assert [(r["K"], r["L"]) for r in smaller.outside_grid] == [(1, 1), (5, 1)]
    assert not any(r["best_val"] or r["best_bic"] for r in smaller.outside_grid)
    assert smaller.best_model is None  # (its only row was read back)
    assert len(smaller.table().splitlines()) == 2
    smaller.save(tmp_path)
    record = json.loads((tmp_path / "selection.json").read_text())
    assert [(r["K"], r["L"]) for r in record["outside_grid"]] == [(1, 1), (5, 1)]
    assert len(list(csv.DictReader(open(tmp_path / "selection.csv", newline="")))) == 1
    again = sweep_models(train, val, [1, 3, 5], [1], fit,
                         finished=SelectionSweep.load(tmp_path / "selection.json"))
    assert calls == [] and again.outside_grid == [] and again.n_reused == 3
    assert again.rows == larger.rows  # (JSON floats read back exactly)


def test_resume_refuses_a_finished_sweep_it_cannot_match(data, tmp_path):
    from mfa.selection import SelectionSweep

    train, val = data
    finished = sweep_models(train, val, [1, 2], [0], lambda k, lat: _Scored(-float(k), k))
    scored = lambda k, lat: _Scored(-1.0, k)  # noqa: E731
    with pytest.raises(TypeError, match="finished must be a SelectionSweep"):
        sweep_models(train, val, [1], [0], scored, finished=finished.rows)
    with pytest.raises(ValueError, match="finished sweep has 6 features but the data have 5"):
        sweep_models(train[:, :5], val[:, :5], [1], [0], scored, finished=finished)
    with pytest.raises(ValueError, match=r"fit_fn\(3, 0\) returned a model of K=2, L=0"):
        sweep_models(train, val, [3], [0], lambda k, lat: _Scored(-1.0, 2), finished=finished)
    twice = SelectionSweep(finished.rows * 2, finished.rows[0], None, None, 6)
    with pytest.raises(ValueError, match="finished: two rows have K=1, L=0"):
        sweep_models(train, val, [1], [0], scored, finished=twice)
    path = tmp_path / "selection.json"
    for text, problem in [("{", "is not a sweep's JSON record"),
                          ("[]", r"not a sweep's JSON record \(no list of rows\)"),
                          ('{"rows": [], "n_features": 0}', "n_features=0"),
                          ('{"rows": [{"K": 0, "L": 1}], "n_features": 6}', "K=0, L=1"),
                          ('{"rows": [{"K": 1, "L": 1, "bic": "x", "fit_seconds": 1, '
                           '"best_val": true, "best_bic": true}], "n_features": 6}',
                           "invalid values for bic"),
                          # (a float count passed, then formatting the table raised)
                          ('{"rows": [{"K": 1, "L": 1, "n_params": 13.0, "fit_seconds": 1, '
                           '"best_val": true, "best_bic": true}], "n_features": 6}',
                           "invalid values for n_params"),
                          ('{"rows": [{"K": 1, "L": 1, "n_params": 13, "fit_seconds": 1, '
                           '"best_val": true, "best_bic": true}]}', "n_features is null but some")]:
        path.write_text(text)
        with pytest.raises(ValueError, match=problem):
            SelectionSweep.load(path)
    # no finite score (every fit failed): read back without a best, for a resume to refit
    path.write_text('{"rows": [{"K": 1, "L": 1, "fit_seconds": 1, "best_val": true, '
                    '"best_bic": false, "error": "E: x"}], "n_features": 6}')
    failed = SelectionSweep.load(path)
    assert failed.best_by_val is None and not failed.rows[0]["best_val"]


def test_a_non_finite_score_read_back_stays_out_of_the_bests_and_the_plot(data, tmp_path):
    """The JSON saves a score that is not finite as null: read back, that row is reused as
    None (never the best) and the table and plot of the resumed sweep still draw."""
    from mfa.selection import SelectionSweep

    train, val = data
    models = {1: _Scored(-3.0, 1), 2: _Scored(-math.inf, 2)}
    sweep_models(train, val, [1, 2], [0], lambda k, lat: models[k]).save(tmp_path)
    finished = SelectionSweep.load(tmp_path / "selection.json")
    assert finished.rows[1]["val_log_likelihood"] is None and finished.rows[1]["error"] is None

    def refit(k, lat):
        raise AssertionError("nothing is left to fit")

    resumed = sweep_models(train, val, [1, 2], [0], refit, finished=finished)
    assert resumed.best_by_val["K"] == 1 and resumed.n_reused == 2
    assert resumed.table().splitlines()[2].split()[:4] == ["2", "0", "25", "-"]
    resumed.save(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "selection.json").read_text())["rows"] == json.loads(
        (tmp_path / "selection.json").read_text())["rows"]


def _saved(out):
    record = json.loads((out / "selection.json").read_text())
    return record, list(csv.DictReader(open(out / "selection.csv", newline="")))


def test_mfa_select_resume_after_two_interruptions_equals_an_uninterrupted_sweep(
        tmp_path, monkeypatch, caplog):
    """`mfa select` stopped by Ctrl-C kept its rows but could only start again
    (--overwrite). --resume fits the missing (K, L) only, a resume stopped in turn keeps the
    rows it read back, and the last one's files equal an uninterrupted sweep's."""
    caplog.set_level(logging.INFO, logger="mfa")
    real_fit, calls, stop_at = EMTrainer.fit, [], []

    def fit(self, model, *args, **kwargs):
        if model.n_components in stop_at:
            raise KeyboardInterrupt
        calls.append(model.n_components)
        return real_fit(self, model, *args, **kwargs)

    monkeypatch.setattr(EMTrainer, "fit", fit)
    grid = ("--components", 1, 2, 3, "--factors", 1)
    code, _, stderr = run_cli("select", "--config", CONFIG, *sets(*TINY), *grid,
                              "--out", tmp_path / "whole")
    assert code == 0, stderr
    out = tmp_path / "resumed"
    stop_at[:] = [2]
    code, _, stderr = run_cli("select", "--config", CONFIG, *sets(*TINY), *grid, "--out", out)
    assert code == 130 and "rerun the same command with --resume to fit only the rest" in stderr
    first_row = _saved(out)[0]["rows"][0]
    stop_at[:] = [3]
    calls.clear()
    code, _, stderr = run_cli("select", "--config", CONFIG, *sets(*TINY), *grid, "--out", out,
                              "--resume")
    assert code == 130 and calls == [2]
    record, _ = _saved(out)
    assert record["complete"] is False and [r["K"] for r in record["rows"]] == [1, 2]
    unmarked = lambda row: {k: v for k, v in row.items() if k not in ("best_val",  # noqa: E731
                                                                       "best_bic")}
    assert unmarked(record["rows"][0]) == unmarked(first_row)  # (read back, saved as it was)
    stop_at[:] = []
    calls.clear()
    code, stdout, stderr = run_cli("select", "--config", CONFIG, *sets(*TINY), *grid,
                                   "--out", out, "--resume")
    assert code == 0 and calls == [3], stderr
    assert "resuming the sweep in" in caplog.text
    assert "2 of the 3 (K, L) read back, 1 to fit" in caplog.text
    (whole, whole_csv), (resumed, resumed_csv) = _saved(tmp_path / "whole"), _saved(out)
    assert resumed["complete"] is True
    assert unmarked(resumed["rows"][0]) == unmarked(first_row)
    assert _without_time(resumed["rows"]) == _without_time(whole["rows"])  # equal floats
    assert _without_time(resumed_csv) == _without_time(whole_csv)
    assert {k: v for k, v in resumed.items() if k != "rows"} == {
        k: v for k, v in whole.items() if k != "rows"}
    assert stdout.splitlines()[0].split()[:4] == ["K", "L", "params", "val"]


def test_mfa_select_resume_refuses_a_sweep_of_other_settings(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="mfa")
    out = tmp_path / "sel"
    code, _, stderr = run_cli("select", "--config", CONFIG, *sets(*TINY),
                              "--components", 2, "--factors", 1, "--out", out)
    assert code == 0, stderr
    saved = {p.name: p.read_bytes() for p in out.glob("selection.*")}
    code, _, stderr = run_cli("select", "--config", CONFIG,
                              *sets(*TINY, "seed=1", "train.em.max_iter=3"),
                              "--components", 2, "--factors", 1, "--out", out, "--resume")
    assert code == 2 and "it was fitted with other settings" in stderr
    assert "seed (saved 0, now 1); train.em.max_iter (saved 2, now 3)" in stderr
    code, _, stderr = run_cli("select", "--config", CONFIG, *sets(*TINY, "data.limit=100"),
                              "--components", 2, "--factors", 1, "--out", out, "--resume")
    assert code == 2 and "data.limit (saved 120, now 100)" in stderr
    code, _, stderr = run_cli("select", "--config", CONFIG, *sets(*TINY),
                              "--components", 2, "--factors", 1, "--method", "sgd",
                              "--out", out, "--resume")
    assert code == 2 and "train.method (saved 'em', now 'sgd')" in stderr
    # (only that: every key of both trainers' sections, ~55, was listed after it)
    error = stderr[stderr.index("error:"):]
    assert "train.em." not in error and "train.sgd." not in error, error
    code, _, stderr = run_cli("select", "--config", CONFIG, *sets(*TINY), "--components", 2,
                              "--factors", 1, "--out", out, "--resume", "--overwrite")
    assert code == 2 and "--overwrite: not allowed with argument --resume" in stderr
    from mfa.config import load_config
    from mfa.run_select import select_run

    with pytest.raises(ValueError, match="resume and overwrite exclude each other"):
        select_run(load_config(CONFIG, TINY), [2], [1], out, resume=True, overwrite=True)
    record = json.loads(saved["selection.json"])
    float_count = record | {"rows": [record["rows"][0] | {"n_params": 3137.0}]}
    for written, problem in [
            (record | {"data_digest": "0" * 64}, "the training or validation images are not "
             "those it was fitted on"),
            (record | {"settings": None}, "it records no settings"),
            # (each was refused as recording no settings, saved before sweeps could resume)
            ([record], "its selection.json holds an array, not a sweep's record"),
            (None, "its selection.json holds null, not a sweep's record"),
            (record | {"settings": [1]}, "its settings are [1], not a mapping"),
            (record | {"data_digest": 5}, "its data_digest is 5, not a SHA-256 hex string"),
            # (it passed, and the resume raised formatting it after rewriting .json and .csv)
            (float_count, "the row of K=2, L=1 has invalid values for n_params")]:
        (out / "selection.json").write_text(json.dumps(written))
        code, _, stderr = run_cli("select", "--config", CONFIG, *sets(*TINY),
                                  "--components", 2, "--factors", 1, "--out", out, "--resume")
        assert code == 2 and problem in stderr, stderr
        assert (out / "selection.json").read_text() == json.dumps(written)
        assert {p.name: p.read_bytes() for p in out.glob("selection.[!j]*")} == {
            name: data for name, data in saved.items() if name != "selection.json"}
    (out / "selection.json").unlink()
    code, _, stderr = run_cli("select", "--config", CONFIG, *sets(*TINY),
                              "--components", 2, "--factors", 1, "--out", out, "--resume")
    assert code == 2 and "holds selection.csv, selection.md, selection.png but no " \
        "selection.json" in stderr
    (out / "selection.json").write_bytes(saved["selection.json"])
    assert {p.name: p.read_bytes() for p in out.glob("selection.*")} == saved
    # what may differ: where the data are read from and how, progress
    code, _, stderr = run_cli("select", "--config", CONFIG,
                              *sets(*TINY, "data.num_workers=1", "train.em.progress=true",
                                    "output.dir=elsewhere"),
                              "--components", 2, "--factors", 1, "--out", out, "--resume")
    assert code == 0 and "1 of the 1 (K, L) read back, 0 to fit" in caplog.text, stderr


def test_mfa_select_resume_with_nothing_saved_fits_every_cell(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="mfa")
    code, stdout, stderr = run_cli("select", "--config", CONFIG, *sets(*TINY),
                                   "--components", 2, "--factors", 1,
                                   "--out", tmp_path / "new", "--resume")
    assert code == 0, stderr
    assert "nothing to resume in" in caplog.text and "fitting every (K, L)" in caplog.text
    assert json.loads((tmp_path / "new" / "selection.json").read_text())["complete"] is True


def test_mfa_select_resume_on_a_new_grid_keeps_the_saved_cells_outside_it(tmp_path,
                                                                          monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="mfa")
    calls, real_fit = [], EMTrainer.fit

    def fit(self, model, *args, **kwargs):
        calls.append((model.n_components, model.n_factors))
        return real_fit(self, model, *args, **kwargs)

    monkeypatch.setattr(EMTrainer, "fit", fit)
    out = tmp_path / "sel"
    for grid, fitted in [((1, 2), [(1, 1), (2, 1)]), ((2, 3), [(3, 1)]), ((1, 2, 3), [])]:
        calls.clear()
        code, stdout, stderr = run_cli("select", "--config", CONFIG, *sets(*TINY),
                                       "--components", *grid, "--factors", 1, "--out", out,
                                       "--resume")
        assert code == 0 and calls == fitted, stderr
        record, rows = _saved(out)
        assert [int(r["K"]) for r in rows] == [r["K"] for r in record["rows"]] == list(grid)
        assert [line.split()[0] for line in stdout.splitlines()[1:1 + len(grid)]] == [
            str(k) for k in grid]
    assert record["outside_grid"] == [] and record["grid"]["components"] == [1, 2, 3]
    code, _, stderr = run_cli("select", "--config", CONFIG, *sets(*TINY), "--components", 3,
                              "--factors", 1, "--out", out, "--resume")
    assert code == 0 and "2 saved (K, L) not in this grid (K=1, L=1; K=2, L=1) stay in " \
        "selection.json's outside_grid" in caplog.text, stderr
    record, rows = _saved(out)
    assert [r["K"] for r in record["outside_grid"]] == [1, 2] and len(rows) == 1



@pytest.mark.parametrize("init", ["kmeans", "none"])
def test_a_select_row_is_the_model_mfa_train_fits_of_that_config(tmp_path, init):
    """select's docstring: every model is built as mfa.workflow.train builds one (its seed,
    not one per K) and fitted on the train split with the validation split as the trainer's
    validation data; the row's score is that model's mean log p of the validation rows. An
    independent mfa train of the same config and (K, L) must give the same number (a sweep
    that scored the train split, gave the trainer the train split as validation data, or
    seeded each K's model by seed + K differed; init=none: the seeded start is the fit's)."""
    from mfa.config import load_config
    from mfa.metrics import mean_log_likelihood
    from mfa.run_select import select_run
    from mfa.workflow import load_data, train

    config = load_config(CONFIG, [*TINY, "train.em.max_iter=3", "train.em.reseed_rounds=0",
                                  f"train.em.init={init}", f"output.dir={tmp_path}",
                                  "model.n_components=3", "model.n_factors=2"])
    sweep, _ = select_run(config, [3], [2], tmp_path / "sel")
    result = train(config, figures=False)
    val = load_data(config).loader("val", batch_size=1024, dtype=result.model.dtype)
    expected = mean_log_likelihood(result.model, val)
    assert sweep.rows[0]["val_log_likelihood"] == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_mfa_select_resume_refuses_a_sweep_whose_validation_images_changed(tmp_path):
    """The rows' scores are validation log-likelihoods: a sweep whose validation images
    changed on disk (the training ones untouched) is not resumed (its data digest hashed
    the training pixels alone, and the resume mixed rows scored on the old images with rows
    scored on the new)."""
    import numpy as np

    from mfa.config import load_config
    from mfa.run_select import select_run
    from mfa.workflow import load_data

    root = tmp_path / "imgs"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (4, 4), dtype=np.uint8)).save(root / f"{i}.png")
    config = load_config(CONFIG, [*TINY, "data.name=folder", f"data.root={root}"])
    before = load_data(config)
    select_run(config, [1], [1], tmp_path / "sel")
    changed = Path(before.source_names("val")[0])
    changed = changed if changed.is_absolute() else root / changed
    Image.fromarray(np.full((4, 4), 255, dtype=np.uint8)).save(changed)
    after = load_data(config)
    assert torch.equal(after.train_pixels, before.train_pixels)
    assert not torch.equal(after.val_pixels, before.val_pixels)
    with pytest.raises(ValueError, match="the training or validation images are not those "
                                         "it was fitted on"):
        select_run(config, [1, 2], [1], tmp_path / "sel", resume=True)
