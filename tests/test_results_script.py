"""scripts/results.py --quick: every model, metric and figure runs and the report is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

MODELS = ("MFA, EM", "MFA, Adam", "diagonal GMM, EM", "KDE")
FIGURES = ("samples-mfa-em", "samples-mfa-adam", "samples-diagonal-gmm-em", "samples-kde",
           "inpaint-center", "inpaint-bottom", "outliers")


@pytest.mark.slow  # a subprocess that fits every model at tiny sizes (~5 s on one thread)
def test_quick_run_writes_the_report(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")]),
        # One thread: on a busy 2-core machine two OpenMP threads per process run ~10x slower.
        "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "results.py"),
                           "--datasets", "embedded-mnist", "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    text = (tmp_path / "results.md").read_text()
    (res,) = json.loads((tmp_path / "results" / "results.json").read_text())
    assert res["dataset"] == "embedded-mnist" and res["quick"] is True
    rows = res["rows"]
    assert [r["model"].split(" (")[0] for r in rows] == list(MODELS)
    for row in rows:
        assert row["model"] in text
        assert row["test_bits_per_dim"] > 0 and 0 <= row["ndb_over_k"] <= 1
    em_rows = [r for r in rows if ", EM" in r["model"]]
    for row in em_rows:  # the automatic noise prior was chosen, and EM ran (capped by --quick)
        assert row["noise_prior_variance"] > 0
        assert 1 <= row["iterations"] <= res["setting"]["em_max_iter"]
    adam = rows[1]
    assert adam["noise_prior_variance"] > 0  # Adam chose its s₀ at the start (auto)
    assert 1 <= adam["iterations"] <= res["setting"]["sgd_epochs"]
    assert "| model | noise prior s₀ (chosen) | iterations |" in text
    for row in em_rows:  # the table shows what the fit chose
        assert f"| {row['model']} | {row['noise_prior_variance']:.3g} | {row['iterations']} |" \
            in text
    assert "| real test images | — | — | — |" in text
    assert "More results:" in text and "(results/baselines.md)" in text
    assert "smoke test" in text and "FLOORS" not in text and "floor among" not in text
    for figure in FIGURES:
        assert (tmp_path / "results" / f"embedded-mnist-{figure}.png").is_file(), figure
    # --markdown-only rewrites the same page: the run's commit, threads and protocol come
    # from results.json, not from the environment that rewrites it (it wrote 2 threads here).
    assert res["run"]["torch_threads"] == 1 and res["run"]["commit"]
    assert f"at commit `{res['run']['commit']}`" in text and "with 1 torch threads" in text
    again = subprocess.run([sys.executable, str(ROOT / "scripts" / "results.py"),
                            "--markdown-only", "--out", str(tmp_path)],
                           capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "2"},
                           timeout=60, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (tmp_path / "results.md").read_text() == text


@pytest.mark.slow  # fits every model at tiny sizes in this process (~5 s)
def test_each_split_is_dequantised_once_before_the_timed_fits(tmp_path, monkeypatch):
    """The dataset's split properties dequantise on every read; the fits' times must not
    include that (it was 1.1-1.3 s a fit on Fashion-MNIST)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import results
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    real_load = results.load_dataset
    reads = {"train": 0, "val": 0, "test": 0}

    class Counting:
        def __init__(self, data):
            self._data = data

        def __getattr__(self, name):
            if name in reads:
                reads[name] += 1
            return getattr(self._data, name)

    monkeypatch.setattr(results, "load_dataset",
                        lambda *a, **k: Counting(real_load(*a, **k)))
    out = tmp_path / "results"
    out.mkdir()
    res = results.run_dataset(results.quick_setting(results.SETTINGS["embedded-mnist"]), out, 0)
    assert len(res["rows"]) == len(MODELS)
    assert reads == {"train": 1, "val": 1, "test": 1}


@pytest.mark.parametrize("script", ["results.py", "baselines.py"])
def test_quick_without_out_is_refused_before_any_work(script):
    """``results.py --quick`` wrote to docs/ by default and replaced the published page,
    JSON and figures with a smoke test's (``baselines.py --quick``: docs/results)."""
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--quick"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2
    assert "--quick needs --out" in done.stderr


def test_an_out_that_is_a_file_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    """An --out at or under a file (or a file named results in it) ended in a raw
    NotADirectoryError or FileExistsError; now a usage error names the file."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import results
    finally:
        sys.path.remove(str(ROOT / "scripts"))

    def no_work(*args, **kwargs):
        raise AssertionError("the run started before --out was checked")

    monkeypatch.setattr(results, "run_dataset", no_work)
    (tmp_path / "afile").write_text("")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results").write_text("")
    for out, blocking in ((tmp_path / "afile", tmp_path / "afile"),
                          (tmp_path / "afile" / "sub", tmp_path / "afile"),
                          (tmp_path / "out", tmp_path / "out" / "results")):
        with pytest.raises(SystemExit) as stop:
            results.main(["--quick", "--datasets", "embedded-mnist", "--out", str(out)])
        assert stop.value.code == 2
        assert f"{blocking} is a file, not a folder" in capsys.readouterr().err
