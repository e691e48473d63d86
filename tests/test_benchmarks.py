"""The GPU benchmark script runs end to end on the CPU at tiny sizes, so it cannot rot while
no GPU is lent: every case reports its figures and the JSON is complete and consistent."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "bench_gpu.py"
TINY = ["--quick", "--device", "cpu", "--n-rows", "600", "--features", "48", "--components",
        "4", "--factors", "2", "--batch-size", "256", "--adam-batch-size", "128",
        "--inpaint-rows", "16", "--large-components", "8"]


def _run(args, tmp_path, timeout=60):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=tmp_path, env=env)


@pytest.mark.slow
def test_bench_gpu_quick_on_cpu_prints_every_case_and_writes_json(tmp_path):
    out = tmp_path / "res" / "bench.json"
    proc = _run([*TINY, "--json", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    for field in ("device: cpu", "torch ", "matmul [256, 48] @ [48, 8] GFLOP/s", "TF32 accuracy",
                  "s/epoch", "GFLOP/s", "EM float64", "EM mixed", "EM float32",
                  "samples/s", "inpaint 16 rows", "large model K=8, L=2: fits = True",
                  "initialisation (EMConfig defaults: K-means 20 iterations", "total "):
        assert field in text, f"{field!r} missing from the output:\n{text}"
    res = json.loads(out.read_text())
    assert res["config"]["n_rows"] == 600 and res["config"]["features"] == 48
    assert res["commit"] not in ("", "unknown") and res["started_utc"]
    assert res["skipped"] == [], res["skipped"]
    for key in ("float32", "tf32", "float64"):
        assert res["matmul"][key] > 0
    assert res["init"]["rows"] == 600 and res["init"]["seconds"] > 0  # (init_samples > 600)
    em = {(r["stats_dtype"], r["tf32"]): r for r in res["em"]}
    assert set(em) == {("auto", False), ("float64", False), ("precise", False),
                       ("centred", False), ("mixed", False), ("centred32", False),
                       ("float32", False), ("centred", True), ("mixed", True),
                       ("float32", True)}
    assert em[("auto", False)]["resolved_stats_dtype"] == "centred"  # on a CPU
    flops = 4 * 600 * 48 * 4 * (2 + 2)
    lls = []
    for r in em.values():
        assert r["seconds_per_epoch"] > 0 and math.isfinite(r["train_log_likelihood"])
        assert r["tflop_per_epoch"] == pytest.approx(flops / 1e12)
        assert r["gflops"] == pytest.approx(flops / r["seconds_per_epoch"] / 1e9)
        assert r["fraction_of_matmul_rate"] == pytest.approx(r["limit_s"] / r["seconds_per_epoch"])
        assert r["peak_memory_gb"] is None  # no GPU memory figure on a CPU
        lls.append(r["train_log_likelihood"])
    # Every mode scores the same start on the same batches: the log-likelihoods agree.
    assert max(lls) - min(lls) < 1e-4 * abs(lls[0])
    adam = res["adam"][0]
    assert adam["samples_per_s"] == pytest.approx(adam["rows"] / adam["seconds"])
    assert adam["steps"] >= 3 and adam["rows"] == min(adam["steps"] * 128, 600)
    acc = res["tf32_accuracy"]
    assert set(acc["log_prob"]) == {"float32", "tf32"}
    assert len(acc["em_update"]) == 14  # seven modes, TF32 off and on
    # float32 on a CPU is accurate to far better than 1e-3 on this small problem.
    assert acc["log_prob"]["float32"]["max_rel_error"] < 1e-4
    assert acc["em_update"]["float64/float32"]["noise_max_rel_error"] < 1e-4
    assert res["inpaint"]["no_grad"]["finite"] and res["inpaint"]["as_called"]["finite"]
    assert res["large_model"]["fits"] and set(res["large_model"]["phases"]) == {
        "construct", "log_prob_batch", "em_iteration_one_batch", "adam_step", "inpaint_64_rows",
        "em_epoch"}


@pytest.mark.slow
def test_profile_gpu_quick_on_cpu_lists_the_top_kernels(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "profile_gpu.py"), "--quick", "--device",
         "cpu", "--modes", "centred", "--rows", "40"],  # (at 5 rows, mm's place in the
        # self-time ranking of these tiny steps varied from run to run: it dropped out once)
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for field in ("== E-step, one batch of 512 rows, stats_dtype=centred",
                  "== Adam, one step of 256 rows", "aten::mm", "Self CPU time total"):
        assert field in proc.stdout, f"{field!r} missing from the output:\n{proc.stdout}"


def test_profile_gpu_without_cuda_says_so(monkeypatch):
    """``--device cuda`` where no CUDA device is: a torch traceback from deep inside (on a
    lent GPU with a broken driver, too), where ``bench_gpu.py`` says what is wrong."""
    spec = importlib.util.spec_from_file_location(
        "profile_gpu", ROOT / "benchmarks" / "profile_gpu.py")
    profile_gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(profile_gpu)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="--device cuda: no CUDA device is available"):
        profile_gpu.main(["--device", "cuda", "--quick"])


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_gpu_rejects_bad_options(capsys):
    bench = _load_script()
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(["--quick", "--modes", "float16"])
    assert exc.value.code == 2
    assert "--modes: unknown stats_dtype ['float16']" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(["--quick", "--components", "0"])
    assert exc.value.code == 2 and "--components: must be >= 1, got 0" in capsys.readouterr().err
    args = bench.parse_args(["--quick", "--features", "48"])  # explicit options win over --quick
    assert (args.features, args.n_rows) == (48, 2048)


@pytest.mark.slow  # the Adam warm-up runs before its budget check
def test_bench_gpu_skips_cases_that_overrun_the_budget(tmp_path, capsys):
    bench = _load_script()
    threads = torch.get_num_threads()
    out = tmp_path / "bench.json"
    res = bench.main([*TINY, "--budget-s", "0", "--json", str(out)])
    assert torch.get_num_threads() == threads  # the quick mode's single thread is restored
    assert "SKIPPED EM auto: needs ~" in capsys.readouterr().out
    assert json.loads(out.read_text())["skipped"] == res["skipped"]
    assert all("skipped" in r for r in res["em"] + res["adam"] + [res["init"]])
    assert "inpaint" not in res
    assert len(res["skipped"]) == 16  # every case after the matmul peers


def test_dequantised_stream_is_seeded_uint8_and_in_unit_interval():
    bench = _load_script()
    pixels = bench.make_pixels(50, 12, torch.device("cpu"), seed=3, chunk=16)
    assert pixels.dtype == torch.uint8 and torch.equal(
        pixels, bench.make_pixels(50, 12, torch.device("cpu"), seed=3, chunk=16))
    stream = bench.DequantisedStream(pixels, 16, seed=1)
    first, again = list(stream), list(stream)
    assert len(first) == len(stream) == 4 and first[-1].shape == (2, 12)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))  # re-seeded every pass
    x = torch.cat(first)
    assert x.dtype == torch.float32 and bool(((x >= 0) & (x < 1)).all())
    assert torch.equal(torch.floor(x * 256).to(torch.uint8), pixels)  # (p + u) / 256


@pytest.mark.slow
def test_bench_em_synthetic_prints_every_mode_and_writes_json(tmp_path):
    """benchmarks/bench_em.py end to end on a tiny synthetic set: every precision mode is timed
    (round-robin), the initialisation and Adam are reported, and the JSON's ratios follow
    from its own figures."""
    out = tmp_path / "em.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_em.py"), "--synthetic", "900", "40",
         "-k", "3", "-l", "2", "--batch-size", "300", "--iters", "2", "--adam-batch", "50", "100",
         "--adam-steps", "2", "--init-runs", "2", "--no-sklearn", "--threads", "1", "--out",
         str(out)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for field in ("auto (= centred)", "float64", "precise", "mixed", "centred32", "float32",
                  "initialisation", "Adam (batch 50)", "Adam (batch 100)"):
        assert field in proc.stdout, f"{field!r} missing from:\n{proc.stdout}"
    res = json.loads(out.read_text())
    # where the figures came from (docs/benchmarks.md names each table's commit)
    assert res["commit"] not in ("", "unknown") and res["started_utc"]
    limit = res["limit_seconds_per_iter"]
    assert limit == pytest.approx(res["gflop_per_iter"] / max(
        res["matmul_gflops"], res["matmul_gflops_after_modes"]))
    for mode in ("auto", "float64", "precise", "centred", "mixed", "centred32", "float32"):
        seconds = res[f"mfa_{mode}_seconds_per_iter"]
        assert seconds > 0
        assert res[f"mfa_{mode}_times_limit"] == pytest.approx(seconds / limit)
    assert len(res["init_seconds_runs"]) == 2
    assert res["init_seconds"] == pytest.approx(sum(res["init_seconds_runs"]) / 2)
    assert res["init_in_default_iterations"] == pytest.approx(
        res["init_seconds"] / res["mfa_auto_seconds_per_iter"])
    # the initialisation proper is part of the whole fit(max_iter=0), reported beside it
    assert 0 < res["init_seconds"] < res["fit_max_iter_0_seconds"]
    assert res["fit_max_iter_0_in_default_iterations"] == pytest.approx(
        res["fit_max_iter_0_seconds"] / res["mfa_auto_seconds_per_iter"])
    assert "the whole fit(max_iter=0)" in proc.stdout
    by_batch = res["adam_by_batch"]
    assert set(by_batch) == {"50", "100"}  # JSON keys
    for figures in by_batch.values():
        assert figures["samples_per_s"] > 0
        assert figures["fraction_of_matmul"] == pytest.approx(
            figures["samples_per_s"] * 4 * 40 * 3 * (2 + 2) / 1e9 / max(
                res["matmul_gflops"], res["matmul_gflops_after_modes"]))
    assert res["adam_samples_per_s"] == by_batch["100"]["samples_per_s"]


def _bench_em_env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))


def test_bench_em_without_scikit_learn_says_so_before_timing(tmp_path):
    """Without scikit-learn the peer is refused at the start with what to do (it crashed
    after all the timing, writing no JSON)."""
    code = ("import runpy, sys; sys.modules['sklearn'] = None; "
            f"sys.argv = ['bench_em.py', '--synthetic', '900', '40', '--out', "
            f"{str(tmp_path / 'em.json')!r}]; "
            f"runpy.run_path({str(ROOT / 'benchmarks' / 'bench_em.py')!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path, env=_bench_em_env())
    assert proc.returncode == 2
    assert "scikit-learn" in proc.stderr and "--no-sklearn" in proc.stderr
    assert "s/iteration" not in proc.stdout  # nothing was timed


FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.slow
@pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").exists(),
                    reason="Fashion-MNIST (Debian dataset-fashion-mnist) not installed")
def test_bench_em_held_out_peer_runs_as_many_iterations_as_mfa(tmp_path):
    """The held-out comparison gives scikit-learn's GMM as many EM iterations as MFA (with
    --iters 4 --fit-iters 5 it ran 7 against MFA's 5 and printed 5)."""
    pytest.importorskip("sklearn")
    out = tmp_path / "em.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_em.py"), "--root", str(FASHION),
         "--rows", "400", "-k", "2", "-l", "1", "--batch-size", "200", "--iters", "4",
         "--fit-iters", "8", "--adam-batch", "100", "--adam-steps", "1", "--init-runs", "1",
         "--threads", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=_bench_em_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["sklearn_diag_test_iterations"] == 8
    assert "MFA held-out bits/dim after 8 EM iterations" in proc.stdout
    assert "scikit-learn diag held-out bits/dim after 8 iterations" in proc.stdout
    assert res["sklearn_diag_seconds_per_iter"] > 0


@pytest.mark.slow
def test_gpu_check_keeps_to_its_deadline(tmp_path):
    """Its steps' timeouts added up to 480 s, but the checks before the tests had none (27 s
    on the H200) and a pip step could add 30 s: one deadline now bounds every step. With a
    deadline of 18 s the quick (CPU) run (21 s here unbounded) is cut short and says so."""
    import time

    env = dict(os.environ, GPU_CHECK_QUICK="1", GPU_CHECK_DEADLINE="18", OUT=str(tmp_path),
               PYTHON=sys.executable)
    started = time.monotonic()
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")],
                          capture_output=True, text=True, timeout=120, env=env)
    wall = time.monotonic() - started
    out = proc.stdout
    assert "== card" in out and "== gpu_check finished" in out, out[-3000:]
    assert proc.returncode != 0 and "FAILED: " in out  # (which step was cut varies with load)
    assert wall < 18 + 12, f"{wall:.0f} s"  # (a kill grace of up to 10 s past a cut step)


def test_bench_selection_quick_reports_every_case_and_writes_json(tmp_path, monkeypatch,
                                                                 capsys):
    """The selection-overhead benchmark runs its smoke test: each dataset here fits and
    reports its figures; a dataset that is not on the machine is skipped by name."""
    from mfa.data.locations import DatasetNotFoundError

    spec = importlib.util.spec_from_file_location("bench_selection",
                                                  ROOT / "benchmarks" / "bench_selection.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    load = bench.load_dataset

    def here(name, **kwargs):
        if name == "fashion-mnist":
            raise DatasetNotFoundError("fashion-mnist: not here")
        return load(name, **kwargs)

    monkeypatch.setattr(bench, "load_dataset", here)
    out = tmp_path / "sel.json"
    result = bench.main(["--quick", "--datasets", "fashion-mnist", "embedded-mnist", "--out",
                         str(out)])
    assert "fashion-mnist: skipped (fashion-mnist: not here)" in capsys.readouterr().out
    (case,) = result["cases"].values()
    assert case["K"] == 4 and case["fit_seconds"] > case["selection_seconds"] > 0
    assert case["selection_share"] == pytest.approx(
        case["selection_seconds"] / (case["fit_seconds"] - case["selection_seconds"]))
    assert case["candidates_scored"] > 3 and case["iterations"] > 0
    assert 0 < case["test_bits_per_dim"] < 8
    written = json.loads(out.read_text())
    assert written["cases"] == json.loads(json.dumps(result["cases"]))
    # where the figures came from, as bench_em's and bench_gpu's JSON say (it said nothing)
    assert written["commit"] not in ("", "unknown") and written["started_utc"]
    from mfa import prior_search  # the benchmark's counter is removed again

    assert prior_search.score_candidates.__name__ == "score_candidates"


def test_gpu_check_names_the_commit_as_the_json_does(tmp_path):
    """Its first line named `git rev-parse --short HEAD` while bench_gpu.json recorded
    `<sha>-dirty` from a modified checkout: both come from scripts/_provenance.py now."""
    repo = tmp_path / "repo"
    for name in ("benchmarks/gpu_check.sh", "scripts/_provenance.py"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text((ROOT / name).read_text())

    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              cwd=repo, capture_output=True, text=True, check=True).stdout
    git("init", "-q")
    git("add", "-A")
    git("commit", "-q", "-m", "scratch")
    sha = git("rev-parse", "--short", "HEAD").strip()
    (repo / "benchmarks" / "gpu_check.sh").write_text(  # a modified checkout
        (repo / "benchmarks" / "gpu_check.sh").read_text() + "# changed\n")
    env = dict(os.environ, GPU_CHECK_QUICK="1", GPU_CHECK_DEADLINE="0", PYTHONPATH="",
               OUT=str(tmp_path / "out"), PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(repo / "benchmarks" / "gpu_check.sh")],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.stdout.startswith("gpu_check ") and proc.stdout.splitlines()[0].endswith(
        f" commit {sha}-dirty"), proc.stdout[:3000]


def _bench_selection():
    spec = importlib.util.spec_from_file_location("bench_selection",
                                                  ROOT / "benchmarks" / "bench_selection.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def _fake_fit(ks: list[int], fail_at: int | None = None):
    """A stand-in for bench_selection.one_fit recording each K (raising at ``fail_at``)."""
    def fit(splits, k, n_factors, seed):
        ks.append(k)
        if k == fail_at:
            raise RuntimeError("a later fit failed")
        return {"K": k, "fit_seconds": 2.0, "selection_seconds": 0.5, "selection_share": 1 / 3,
                "candidates_scored": 4, "iterations": 3, "tempered": None,
                "test_bits_per_dim": 5.0}
    return fit


def test_bench_selection_checks_its_options_before_any_fit(tmp_path, monkeypatch, capsys):
    """A typo in the second dataset's name ended the run after the first's fits (and wrote
    no JSON); an --out under a file was found after every fit."""
    bench = _bench_selection()
    ks: list[int] = []
    monkeypatch.setattr(bench, "one_fit", _fake_fit(ks))
    (tmp_path / "afile").write_text("")
    for argv, message in (
            (["--datasets", "embedded-mnist", "fashon-mnist"], "unknown dataset 'fashon-mnist'"),
            (["--out", str(tmp_path / "afile" / "x.json")],
             f"--out {tmp_path / 'afile' / 'x.json'}: {tmp_path / 'afile'} is a file"),
            (["--components", "3", "0"], "--components must be >= 1, got 0"),
            (["--seed", "-1"], "--seed: must be >= 0, got -1")):
        with pytest.raises(SystemExit) as stop:
            bench.main(["--quick", *argv])
        assert stop.value.code == 2 and message in capsys.readouterr().err
    assert ks == []


def test_bench_selection_writes_each_case_and_quick_keeps_the_components_given(
        tmp_path, monkeypatch):
    """The JSON was written once, at the end: a failure lost every case before it. --quick
    replaced the --components given with K=4."""
    bench = _bench_selection()
    monkeypatch.setattr(bench, "splits_of", lambda name, seed, quick: {
        s: torch.zeros(3, 2) for s in ("train", "val", "test")})
    ks: list[int] = []
    monkeypatch.setattr(bench, "one_fit", _fake_fit(ks, fail_at=5))
    out = tmp_path / "sel.json"
    with pytest.raises(RuntimeError, match="a later fit failed"):
        bench.main(["--datasets", "embedded-mnist", "--components", "3", "5", "--out", str(out)])
    written = json.loads(out.read_text())
    assert list(written["cases"]) == ["embedded-mnist K=3"] and written["complete"] is False
    ks.clear()
    result = bench.main(["--quick", "--datasets", "fmnist", "--components", "7", "--out",
                         str(out)])
    assert ks == [7] and list(result["cases"]) == ["fashion-mnist K=7"]
    assert json.loads(out.read_text())["complete"] is True
    ks.clear()
    bench.main(["--quick", "--datasets", "embedded-mnist"])
    assert ks == [4]
