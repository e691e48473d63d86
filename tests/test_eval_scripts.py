"""scripts/outlier_eval.py and scripts/missing_eval.py at tiny sizes: each runs and writes
its page and the page's JSON twin (the figures, the command, the commit and the wall time);
the commands and commits the evaluation scripts print (scripts/_provenance.py,
scripts/hierarchical_eval.py too), and hierarchical_eval's failing child process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mfa.data import FASHION_MNIST_DEBIAN_DIR

ROOT = Path(__file__).resolve().parent.parent

TINY = {
    "outlier_eval": ["--n-components", "3", "--n-factors", "2", "--max-iter", "2",
                     "--train-limit", "300", "--eval-limit", "60"],
    "missing_eval": ["--n-components", "2", "--n-factors", "2", "--max-iter", "2",
                     "--train-limit", "300", "--test-limit", "60", "--knn-donors", "100"],
}


@pytest.mark.slow  # a subprocess that fits small models (~5 s on one thread)
@pytest.mark.parametrize("script", sorted(TINY))
def test_tiny_run_writes_the_page_and_its_json_twin(tmp_path, script):
    if not (FASHION_MNIST_DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("needs Debian's dataset-fashion-mnist")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "page.md"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / f"{script}.py"),
                           *TINY[script], "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    twin = json.loads(out.with_suffix(".json").read_text())
    assert twin["command"] == f"python scripts/{script}.py {' '.join(TINY[script])} --out {out}"
    assert twin["seconds"] > 0 and twin["commit"]
    text = out.read_text()
    assert f"at commit `{twin['commit']}`" in text  # the page and its twin name one commit
    if script == "outlier_eval":  # one row per direction and score, each on the page
        assert len(twin["figures"]) >= 2
        for row in twin["figures"]:
            assert 0 <= row["test"]["auroc"] <= 1 and row["score"] in text
            # the page names the tail that dominates the mean (the README cites it)
            assert row["low_nats"] <= row["median_nats"]
            assert f"score below {row['low_nats']:,.0f} nats" in text
    else:  # every setting with each method's bits/dim and RMSE
        assert set(twin["figures"]) == {"random 25 %", "random 50 %", "one 14×14 block"}
        for setting, methods in twin["figures"].items():
            assert setting in text
            scored = [m for m in methods.values() if isinstance(m, dict)]  # (a), (c), (d)
            assert len(scored) == 3 and all(m["bpd"] > 0 and m["rmse"] >= 0 for m in scored)


def test_the_json_twin_names_the_argv_given_to_main(tmp_path, monkeypatch):
    """A script's main(argv) called from Python: the twin records that argv (it recorded the
    calling process's own command line, unlike the page)."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import _provenance

    out = tmp_path / "page.md"
    _provenance.write_report(out, "text\n", {"x": 1.5}, 2.0, "/somewhere/missing_eval.py",
                             ["--seed", 3, "--out", out])
    twin = json.loads(out.with_suffix(".json").read_text())
    assert twin["command"] == f"python scripts/missing_eval.py --seed 3 --out {out}"
    assert twin["figures"] == {"x": 1.5} and twin["seconds"] == 2.0 and out.read_text() == "text\n"


def _scratch_checkout(tmp_path: Path, files: dict[str, str]) -> tuple[Path, str]:
    """A git checkout in ``tmp_path / "repo"`` with ``files`` (path: text) committed, and
    its short commit."""
    repo = tmp_path / "repo"
    for name, text in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(text)

    def git(*args: str) -> str:
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              cwd=repo, capture_output=True, text=True, check=True).stdout
    git("init", "-q")
    git("add", "-A")
    git("commit", "-q", "-m", "scratch")
    return repo, git("rev-parse", "--short", "HEAD").strip()


def test_the_json_twin_names_the_commit_the_page_was_made_at(tmp_path):
    """Regenerating a tracked page: its twin recorded ``<sha>-dirty`` (the commit was taken
    after the new page was written, so the page itself made the checkout dirty) while the
    page said ``<sha>``."""
    import importlib.util

    repo, sha = _scratch_checkout(tmp_path, {
        "scripts/_provenance.py": (ROOT / "scripts" / "_provenance.py").read_text(),
        "docs/page.md": "the old page\n"})
    spec = importlib.util.spec_from_file_location("scratch_provenance",
                                                  repo / "scripts" / "_provenance.py")
    provenance = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(provenance)
    out = repo / "docs" / "page.md"
    provenance.write_report(out, f"made at {provenance.commit()}\n", {}, 1.0, "x.py", [])
    assert out.read_text() == f"made at {sha}\n"
    assert json.loads(out.with_suffix(".json").read_text())["commit"] == sha


def test_the_printed_commands_rerun_the_same_settings_and_are_shell_safe(tmp_path,
                                                                       monkeypatch):
    """missing_eval's page named no --settings (re-running it ran all three) and, like the
    JSON twin and hierarchical_eval's page, joined the words with spaces: a setting such as
    "one 14×14 block" came back as three words. hierarchical_eval's page named the calling
    process's argv, not the one given to main. With --knn-donors 0 the page said (d) used
    "0 seeded donor rows" though (d) did not run."""
    import argparse
    import shlex

    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import _provenance
    import hierarchical_eval
    import missing_eval

    args = argparse.Namespace(n_components=2, n_factors=2, max_iter=2, train_limit=300,
                              test_limit=60, knn_donors=0, knn_neighbors=5, seed=0,
                              settings=["one 14×14 block"])
    words = shlex.split(missing_eval.command_line(args))
    assert words[words.index("--settings"):] == ["--settings", "one 14×14 block"]
    page = missing_eval.table({}, args, 1.0, "abc")
    assert "0 seeded donor rows" not in page and "(d), scikit-learn's `KNNImputer`, was " \
        "skipped (`--knn-donors 0`)." in " ".join(page.split())

    out = tmp_path / "page.md"
    argv = ["--settings", "one 14×14 block", "--out", out]
    _provenance.write_report(out, "text\n", {}, 1.0, "missing_eval.py", argv, "abc")
    command = json.loads(out.with_suffix(".json").read_text())["command"]
    assert shlex.split(command) == ["python", "scripts/missing_eval.py", *map(str, argv)]

    monkeypatch.setattr(sys, "argv", ["pytest", "--not-these"])
    hier = dict(model="hierarchical", K=6, test_bpd=1.0, train_bpd=1.0, seconds=1.0,
                em_seconds=1.0, cpu_seconds=1.0, peak_bytes=0, max_rss_bytes=0,
                peak_kind="RSS increase", root_components=2, kept=0, child_sizes=[3, 3],
                root_test_bpd=1.0, root_seconds=1.0)
    flat = dict(hier, model="flat")
    opts = argparse.Namespace(train_rows=300, test_rows=60, factors=2, stats_dtype="float32",
                              device="cpu", threads=1, root_iter=1, rows_per_component=100,
                              max_child_components=60, child_iter=1, final_iter=0, flat_iter=1)
    page = hierarchical_eval.table(opts, [hier, flat], ["--out", "a b.md"])
    command = page.split("Written by `")[1].split("`")[0]
    assert shlex.split(command) == ["python", "scripts/hierarchical_eval.py", "--out", "a b.md"]


def test_outlier_eval_names_train_limit_0_when_it_used_every_row(monkeypatch):
    """--train-limit 0 (every train row) is kept as None, and the printed command left None
    options out: re-running it used the default 20,000 rows."""
    import argparse
    import shlex

    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import outlier_eval

    args = argparse.Namespace(n_components=3, n_factors=2, max_iter=2, train_limit=None,
                              eval_limit=None, patch_size=4, seed=0)
    assert shlex.split(outlier_eval.command_line(args)) == [
        "--n-components", "3", "--n-factors", "2", "--max-iter", "2", "--train-limit", "0",
        "--patch-size", "4", "--seed", "0"]  # (no --eval-limit: its default is every row)


@pytest.mark.slow  # two processes that import torch (~8 s)
def test_hierarchical_eval_names_the_error_of_a_child_that_failed(tmp_path):
    """A child process that dies (here: no dataset) ends the script with its error; the
    parent waited on the queue forever."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "hierarchical_eval.py"),
                           "--data-root", str(tmp_path / "nowhere"), "--out",
                           str(tmp_path / "page.md")],
                          capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path)
    assert done.returncode != 0 and not (tmp_path / "page.md").exists()
    assert "RuntimeError: the hierarchical run failed: DatasetNotFoundError: fashion-mnist " \
        "not found" in done.stderr, done.stderr[-2000:]


def _no_work(*args, **kwargs):
    raise AssertionError("the run started before its options were checked")


@pytest.mark.parametrize("script", ["outlier_eval", "missing_eval", "hierarchical_eval"])
def test_an_out_under_a_file_is_refused_before_any_work(tmp_path, monkeypatch, capsys,
                                                        script):
    """An --out under (or at) a file was found when writing, after minutes of fits
    (FileExistsError from write_report's mkdir)."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    module = __import__(script)
    for heavy in ("load_dataset", "in_fresh_process"):
        if hasattr(module, heavy):
            monkeypatch.setattr(module, heavy, _no_work)
    (tmp_path / "afile").write_text("not a folder")
    for out, blocking in ((tmp_path / "afile" / "sub" / "page.md", tmp_path / "afile"),
                          (tmp_path / "afile" / "page.md", tmp_path / "afile")):
        with pytest.raises(SystemExit) as stop:
            module.main(["--out", str(out)])
        assert stop.value.code == 2
        assert f"--out {out}: {blocking} is a file, not a folder" in capsys.readouterr().err
    (tmp_path / "folder.md").mkdir()
    with pytest.raises(SystemExit):
        module.main(["--out", str(tmp_path / "folder.md")])
    assert "it is a folder; give the name of a file" in capsys.readouterr().err
    if script == "hierarchical_eval":  # and its --json
        with pytest.raises(SystemExit):
            module.main(["--out", str(tmp_path / "p.md"), "--json",
                         str(tmp_path / "afile" / "h.json")])
        assert f"--json {tmp_path / 'afile' / 'h.json'}: {tmp_path / 'afile'} is a file" \
            in capsys.readouterr().err


def test_output_folder_creates_the_folder_and_names_a_file_in_the_way(tmp_path):
    import argparse

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import _provenance
    finally:
        sys.path.remove(str(ROOT / "scripts"))

    parser = argparse.ArgumentParser()
    assert _provenance.output_folder(parser, tmp_path / "a" / "b", is_file=False) == \
        tmp_path / "a" / "b"
    assert (tmp_path / "a" / "b").is_dir()
    _provenance.output_folder(parser, tmp_path / "c" / "page.md")
    assert (tmp_path / "c").is_dir() and not (tmp_path / "c" / "page.md").exists()
    (tmp_path / "f").write_text("")
    with pytest.raises(SystemExit):
        _provenance.output_folder(parser, tmp_path / "f", is_file=False)


def test_hierarchical_eval_writes_the_published_page_only_for_the_published_run(
        tmp_path, monkeypatch, capsys):
    """Its default --out is docs/results/hierarchical.md: the docstring's own smaller example
    (and a GPU run) replaced the published page. Without --out only the published settings
    run (--json and --data-root may differ); everything else needs an --out."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import hierarchical_eval

    monkeypatch.setattr(hierarchical_eval, "ROOT", tmp_path)  # (never the real docs/)
    monkeypatch.setattr(hierarchical_eval, "in_fresh_process", _no_work)
    for argv in (["--train-rows", "20000", "--root-components", "10"],
                 ["--device", "cuda", "--threads", "4"], ["--seed", "1"]):
        with pytest.raises(SystemExit) as stop:
            hierarchical_eval.main(argv)
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert f"{' '.join(argv[::2])} given without --out" in err, err
    assert not (tmp_path / "docs").exists()

    class Ran(Exception):
        pass

    def ran(*args, **kwargs):
        raise Ran

    monkeypatch.setattr(hierarchical_eval, "in_fresh_process", ran)
    with pytest.raises(Ran):  # the published run, and a smaller one given its own --out
        hierarchical_eval.main(["--json", str(tmp_path / "h.json"), "--data-root", "x"])
    assert (tmp_path / "docs" / "results").is_dir()
    with pytest.raises(Ran):
        hierarchical_eval.main(["--train-rows", "20000", "--out", str(tmp_path / "h.md")])


def test_the_outlier_page_names_every_emconfig_field_the_script_changes(monkeypatch):
    """The page said "EMConfig's defaults but at most 20 iterations" while the fits ran with
    stats_dtype="mixed" too. Every field of the config the fits are given that differs from
    EMConfig() is named on the page, and the published page says what the script prints."""
    import argparse
    import dataclasses
    import types

    import torch

    from mfa import EMConfig

    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import outlier_eval

    given = []

    class Stop(Exception):
        pass

    class Recording:
        def __init__(self, config):
            given.append(config)

        def fit(self, *args, **kwargs):
            raise Stop

    monkeypatch.setattr(outlier_eval, "EMTrainer", Recording)
    data = types.SimpleNamespace(train=torch.rand(20, 4), image_shape=(1, 2, 2),
                                 as_float=lambda split: torch.rand(6, 4))
    published = dict(n_components=50, n_factors=6, max_iter=20, train_limit=20000,
                     eval_limit=None, patch_size=4, seed=0)  # (docs/results/outliers.md's)
    for options in ({**published, "n_components": 2, "n_factors": 1},
                    {**published, "n_components": 2, "n_factors": 1, "max_iter": 3, "seed": 5}):
        args = argparse.Namespace(**options)
        with pytest.raises(Stop):
            outlier_eval.run_direction("a", data, "b", data, args)
        page = " ".join(outlier_eval.table([], "x", args, 1.0, "abc").split())
        changed = {f.name: getattr(given[-1], f.name) for f in dataclasses.fields(EMConfig)
                   if getattr(given[-1], f.name) != getattr(EMConfig(), f.name)}
        assert {"max_iter", "stats_dtype"} <= set(changed)
        for name, value in changed.items():
            assert f"`{name}={value!r}`" in page, name
    text = outlier_eval.table([], "x", argparse.Namespace(**published), 1.0, "abc")
    shipped = (ROOT / "docs" / "results" / "outliers.md").read_text()
    assert text.splitlines()[4] == shipped.splitlines()[4]
