"""``mfa train`` on CUDA and the per-run commands on its run folder: the workflow's
evaluation, figures and commands with the model on the GPU (the CPU suite runs the same
commands on the CPU, tests/test_cli.py). Skipped where no CUDA device is present."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli import CONFIG, N_SAMPLES, NROW, SCALE, TINY, run_cli, set_args

from mfa.checkpoint import load_checkpoint

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_a_cuda_run_and_its_commands_on_the_gpu(tmp_path):
    code, stdout, stderr = run_cli("train", "--config", CONFIG, *set_args(
        *TINY, f"output.dir={tmp_path / 'runs'}", "device=cuda"))
    assert code == 0, stderr
    folder = next((tmp_path / "runs").iterdir())
    metrics = json.loads((folder / "metrics.json").read_text())
    assert load_checkpoint(folder / "checkpoint.pt").run_config.device == "cuda"
    # evaluate on the run's device (CUDA), NDB's samples drawn there, then on the CPU
    code, stdout, stderr = run_cli("evaluate", folder, "--ndb-bins", 5)
    assert code == 0, stderr
    on_gpu = json.loads(stdout)
    assert on_gpu["test_log_likelihood"] == pytest.approx(metrics["test_log_likelihood"],
                                                          rel=1e-6)
    assert 0 <= on_gpu["ndb"] <= 5
    code, stdout, stderr = run_cli("evaluate", folder, "--device", "cpu")
    assert code == 0, stderr
    assert json.loads(stdout)["test_log_likelihood"] == pytest.approx(
        metrics["test_log_likelihood"], rel=1e-4)
    # the run's own sample figure, drawn again on its device with its seed
    seed = load_checkpoint(folder / "checkpoint.pt").run_config.seed
    code, _, stderr = run_cli("sample", folder, "--seed", seed, "-n", N_SAMPLES,
                              "--nrow", NROW, "--scale", SCALE, "-o", tmp_path / "s.png")
    assert code == 0, stderr
    assert (tmp_path / "s.png").read_bytes() == (folder / "samples.png").read_bytes()
    for command, extra in (("inpaint", ["-o", tmp_path / "i.png"]),
                           ("outliers", ["--out-dir", tmp_path / "o"]),
                           ("visualize", ["-o", tmp_path / "v.png"])):
        code, _, stderr = run_cli(command, folder, *extra)
        assert code == 0, (command, stderr)


def test_hierarchical_stages_on_a_dataset_run_on_the_models_cuda_device():
    """Above STREAM_ABOVE the hierarchical trainer gets a map-style dataset (on no device):
    its stages ran on the CPU while the run said cuda."""
    from helpers import gen

    from mfa import MixtureOfFactorAnalyzers
    from mfa.data import ImageDataset
    from mfa.hierarchical import HierarchicalConfig
    from mfa.hierarchical_run import HierarchicalRunTrainer

    pixels = torch.randint(0, 256, (300, 6), generator=gen(0), dtype=torch.uint8)
    model = MixtureOfFactorAnalyzers(2, 6, 1, device="cuda")
    cfg = HierarchicalConfig(root_components=2, n_factors=1, rows_per_component=60)
    flat = HierarchicalRunTrainer(cfg).fit(model, ImageDataset(pixels))
    assert flat.device.type == "cuda" and flat.n_components >= 2


@pytest.mark.parametrize("method, extra", [
    ("em", []),
    ("sgd", ["train.sgd.epochs=2", "train.sgd.progress=false"]),
    ("hierarchical", ["model.n_components=2", "train.hierarchical.rows_per_component=60",
                      "train.hierarchical.child_em={max_iter: 2, kmeans_iter: 3, "
                      "progress: false}"]),
])
def test_each_method_trains_on_cuda_from_uint8_pixels_and_resumes(tmp_path, monkeypatch,
                                                                  method, extra):
    """Every trainer through mfa train on CUDA, with the data past STREAM_ABOVE (lowered to 0
    here): QuantizedRows on the GPU for EM and Adam, datasets for the hierarchical trainer;
    then a --resume of the finished run keeps its result."""
    from mfa import workflow

    monkeypatch.setattr(workflow, "STREAM_ABOVE", 0)
    runs = tmp_path / "runs"
    args = set_args(*TINY, f"output.dir={runs}", "device=cuda", f"train.method={method}",
                    "output.n_inpaint=0", *extra)
    code, _, stderr = run_cli("train", "--config", CONFIG, *args)
    assert code == 0, stderr
    folder = next(runs.iterdir())
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["test_log_likelihood"] == metrics["test_log_likelihood"]  # not NaN
    code, stdout, stderr = run_cli("train", "--resume", folder)
    assert code == 0, stderr
    resumed = json.loads(stdout[stdout.index("{"):])
    assert resumed["test_log_likelihood"] == pytest.approx(metrics["test_log_likelihood"],
                                                           rel=1e-6)


@pytest.mark.parametrize("method, key, extra", [
    ("em", "iteration", []),
    ("sgd", "epoch", ["train.sgd.epochs=3", "train.sgd.progress=false"]),
])
def test_a_run_interrupted_on_cuda_resumes_on_the_cpu(tmp_path, caplog, method, key, extra):
    """A run trained on CUDA could not continue on a machine without it: the device was not
    a setting a resume may change. The continued fit differs from the uninterrupted one by
    rounding only (and the precision mode each device's "auto" picks)."""
    from mfa import workflow
    from mfa.config import load_config

    def config(name):
        return load_config(CONFIG, [*TINY, *extra, f"train.method={method}", "device=cuda",
                                    f"output.dir={tmp_path}", f"output.name={name}"])

    def stop(trainer, model, record):
        if record.get(key) == 2:
            raise KeyboardInterrupt

    whole = workflow.train(config("whole"), figures=False)
    with pytest.raises(KeyboardInterrupt):
        workflow.train(config("cut"), figures=False, callbacks=(stop,))
    with caplog.at_level("WARNING", logger="mfa"):
        resumed = workflow.train(None, resume=tmp_path / "cut", overrides=["device=cpu"],
                                 figures=False)
    assert "resumed with device='cpu' (saved 'cuda')" in caplog.text
    assert resumed.model.means.device.type == "cpu"
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt").run_config.device == "cpu"
    assert resumed.metrics["test_log_likelihood"] == pytest.approx(
        whole.metrics["test_log_likelihood"], rel=1e-2)
