"""scripts/baselines.py --quick: every code path runs and both reports are written.

Without the Debian package dataset-fashion-mnist the run reads small idx files of random
pixels written in its on-disk format (the code path is the same; the figures mean nothing in
a smoke test either way)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_data_sources import write_mnist

from mfa.data import FASHION_MNIST_DEBIAN_DIR

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # a subprocess that fits every model at tiny sizes (~10-20 s)
def test_quick_run_writes_the_table(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if not (FASHION_MNIST_DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file():
        write_mnist(tmp_path / "data" / "FashionMNIST" / "raw", n_train=500, n_test=120)
        env.update(MFA_DATA_DIR=str(tmp_path / "data"), MFA_CACHE_DIR=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "baselines.py"), "--quick",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env,
                          timeout=300, cwd=ROOT)  # ~15 s alone; a loaded machine is slower
    assert done.returncode == 0, done.stderr[-2000:]
    text = (tmp_path / "out" / "baselines.md").read_text()
    results = json.loads((tmp_path / "out" / "baselines.json").read_text())
    assert results["meta"]["complete"] is True
    assert set(results["datasets"]) == {"fashion-mnist", "embedded-mnist"}
    for name, ds in results["datasets"].items():
        assert f"## {name}" in text
        assert set(ds["per_k"]) == {"3", "5"}
        for res in ds["per_k"].values():
            models = [r["model"] for r in res["rows"]]
            assert any(m.startswith("MFA EM, default") for m in models)
            assert any(m.startswith("MFA Adam") for m in models)
            assert "sklearn GMM diag, defaults (reg_covar=1e-6)" in models
            assert any(m.startswith("sklearn GMM full") for m in models)
            for r in res["rows"]:  # a number, or a stated reason why there is none
                assert r["test_bits_per_dim"] is not None or r["note"].startswith(
                    ("not run (cost)", "failed", "every grid fit failed")), r
            targets = res["targets"]
            diag = next(r for r in res["rows"] if r["model"].startswith("sklearn GMM diag, def"))
            default = res["rows"][0]
            if default["test_bits_per_dim"] is not None:  # the target is the difference shown
                assert targets["default_minus_sklearn_diag"] == pytest.approx(
                    default["test_bits_per_dim"] - diag["test_bits_per_dim"])
                # The overhead is against the fixed fit at the default's own choice.
                assert default["selected"] is not None
                assert any("(the default's searches' choice" in m for m in models)
                # the tempered step is recorded, and said in the note when it was applied
                step = default["tempered"]
                assert step is None or set(step) == {"applied", "temperature",
                                                     "noise_prior_variance",
                                                     "noise_prior_strength"}
                assert ("tempered step applied" in default["note"]) == bool(
                    step and step["applied"])
                timing = res["timing"]
                assert timing["chosen"] == default["selected"]
                assert targets["selection_overhead"] == pytest.approx(
                    min(timing["default_seconds"]) / min(timing["chosen_seconds"]) - 1)
                # The searches' own time: part of the faster default fit, over the rest of it.
                total, selection = min(zip(timing["default_seconds"],
                                           timing["default_selection_seconds"], strict=True))
                assert 0 < selection < total
                assert targets["selection_share"] == pytest.approx(
                    selection / (total - selection))
    assert "## Targets (issue 12)" in text
    assert "smoke test" in text
    # scripts/split_summary.py over this run and a copy of it with other figures: each cell is
    # the mean of the seeds' values, every seed's value printed beside it.
    other = json.loads(json.dumps(results))
    other["meta"]["seed"] = 1
    cell = other["datasets"]["embedded-mnist"]["per_k"]["3"]
    first = results["datasets"]["embedded-mnist"]["per_k"]["3"]
    cell["targets"]["default_minus_tuned_mfa"] = 0.5
    cell["targets"]["default_minus_sklearn_diag"] = None  # a seed without the figure
    cell["rows"][0]["test_bits_per_dim"] = (first["rows"][0]["test_bits_per_dim"] or 0) + 1.0
    (tmp_path / "other.json").write_text(json.dumps(other))
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "split_summary.py"),
                           str(tmp_path / "out" / "baselines.json"), str(tmp_path / "other.json"),
                           "--out", str(tmp_path / "summary.md"),
                           "--note", "Seed 1 is a copy of seed 0 with other figures."],
                          capture_output=True,
                          text=True, env=env, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = (tmp_path / "summary.md").read_text()
    assert "| seed 0 | seed 1 | mean |" in summary
    assert "\nSeed 1 is a copy of seed 0 with other figures.\n" in summary
    # the overhead target's strict reading has its verdict too
    assert any(line.startswith("| 3 | searches' and tempered step's own time over the rest "
                               "(≤ 30%) |") for line in summary.splitlines())
    gap = first["targets"]["default_minus_tuned_mfa"]
    row = next(line for line in summary.splitlines()
               if line.startswith("| 3 | default MFA − best hand-tuned MFA"))
    assert row.split(" | ")[2:5] == [f"{gap:.3f}", "0.500", f"{(gap + 0.5) / 2:.3f}"]
    # no mean (nor verdict) from some of the seeds: it read as every seed's, "met"
    row = next(line for line in summary.splitlines()
               if line.startswith("| 3 | default MFA − sklearn default diag"))
    assert [c.strip(" |") for c in row.split(" | ")[3:6]] == ["—", "—", "—"]
    default = first["rows"][0]["test_bits_per_dim"]
    if default is not None:
        row = next(line for line in summary.splitlines()
                   if line.startswith("| 3 | default MFA EM |"))
        cells = [c.strip(" |") for c in row.split(" | ")[2:5]]
        assert cells == [f"{default:.3f}", f"{default + 1:.3f}", f"{default + 0.5:.3f}"]


def test_split_summary_verdicts_allow_for_the_spread_of_the_seeds():
    """A mean within the target was stamped "met" though the seeds spread over it by tenths
    (K=50 on the digits: +0.099, +0.268, -0.432 against <= 0.02)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from split_summary import verdict
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    assert verdict([0.099, 0.268, -0.432], 0.02) == "undetermined"
    assert verdict([-0.571, -0.902, -1.127], 0.02) == "met"
    assert verdict([4.08, 3.87, 4.38], 0.30) == "**not met**"
    assert verdict([-6.876, -1.308, -1.280], -0.1) == "met"  # every seed, a wide spread
    assert verdict([3.68, 0.47, 0.12], 0.30) == "undetermined"  # one seed within it
    assert verdict([0.01], 0.02) == "met" and verdict([0.03], 0.02) == "**not met**"
    assert verdict([0.01, None], 0.02) == "—" and verdict([0.5, 0.6], None) == "—"
    # the mean's interval takes Student's t for the seeds' degrees of freedom, not 2: with 4
    # seeds the mean -0.143 lies 2.8 s.e. below 0.02, short of t(3) = 3.18
    assert verdict([0.03, -0.2, -0.2, -0.2], 0.02) == "undetermined"
    assert verdict([0.03, -0.1, -0.1, -0.1, -0.1], 0.02) == "met"  # t(4) = 2.78


def test_the_split_page_regenerates_from_the_runs_shipped_beside_it():
    """docs/results/embedded-mnist-splits.md must be what split_summary.py makes of the
    seed files next to it: they were once older runs than the page's (17 rows and two
    verdicts differed). Its hand-written note (``--note``) is left out of the comparison."""
    page = ROOT / "docs" / "results" / "embedded-mnist-splits.md"
    runs = sorted((ROOT / "docs" / "results" / "embedded-mnist-splits").glob("seed*.json"))
    assert [p.stem for p in runs] == ["seed0", "seed1", "seed2"]
    made = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "split_summary.py"), *map(str, runs),
         "--dataset", "embedded-mnist"], capture_output=True, text=True, check=True).stdout
    note = lambda text: [line for line in text.splitlines()  # noqa: E731
                         if line.strip() and not line.startswith("All three seeds")]
    assert note(made) == note(page.read_text())


def _fake_full_fits(monkeypatch, n_iter: int):
    """scripts/baselines.py with scikit-learn's fit replaced: 4 s initialisation and 6 s an
    iteration per 20 components, ``n_iter`` iterations (converged below 20); the module, the
    list of its ``(K, max_iter, reg_covar)`` calls and tiny splits."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import baselines
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    calls = []

    class FakeGMM:
        n_iter_, converged_ = n_iter, n_iter < 20

        def score_samples(self, rows):
            return np.zeros(rows.shape[0])

    def fake_fit(k, train, seed, covariance_type, max_iter=100, reg_covar=1e-6):
        calls.append((k, max_iter, reg_covar))
        return FakeGMM(), (4.0 + 6.0 * min(max_iter, 2)) * k / 20

    monkeypatch.setattr(baselines, "fit_sklearn", fake_fit)
    rows = np.zeros((4, 3))
    return baselines, calls, {"train": rows, "val": rows, "test": rows}


def test_full_covariance_fits_run_capped_by_the_budget_priced_from_a_two_step_probe(
        monkeypatch):
    """The probe's fit with ``max_iter=1`` was taken for one iteration's cost and multiplied
    by ``max_iter``: on the digits (K=20) it priced a fit that converges in 2 iterations
    (16 s) at 127 s, over the 90 s budget, and it was not run."""
    import argparse
    baselines, calls, splits = _fake_full_fits(monkeypatch, n_iter=2)
    args = argparse.Namespace(seed=0, full_max_iter=20, full_budget=90.0, reg_grid=[1e-6, 1e-3])
    cost: dict = {}
    out = baselines.run_full(20, splits, args, cost)
    assert calls[:2] == [(20, 1, 1e-6), (20, 2, 1e-6)]  # the probe
    assert cost["per_iter_per_k"] == pytest.approx(6.0 / 20)
    assert cost["init_per_k"] == pytest.approx(4.0 / 20)
    assert calls[2] == (20, 14, 1e-6)  # (90 - 4) / 6 iterations fit the budget
    assert out[0]["test_bits_per_dim"] is not None
    assert "converged=True" in out[0]["note"] and "capped at 14" in out[0]["note"]
    assert "not run" in out[1]["note"]  # the 2-fit grid does not fit 90 s
    calls.clear()
    out = baselines.run_full(200, splits, args, cost)  # 40 s + 60 s an iteration
    assert calls == [] and out[0]["test_bits_per_dim"] is None
    assert out[0]["note"].startswith("not run (cost): ≈40.0 s initialisation + 60.0 s")


def test_full_covariance_fits_take_an_infinite_budget_as_no_cap(monkeypatch):
    """``--full-budget inf`` raised OverflowError in math.floor."""
    import argparse
    baselines, calls, splits = _fake_full_fits(monkeypatch, n_iter=20)
    args = argparse.Namespace(seed=0, full_max_iter=20, full_budget=math.inf, reg_grid=[1e-6])
    out = baselines.run_full(20, splits, args, {})
    assert [max_iter for _, max_iter, _ in calls] == [1, 2, 20]
    assert "capped" not in out[0]["note"]
    args.full_max_iter = 0
    out = baselines.run_full(20, splits, args, {})
    assert out[0]["note"] == "not run: max_iter=0"
