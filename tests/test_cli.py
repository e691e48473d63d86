"""End to end: the ``mfa`` command on the embedded MNIST digits with a tiny model.

One run is trained once per module (``mfa train --config configs/embedded-mnist.yaml``) and
every subcommand is then run on it in-process through :func:`mfa.cli.main`; one test runs the
installed console script in a subprocess to prove the entry point works.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from mfa import cli
from mfa.checkpoint import load_checkpoint, save_checkpoint
from mfa.config import load_config
from mfa.data import load_dataset
from mfa.masks import MASK_KINDS
from mfa.model import MixtureOfFactorAnalyzers

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "embedded-mnist.yaml"

K, L = 3, 2  # components, factors
SIDE, PAD = 28, 2  # MNIST side; viz pads every cell by 2 pixels
LIMIT = 300  # images per split
N_SAMPLES, NROW, SCALE = 16, 5, 3  # sample/outlier grids of the run: 4 rows, the last partial
N_INPAINT, INPAINT_SAMPLES = 3, 2  # rows and conditional samples of the inpainting figures
MASKS = ["center", "bottom", "right"]  # the YAML's inpaint_masks
ITERATIONS = 3

TINY = [
    f"model.n_components={K}",
    f"model.n_factors={L}",
    f"train.em.max_iter={ITERATIONS}",
    "train.em.kmeans_iter=3",
    "train.em.progress=false",
    f"data.limit={LIMIT}",
    "data.dequantize=false",  # pixel/255 floats: no bits/dim keys (see the dequantised test)
    f"output.n_samples={N_SAMPLES}",
    f"output.grid_nrow={NROW}",
    f"output.image_scale={SCALE}",
    f"output.n_inpaint={N_INPAINT}",
    f"output.inpaint_samples={INPAINT_SAMPLES}",
    "output.n_factor_components=2",
    "device=cpu",
]

RUN_FILES = [
    "config.yaml", "train.log", "checkpoint.pt", "metrics.json", "history.json", "curve.png",
    "samples.png", *(f"inpaint-{m}.png" for m in MASKS), "outliers.png", "outliers.csv",
    "factors.png",
]

MAGENTA = (255, 0, 255)  # viz.HIDDEN_COLOR as 8-bit RGB


def grid_size(n: int, nrow: int, scale: int = 1, side: int = SIDE) -> tuple[int, int]:
    """(width, height) of viz.image_grid(n images, nrow) upscaled ``scale`` times:
    ``cols·(W + 2) + 2`` by ``rows·(H + 2) + 2`` with ``cols = min(nrow, n)``."""
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    return scale * (cols * (side + PAD) + PAD), scale * (rows * (side + PAD) + PAD)


def set_args(*overrides: str) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def run_cli(*argv) -> tuple[int, str, str]:
    """``mfa.cli.main`` in-process: (exit code, stdout, stderr). A ``SystemExit`` with a
    message counts as exit code 1 with the message on stderr, as the interpreter does."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main([str(a) for a in argv])
        except SystemExit as exit_:
            code = exit_.code
            if code is None:
                code = 0
            elif not isinstance(code, int):
                print(code, file=sys.stderr)
                code = 1
    return code, out.getvalue(), err.getvalue()


def open_png(path: Path) -> Image.Image:
    assert path.is_file(), f"{path} was not written"
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()
        return image.copy()


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """``mfa train`` of the tiny model; the run folder it prints."""
    out = tmp_path_factory.mktemp("cli") / "runs"
    code, stdout, stderr = run_cli("train", "--config", CONFIG,
                                   *set_args(*TINY, f"output.dir={out}"))
    assert code == 0, stderr
    lines = [line for line in stdout.splitlines() if line.startswith("run folder: ")]
    assert len(lines) == 1, stdout
    folder = Path(lines[0].removeprefix("run folder: "))
    assert folder.parent == out and folder.name == "001-embedded-mnist"
    metrics = json.loads(stdout[stdout.index("{"):])  # the metrics JSON follows
    assert metrics == json.loads((folder / "metrics.json").read_text())
    return folder


@pytest.fixture(scope="module")
def test_split():
    data = load_dataset("embedded-mnist", limit=LIMIT)
    assert data.sizes["test"] == LIMIT
    return data


# ---------------------------------------------------------------------------- mfa train


def test_train_writes_the_run_folder(run_dir):
    missing = [name for name in RUN_FILES if not (run_dir / name).is_file()]
    assert not missing, f"missing from the run folder: {missing}"
    config = load_config(run_dir / "config.yaml")
    assert config == load_config(CONFIG, [*TINY, f"output.dir={run_dir.parent}"])
    log = (run_dir / "train.log").read_text()
    assert f"run folder {run_dir}" in log

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["dataset"] == "embedded-mnist"
    assert metrics["image_shape"] == [1, SIDE, SIDE]
    assert metrics["method"] == "em"
    assert metrics["iterations"] == ITERATIONS
    for split in ("train", "val", "test"):
        ll = metrics[f"{split}_log_likelihood"]
        assert isinstance(ll, float) and math.isfinite(ll), (split, ll)
        assert f"{split}_bits_per_dim" not in metrics  # not dequantised
    assert metrics["train_seconds"] > 0

    history = json.loads((run_dir / "history.json").read_text())
    assert [r["iteration"] for r in history] == list(range(1, ITERATIONS + 1))
    assert all(math.isfinite(r["train_log_likelihood"]) for r in history)
    assert all(math.isfinite(r["val_log_likelihood"]) for r in history)
    # EM never lowers the MAP objective while its prior stays (the automatic search moves s₀).
    pairs = [(a["train_objective"], b["train_objective"])
             for a, b in zip(history, history[1:], strict=False)
             if a["noise_prior_variance"] == b["noise_prior_variance"]]
    assert pairs and all(b >= a - 1e-6 * abs(a) for a, b in pairs)

    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    assert ckpt.run_config == config
    assert (ckpt.model.n_components, ckpt.model.n_factors) == (K, L)
    assert ckpt.metrics == metrics


def test_train_figures_have_the_grid_sizes(run_dir):
    expected = {
        "samples.png": (grid_size(N_SAMPLES, NROW, SCALE), "L"),
        "outliers.png": (grid_size(N_SAMPLES, NROW, SCALE), "L"),
        # one row per component: mean | noise | (μ − cA, A, μ + cA) per factor
        "factors.png": (grid_size(2 * (2 + 3 * L), 2 + 3 * L, SCALE), "L"),
        # one row per image: original | masked (magenta = hidden) | mean | samples
        **{f"inpaint-{m}.png": (grid_size(N_INPAINT * (3 + INPAINT_SAMPLES),
                                          3 + INPAINT_SAMPLES, SCALE), "RGB")
           for m in MASKS},
    }
    assert grid_size(N_SAMPLES, NROW, SCALE) == (456, 366)  # the formula, spelled out once
    for name, (size, mode) in expected.items():
        image = open_png(run_dir / name)
        assert image.size == size, name
        assert image.mode == mode, name
    curve = open_png(run_dir / "curve.png")
    assert curve.size == (600, 400)  # 6 × 4 inches at 100 dpi


def test_train_outliers_csv_ranks_every_test_image(run_dir, test_split):
    rows = read_csv(run_dir / "outliers.csv")
    assert list(rows[0]) == ["rank", "index", "source", "score", "log_prob", "label"]
    assert len(rows) == LIMIT
    assert [int(r["rank"]) for r in rows] == list(range(LIMIT))
    indices = [int(r["index"]) for r in rows]
    assert sorted(indices) == list(range(LIMIT))
    log_p = [float(r["log_prob"]) for r in rows]
    scores = [float(r["score"]) for r in rows]
    assert all(math.isfinite(v) for v in log_p + scores)
    assert scores == sorted(scores, reverse=True)  # most outlying first
    labels = test_split.labels("test")
    assert [int(r["label"]) for r in rows] == [int(labels[i]) for i in indices]
    sources = test_split.source_names("test")  # (the image's row in the dataset's files)
    assert [r["source"] for r in rows] == [sources[i] for i in indices]
    assert all(r["source"].startswith("all:") for r in rows)
    # The log p column is the model's log p of the test images.
    model = load_checkpoint(run_dir / "checkpoint.pt").model
    x = test_split.test[torch.tensor(indices)]
    with torch.no_grad():
        expected = model.log_prob(x).double()
    torch.testing.assert_close(torch.tensor(log_p, dtype=torch.float64), expected,
                               rtol=1e-6, atol=1e-5)
    # The score is the default one, complexity (pixel/255 data: scale 255): bits/dim of
    # the model minus the PNG length of the image in bits/dim.
    d = SIDE * SIDE
    png_bits = []
    for row in x:
        buffer = io.BytesIO()
        pixels = torch.round(row * 255).to(torch.uint8).reshape(SIDE, SIDE).numpy()
        Image.fromarray(pixels).save(buffer, format="PNG", compress_level=9)
        png_bits.append(8.0 * buffer.tell() / d)
    bits = -(expected - d * math.log(255)) / (d * math.log(2))
    torch.testing.assert_close(torch.tensor(scores, dtype=torch.float64),
                               bits - torch.tensor(png_bits, dtype=torch.float64),
                               rtol=1e-6, atol=1e-5)
    # The mean of the log p column is the test log-likelihood of metrics.json.
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert sum(log_p) / LIMIT == pytest.approx(metrics["test_log_likelihood"], rel=1e-5)


def test_train_with_dequantized_data_reports_bits_per_dim(tmp_path):
    # At a variance floor of 1e-5 the tiny model overfits the blank borders of 300
    # digits and held-out bits/dim exceed 8; a floor of 1e-3 keeps all splits plausible.
    code, _, stderr = run_cli("train", "--config", CONFIG, "--no-figures",
                              *set_args(*TINY, "data.dequantize=true",
                                        "train.em.variance_floor=1e-3",
                                        f"output.dir={tmp_path}", "output.name=deq"))
    assert code == 0, stderr
    metrics = json.loads((tmp_path / "deq" / "metrics.json").read_text())
    d = SIDE * SIDE
    for split in ("train", "val", "test"):
        ll = metrics[f"{split}_log_likelihood"]
        bpd = metrics[f"{split}_bits_per_dim"]
        assert math.isfinite(ll) and 0 < bpd < 8, (split, ll, bpd)
        # −(log p − D·log 256) / (D·ln 2)
        assert bpd == pytest.approx(-(ll - d * math.log(256)) / (d * math.log(2)), rel=1e-9)
    assert not (tmp_path / "deq" / "samples.png").exists()  # --no-figures
    assert (tmp_path / "deq" / "curve.png").is_file()  # (output.plot's, as the help says)
    # mfa evaluate reports the same numbers from the checkpoint.
    code, stdout, stderr = run_cli("evaluate", tmp_path / "deq", "--split", "val", "test")
    assert code == 0, stderr
    result = json.loads(stdout)
    for key in ("val_log_likelihood", "val_bits_per_dim", "test_log_likelihood",
                "test_bits_per_dim"):
        assert result[key] == pytest.approx(metrics[key], rel=1e-9)
    # mfa sample and mfa visualize draw the model's values as the pixels floor(256 x) they
    # stand for on the run's dequantised scale (they drew round(255 x): p or p ± 1).
    model = load_checkpoint(tmp_path / "deq" / "checkpoint.pt").model
    assert run_cli("sample", tmp_path / "deq", "-n", 1, "--seed", 3, "--scale", 1,
                   "-o", tmp_path / "s.png")[0] == 0
    x, _ = model.sample(1, generator=torch.Generator().manual_seed(3))
    assert run_cli("visualize", tmp_path / "deq", "--components", 0, "--scale", 1,
                   "-o", tmp_path / "f.png")[0] == 0
    for png, value in (("s.png", x[0]), ("f.png", model.means[0])):
        cell = np.asarray(open_png(tmp_path / png))[PAD : PAD + SIDE, PAD : PAD + SIDE]
        want = np.clip(np.floor(value.detach().double().numpy() * 256), 0, 255)
        assert np.array_equal(cell, want.reshape(SIDE, SIDE).astype(np.uint8)), png


def test_train_resume_of_a_finished_run_changes_nothing(run_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    before = load_checkpoint(copy / "checkpoint.pt")
    files = sorted(p.name for p in copy.iterdir())
    code, stdout, stderr = run_cli("train", "--resume", copy, "--no-figures")
    assert code == 0, stderr
    assert f"run folder: {copy}" in stdout
    # --no-figures holds for a resume too: no samples-2.png, outliers-2.csv, … (the curve
    # follows output.plot: drawn again as curve-2.png, the run's own kept)
    assert sorted({p.name for p in copy.iterdir()} - set(files)) == ["curve-2.png"]
    after = load_checkpoint(copy / "checkpoint.pt")
    for name, value in before.model.state_dict().items():
        assert torch.equal(value, after.model.state_dict()[name]), name
    assert len(json.loads((copy / "history.json").read_text())) == ITERATIONS


def test_no_figures_says_a_resume_does_not_keep_it():
    """--no-figures is not saved with the run: a resume started without it drew every figure
    and neither --help nor the README said so (a new-user review)."""
    code, stdout, _ = run_cli("train", "--help")
    assert code == 0
    text = " ".join(stdout.split())
    assert "not saved with the run, so a --resume draws them unless given --no-figures again" \
        in text
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "so a `--resume` draws them unless given `--no-figures` again" in readme


def test_version_and_the_help_name_what_the_command_does(tmp_path):
    """No `mfa --version`; the description left out select and visualize; --factor-scale
    and visualize --components did not say their defaults (4 components where the run's
    n_factor_components is 0); --no-figures said it skips the figures, and curve.png was
    drawn (it follows output.plot)."""
    from mfa import __version__

    code, stdout, _ = run_cli("--version")
    assert code == 0 and stdout.strip() == f"mfa {__version__}"
    code, stdout, _ = run_cli("--help")
    assert "select K and L, visualize the factors" in " ".join(stdout.split())
    text = help_of("visualize")
    assert "c in μ ± c·A_i (default: 2)" in text
    assert "the first 4 where that is 0 or there is no run config" in text
    assert "(curve.png, the training curve, follows output.plot)" in help_of("train")


def test_yaml_errors_name_the_file_and_the_override(tmp_path):
    """PyYAML's marks said `in "<unicode string>", line 3`, not which file."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  n_components: [1\n")
    code, _, stderr = run_cli("train", "--config", bad)
    assert code == 2 and f'in "{bad}", line 2' in stderr and "<unicode string>" not in stderr
    assert "n_components: [1" in stderr  # (the snippet stays)
    code, _, stderr = run_cli("train", *set_args("model.n_components=[1"))
    assert code == 2 and 'in "--set model.n_components", line 1' in stderr, stderr


def help_of(command: str) -> str:
    code, stdout, _ = run_cli(command, "--help")
    assert code == 0
    return " ".join(stdout.split())


def test_help_explains_every_option_it_was_missing():
    """A new-user review: --seed, --image-shape and the checkpoint positional had no help (or
    only a default), --ndb-bins did not say its default, evaluate --overwrite spoke of a
    default name that evaluate does not have, --resume did not say it takes a finished run."""
    for command in ("sample", "inpaint", "outliers", "evaluate", "visualize"):
        text = help_of(command)
        assert "checkpoint a run folder (e.g. runs/001-embedded-mnist) or a checkpoint file" \
            in text, command
        if command != "visualize":
            assert re.search(r"--seed SEED seeds \S", text), command
    for command in ("sample", "visualize"):
        assert "--image-shape C H W channels, height and width of the images" in help_of(
            command)
    text = help_of("evaluate")
    assert "--ndb-bins NDB_BINS NDB with this many bins (default: 0, off)" in text
    assert "--overwrite replace an existing -o file (else it is refused)" in text
    assert "default name" not in text
    assert ("continue an interrupted run; a finished one is only evaluated and its figures "
            "drawn again, under new names") in help_of("train")


def test_every_option_of_every_command_has_a_help_text():
    """-o/--out of sample, inpaint and visualize and outliers' --out-dir had no help, and
    inpaint's and outliers' --split did not say its default (a docs review)."""
    import argparse

    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in commands.choices.items():
        for action in sub._actions:
            assert action.help, (name, action.option_strings or action.dest)
    for command, use in (("inpaint", "whose images are inpainted"), ("outliers", "to rank")):
        assert f"--split {{train,val,test}} the split {use} (default: test)" in help_of(command)
    for command, name in (("sample", "samples.png"), ("inpaint", "inpaint-<mask>.png"),
                          ("visualize", "factors.png")):
        assert f"default: {name} in the run folder" in help_of(command)
    assert "--out-dir OUT_DIR the folder for outliers.png and outliers.csv" in help_of(
        "outliers")


def test_train_resume_keeps_the_files_the_per_run_commands_wrote(run_dir, tmp_path):
    """A run trained without figures, then `mfa outliers` and `mfa sample` into its folder:
    `mfa train --resume` redrew samples.png and outliers.csv over them (the scores became
    another score's)."""
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    for figure in copy.glob("*.png"):
        figure.unlink()
    (copy / "outliers.csv").unlink()
    assert run_cli("outliers", copy, "--score", "neg_log_prob")[0] == 0
    assert run_cli("sample", copy, "--seed", "7")[0] == 0
    mine = {name: (copy / name).read_bytes() for name in ("outliers.csv", "samples.png")}
    code, _, stderr = run_cli("train", "--resume", copy)
    assert code == 0, stderr
    for name, content in mine.items():
        assert (copy / name).read_bytes() == content, name
    assert (copy / "outliers-2.csv").exists() and (copy / "outliers-2.png").exists()
    assert (copy / "samples-2.png").exists()


# ---------------------------------------------------------------------------- mfa sample


@pytest.mark.parametrize("flags", [[], ["--per-component"], ["--no-noise"],
                                   ["--per-component", "--no-noise"]])
def test_sample(run_dir, tmp_path, flags):
    out = tmp_path / "s.png"
    count = [] if "--per-component" in flags else ["-n", 6]  # -n with it is refused
    code, stdout, stderr = run_cli("sample", run_dir, *count, "--nrow", 4, "--scale", 1,
                                   "--seed", 3, "-o", out, *flags)
    assert code == 0, stderr
    assert stdout.strip() == str(out)
    image = open_png(out)
    n = K * 4 if "--per-component" in flags else 6  # one row of nrow per component
    assert image.size == grid_size(n, 4)
    assert image.mode == "L"
    # The same seed draws the same images.
    again = tmp_path / "again.png"
    assert run_cli("sample", run_dir, *count, "--nrow", 4, "--scale", 1, "--seed", 3,
                   "-o", again, *flags)[0] == 0
    assert open_png(again).tobytes() == image.tobytes()


def test_sample_refuses_flags_it_would_ignore(run_dir, tmp_path):
    """-n with --per-component (which draws --nrow a component) and an --image-shape other
    than the run's were silently ignored; both are refused, naming the conflict."""
    code, _, stderr = run_cli("sample", run_dir, "-n", 10, "--per-component",
                              "-o", tmp_path / "a.png")
    assert code != 0 and "-n and --per-component exclude each other" in stderr
    code, _, stderr = run_cli("sample", run_dir, "--image-shape", 1, 14, 56,
                              "-o", tmp_path / "b.png")
    assert code != 0 and "differs from the run's image shape 1 28 28" in stderr
    assert not (tmp_path / "a.png").exists() and not (tmp_path / "b.png").exists()
    code, _, stderr = run_cli("evaluate", run_dir, "--outlier-scores", "neg_log_prob")
    assert code != 0 and "--outlier-scores needs --outliers-against" in stderr
    code, _, stderr = run_cli("train", "--resume", tmp_path / "no-such-run")
    assert code != 0 and "no-such-run does not exist" in stderr
    # a run's config.yaml was called a checkpoint of another name, to be copied as one
    code, _, stderr = run_cli("train", "--resume", run_dir / "config.yaml")
    assert code == 2 and "is a config file: resume its run with --resume" in stderr
    assert "copy it" not in stderr
    # a config outside a run (flags mixed up): no run folder to advise
    (tmp_path / "mine.yaml").write_text("model:\n  n_components: 3\n")
    code, _, stderr = run_cli("train", "--resume", tmp_path / "mine.yaml")
    assert code == 2 and "is a config file: start a new run from it with --config" in stderr
    code, _, stderr = run_cli("train", "--config", tmp_path)
    assert code == 2 and "is a folder, not a YAML file" in stderr


def test_per_run_commands_compute_on_the_runs_device_or_device(run_dir, tmp_path,
                                                               monkeypatch):
    """The per-run commands use the run's own device setting (they always loaded onto the
    CPU, so a run trained on a GPU could not reproduce its figures there); --device
    overrides it, and a device this machine lacks is refused naming the way out."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)  # as on a CPU-only machine
    monkeypatch.setattr("torch.cuda.device_count", lambda: 0)
    code, _, stderr = run_cli("sample", run_dir, "--device", "cuda", "-o", tmp_path / "x.png")
    assert code == 2 and "asks for CUDA" in stderr and "Traceback" not in stderr
    assert "use --device cpu" in stderr and "device=cpu" not in stderr  # (not config syntax)
    assert not (tmp_path / "x.png").exists()
    for bad in ("tpu", "cuda:x"):  # torch's own RuntimeError was printed as it came
        code, _, stderr = run_cli("sample", run_dir, "--device", bad, "-o", tmp_path / "x.png")
        assert code == 2 and f"device {bad!r} is not a device" in stderr, stderr
        assert "RuntimeError" not in stderr and not (tmp_path / "x.png").exists()
    gpu_run = tmp_path / "gpu-run"  # a run trained with device=cuda, moved to this machine
    gpu_run.mkdir()
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    save_checkpoint(gpu_run / "checkpoint.pt", ckpt.model,
                    run_config=dataclasses.replace(ckpt.run_config, device="cuda"),
                    trainer_state=ckpt.trainer_state, metrics=ckpt.metrics)
    for command in ("sample", "inpaint", "outliers", "visualize", "evaluate"):
        code, _, stderr = run_cli(command, gpu_run)
        assert code == 2 and "asks for CUDA" in stderr, (command, stderr)
        assert "(the run's device setting; pass --device cpu)" in stderr, command
    assert sorted(p.name for p in gpu_run.iterdir()) == ["checkpoint.pt"]
    seed = ckpt.run_config.seed
    code, stdout, _ = run_cli("sample", gpu_run, "--device", "cpu", "--seed", seed,
                              "-n", N_SAMPLES, "--nrow", NROW, "--scale", SCALE)
    assert code == 0
    assert (gpu_run / "samples.png").read_bytes() == (run_dir / "samples.png").read_bytes()
    code, stdout, _ = run_cli("evaluate", gpu_run, "--device", "cpu")
    assert code == 0
    assert json.loads(stdout)["test_log_likelihood"] == pytest.approx(
        json.loads((run_dir / "metrics.json").read_text())["test_log_likelihood"], rel=1e-6)


def test_sample_without_noise_differs_and_defaults_to_the_run_folder(run_dir, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    shutil.copy(run_dir / "checkpoint.pt", folder / "checkpoint.pt")
    code, stdout, stderr = run_cli("sample", folder / "checkpoint.pt")  # the run's n, nrow
    assert code == 0, stderr
    assert stdout.strip() == str(folder / "samples.png")
    noisy = open_png(folder / "samples.png")
    assert noisy.size == grid_size(N_SAMPLES, NROW, SCALE)  # (the run's output.*)
    assert run_cli("sample", folder, "--no-noise", "-o", folder / "smooth.png")[0] == 0
    smooth = open_png(folder / "smooth.png")
    assert smooth.size == noisy.size
    assert smooth.tobytes() != noisy.tobytes()


# ---------------------------------------------------------------------------- mfa inpaint


def left_half_mask_png(path: Path) -> Path:
    """A 56×56 mask picture, black (hidden) on its left half: the 'left' mask at 28×28."""
    picture = Image.new("L", (56, 56), 255)
    picture.paste(0, (0, 0, 28, 56))
    picture.save(path)
    return path


#: hidden pixels per image for each kind (random: --fraction 0.25 of 784)
HIDDEN = {"center": 14 * 14, "top": 392, "bottom": 392, "left": 392, "right": 392,
          "random": 196, "image": 392}


def test_every_mask_kind_is_covered():
    assert set(HIDDEN) == set(MASK_KINDS)


@pytest.mark.parametrize("kind", MASK_KINDS)
def test_inpaint(run_dir, tmp_path, kind):
    out = tmp_path / f"inpaint-{kind}.png"
    extra = []
    if kind == "image":
        extra = ["--mask-image", left_half_mask_png(tmp_path / "mask.png")]
    if kind == "random":
        extra = ["--fraction", 0.25]
    code, stdout, stderr = run_cli("inpaint", run_dir, "--mask", kind, "-n", 3, "--samples", 2,
                                   "--scale", 1, "-o", out, *extra)
    assert code == 0, stderr
    assert stdout.strip() == str(out)
    image = open_png(out)
    assert image.mode == "RGB"
    assert image.size == grid_size(3 * 5, 5)  # 3 rows of original | masked | mean | 2 samples
    # The masked-input column shows exactly the hidden pixels in magenta.
    step = SIDE + PAD
    pixels = np.asarray(image)  # [H, W, 3]
    for row in range(3):
        top = PAD + row * step
        masked = pixels[top : top + SIDE, PAD + step : PAD + step + SIDE]
        hidden = int((masked == MAGENTA).all(axis=-1).sum())
        assert hidden == HIDDEN[kind], (kind, row)
        # The original column is the test image itself: grey, no magenta.
        original = pixels[top : top + SIDE, PAD : PAD + SIDE]
        assert (original == original[..., :1]).all()


def test_inpaint_with_a_mask_image_matches_the_same_builtin_mask(run_dir, tmp_path):
    mask = left_half_mask_png(tmp_path / "mask.png")
    common = ["-n", 2, "--samples", 1, "--seed", 5]
    assert run_cli("inpaint", run_dir, "--mask", "left", "-o", tmp_path / "l.png", *common)[0] == 0
    assert run_cli("inpaint", run_dir, "--mask", "image", "--mask-image", mask,
                   "-o", tmp_path / "i.png", *common)[0] == 0
    assert open_png(tmp_path / "l.png").tobytes() == open_png(tmp_path / "i.png").tobytes()
    # --mask-image alone implies --mask image; with another kind it was silently ignored
    assert run_cli("inpaint", run_dir, "--mask-image", mask, "-o", tmp_path / "j.png",
                   *common)[0] == 0
    assert open_png(tmp_path / "j.png").tobytes() == open_png(tmp_path / "i.png").tobytes()
    code, _, stderr = run_cli("inpaint", run_dir, "--mask", "top", "--mask-image", mask,
                              "-o", tmp_path / "t.png", *common)
    assert code == 2 and "--mask-image is a mask of kind image, not --mask top" in stderr
    assert not (tmp_path / "t.png").exists()
    # a run drawn with output.mask_image: --mask image takes it (it was refused)
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    output = dataclasses.replace(ckpt.run_config.output, mask_image=str(mask))
    masked = tmp_path / "masked-run"
    save_checkpoint(masked / "checkpoint.pt", ckpt.model,
                    run_config=dataclasses.replace(ckpt.run_config, output=output),
                    trainer_state=ckpt.trainer_state, metrics=ckpt.metrics)
    code, _, stderr = run_cli("inpaint", masked, "--mask", "image", "-o", tmp_path / "r.png",
                              *common)
    assert code == 0, stderr
    assert open_png(tmp_path / "r.png").tobytes() == open_png(tmp_path / "i.png").tobytes()


def test_inpaint_refuses_a_mask_that_hides_nothing(run_dir, tmp_path):
    """--mask random --fraction 0 and an all-white mask image drew a figure of unchanged
    images with exit 0; now each is refused (exit 2), naming why, and nothing is written.
    mfa train refuses such output.mask_image before training."""
    white = tmp_path / "white.png"
    Image.new("L", (28, 28), 255).save(white)
    for extra, why in ((["--mask", "random", "--fraction", 0], "fraction of the pixels"),
                       (["--mask-image", white], "no dark pixel")):
        code, _, stderr = run_cli("inpaint", run_dir, *extra, "-o", tmp_path / "x.png",
                                  "-n", 2, "--samples", 0)
        assert code == 2 and "mask hides no pixel" in stderr and why in stderr, stderr
        assert "Traceback" not in stderr and not (tmp_path / "x.png").exists()
    runs = tmp_path / "runs"
    code, stdout, stderr = run_cli("train", "--config", CONFIG, *set_args(
        *TINY, f"output.dir={runs}", "output.inpaint_masks=[image]",
        f"output.mask_image={white}"))
    assert code == 2 and "'image' mask hides no pixel" in stderr, stderr
    assert not runs.exists() or not any(runs.iterdir())


def test_inpaint_fraction_belongs_to_random_masks(run_dir, tmp_path):
    """--fraction with another mask kind was silently ignored; now refused (exit 2), and
    with --mask random it sets the hidden share (0.5 when absent)."""
    common = ["-n", 2, "--samples", 0, "--seed", 3]
    code, _, stderr = run_cli("inpaint", run_dir, "--fraction", 0.2, "-o", tmp_path / "c.png",
                              *common)
    assert code == 2 and "--fraction is the hidden share of --mask random" in stderr
    assert "--mask center" in stderr and not (tmp_path / "c.png").exists()
    pngs = {}
    for name, extra in (("default", []), ("tenth", ["--fraction", 0.1]),
                        ("explicit", ["--fraction", 0.5])):
        out = tmp_path / f"{name}.png"
        assert run_cli("inpaint", run_dir, "--mask", "random", "-o", out, *extra,
                       *common)[0] == 0
        pngs[name] = open_png(out).tobytes()
    assert pngs["default"] == pngs["explicit"] != pngs["tenth"]


def test_inpaint_image_mask_without_a_file_fails_clearly(run_dir, tmp_path):
    code, _, stderr = run_cli("inpaint", run_dir, "--mask", "image", "-o", tmp_path / "x.png")
    assert code == 2
    assert "--mask image needs --mask-image PNG" in stderr  # (it named the API's mask_image)
    code, _, stderr = run_cli("inpaint", run_dir, "--mask", "image", "--mask-image",
                              tmp_path / "nope.png", "-o", tmp_path / "x.png")
    assert code == 2
    assert "nope.png" in stderr and "does not exist" in stderr
    assert not (tmp_path / "x.png").exists()


def test_a_mask_image_that_is_no_image_names_its_option(run_dir, tmp_path):
    """`--mask-image dup.yaml` said only PIL's "cannot identify image file 'dup.yaml'"."""
    (tmp_path / "dup.yaml").write_text("model: {}\n")
    code, _, stderr = run_cli("inpaint", run_dir, "--mask-image", tmp_path / "dup.yaml",
                              "-o", tmp_path / "x.png")
    assert code == 2 and not (tmp_path / "x.png").exists()
    assert f"error: --mask-image: mask image {tmp_path / 'dup.yaml'} is not an image file: " \
        "give a PNG" in stderr
    code, _, stderr = run_cli("train", "--config", CONFIG, "--no-figures",
                              *set_args(*TINY, f"output.dir={tmp_path / 'runs'}",
                                        f"output.mask_image={tmp_path / 'dup.yaml'}",
                                        "output.inpaint_masks=[image]"))
    assert code == 2 and not (tmp_path / "runs").exists()
    assert "error: output.mask_image: mask image" in stderr and "is not an image file" in stderr


# ---------------------------------------------------------------------------- mfa outliers


def test_outliers(run_dir, tmp_path):
    out = tmp_path
    code, stdout, stderr = run_cli("outliers", run_dir, "--out-dir", out, "-n", 10, "--nrow", 5,
                                   "--scale", 1)
    assert code == 0, stderr
    assert stdout.split() == [str(out / "outliers.png"), str(out / "outliers.csv")]
    image = open_png(out / "outliers.png")
    assert image.size == grid_size(10, 5)
    # Same model, same split: the same ranking as the run's own outliers.csv.
    assert read_csv(out / "outliers.csv") == read_csv(run_dir / "outliers.csv")


def test_outliers_creates_a_new_out_dir(run_dir, tmp_path):
    out = tmp_path / "new" / "folder"
    code, _, stderr = run_cli("outliers", run_dir, "--out-dir", out, "-n", 4)
    assert code == 0, stderr
    assert (out / "outliers.csv").is_file() and (out / "outliers.png").is_file()


def test_outliers_of_the_validation_split(run_dir, tmp_path):
    code, _, stderr = run_cli("outliers", run_dir, "--out-dir", tmp_path, "--split", "val",
                              "-n", 3)
    assert code == 0, stderr
    rows = read_csv(tmp_path / "outliers.csv")
    assert len(rows) == LIMIT
    assert sorted(int(r["index"]) for r in rows) == list(range(LIMIT))
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    assert open_png(tmp_path / "outliers.png").size == grid_size(3, 8, SCALE)  # (the run's)


def test_outliers_by_neg_log_prob_ranks_by_log_p(run_dir, tmp_path):
    code, _, stderr = run_cli("outliers", run_dir, "--out-dir", tmp_path, "--score",
                              "neg_log_prob", "-n", 4)
    assert code == 0, stderr
    rows = read_csv(tmp_path / "outliers.csv")
    log_p = torch.tensor([float(r["log_prob"]) for r in rows], dtype=torch.float64)
    assert torch.equal(log_p, log_p.sort().values)  # least likely first
    d = SIDE * SIDE  # pixel/255 data: −log p in bits/dim with scale 255
    expected = -(log_p - d * math.log(255)) / (d * math.log(2))
    torch.testing.assert_close(torch.tensor([float(r["score"]) for r in rows],
                                            dtype=torch.float64), expected,
                               rtol=1e-6, atol=1e-5)
    code, _, stderr = run_cli("outliers", run_dir, "--score", "entropy")
    assert code == 2 and "--score" in stderr and "invalid choice" in stderr


def write_pngs(folder: Path, n: int, side: int = SIDE, seed: int = 0) -> Path:
    """``n`` greyscale PNGs of uniform noise."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        pixels = rng.integers(0, 256, size=(side, side), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return folder


# ---------------------------------------------------------------------------- mfa evaluate


def test_evaluate(run_dir, tmp_path):
    out = tmp_path / "eval.json"
    code, stdout, stderr = run_cli("evaluate", run_dir, "--ndb-bins", 5, "--split", "test", "val",
                                   "--out", out)
    assert code == 0, stderr
    result = json.loads(out.read_text())
    assert result == json.loads(stdout)
    assert set(result) == {
        "test_log_likelihood", "val_log_likelihood", "ndb_bins", "ndb", "ndb_over_k",
        "ndb_js", "ndb_real", "ndb_over_k_real", "ndb_js_real", "ndb_reference",
        "ndb_train_rows",
    }
    assert result.pop("ndb_reference") == "test"  # the real images NDB is measured on
    for key, value in result.items():
        assert isinstance(value, (int, float)) and math.isfinite(value), (key, value)
    assert result["ndb_bins"] == 5
    for suffix in ("", "_real"):
        assert 0 <= result[f"ndb{suffix}"] <= 5
        assert result[f"ndb_over_k{suffix}"] == pytest.approx(result[f"ndb{suffix}"] / 5)
        assert 0 <= result[f"ndb_js{suffix}"] <= math.log(2)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for split in ("test", "val"):
        key = f"{split}_log_likelihood"
        assert result[key] == pytest.approx(metrics[key], rel=1e-9)


def test_evaluate_with_a_data_override(run_dir):
    code, stdout, stderr = run_cli("evaluate", run_dir, "--set", "data.limit=50")
    assert code == 0, stderr
    result = json.loads(stdout)
    assert set(result) == {"test_log_likelihood"}
    model = load_checkpoint(run_dir / "checkpoint.pt").model
    test = load_dataset("embedded-mnist", limit=50).test
    with torch.no_grad():
        expected = model.log_prob(test).double().mean().item()
    assert result["test_log_likelihood"] == pytest.approx(expected, rel=1e-5)


def test_commands_refuse_a_folder_that_changed_since_training(tmp_path):
    """A folder dataset that gains one file is split afresh (the seeded permutation is over
    the file count): 8 of 10 "test" images were training images, and `mfa evaluate` printed
    a test score far better than the run's, silently. The run records each pool's count and
    file list; evaluate, the per-run commands and --resume refuse another."""
    pngs = write_pngs(tmp_path / "pngs", 60)
    out = tmp_path / "runs"
    code, stdout, stderr = run_cli(
        "train", "--config", CONFIG, "--no-figures",
        *set_args("data.name=folder", f"data.root={pngs}", "data.test_fraction=0.2",
                  "model.n_components=2", "model.n_factors=1", "train.em.max_iter=2",
                  "train.em.kmeans_iter=2", "train.em.progress=false", "device=cpu",
                  f"output.dir={out}"))
    assert code == 0, stderr
    run = next(out.iterdir())
    assert json.loads((run / "metrics.json").read_text())["pools"]["all"][0] == 60
    code, _, stderr = run_cli("evaluate", run)  # the same folder: accepted
    assert code == 0, stderr
    moved = tmp_path / "moved"  # the same files elsewhere (data.root may change): accepted
    shutil.copytree(pngs, moved)
    code, _, stderr = run_cli("evaluate", run, "--set", f"data.root={moved}")
    assert code == 0, stderr
    Image.fromarray(np.zeros((SIDE, SIDE), np.uint8)).save(pngs / "extra.png")
    for argv in (("evaluate", run), ("outliers", run, "--out-dir", tmp_path / "o"),
                 ("train", "--resume", run)):
        code, _, stderr = run_cli(*argv)
        assert code == 2, (argv, stderr)
        assert "is not the data the run was trained on: pool 'all' has 61 images, the " \
               "run's had 60" in stderr, stderr
    (pngs / "extra.png").unlink()
    (pngs / "000.png").rename(pngs / "zzz.png")  # as many files, another list
    code, _, stderr = run_cli("evaluate", run)
    assert code == 2 and "pool 'all' lists other image files" in stderr, stderr


def test_a_run_that_records_no_pools_is_warned_of(run_dir, tmp_path):
    """A run saved before its data's pools were recorded (2026-12-06) was evaluated, and
    resumed, without a word, on splits an older mfa may not have made (before 2026-12-05 a
    pool was split val first: its "test" images here are those it validated on)."""
    old = tmp_path / "old run"
    shutil.copytree(run_dir, old, ignore=shutil.ignore_patterns(".lock"))
    ckpt = load_checkpoint(old / "checkpoint.pt")
    assert ckpt.metrics["pools"] == {"all": [5000, None]}  # (the current record)
    save_checkpoint(old / "checkpoint.pt", ckpt.model, run_config=ckpt.run_config,
                    trainer_state=ckpt.trainer_state,
                    metrics={k: v for k, v in ckpt.metrics.items() if k != "pools"})
    warned = "warning: the run predates the record of its data's pools"
    code, _, stderr = run_cli("evaluate", run_dir)
    assert code == 0 and warned not in stderr, stderr
    for argv in (("evaluate", old), ("inpaint", old, "-o", tmp_path / "i.png"),
                 ("train", "--resume", old, "--no-figures")):
        code, _, stderr = run_cli(*argv)
        assert code == 0 and warned in stderr, (argv, stderr)
        assert "its val and test images here are not the run's" in stderr  # (one pool)
    # the resumed run records no pools: the data it was trained on were never checked
    assert json.loads((old / "metrics.json").read_text())["pools"] is None


def test_evaluate_outliers_against_another_dataset(run_dir, tmp_path, test_split):
    """AUROC/AUPR of every score against sklearn on scores recomputed with OutlierScorer."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    from mfa.outliers import SCORE_NAMES, OutlierScorer

    pngs = write_pngs(tmp_path / "noise", 40)
    code, stdout, stderr = run_cli("evaluate", run_dir, "--outliers-against", "folder",
                                   "--against-set", f"data.root={pngs}",
                                   "--against-set", "data.test_fraction=0.5")
    assert code == 0, stderr
    result = json.loads(stdout)
    report = result["outliers"]
    assert report["against"] == "folder" and report["split"] == "test"
    assert (report["n_in"], report["n_out"]) == (LIMIT, 20)
    assert report["default_score"] == "complexity"
    # which class is positive, and AUPR's chance level (the positives' share: an AUPR of 1.0
    # against 10,000 outliers and 500 own images, chance 0.952, was read as a feat)
    assert report["positive"] == "folder (the outliers)"
    assert report["aupr_chance"] == pytest.approx(20 / (LIMIT + 20))
    model = load_checkpoint(run_dir / "checkpoint.pt").model
    other = load_dataset("folder", pngs, test_fraction=0.5)
    train_rows = load_dataset("embedded-mnist", limit=LIMIT).train
    labels = np.r_[np.zeros(LIMIT), np.ones(20)]
    for name in SCORE_NAMES:
        scorer = OutlierScorer.fit(model, train_rows, name, image_shape=(1, SIDE, SIDE),
                                   scale=255, seed=0)
        scores = torch.cat([scorer(test_split.test), scorer(other.test)]).numpy()
        assert report[name]["auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
        assert report[name]["aupr"] == pytest.approx(average_precision_score(labels, scores),
                                                     abs=1e-12)
    # Uniform noise is far from any digit: raw -log p already separates it perfectly.
    assert report["neg_log_prob"]["auroc"] == 1.0


def test_outlier_metrics_log_the_positive_class_and_chance(caplog):
    from mfa.run_outliers import outlier_metrics

    data = load_dataset("embedded-mnist", limit=30)
    other = load_dataset("embedded-mnist", limit=10)  # (checked=True: not refused as own)
    torch.manual_seed(0)
    model = MixtureOfFactorAnalyzers(2, data.n_features, 1)
    with caplog.at_level("INFO", logger="mfa"):
        result = outlier_metrics(model, data, other, scores=["neg_log_prob"], checked=True)
    assert result["aupr_chance"] == pytest.approx(10 / 40)
    assert "AUPR" in caplog.text and "(chance 0.2500: positives are the 10 embedded-mnist images)" \
        in caplog.text


def test_evaluate_outliers_against_refuses_what_it_cannot_compare(run_dir, tmp_path):
    pngs = write_pngs(tmp_path / "big", 10, side=32)
    code, _, stderr = run_cli("evaluate", run_dir, "--outliers-against", "folder",
                              "--against-set", f"data.root={pngs}",
                              "--outlier-scores", "neg_log_prob")
    assert code == 2
    assert "needs images of one shape" in stderr and "(1, 28, 28)" in stderr
    assert "(1, 32, 32)" in stderr
    # -o into new folders: made before the work, removed again when it fails (they were left)
    code, _, stderr = run_cli("evaluate", run_dir, "--outliers-against", "folder",
                              "--against-set", f"data.root={pngs}",
                              "--outlier-scores", "neg_log_prob",
                              "-o", f"{tmp_path / 'made' / 'sub'}/")
    assert code == 2 and "needs images of one shape" in stderr
    assert not (tmp_path / "made").exists()
    code, _, stderr = run_cli("evaluate", run_dir, "--outliers-against", "folder")
    assert code == 2 and "data.root: required when data.name is 'folder'" in stderr
    assert "--against-set data.KEY=VALUE" in stderr  # the other dataset's, not --set
    code, _, stderr = run_cli("evaluate", run_dir, "--against-set", "data.root=x")
    assert code == 2 and "--against-set needs --outliers-against" in stderr  # was 1: one code
    code, _, stderr = run_cli("evaluate", run_dir, "--outliers-against", "imagenet")
    assert code == 2 and "unknown dataset 'imagenet'" in stderr and "fashion-mnist" in stderr
    # a missing other dataset: its settings are given with --against-set, not --set
    code, _, stderr = run_cli("evaluate", run_dir, "--outliers-against", "svhn",
                              "--against-set", f"data.root={tmp_path / 'no-svhn'}")
    assert code == 2 and "svhn" in stderr and "--against-set data.download=true" in stderr
    assert "--set data.download" not in stderr


def test_the_other_dataset_is_read_from_the_runs_root_where_it_is_there(tmp_path,
                                                                        monkeypatch):
    """Against mnist, a Fashion-MNIST run's flat folder (its data.root) was read again (the
    two share their files' names) and refused as the run's own images; another dataset is
    read from the run's root where it is there (torchvision's layout holds several), else
    from its own default place."""
    from test_data_sources import write_labelled_mnist, write_mnist

    from mfa.data import DatasetNotFoundError
    from mfa.data.sources.mnist import _FIRST_LABELS
    from mfa.run_evaluate import _other_data

    monkeypatch.setenv("MFA_DATA_DIR", str(tmp_path / "default"))
    monkeypatch.setenv("MFA_CACHE_DIR", str(tmp_path / "cache"))
    flat = tmp_path / "fashion-mnist"  # as Debian's package: one dataset's files, flat
    write_labelled_mnist(flat, _FIRST_LABELS["fashion-mnist"])
    run = load_config(overrides=["data.name=fashion-mnist", f"data.root={flat}"])
    with pytest.raises(DatasetNotFoundError, match="mnist"):  # not in either place
        _other_data(run, "mnist", ())
    _, _, digits, _ = write_mnist(tmp_path / "default" / "MNIST" / "raw", n_test=5, seed=7)
    other = _other_data(run, "mnist", ())  # from its default place
    assert torch.equal(other.test_pixels, torch.from_numpy(digits).reshape(5, -1))
    both = tmp_path / "both"  # torchvision's layout, both datasets under one root
    _, _, clothes, _ = write_mnist(both / "FashionMNIST" / "raw", n_test=6, seed=3)
    _, _, digits, _ = write_mnist(both / "MNIST" / "raw", n_test=4, seed=4)
    run = load_config(overrides=["data.name=fashion-mnist", f"data.root={both}"])
    other = _other_data(run, "mnist", ())  # from the run's root
    assert torch.equal(other.test_pixels, torch.from_numpy(digits).reshape(4, -1))
    given = _other_data(run, "mnist", [f"data.root={tmp_path / 'default'}"])
    assert given.test_pixels.shape[0] == 5


def test_evaluate_outliers_against_the_runs_own_images_is_refused(run_dir):
    """Against the run's own dataset the "outliers" were its test images: AUROC 0.5 came
    back as a result, without a word."""
    code, stdout, stderr = run_cli("evaluate", run_dir, "--outliers-against", "embedded-mnist",
                                   "--outlier-scores", "neg_log_prob")
    assert code == 2 and stdout == ""
    assert f"{LIMIT} of the {LIMIT} test images of embedded-mnist are images of the run's own"\
        in stderr


def test_outlier_data_of_the_runs_training_images_is_refused():
    """Only the run's own test split was compared: its training images passed as outliers
    (a warning for the test images among them, AUROC 0.18)."""
    from mfa.run_outliers import check_outlier_data

    data = load_dataset("embedded-mnist")  # test: 500 images
    wider = load_dataset("embedded-mnist", test_fraction=0.2)  # test: those 500, 500 of train
    with pytest.raises(ValueError, match="1000 of the 1000 test images of embedded-mnist are "
                                         "images of the run's own data"):
        check_outlier_data(data, wider)


def test_outlier_data_of_other_channels_is_told_resizing_cannot_help():
    """A greyscale run against RGB images was told to resize them (data.image_size), which
    cannot change the channels."""
    from dataclasses import replace

    from mfa.run_outliers import check_outlier_data

    data = load_dataset("embedded-mnist", limit=20)
    rgb = replace(data, image_shape=(3, 28, 28), **{
        f"{split}_pixels": data.pixels(split).repeat(1, 3) for split in ("train", "val", "test")})
    with pytest.raises(ValueError, match="its channels differ, which resizing cannot change: "
                                         r"pick a dataset of 1 channel\(s\)$"):
        check_outlier_data(data, rgb)
    # load_dataset(channels=...) offered only where the other dataset takes it, and the
    # resize advice kept where the size differs too (an RGB run against MNIST was offered
    # channels=3, which MNIST refuses)
    folder = replace(rgb, name="folder")
    with pytest.raises(ValueError, match=r"1 channel\(s\), or compare in Python with "
                                         r"load_dataset\(\.\.\., channels=1\)$"):
        check_outlier_data(data, folder)
    with pytest.raises(ValueError, match=r"pick a dataset of 3 channel\(s\); its size differs "
                                         r"too: resize it \(e\.g\. data\.image_size\)$"):
        check_outlier_data(replace(rgb, image_shape=(3, 14, 56)), data)


def test_outlier_data_sharing_some_images_warns():
    from mfa.run_outliers import check_outlier_data

    data = load_dataset("embedded-mnist", limit=100)  # 100 of each split
    other = load_dataset("embedded-mnist")  # test: 500 images, the run's 100 among them
    with pytest.warns(UserWarning, match="100 of the 500 test images of embedded-mnist are "
                                         "also in the run's own data"):
        check_outlier_data(data, other)


# ---------------------------------------------------------------------------- mfa visualize


def test_visualize(run_dir, tmp_path):
    out = tmp_path / "f.png"
    code, stdout, stderr = run_cli("visualize", run_dir, "--components", 0, 1, "--scale", 1,
                                   "-o", out)
    assert code == 0, stderr
    assert stdout.strip() == str(out)
    image = open_png(out)
    assert image.size == grid_size(2 * (2 + 3 * L), 2 + 3 * L)
    assert image.mode == "L"
    # Default: the run's first output.n_factor_components (2 of K = 3), as its factors.png
    assert run_cli("visualize", run_dir, "--scale", 1, "-o", tmp_path / "all.png")[0] == 0
    assert open_png(tmp_path / "all.png").size == grid_size(2 * (2 + 3 * L), 2 + 3 * L)


# ---------------------------------------------------------------------------- outputs kept


def test_commands_keep_the_files_a_run_already_has(run_dir, tmp_path):
    """sample, inpaint, outliers, visualize and evaluate never replace a file unasked: a
    default name inside the run folder moves on to name-2 (the training figures stay as they
    were), a path given with -o / --out-dir is refused before any work, --overwrite replaces."""
    folder = tmp_path / "run"
    shutil.copytree(run_dir, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    for command, made in [(["sample"], ["samples-2.png"]),
                          (["inpaint"], ["inpaint-center-2.png"]),
                          (["visualize"], ["factors-2.png"]),
                          (["outliers", "-n", 4], ["outliers-2.png", "outliers-2.csv"])]:
        code, stdout, stderr = run_cli(command[0], folder, *command[1:])
        assert code == 0, stderr
        assert stdout.split() == [str(folder / name) for name in made]
    code, stdout, _ = run_cli("sample", folder, "--seed", 1)
    assert stdout.strip() == str(folder / "samples-3.png")
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.name in before} == before

    code, _, stderr = run_cli("sample", folder, "-o", folder / "samples.png")
    assert code != 0 and "samples.png already exists; pass --overwrite" in stderr
    code, _, stderr = run_cli("outliers", folder, "--out-dir", folder)
    assert code != 0 and "outliers.png already exists" in stderr and "--out-dir" in stderr
    assert (folder / "samples.png").read_bytes() == before["samples.png"]
    code, _, stderr = run_cli("sample", folder, "-n", 4, "-o", folder / "samples.png",
                              "--overwrite")
    assert code == 0, stderr
    assert open_png(folder / "samples.png").size == grid_size(4, 8, SCALE)


@pytest.mark.parametrize("command, chosen, written", [
    (["sample", "--seed", 2], ["samples-2.png"], ["samples-3.png"]),
    (["outliers", "-n", 4], ["outliers-2.png"], ["outliers-3.png", "outliers-3.csv"]),
    (["visualize", "-o", "mine.png"], ["mine.png"], None),  # a path given: refused
])
def test_a_name_another_command_took_meanwhile_is_not_replaced(run_dir, tmp_path, monkeypatch,
                                                              command, chosen, written):
    """Two commands started together (mfa sample RUN --seed 1 and --seed 2) chose the same
    free name, and the later write's os.replace silently replaced the other's file. Here
    the other command writes that name between this one's choice and its write."""
    from mfa import _temporaries

    folder = tmp_path / "run"
    shutil.copytree(run_dir, folder)
    if command[-1] == "mine.png":
        command = [*command[:-1], folder / "mine.png"]
    real_fsync_file = _temporaries.fsync_file
    theirs = {}

    def other_command_first(temporary):  # (just before the temporary gets its name)
        name = temporary.name[1:].rsplit(".", 3)[0]  # .<name>.<pid>.<hex>.tmp
        if name in chosen and not theirs:
            theirs[name] = b"the other command's " + name.encode()
            (folder / name).write_bytes(theirs[name])
        return real_fsync_file(temporary)

    monkeypatch.setattr(_temporaries, "fsync_file", other_command_first)
    code, stdout, stderr = run_cli(command[0], folder, *command[1:])
    assert theirs and all((folder / n).read_bytes() == b for n, b in theirs.items())
    if written is None:
        assert code == 2 and re.search(r"error: \[Errno 17\] cannot write .*mine\.png: a file "
                                       "of that name exists; it is kept, not replaced",
                                       stderr), stderr
    else:
        assert code == 0, stderr
        assert stdout.split() == [str(folder / name) for name in written]  # what it wrote
        open_png(folder / written[0])
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_outliers_against_takes_dataset_aliases():
    parser = cli.build_parser()
    args = parser.parse_args(["evaluate", "run", "--outliers-against", "FMNIST"])
    assert args.outliers_against == "fashion-mnist"
    with contextlib.redirect_stderr(io.StringIO()) as err, pytest.raises(SystemExit):
        parser.parse_args(["evaluate", "run", "--outliers-against", "cifar"])
    assert "unknown dataset 'cifar'; choose one of embedded-mnist" in err.getvalue()


def test_evaluate_out_takes_a_folder_and_keeps_an_existing_file(run_dir, tmp_path):
    """-o DIR wrote nothing (IsADirectoryError after the evaluation); now it writes
    DIR/evaluation.json. An existing file, given as -o or in the folder given, is refused
    before the evaluation runs (as outliers --out-dir is); a path ending in / is a folder."""
    code, stdout, stderr = run_cli("evaluate", run_dir, "-o", tmp_path)
    assert code == 0, stderr
    result = json.loads((tmp_path / "evaluation.json").read_text())
    assert result == json.loads(stdout)
    code, stdout, stderr = run_cli("evaluate", run_dir, "-o", tmp_path)
    assert code != 0 and "evaluation.json already exists" in stderr and stdout == ""
    code, stdout, stderr = run_cli("evaluate", run_dir, "-o", tmp_path / "evaluation.json")
    assert code != 0 and "evaluation.json already exists" in stderr and stdout == ""
    code, _, stderr = run_cli("evaluate", run_dir, "-o", f"{tmp_path / 'new'}/")
    assert code == 0, stderr
    assert json.loads((tmp_path / "new" / "evaluation.json").read_text()) == result
    code, _, stderr = run_cli("evaluate", run_dir, "-o", tmp_path / "evaluation.json",
                              "--overwrite")
    assert code == 0, stderr


# ---------------------------------------------------------------------------- bad input


def test_a_shipped_config_missing_outside_the_checkout_says_where_they_are(tmp_path,
                                                                         monkeypatch):
    """The README's `mfa train --config configs/fashion-mnist.yaml`, run outside the checkout,
    said only that the file did not exist."""
    from mfa.config_text import SHIPPED_CONFIGS

    assert sorted(SHIPPED_CONFIGS) == sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))
    monkeypatch.chdir(tmp_path)
    code, _, stderr = run_cli("train", "--config", "configs/fashion-mnist.yaml")
    assert code == 2
    assert "config file configs/fashion-mnist.yaml does not exist" in stderr
    assert "the shipped configs live in the source checkout's configs/ folder" in stderr
    assert f"--config {ROOT / 'configs' / 'fashion-mnist.yaml'}" in stderr
    code, _, stderr = run_cli("train", "--config", "configs/mine.yaml")  # not a shipped one
    assert code == 2 and "shipped" not in stderr


def test_the_readme_says_how_celeba_yaml_runs_on_the_cpu():
    """configs/celeba.yaml asks for CUDA, while the README said everything runs on the CPU:
    on a CPU machine its first error was about CUDA, not the missing data."""
    assert load_config(ROOT / "configs" / "celeba.yaml").device == "cuda"
    assert load_config(ROOT / "configs" / "celeba.yaml", ["device=cpu"]).device == "cpu"
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "`celeba.yaml` sets `device: cuda`" in readme
    assert "add `--set device=cpu` to train it on the CPU" in readme


def test_an_output_dir_that_cannot_be_made_is_named(tmp_path):
    """--set output.dir=/proc/foo said only "[Errno 2] No such file or directory"."""
    (tmp_path / "afile").write_text("")
    code, _, stderr = run_cli("train", "--config", CONFIG, "--no-figures",
                              *set_args(*TINY, f"output.dir={tmp_path / 'afile' / 'runs'}"))
    assert code == 2
    assert f"output.dir {tmp_path / 'afile' / 'runs'} cannot be made" in stderr
    assert "--set output.dir=DIR" in stderr


def test_unknown_config_key_is_refused(tmp_path):
    code, stdout, stderr = run_cli("train", "--config", CONFIG,
                                   *set_args(*TINY, f"output.dir={tmp_path}",
                                             "model.n_component=4"))
    assert code == 2
    assert "unknown config key 'model.n_component'" in stderr
    assert "did you mean 'n_components'" in stderr
    assert stdout == ""
    assert not any(tmp_path.iterdir()), "no run folder for a refused config"


def test_invalid_config_value_is_refused(tmp_path):
    code, _, stderr = run_cli("train", *set_args(*TINY, f"output.dir={tmp_path}",
                                                 "train.em.max_iter=zero"))
    assert code == 2
    assert "train.em.max_iter" in stderr and "'zero'" in stderr


def test_taken_run_folder_name_fails_clearly(tmp_path):
    (tmp_path / "taken").mkdir()
    code, _, stderr = run_cli("train", *set_args(*TINY, f"output.dir={tmp_path}",
                                                 "output.name=taken"))
    assert code == 2
    assert stderr.startswith("error: ") and "taken" in stderr


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_visualize_refuses_a_factor_scale_that_is_not_finite(run_dir, tmp_path, value):
    code, _, stderr = run_cli("visualize", run_dir, "--factor-scale", value,
                              "-o", tmp_path / "f.png")
    assert code == 2 and f"must be a finite number, got {value}" in stderr
    assert not (tmp_path / "f.png").exists()  # (nan drew an image before)


def test_commands_on_an_interrupted_run_say_it_is_unfinished(run_dir, tmp_path):
    """sample, evaluate and the rest used an interrupted run's last checkpoint (a
    hierarchical run's root, say) without a word."""
    from mfa import workflow

    def stop(trainer, model, record):
        if record["iteration"] == 1:
            raise KeyboardInterrupt

    config = load_config(CONFIG, [*TINY, "train.em.checkpoint_every=1",
                                  f"output.dir={tmp_path}", "output.name=cut"])
    with pytest.raises(KeyboardInterrupt):
        workflow.train(config, figures=False, callbacks=(stop,))
    cut = tmp_path / "cut"
    for argv in (("sample", cut, "-n", "4"), ("visualize", cut), ("evaluate", cut)):
        code, stdout, stderr = run_cli(*argv)
        assert code == 0, stderr
        assert f"warning: {cut} is an unfinished run" in stderr, argv
    assert json.loads(stdout)["unfinished"] is True
    code, stdout, stderr = run_cli("evaluate", run_dir)  # a finished run: no such word
    assert code == 0 and "unfinished" not in stderr + stdout
    # A run still training (its folder held): said so, and its own figures' names are kept
    # for it (a sample took samples.png and the run's own went to samples-2.png; the
    # advice to resume it was refused as the folder is in use)
    from mfa.run_folder import hold_run_folder

    (cut / "samples.png").unlink()  # (drawn above)
    with hold_run_folder(cut):
        code, _, error = run_cli("train", "--resume", cut)
        assert code == 2 and error.startswith(f"error: the folder {cut} is in use")  # (it
        # printed the class name, RunFolderInUse, first)
        code, stdout, stderr = run_cli("sample", cut, "-n", "4")
    assert code == 0 and (f"warning: {cut} is in use by `mfa train` (pid {os.getpid()}), "
                          "still training") in stderr
    assert "--resume" not in stderr
    assert stdout.strip() == str(cut / "samples-2.png") and not (cut / "samples.png").exists()
    code, stdout, stderr = run_cli("sample", cut, "-n", "4")  # (ended: the name is free)
    assert code == 0 and stdout.strip() == str(cut / "samples.png")
    assert "is an unfinished run" in stderr
    assert f"continue it with `mfa train --resume {cut}`" in stderr
    # a copy under another name: --resume refuses that file, so it is not advised
    other = tmp_path / "best.pt"
    other.write_bytes((cut / "checkpoint.pt").read_bytes())
    code, _, stderr = run_cli("sample", other, "-n", "4", "-o", tmp_path / "s.png")
    assert code == 0 and f"warning: {other} is an unfinished run" in stderr
    assert "--resume" in stderr and f"--resume {other}" not in stderr
    assert "copy it as checkpoint.pt into an empty folder" in stderr


def test_visualize_offers_no_seed(run_dir, tmp_path):
    """It draws nothing at random: --seed was listed, accepted and ignored."""
    code, _, stderr = run_cli("visualize", run_dir, "--seed", "1", "-o", tmp_path / "f.png")
    assert code == 2 and "unrecognized arguments: --seed" in stderr
    assert not (tmp_path / "f.png").exists()


def test_checkpoint_without_run_metadata(run_dir, tmp_path):
    """A bare checkpoint (model only): the image shape must be given, data commands refuse."""
    bare = save_checkpoint(tmp_path / "bare.pt", load_checkpoint(run_dir / "checkpoint.pt").model)
    code, _, stderr = run_cli("sample", bare, "-o", tmp_path / "s.png")
    assert code != 0 and "--image-shape" in stderr
    code, _, stderr = run_cli("sample", bare, "-n", 2, "--scale", 1, "--image-shape", 1, 28, 28,
                              "-o", tmp_path / "s.png")
    assert code == 0, stderr
    assert open_png(tmp_path / "s.png").size == grid_size(2, 8)
    code, _, stderr = run_cli("visualize", bare, "-o", tmp_path / "f.png")
    assert code != 0 and "--image-shape" in stderr
    for command in ("inpaint", "outliers", "evaluate"):
        code, _, stderr = run_cli(command, bare)
        assert code != 0 and "no run config" in stderr, command
    code, _, stderr = run_cli("train", "--resume", bare)
    assert code == 2 and "--resume takes a run folder" in stderr  # not named checkpoint.pt
    (tmp_path / "bare-run").mkdir()
    bare.rename(tmp_path / "bare-run" / "checkpoint.pt")
    code, _, stderr = run_cli("train", "--resume", tmp_path / "bare-run")
    assert code == 2 and "no run config" in stderr


SUBCOMMANDS = [["sample"], ["inpaint"], ["outliers"], ["evaluate"], ["visualize"],
               ["train", "--resume"]]


@pytest.mark.parametrize("command", SUBCOMMANDS, ids=lambda c: c[0])
def test_missing_checkpoint(tmp_path, command):
    missing = tmp_path / "nowhere" / "checkpoint.pt"
    code, _, stderr = run_cli(*command, missing)
    assert code == 2
    assert stderr.startswith("error: ")
    assert str(missing) in stderr and "does not exist" in stderr


@pytest.mark.parametrize("command", SUBCOMMANDS, ids=lambda c: c[0])
def test_the_parent_of_run_folders_is_not_taken_for_one(run_dir, tmp_path, command):
    """`mfa sample runs` said "checkpoint runs/checkpoint.pt does not exist"."""
    for name in ("001-a", "002-b", "003-c"):
        (tmp_path / "runs" / name).mkdir(parents=True)
        shutil.copy(run_dir / "checkpoint.pt", tmp_path / "runs" / name)
    (tmp_path / "runs" / "select-x").mkdir()  # (no checkpoint: not a run folder)
    code, _, stderr = run_cli(*command, tmp_path / "runs")
    assert code == 2
    assert stderr.startswith(f"error: {tmp_path / 'runs'} is not a run folder (it has no "
                             "checkpoint.pt); it holds 3 run folders: give one, e.g. "
                             f"{tmp_path / 'runs' / '002-b'} or {tmp_path / 'runs' / '003-c'}")
    (tmp_path / "empty").mkdir()
    code, _, stderr = run_cli(*command, tmp_path / "empty")
    assert code == 2 and "is not a run folder" in stderr
    assert ("or a checkpoint file" in stderr) is (command[0] != "train")  # (--resume: none)


def test_resume_of_the_parent_of_run_folders_names_those_it_can_resume(run_dir, tmp_path):
    """--resume takes no checkpoint file, and a run stopped before its first checkpoint
    (config.yaml only) can be resumed: the message offered the first and not the second."""
    (tmp_path / "runs" / "001-killed").mkdir(parents=True)
    shutil.copy(run_dir / "config.yaml", tmp_path / "runs" / "001-killed")
    (tmp_path / "runs" / "001-killed" / ".lock").write_text("")  # (a config.yaml alone is
    (tmp_path / "runs" / "002-mine").mkdir()  # a user's folder, not a run's)
    shutil.copy(run_dir / "config.yaml", tmp_path / "runs" / "002-mine")
    code, _, stderr = run_cli("train", "--resume", tmp_path / "runs")
    assert code == 2 and stderr.startswith(
        f"error: {tmp_path / 'runs'} is not a run folder (it has no checkpoint.pt); it holds 1 "
        f"run folder: give one, e.g. {tmp_path / 'runs' / '001-killed'}")
    (tmp_path / "empty").mkdir()
    code, _, stderr = run_cli("train", "--resume", tmp_path / "empty")
    assert code == 2 and "give a run folder (e.g. runs/001-embedded-mnist)\n" in stderr + "\n"
    assert "checkpoint file" not in stderr


@pytest.mark.parametrize("command", SUBCOMMANDS, ids=lambda c: c[0])
def test_corrupted_checkpoint(tmp_path, command):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(os.urandom(64) + b"not a checkpoint")
    code, _, stderr = run_cli(*command, tmp_path)  # the run folder resolves to checkpoint.pt
    assert code == 2
    assert stderr.startswith("error: ")
    assert str(bad) in stderr and "not an mfa checkpoint" in stderr


def test_truncated_checkpoint(run_dir, tmp_path):
    data = (run_dir / "checkpoint.pt").read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    code, _, stderr = run_cli("sample", cut, "-o", tmp_path / "s.png")
    assert code == 2
    assert "truncated or corrupted" in stderr
    assert not (tmp_path / "s.png").exists()


@pytest.mark.parametrize("components", [[K], [-1], [0, K + 5]])
def test_visualize_components_out_of_range(run_dir, tmp_path, components):
    code, _, stderr = run_cli("visualize", run_dir, "--components", *components,
                              "-o", tmp_path / "f.png")
    assert code != 0
    assert "out of range" in stderr and f"[0, {K})" in stderr
    assert not (tmp_path / "f.png").exists()


def test_bad_arguments_are_refused_by_the_parser(run_dir):
    assert run_cli("inpaint", run_dir, "--mask", "diagonal")[0] == 2
    assert run_cli("evaluate", run_dir, "--split", "everything")[0] == 2
    assert run_cli("nonsense")[0] == 2


@pytest.mark.parametrize("argv, option", [
    (["outliers", "RUN", "-n", "-5"], "-n"),
    (["outliers", "RUN", "-n", "0"], "-n"),
    (["outliers", "RUN", "--nrow", "0"], "--nrow"),
    (["inpaint", "RUN", "-n", "0"], "-n"),
    (["inpaint", "RUN", "-n", "-5"], "-n"),
    (["inpaint", "RUN", "--samples", "-1"], "--samples"),
    (["inpaint", "RUN", "--fraction", "1.5"], "--fraction"),
    (["sample", "RUN", "-n", "0"], "-n"),
    (["sample", "RUN", "--nrow", "-2"], "--nrow"),
    (["sample", "RUN", "--image-shape", "1", "0", "28"], "--image-shape"),
    (["visualize", "RUN", "--scale", "0"], "--scale"),
    (["evaluate", "RUN", "--ndb-bins", "-1"], "--ndb-bins"),
    (["inpaint", "RUN", "-n", "two"], "-n"),
])
def test_counts_are_checked_by_the_parser(run_dir, tmp_path, argv, option):
    argv = [str(run_dir) if a == "RUN" else a for a in argv]
    code, stdout, stderr = run_cli(*argv, "-o" if argv[0] != "outliers" else "--out-dir",
                                   tmp_path / ("out.png" if argv[0] != "outliers" else "o"))
    assert code == 2
    assert f"argument {option}" in stderr, stderr
    assert stdout == "" and not any(tmp_path.iterdir())


def test_inpaint_with_no_conditional_samples_draws_the_mean_only(run_dir, tmp_path):
    out = tmp_path / "i.png"
    code, _, stderr = run_cli("inpaint", run_dir, "-n", 2, "--samples", 0, "--scale", 1,
                              "-o", out)
    assert code == 0, stderr
    assert open_png(out).size == grid_size(2 * 3, 3)  # original | masked | mean


def test_resume_applies_or_refuses_every_option(run_dir, tmp_path):
    """The probe: `--resume RUN --set train.em.max_iter=40 --config other.yaml` exited 0 and
    ignored both options."""
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    before = (copy / "checkpoint.pt").read_bytes()
    code, _, stderr = run_cli("train", "--resume", copy, "--config", CONFIG,
                              *set_args("train.em.max_iter=40"))
    assert code == 2
    assert "cannot change model.n_components when resuming" in stderr  # the first difference
    code, _, stderr = run_cli("train", "--resume", copy, *set_args("model.n_factors=1"))
    assert code == 2 and "cannot change model.n_factors when resuming" in stderr
    code, _, stderr = run_cli("train", "--resume", copy, *set_args("train.em.max_iter=40"))
    assert code == 2 and "train.em.max_iter" in stderr and "finished" in stderr
    assert (copy / "checkpoint.pt").read_bytes() == before
    # The run's own config with a safe change: applied and recorded.
    code, _, stderr = run_cli("train", "--resume", copy, "--no-figures",
                              "--config", copy / "config.yaml", *set_args("output.n_samples=4"))
    assert code == 0, stderr
    assert load_config(copy / "config.yaml").output.n_samples == 4
    assert load_checkpoint(copy / "checkpoint.pt").run_config.output.n_samples == 4


def test_a_run_trained_on_cuda_resumes_on_the_cpu(run_dir, tmp_path, monkeypatch, caplog):
    """Without CUDA, `--resume` of a CUDA run advised device=cpu, and `--set device=cpu` was
    then refused ("cannot change device when resuming")."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)  # as on a CPU-only machine
    monkeypatch.setattr("torch.cuda.device_count", lambda: 0)
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    ckpt = load_checkpoint(copy / "checkpoint.pt")  # as if trained with device: cuda
    on_cuda = dataclasses.replace(ckpt.run_config, device="cuda")
    save_checkpoint(copy / "checkpoint.pt", ckpt.model, run_config=on_cuda,
                    trainer_state=ckpt.trainer_state, metrics=ckpt.metrics)
    (copy / "config.yaml").write_text(
        (copy / "config.yaml").read_text().replace("device: cpu", "device: cuda"))
    code, _, stderr = run_cli("train", "--resume", copy, "--no-figures")
    assert code == 2 and "use device=cpu or device=auto" in stderr, stderr
    with caplog.at_level("WARNING", logger="mfa"):
        code, _, stderr = run_cli("train", "--resume", copy, "--no-figures",
                                  *set_args("device=cpu"))
    assert code == 0, stderr
    assert "resumed with device='cpu' (saved 'cuda')" in caplog.text
    assert load_checkpoint(copy / "checkpoint.pt").run_config.device == "cpu"


@pytest.mark.parametrize("argv, option", [
    (["sample", "--device", ""], "--device"), (["evaluate", "--device", ""], "--device"),
    (["inpaint", "--mask-image", ""], "--mask-image"),
])
def test_an_empty_option_value_is_refused(run_dir, tmp_path, argv, option):
    """`--device ""` computed on the run's device and `--mask-image ""` drew a centre mask:
    an empty value was taken for the option not given (as `-o ""` was, before)."""
    code, _, stderr = run_cli(argv[0], run_dir, *argv[1:], "-o", tmp_path / "x.png")
    assert code == 2 and f"argument {option}: is empty: give" in stderr, stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("argv, option", [
    (["evaluate", "--split", "val"], "--split"),
    (["evaluate", "--outliers-against", "mnist", "--outlier-scores", "complexity"],
     "--outlier-scores"),
    (["visualize", "--components", "0", "1"], "--components"),
])
def test_a_run_folder_after_an_option_of_several_values_is_told_to_come_first(
        run_dir, argv, option):
    """`mfa evaluate --split val RUN` took RUN for a split and said only "invalid choice"
    (`visualize --components 0 1 RUN`: "invalid int value"); the help did not say either."""
    code, _, stderr = run_cli(*argv, run_dir)
    assert code == 2
    assert (f"argument {option}: " in stderr and f"{run_dir} is a path: give the run folder "
            f"before {option}, whose values take every word after it") in stderr, stderr
    code, _, stderr = run_cli(*argv, "nowhere")  # (not a path: the plain error)
    assert code == 2 and "is a path" not in stderr and "'nowhere'" in stderr
    assert "whose values take every word after" in " ".join(help_of(argv[0]).split())
    code, _, stderr = run_cli(argv[0], run_dir, *argv[1:], "-o", run_dir / "x.json"
                              if argv[0] == "evaluate" else run_dir / "x.png", "--help")
    assert code == 0  # (the run folder first parses)


def test_a_resume_lays_a_partial_config_over_the_runs(run_dir, tmp_path):
    """`--resume RUN --config small.yaml`: the keys small.yaml left out took the defaults, so
    the resume was refused over values the user never wrote (model.n_components=20)."""
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    small = tmp_path / "small.yaml"
    small.write_text("output:\n  n_samples: 4\n")
    code, _, stderr = run_cli("train", "--resume", copy, "--no-figures", "--config", small)
    assert code == 0, stderr
    saved = load_config(copy / "config.yaml")
    assert saved.output.n_samples == 4 and saved.model.n_components == K
    assert saved.output.grid_nrow == NROW  # (the run's, not the default 8)
    before = load_config(copy / "config.yaml")
    # A section whose keys are all commented out reads as null: it reset the section to
    # the defaults (max_iter 12 became 30, silently); it now sets nothing.
    small.write_text("train:\n  em:\n    # max_iter: 50\noutput:\n  n_samples: 4\n")
    code, _, stderr = run_cli("train", "--resume", copy, "--no-figures", "--config", small)
    assert code == 0, stderr
    assert load_config(copy / "config.yaml").train.em == before.train.em
    small.write_text("model:\n  n_factors: 1\n")  # what the file writes is still checked
    code, _, stderr = run_cli("train", "--resume", copy, "--config", small)
    assert code == 2 and "cannot change model.n_factors when resuming" in stderr, stderr
    small.write_text("model:\n  n_factor: 1\n")  # and its errors name it
    code, _, stderr = run_cli("train", "--resume", copy, "--config", small)
    assert code == 2 and f"config file {small}" in stderr and "n_factor'" in stderr, stderr


@pytest.mark.parametrize("override, key", [
    ("train.em.variance_floor=0", "train.em.variance_floor"),
    ("train.em.kmeans_iter=0", "train.em.kmeans_iter"),
    ("model.n_factors=1000", "model.n_factors=1000"),
    ("data.root=/nonexistent/images", "/nonexistent/images"),
    ("device=cuda", "asks for CUDA"),
    (["data.missing.kind=block", "data.missing.block_size=28"],  # every pixel hidden
     "invalid data.missing for embedded-mnist: block_size=28 hides the whole 28×28 image"),
    ("seed=99999999999999999999999", "invalid value for seed: must be below 2**63"),
    ("train.em.seed=99999999999999999999999", "invalid value for train.em.seed: must be below"),
    (["output.inpaint_masks=[image]", "output.mask_image=/nonexistent/mask.png"],  # was
     "/nonexistent/mask.png"),  # found only after training
    ("output.image_scale=100000", "use a smaller scale"),  # was: MemoryError after training
])
def test_train_refuses_bad_values_before_making_the_run_folder(tmp_path, monkeypatch,
                                                               override, key):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)  # as on a CPU-only machine
    monkeypatch.setattr("torch.cuda.device_count", lambda: 0)
    override = [override] if isinstance(override, str) else override
    extra = ["data.name=folder"] if override[0].startswith("data.root") else []
    code, stdout, stderr = run_cli("train", "--config", CONFIG,
                                   *set_args(*TINY, f"output.dir={tmp_path}", *extra, *override))
    assert code == 2, stderr
    assert stderr.startswith("error: ") and key in stderr
    assert "Traceback" not in stderr and stdout == ""
    assert not any(tmp_path.iterdir()), "no run folder for a refused run"


def test_settings_of_a_trainer_the_run_does_not_use_are_named(tmp_path):
    """--set train.em.max_iter=2 in an Adam run was ignored without a word (a resume refuses
    it)."""
    code, _, stderr = run_cli("train", "--config", CONFIG, "--no-figures", *set_args(
        *TINY, f"output.dir={tmp_path}", "train.method=sgd", "train.sgd.epochs=1",
        "train.sgd.progress=false", "train.hierarchical.seed=3"))
    assert code == 0, stderr
    assert ("warning: --set train.em.max_iter, train.em.kmeans_iter, train.em.progress, "
            "train.hierarchical.seed are not used: this run trains with train.method=sgd, "
            "which reads train.sgd.* only") in stderr


def test_a_diverging_run_ends_with_its_message_not_a_traceback(tmp_path):
    adam = [s for s in TINY if not s.startswith("train.em.")]
    args = ("train", "--config", CONFIG, "--no-figures",
            *set_args(*adam, f"output.dir={tmp_path}", "train.method=sgd", "train.sgd.lr=1000",
                      "train.sgd.epochs=2", "train.sgd.progress=false",
                      "train.sgd.checkpoint_every=1"))
    code, _, stderr = run_cli(*args)
    assert code == 2 and stderr.startswith("error: FloatingPointError: Adam diverged"), stderr
    assert "Traceback" not in stderr
    # the setting as a config names it, and as the library does (it said SGDConfig.lr only)
    assert "learning rate than train.sgd.lr (SGDConfig.lr)=1000" in stderr, stderr
    # --verbose shows where, with the same exit status (it raised: 1)
    code, _, stderr = run_cli("--verbose", *args)
    assert code == 2 and "Traceback" in stderr and "FloatingPointError" in stderr
    assert stderr.rstrip().splitlines()[-1].startswith("error: FloatingPointError: Adam")


def test_a_run_without_a_test_split_trains_and_draws_what_it_can(tmp_path):
    code, _, stderr = run_cli("train", "--config", CONFIG, *set_args(
        *TINY, f"output.dir={tmp_path}", "data.test_fraction=0"))  # (was: a traceback)
    assert code == 0, stderr
    run = next(tmp_path.iterdir())
    assert (run / "samples.png").is_file() and not (run / "outliers.png").exists()
    assert not list(run.glob("inpaint-*.png")) and not (run / "FAILED").exists()
    for command in (("inpaint", run), ("evaluate", run), ("outliers", run)):
        code, _, stderr = run_cli(*command, "--split", "test")
        assert code == 2 and "the test split of embedded-mnist is empty" in stderr, stderr


def test_a_binary_config_file_is_named(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"PK\x03\x04\x14\x00\x00\x08\x08\x00\xff\xfe")
    code, _, stderr = run_cli("train", "--config", path)
    assert code == 2
    assert str(path) in stderr and "not UTF-8 YAML" in stderr


# ---------------------------------------------------------------------------- entry point


def test_installed_console_script(run_dir, tmp_path):
    script = Path(sys.executable).parent / "mfa"
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "mfa.cli"]
    out = tmp_path / "s.png"
    done = subprocess.run([*command, "sample", str(run_dir), "-n", "4", "--nrow", "2",
                           "--scale", "1", "-o", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out)
    assert open_png(out).size == grid_size(4, 2)


def test_python_dash_m_mfa(run_dir, tmp_path):
    """``python -m mfa`` is the same command as the console script."""
    out = tmp_path / "s.png"
    done = subprocess.run([sys.executable, "-m", "mfa", "sample", str(run_dir), "-n", "2",
                           "--nrow", "2", "--scale", "1", "-o", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out)
    assert open_png(out).size == grid_size(2, 2)


def test_the_package_exports_load_pil_only_when_used():
    """``import mfa`` and the parser stay free of PIL; the outlier names resolve on use to
    mfa.outliers' objects, and every name of ``mfa.__all__`` exists."""
    code = ("import sys, mfa, mfa.cli\n"
            "mfa.cli.build_parser()\n"
            "print('PIL' in sys.modules)\n"
            "import mfa.outliers as o, mfa.hierarchical as h\n"
            "print(mfa.OutlierScorer is o.OutlierScorer and mfa.auroc is o.auroc\n"
            "      and mfa.aupr is o.aupr and mfa.evaluate_outliers is o.evaluate_outliers\n"
            "      and mfa.HierarchicalTrainer is h.HierarchicalTrainer\n"
            "      and mfa.HierarchicalConfig is h.HierarchicalConfig)\n"
            "print(all(hasattr(mfa, name) for name in mfa.__all__))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True", "True"]


def test_the_default_config_ships_inside_the_package():
    """``mfa train`` without ``--config`` reads ``configs/embedded-mnist.yaml`` through a copy
    inside the package (a link in the checkout), so a wheel install runs the same default
    (before, it fell back to the library defaults: K = 10, no dequantisation); the package
    data of pyproject.toml covers the file."""
    import ast
    import fnmatch
    import re

    package = Path(cli.__file__).resolve().parent
    assert cli.DEFAULT_CONFIG.is_relative_to(package)
    assert cli.DEFAULT_CONFIG.read_bytes() == CONFIG.read_bytes()
    pyproject = (ROOT / "pyproject.toml").read_text()  # no tomllib before Python 3.11
    section = pyproject.split("[tool.setuptools.package-data]", 1)[1]
    patterns = ast.literal_eval(re.search(r"^mfa\s*=\s*(\[.*?\])", section, re.M).group(1))
    relative = cli.DEFAULT_CONFIG.relative_to(package).as_posix()
    assert any(fnmatch.fnmatch(relative, p) for p in patterns)
    config = load_config(cli.DEFAULT_CONFIG)
    assert config.model.n_components == 20 and config.data.dequantize


def test_ctrl_c_ends_with_a_resume_hint_not_a_traceback(monkeypatch):
    """Ctrl-C during `mfa train` printed a 30-frame traceback; it prints where to go on and
    exits with 130, as shells expect of SIGINT."""
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_train", interrupted)
    code, _, stderr = run_cli("train")
    assert code == 130
    assert "interrupted" in stderr and "mfa train --resume RUN" in stderr
    assert "stopped before its first checkpoint was removed" in stderr  # it said: resume it
    assert "Traceback" not in stderr


def test_commands_on_a_run_take_data_settings_only_and_check_the_shape(run_dir, tmp_path):
    """inpaint/outliers/evaluate accepted (and ignored) any --set key, and a data setting that
    changes the number of features failed deep inside with a shape error."""
    for command in (["inpaint", run_dir, "-o", tmp_path / "i.png"],
                    ["outliers", run_dir, "--out-dir", tmp_path],
                    ["evaluate", run_dir]):
        code, _, stderr = run_cli(*command, "--set", "model.n_components=50")
        assert code != 0 and "takes data.* settings only" in stderr, command
        code, _, stderr = run_cli(*command, "--set", "data.image_size=14")
        assert code != 0 and "--set data.image_size would change which images" in stderr
    code, _, stderr = run_cli("evaluate", run_dir, "--outliers-against", "fashion-mnist",
                              "--against-set", "model.n_components=4")
    assert code != 0 and "--against-set takes data.* settings only" in stderr


def test_commands_on_a_run_refuse_data_settings_that_change_its_splits(run_dir):
    """--set data.seed=1 re-split the data: 391 of 500 "test" rows were training rows and
    evaluate reported 4.49 instead of 4.93 bits/dim, with no warning."""
    for key in ("data.seed=1", "data.test_fraction=0.5", "data.val_fraction=0.2",
                "data.dequantize=true", "data.name=fashion-mnist"):
        code, stdout, stderr = run_cli("evaluate", run_dir, "--set", key)
        name = key.split("=")[0]
        assert code != 0 and f"--set {name} would change which images" in stderr, key
        assert "only data.root, data.download, data.num_workers, data.limit may differ" in stderr
        assert stdout == ""
    # the saved value itself is no change
    code, _, stderr = run_cli("evaluate", run_dir, "--set", "data.seed=0", "--set",
                              "data.limit=50")
    assert code == 0, stderr


def test_a_figure_too_large_to_draw_is_an_error_not_a_traceback(run_dir, tmp_path):
    code, stdout, stderr = run_cli("sample", run_dir, "--scale", 100000, "-n", 1,
                                   "-o", tmp_path / "huge.png")
    assert code == 2 and stderr.startswith("error: ") and "MAX_FIGURE_PIXELS" in stderr
    assert "Traceback" not in stderr and not (tmp_path / "huge.png").exists()

    def out_of_memory(*args, **kwargs):
        raise MemoryError()

    with pytest.MonkeyPatch.context() as patch:  # any other MemoryError: its message, code 2
        patch.setattr("mfa.workflow.sample", out_of_memory)
        code, _, stderr = run_cli("sample", run_dir, "-o", tmp_path / "x.png")
    assert code == 2 and stderr.strip() == "error: MemoryError: out of memory", stderr


def test_outliers_out_dir_that_is_a_file_is_refused_before_the_work(run_dir, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    code, stdout, stderr = run_cli("outliers", run_dir, "--out-dir", afile)
    assert code != 0 and f"--out-dir {afile} is a file, not a folder" in stderr
    assert afile.read_text() == "mine" and stdout == ""


def test_outliers_refuse_an_oversized_grid_before_scoring_and_name_the_taken_file(
        run_dir, tmp_path, monkeypatch):
    """An oversized grid was refused after all the scoring, leaving outliers.csv alone; the
    rerun was then refused naming outliers.png, which did not exist."""
    def never(*args, **kwargs):
        raise AssertionError("scored before the figure was checked")

    with monkeypatch.context() as patch:
        patch.setattr("mfa.run_outliers.make_scorer", never)
        code, _, stderr = run_cli("outliers", run_dir, "-n", 300, "--scale", 200,
                                  "--out-dir", tmp_path / "big")
    assert code == 2 and "MAX_FIGURE_PIXELS" in stderr, stderr
    assert not (tmp_path / "big" / "outliers.csv").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "outliers.csv").write_text("mine")
    code, _, stderr = run_cli("outliers", run_dir, "--out-dir", tmp_path / "taken")
    assert code != 0 and f"{tmp_path / 'taken' / 'outliers.csv'} already exists" in stderr
    assert (tmp_path / "taken" / "outliers.csv").read_text() == "mine"


def test_bad_output_paths_are_named(run_dir, tmp_path):
    """-o a folder or a name without an image suffix failed with PIL's "unknown file
    extension: "; an output.dir that is a file with a bare "[Errno 17] File exists"."""
    for out in (tmp_path, tmp_path / "noext"):
        code, _, stderr = run_cli("sample", run_dir, "-o", out)
        assert code != 0 and f"-o {out} must be an image file name" in stderr
    afile = tmp_path / "afile"
    afile.write_text("mine")
    code, _, stderr = run_cli("train", "--set", f"output.dir={afile}", "--set",
                              "model.n_components=2", "--no-figures")
    assert code != 0 and f"output.dir {afile} is a file" in stderr
    assert afile.read_text() == "mine"


def test_per_run_commands_redraw_the_runs_figures_by_default(run_dir, tmp_path):
    """They drew at --scale 2, 64 samples in rows of 8 with seed 0, 32 outliers, 8 images
    with 3 samples, whatever the run's output.* and seed: a command with its defaults did not
    reproduce the run's own figure."""
    for command, name in (("sample", "samples.png"), ("inpaint", "inpaint-center.png"),
                          ("visualize", "factors.png")):
        code, _, stderr = run_cli(command, run_dir, "-o", tmp_path / name)
        assert code == 0, stderr
        assert (tmp_path / name).read_bytes() == (run_dir / name).read_bytes(), command
    code, _, stderr = run_cli("outliers", run_dir, "--out-dir", tmp_path)
    assert code == 0, stderr
    for name in ("outliers.png", "outliers.csv"):
        assert (tmp_path / name).read_bytes() == (run_dir / name).read_bytes(), name
    code, _, _ = run_cli("visualize", run_dir, "-o", tmp_path / "f.png")
    wide = Image.open(tmp_path / "f.png").size
    code, _, _ = run_cli("visualize", run_dir, "-o", tmp_path / "f1.png", "--scale", 1)
    assert code == 0 and wide == tuple(SCALE * s for s in Image.open(tmp_path / "f1.png").size)



def test_evaluate_checks_the_outlier_data_once(run_dir, tmp_path, monkeypatch):
    """Both splits were hashed (and a warning printed) twice: in evaluate and again in
    outlier_metrics."""
    import mfa.run_evaluate
    import mfa.run_outliers

    calls = []
    real = mfa.run_outliers.check_outlier_data

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(mfa.run_outliers, "check_outlier_data", counted)
    monkeypatch.setattr(mfa.run_evaluate, "check_outlier_data", counted)
    pngs = write_pngs(tmp_path / "noise", 10)
    code, _, stderr = run_cli("evaluate", run_dir, "--outliers-against", "folder",
                              "--against-set", f"data.root={pngs}",
                              "--outlier-scores", "neg_log_prob")
    assert code == 0, stderr
    assert len(calls) == 1


# --------------------------------------------------- after-training commands (review findings)


@pytest.mark.parametrize("value", ["", "  "])
@pytest.mark.parametrize("option", ["--resume", "--config", "-c"])
def test_train_refuses_an_empty_resume_or_config(tmp_path, monkeypatch, option, value):
    """--resume "" (--resume "$RUN" with RUN unset) trained a new run of the default config,
    and -c "" trained the default config: "" was taken for no option."""
    monkeypatch.chdir(tmp_path)
    code, _, stderr = run_cli("train", option, value, *set_args(*TINY, "train.em.max_iter=1"),
                              "--no-figures")
    name = "--resume" if option == "--resume" else "--config"
    assert code == 2 and f"error: {name} is empty: give a path" in stderr, stderr
    assert list(tmp_path.iterdir()) == []  # no run folder
    from mfa import workflow

    with pytest.raises(ValueError, match="--resume is empty"):
        workflow.train(None, resume=value)


def test_an_output_place_that_cannot_be_written_is_refused_before_the_work(run_dir, tmp_path,
                                                                          monkeypatch):
    """A read-only folder failed after the work, naming the atomic write's temporary file;
    a file in the way raised a bare [Errno 17]; -o "" was taken for no -o (nothing written,
    exit 0)."""
    from mfa import figures

    def never(*args, **kwargs):
        raise AssertionError("the work ran")

    monkeypatch.setattr(figures, "sample", never)
    afile = tmp_path / "keep.png"
    afile.write_text("mine")
    code, _, stderr = run_cli("sample", run_dir, "-o", afile / "x.png")
    assert code == 2 and f"{afile} is a file, not a folder; pass another -o" in stderr
    code, _, stderr = run_cli("evaluate", run_dir, "-o", afile / "e.json")
    assert code == 2 and "is a file, not a folder" in stderr and afile.read_text() == "mine"
    for command in (("sample", run_dir, "-o", ""), ("evaluate", run_dir, "-o", ""),
                    ("outliers", run_dir, "--out-dir", "")):
        code, _, stderr = run_cli(*command)
        assert code == 2 and "is empty: give a path" in stderr, stderr
    readonly = tmp_path / "ro"
    readonly.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != readonly
                        and real(path, mode))
    code, _, stderr = run_cli("sample", run_dir, "-o", readonly / "x.png")
    assert code == 2 and f"cannot write into {readonly} (read-only or not permitted)" in stderr
    assert not list(readonly.iterdir())
    # into a read-only run folder, each command names the option it has (outliers has no
    # -o, and was told to pass one)
    run = tmp_path / "run-ro"
    run.mkdir()
    shutil.copy(run_dir / "checkpoint.pt", run)
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) not in (readonly, run)
                        and real(path, mode))
    for command, option in (("outliers", "--out-dir"), ("sample", "-o"),
                            ("visualize", "-o"), ("inpaint", "-o")):
        code, _, stderr = run_cli(command, run)
        assert code == 2 and stderr.startswith(
            f"error: cannot write into {run} (read-only or not permitted); pass {option} to "
            "write elsewhere"), stderr
    # Where os.access says yes but no file can be made (root on /proc or /sys), evaluate
    # printed its whole JSON, then failed naming the temporary file.
    special = tmp_path / "special"
    special.mkdir()
    import tempfile

    make = tempfile.mkstemp

    def refuse(*args, dir=None, **kwargs):
        if Path(dir) == special:
            raise PermissionError(13, "Permission denied")
        return make(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    monkeypatch.setattr("mfa.cli_run.tempfile.mkstemp", refuse)
    code, stdout, stderr = run_cli("evaluate", run_dir, "-o", special / "e.json")
    assert code == 2 and f"cannot write into {special} (Permission denied)" in stderr, stderr
    assert "bits_per_dim" not in stdout and not list(special.iterdir())


def test_a_per_run_command_names_the_settings_edited_in_config_yaml(run_dir, tmp_path):
    """The per-run commands take a run's settings from its checkpoint: an edit of the run
    folder's config.yaml (which --resume reads) was ignored without a word."""
    run = tmp_path / "run"
    run.mkdir()
    for name in ("checkpoint.pt", "config.yaml"):
        shutil.copy(run_dir / name, run)
    for command in (("sample",), ("visualize",), ("outliers",), ("inpaint",),
                    ("evaluate", "--split", "test")):
        code, _, stderr = run_cli(command[0], run, *command[1:], "--overwrite")  # unedited:
        assert code == 0 and "differs" not in stderr, stderr  # nothing said
    edited = yaml.safe_load((run / "config.yaml").read_text())
    # The device in another spelling of the same device (a resume with --set device=cpu:0 on
    # a cpu run keeps the file's cpu, and its checkpoint cpu:0): not an edit.
    ckpt = load_checkpoint(run / "checkpoint.pt")
    ckpt.run_config.device = "cpu:0"
    save_checkpoint(run / "checkpoint.pt", ckpt.model, run_config=ckpt.run_config,
                    trainer_state=ckpt.trainer_state, metrics=ckpt.metrics)
    (run / "config.yaml").write_text(yaml.safe_dump(dict(edited, device="cpu")))
    code, _, stderr = run_cli("sample", run, "--overwrite")
    assert code == 0 and "differs" not in stderr, stderr
    edited["device"] = "cpu"  # (the file's from here on)
    edited["output"].update(n_samples=8, grid_nrow=4)
    edited["train"]["em"]["max_iter"] = 9  # (a trainer key: no command's)
    (run / "config.yaml").write_text(yaml.safe_dump(edited))
    for command in (("sample",), ("visualize",), ("outliers",), ("inpaint",),
                    ("evaluate", "--split", "test")):
        code, _, stderr = run_cli(command[0], run, *command[1:], "--overwrite")
        assert code == 0 and stderr.startswith(
            f"warning: {run / 'config.yaml'} differs from the config its checkpoint holds in "
            f"output.grid_nrow (4 there, {NROW} in the checkpoint), output.n_samples (8 there, "
            f"{N_SAMPLES} in the checkpoint): this command uses the checkpoint's values, not the "
            "file's (which `mfa train --resume` reads); give others with this command's "
            "options"), \
            stderr
    assert Image.open(run / "samples.png").size == Image.open(run_dir / "samples.png").size


def test_a_figure_too_large_is_refused_before_the_sampling(run_dir, tmp_path, monkeypatch):
    """-n 400000 sampled for 33 s before the size was refused, and inpainting left the
    folder it made."""
    def never(*args, **kwargs):
        raise AssertionError("sampled")

    monkeypatch.setattr(MixtureOfFactorAnalyzers, "sample", never)
    code, _, stderr = run_cli("sample", run_dir, "-n", 400000, "-o", tmp_path / "a" / "x.png")
    assert code == 2 and "MAX_FIGURE_PIXELS" in stderr, stderr
    monkeypatch.setattr("mfa.figures.inpaint_rows", never)
    code, _, stderr = run_cli("inpaint", run_dir, "--samples", 20000, "-n", 2,
                              "-o", tmp_path / "b" / "x.png")
    assert code == 2 and "MAX_FIGURE_PIXELS" in stderr, stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_an_image_shape_that_does_not_fit_the_model_is_refused_first():
    from mfa import figures

    model = MixtureOfFactorAnalyzers(2, 784, 1, generator=torch.Generator().manual_seed(0))
    for shape in ((1, 14, 14), (2, 14, 28)):
        for draw in (figures.sample, figures.visualize):
            with pytest.raises(ValueError, match="does not fit the model: it needs C = 1 or 3 "
                                                 "and C·H·W = its 784 features"):
                draw(model, shape, "never.png")


def test_run_commands_take_the_mapping_form_and_verbose_after_the_command(run_dir, tmp_path):
    """--set data={limit: 5} was refused as not data.*, --set foo with the same message;
    -v after the command was refused by the top-level parser."""
    code, stdout, stderr = run_cli("inpaint", run_dir, "--set", "data={limit: 5}", "-n", 2,
                                   "-o", tmp_path / "i.png", "-v")
    assert code == 0, stderr
    code, _, stderr = run_cli("inpaint", run_dir, "--set", "foo")
    assert code == 2 and "--set foo: invalid override 'foo'" in stderr


def test_against_set_may_not_name_another_dataset(run_dir):
    """--against-set data.name=... replaced --outliers-against silently."""
    code, stdout, stderr = run_cli("evaluate", run_dir, "--outliers-against", "fashion-mnist",
                                   "--against-set", "data.name=embedded-mnist")
    assert code == 2 and stdout == ""
    assert "--against-set data.name: the dataset is --outliers-against's" in stderr


def test_a_mask_image_folder_is_named_as_a_folder(tmp_path):
    from mfa.masks import make_mask

    with pytest.raises(FileNotFoundError, match="is a folder, not an image file"):
        make_mask("image", (1, 4, 4), 1, mask_image=tmp_path)


def test_a_library_warning_is_one_line(monkeypatch):
    """Warnings reached the terminal as Python prints them: the category, a source path
    and a line of code (e.g. the outlier data's overlap)."""
    def warns(args):
        import warnings

        warnings.warn("3 of the 15 test images are also in the run's own data", UserWarning,
                      stacklevel=2)
        return 0

    monkeypatch.setattr(cli, "cmd_sample", warns)
    code, _, stderr = run_cli("sample", "anything")
    assert code == 0
    assert stderr == "warning: 3 of the 15 test images are also in the run's own data\n"


# ---------------------------------------------------------------------------- defaults and seeds


def test_sample_of_a_bare_checkpoint_takes_the_documented_defaults(run_dir, tmp_path):
    """Without a run config: 64 samples in rows of 8 at --scale 2 (the help's "else 64",
    "else 8", "else 2"), written beside the checkpoint file."""
    bare = save_checkpoint(tmp_path / "bare.pt", load_checkpoint(run_dir / "checkpoint.pt").model)
    code, stdout, stderr = run_cli("sample", bare, "--image-shape", 1, 28, 28)
    assert code == 0, stderr
    assert stdout.strip() == str(tmp_path / "samples.png")
    assert open_png(tmp_path / "samples.png").size == grid_size(64, 8, 2)


def with_run_config(run_dir: Path, folder: Path, **changes) -> Path:
    """A copy of the run's checkpoint in ``folder`` whose run config has ``changes``."""
    folder.mkdir()
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    config = ckpt.run_config
    for key, value in changes.items():
        section, _, name = key.rpartition("__")
        if section:
            config = dataclasses.replace(config, **{section: dataclasses.replace(
                getattr(config, section), **{name: value})})
        else:
            config = dataclasses.replace(config, **{name: value})
    save_checkpoint(folder / "checkpoint.pt", ckpt.model, run_config=config,
                    trainer_state=ckpt.trainer_state, metrics=ckpt.metrics)
    return folder


def test_outliers_seed_seeds_the_background_model_and_defaults_to_0(run_dir, tmp_path,
                                                                   monkeypatch):
    """--seed seeds the likelihood-ratio score's background fit: the same seed ranks alike,
    another seed scores otherwise; unset it is 0, as the run's own outliers figure, not the
    run's seed (5 here)."""
    from mfa.outliers import PatchBackground

    run = with_run_config(run_dir, tmp_path / "seeded", seed=5)
    fit, seeds = PatchBackground.fit.__func__, []

    def quick_fit(cls, train, image_shape, *, seed=0, **options):  # a small background
        seeds.append(seed)
        return fit(cls, train, image_shape, seed=seed, n_components=2, max_iter=2)

    monkeypatch.setattr(PatchBackground, "fit", classmethod(quick_fit))

    def scores(*seed):
        out = tmp_path / f"out{len(seeds)}"
        code, _, stderr = run_cli("outliers", run, "--score", "likelihood_ratio", *seed,
                                  "--set", "data.limit=20", "--out-dir", out, "-n", 2,
                                  "--scale", 1)
        assert code == 0, stderr
        return [(r["index"], r["score"]) for r in read_csv(out / "outliers.csv")]

    zero = scores("--seed", 0)
    assert scores() == zero
    assert scores("--seed", 5) != zero
    assert seeds == [0, 0, 5]


def test_evaluate_seed_seeds_ndb_and_prints_where_it_wrote(run_dir, tmp_path):
    """--seed seeds NDB's samples (it was passed on): unset it is 0; another seed draws
    other samples. With -o the file written is named on stderr."""
    def ndb(*argv):
        code, stdout, stderr = run_cli("evaluate", run_dir, "--ndb-bins", 5, *argv)
        assert code == 0, stderr
        result = json.loads(stdout)
        return stderr, (result["ndb"], result["ndb_js"])

    stderr, default = ndb("-o", tmp_path)
    assert str(tmp_path / "evaluation.json") in stderr.splitlines()
    assert ndb("--seed", 0)[1] == default
    assert ndb("--seed", 1)[1] != default


def test_visualize_draws_the_first_4_components_where_the_run_drew_none(run_dir, tmp_path):
    """output.n_factor_components 0 (no factors.png in the run): the first 4 components,
    here all K = 3."""
    run = with_run_config(run_dir, tmp_path / "none", output__n_factor_components=0)
    code, _, stderr = run_cli("visualize", run, "--scale", 1, "-o", tmp_path / "f.png")
    assert code == 0, stderr
    assert open_png(tmp_path / "f.png").size == grid_size(K * (2 + 3 * L), 2 + 3 * L)


@pytest.mark.parametrize("error, shown", [
    (ValueError("bad value"), "error: bad value"),
    (TypeError("n_samples must be an int"), "error: n_samples must be an int"),
    (OSError("disk full"), "error: disk full"),
    (FloatingPointError("EM diverged"), "error: FloatingPointError: EM diverged"),
    (RuntimeError("CUDA out of memory"), "error: RuntimeError: CUDA out of memory"),
    (MemoryError(), "error: MemoryError: out of memory"),
])
def test_an_error_is_one_line_naming_its_kind_unless_it_is_a_bad_value(monkeypatch, error,
                                                                       shown):
    """A bad value (ValueError, TypeError, OSError) is its message; a failure of another kind
    (a diverged fit, torch's RuntimeError, memory) is named; exit status 2, no traceback."""
    def fails(args):
        raise error

    monkeypatch.setattr(cli, "cmd_sample", fails)
    code, stdout, stderr = run_cli("sample", "anything")
    assert (code, stdout, stderr) == (2, "", shown + "\n")


@pytest.mark.parametrize("command", ["train", "select", "sample"])
def test_a_trainers_setting_is_named_as_the_configs_key_by_train_and_select(monkeypatch,
                                                                            command):
    """`mfa train` and `mfa select` fit from a config: a trainer's message naming
    SGDConfig.lr names train.sgd.lr too; a per-run command fits nothing and keeps it."""
    def fails(args):
        raise ValueError("SGDConfig.lr must be positive, and EMConfig.max_iter too")

    monkeypatch.setattr(cli, f"cmd_{command}", fails)
    argv = {"train": ["train"], "select": ["select", "--components", 2, "--factors", 1],
            "sample": ["sample", "anything"]}[command]
    code, _, stderr = run_cli(*argv)
    assert code == 2
    assert stderr == ("error: train.sgd.lr (SGDConfig.lr) must be positive, and "
                      "train.em.max_iter (EMConfig.max_iter) too\n" if command != "sample" else
                      "error: SGDConfig.lr must be positive, and EMConfig.max_iter too\n")


def test_ctrl_c_in_select_says_how_to_keep_the_finished_fits(monkeypatch):
    """Ctrl-C during `mfa select`: exit 130 and the hint to rerun it with --resume (not the
    train hint); a per-run command says only "interrupted"; --verbose adds the traceback."""
    def interrupted_select(args):
        raise KeyboardInterrupt

    def interrupted_sample(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_select", interrupted_select)
    monkeypatch.setattr(cli, "cmd_sample", interrupted_sample)
    code, _, stderr = run_cli("select", "--components", 2, "--factors", 1)
    assert code == 130 and stderr.startswith("interrupted (any finished fits are kept in "
                                             "selection.json: rerun the same command with "
                                             "--resume"), stderr
    assert "Traceback" not in stderr
    code, _, stderr = run_cli("sample", "anything")
    assert (code, stderr) == (130, "interrupted\n")
    code, _, stderr = run_cli("sample", "anything", "-v")
    assert code == 130 and "Traceback" in stderr and "KeyboardInterrupt" in stderr
    assert stderr.endswith("interrupted\n")


@pytest.mark.parametrize("verbose", [False, True])
def test_verbose_shows_debug_records_and_warnings_as_python_shows_them(monkeypatch, recwarn,
                                                                       verbose):
    """-v: the console log takes DEBUG records (else INFO and up), and a warning is left to
    Python's own display (here pytest's record: source and category) instead of one line."""
    import logging
    import warnings

    def logs(args):
        logging.getLogger("mfa.test_cli").debug("a detail")
        logging.getLogger("mfa.test_cli").info("news")
        warnings.warn("a library warning", UserWarning, stacklevel=2)
        return 0

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])  # (pytest's: logging.basicConfig adds none)
    level = root.level
    monkeypatch.setattr(cli, "cmd_sample", logs)
    try:
        code, _, stderr = run_cli("sample", "anything", *(["-v"] if verbose else []))
    finally:
        root.setLevel(level)
    assert code == 0
    lines = stderr.splitlines()
    assert ("DEBUG mfa.test_cli: a detail" in lines) is verbose
    assert "INFO mfa.test_cli: news" in lines
    assert ("warning: a library warning" in lines) is not verbose
    assert [str(w.message) for w in recwarn] == (["a library warning"] if verbose else [])


def test_an_edit_of_the_mask_image_or_data_is_named_for_the_runs_own_checkpoint_only(
        run_dir, tmp_path):
    """output.mask_image and data.* are settings the per-run commands take from the
    checkpoint: their edit in config.yaml is named. A checkpoint of another name in the
    folder is no run of that config.yaml: nothing is said of it."""
    run = tmp_path / "run"
    run.mkdir()
    for name in ("checkpoint.pt", "config.yaml"):
        shutil.copy(run_dir / name, run)
    edited = yaml.safe_load((run / "config.yaml").read_text())
    edited["output"]["mask_image"] = "mask.png"
    edited["data"]["limit"] = 100
    (run / "config.yaml").write_text(yaml.safe_dump(edited))
    code, _, stderr = run_cli("sample", run, "-n", 2)
    assert code == 0, stderr
    assert stderr.startswith(
        f"warning: {run / 'config.yaml'} differs from the config its checkpoint holds in "
        f"data.limit (100 there, {LIMIT} in the checkpoint), output.mask_image ('mask.png' "
        "there, None in the checkpoint): "), stderr
    shutil.copy(run / "checkpoint.pt", run / "copy.pt")
    code, _, stderr = run_cli("sample", run / "copy.pt", "-n", 2)
    assert (code, stderr) == (0, "")


def test_select_fails_when_no_fit_has_a_finite_validation_score(monkeypatch, tmp_path):
    """Fits that ran but scored no finite validation value (none failed): no best model,
    exit status 1 with the reason."""
    from types import SimpleNamespace

    import mfa.run_select

    sweep = SimpleNamespace(table=lambda: "| K | L |", best_by_val=None, best_by_bic=None,
                            failed=[], rows=[{"K": 2, "L": 1}], has_bits_per_dim=False)
    monkeypatch.setattr(mfa.run_select, "select_run", lambda *a, **k: (sweep, []))
    code, stdout, stderr = run_cli("select", "--config", CONFIG, "--components", 2,
                                   "--factors", 1, "--out", tmp_path)
    assert code == 1
    assert "best by validation: none (no fit gave a finite validation score)" in stdout
    assert "best by BIC: none (no finite BIC)" in stdout
    assert stderr == "error: no fit gave a finite validation score\n"


def test_a_run_that_drew_no_samples_or_inpaintings_draws_the_defaults(run_dir, tmp_path):
    """output.n_samples 0 and output.n_inpaint 0 (the run drew no such figure): `mfa sample`
    draws 64 and `mfa inpaint` 8 images, as with -n 64 and -n 8."""
    run = with_run_config(run_dir, tmp_path / "none", output__n_samples=0,
                          output__n_inpaint=0)
    for command, n in (("sample", 64), ("inpaint", 8)):
        code, _, stderr = run_cli(command, run, "-o", tmp_path / f"{command}.png")
        assert code == 0, stderr
        code, _, stderr = run_cli(command, run, "-n", n, "-o", tmp_path / f"{command}-n.png")
        assert code == 0, stderr
        assert (tmp_path / f"{command}.png").read_bytes() == \
            (tmp_path / f"{command}-n.png").read_bytes(), command


def test_an_image_suffix_in_capitals_is_an_image_file(run_dir, tmp_path):
    """-o S.PNG (a suffix in capitals, as some cameras and tools write) is an image file."""
    code, stdout, stderr = run_cli("sample", run_dir, "-n", 2, "-o", tmp_path / "S.PNG")
    assert code == 0, stderr
    assert stdout.strip() == str(tmp_path / "S.PNG")
    assert open_png(tmp_path / "S.PNG").size == grid_size(2, NROW, SCALE)
    assert [p.name for p in tmp_path.iterdir()] == ["S.PNG"]  # (no write probe left)
