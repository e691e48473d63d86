"""Tests of mfa.checkpoint: round trips, atomic writes, and refusing bad or hostile files."""

from __future__ import annotations

import io
import math
import os
import pickle
import re
import signal
import struct
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

from mfa import MixtureOfFactorAnalyzers
from mfa.checkpoint import (
    FORMAT_NAME,
    FORMAT_VERSION,
    Checkpoint,
    CheckpointError,
    CheckpointNotFoundError,
    clean_stale_temporaries,
    load_checkpoint,
    save_checkpoint,
)
from mfa.config import RunConfig, load_config
from mfa.model import DEFAULT_CHUNK_ELEMENTS


def make_model(k=3, d=12, lat=2, noise="diagonal", seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    model = MixtureOfFactorAnalyzers(k, d, lat, noise, generator=g, dtype=dtype)
    with torch.no_grad():
        model.logits.copy_(torch.randn(k, generator=g, dtype=dtype))
        model.loc.copy_(torch.randn(k, d, generator=g, dtype=dtype))
        model.raw_noise.normal_(generator=g)
    return model


def trainer_state():
    return {
        "iteration": 7,
        "best_log_likelihood": -123.5,
        "converged": False,
        "history": [{"iteration": 1, "train_log_likelihood": -200.0, "val_log_likelihood": None}],
        "rng_state": torch.Generator().manual_seed(3).get_state(),
        "statistics": {"mass": torch.arange(3.0), "shape": (3, 12)},
        5: "int keys survive",
        "stats_dtype": torch.float64,
    }


def assert_same(a, b, where="state"):
    """Deep equality for nested dicts/lists/tuples with tensors."""
    assert type(a) is type(b), f"{where}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):  # (a tempered step's standard error)
        assert math.isnan(b), f"{where}: {a!r} != {b!r}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def no_temporaries(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("noise", ["diagonal", "isotropic"])
def test_round_trip(tmp_path, noise):
    model = make_model(noise=noise)
    config = load_config(overrides=["model.n_components=3", "train.em.max_iter=4"])
    state = trainer_state()
    path = save_checkpoint(tmp_path / "model.pt", model, run_config=config,
                           trainer_state=state, metrics={"test_bits_per_dim": 1.25, "n": 10})
    assert path == tmp_path / "model.pt"
    assert no_temporaries(tmp_path)

    loaded = load_checkpoint(path)
    assert isinstance(loaded, Checkpoint)
    assert loaded.path == path
    assert loaded.version == FORMAT_VERSION
    assert loaded.model.config() == model.config()
    assert loaded.model.dtype == torch.float64
    x = torch.randn(20, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.equal(loaded.model.log_prob(x), model.log_prob(x))
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], value)
    assert loaded.run_config == config
    assert_same(loaded.trainer_state, state)
    assert loaded.metrics == {"test_bits_per_dim": 1.25, "n": 10}


def test_chunk_elements_round_trip(tmp_path):
    """A model's chunk_elements is saved: draws are made chunk by chunk, so a seed gives the
    loaded model the saved one's samples only under the same chunk_elements."""
    model = make_model()
    model.chunk_elements = 40  # (chunks of a few rows)
    loaded = load_checkpoint(save_checkpoint(tmp_path / "m.pt", model)).model
    assert loaded.chunk_elements == 40
    draw = lambda m: m.sample(50, torch.Generator().manual_seed(3))[0]  # noqa: E731
    assert torch.equal(draw(loaded), draw(model))
    default = make_model()
    assert not torch.equal(draw(default), draw(model))  # (the test can fail)

    # Beside model_config, whose unknown keys an older mfa refuses: it reads the file.
    path = save_checkpoint(tmp_path / "old.pt", model)
    assert "chunk_elements" not in torch.load(path, weights_only=True)["model_config"]
    # A checkpoint written before chunk_elements was saved loads with the default.
    rewrite(path, lambda p: p.pop("chunk_elements"))
    assert load_checkpoint(path).model.chunk_elements == DEFAULT_CHUNK_ELEMENTS
    for bad in (0, 2.5, "40", True):
        rewrite(path, lambda p, bad=bad: p.update(chunk_elements=bad))
        with pytest.raises(CheckpointError, match=r"old\.pt holds an invalid chunk_elements"):
            load_checkpoint(path)


def test_minimal_checkpoint_and_float32(tmp_path):
    model = make_model(dtype=torch.float32, lat=0)
    loaded = load_checkpoint(save_checkpoint(tmp_path / "m.pt", model))
    assert loaded.run_config is None and loaded.trainer_state is None and loaded.metrics is None
    assert loaded.model.dtype == torch.float32 and loaded.model.n_factors == 0
    x = torch.randn(5, 12)
    assert torch.equal(loaded.model.log_prob(x), model.log_prob(x))


def test_run_config_may_be_a_dict_and_is_validated(tmp_path):
    model = make_model()
    loaded = load_checkpoint(save_checkpoint(tmp_path / "m.pt", model,
                                             run_config={"model": {"n_components": 3}}))
    assert loaded.run_config.model.n_components == 3
    with pytest.raises(ValueError, match=r"unknown config key 'model\.k'"):
        save_checkpoint(tmp_path / "bad.pt", model, run_config={"model": {"k": 3}})
    assert not (tmp_path / "bad.pt").exists()


def test_overwriting_replaces_the_checkpoint(tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint(path, make_model(seed=0))
    save_checkpoint(path, make_model(seed=1), metrics={"second": True})
    loaded = load_checkpoint(path)
    assert loaded.metrics == {"second": True}
    assert torch.equal(loaded.model.loc, make_model(seed=1).loc)
    assert no_temporaries(tmp_path)


def test_views_numpy_and_cpu_copies(tmp_path):
    np = pytest.importorskip("numpy")
    big = torch.arange(10_000.0)
    state = {"view": big[:3], "np_scalar": np.float64(2.5), "np_array": np.arange(4)}
    save_checkpoint(tmp_path / "m.pt", make_model(), trainer_state=state)
    loaded = load_checkpoint(tmp_path / "m.pt").trainer_state
    assert torch.equal(loaded["view"], torch.tensor([0.0, 1.0, 2.0]))
    assert loaded["view"].untyped_storage().nbytes() == 3 * 4  # not the whole 10 000 values
    assert loaded["np_scalar"] == 2.5 and isinstance(loaded["np_scalar"], float)
    assert torch.equal(loaded["np_array"], torch.arange(4))


def test_unsafe_trainer_state_is_refused_when_saving(tmp_path):
    class Opaque:
        pass

    with pytest.raises(TypeError, match=r"trainer_state\['inner'\]\[0\] holds an object.*Opaque"):
        save_checkpoint(tmp_path / "m.pt", make_model(), trainer_state={"inner": [Opaque()]})
    with pytest.raises(TypeError, match=r"metrics must be a dict"):
        save_checkpoint(tmp_path / "m.pt", make_model(), metrics=[1, 2])
    with pytest.raises(TypeError, match=r"model must be a MixtureOfFactorAnalyzers"):
        save_checkpoint(tmp_path / "m.pt", torch.nn.Linear(2, 2))
    assert list(tmp_path.iterdir()) == []


def test_invalid_run_config_object_is_refused_when_saving(tmp_path):
    config = RunConfig()
    config.model.n_factors = -1
    with pytest.raises(ValueError, match=r"model\.n_factors: must be >= 0"):
        save_checkpoint(tmp_path / "m.pt", make_model(), run_config=config)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_map_location_to_a_missing_device(tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", make_model())
    with pytest.raises(CheckpointError, match=r"m\.pt cannot be read with map_location='cuda'"
                                              r".*CUDA"):
        load_checkpoint(path, map_location="cuda")


def test_map_location(tmp_path):
    save_checkpoint(tmp_path / "m.pt", make_model(), trainer_state={"t": torch.ones(2)})
    loaded = load_checkpoint(tmp_path / "m.pt", map_location=torch.device("cpu"))
    assert loaded.model.device.type == "cpu"
    assert loaded.trainer_state["t"].device.type == "cpu"


# ---------------------------------------------------------------------------- atomicity


def test_failed_write_keeps_the_old_checkpoint_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "m.pt"
    save_checkpoint(path, make_model(seed=0), metrics={"version": "good"})
    before = path.read_bytes()

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial archive")  # half an archive in the temporary file
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, make_model(seed=1), metrics={"version": "bad"})
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert load_checkpoint(path).metrics == {"version": "good"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_a_full_disk_during_a_save_is_an_oserror_naming_the_checkpoint(tmp_path, monkeypatch):
    """On a full disk torch.save raised its own RuntimeError ("[enforce fail at
    inline_container.cc:672] . unexpected pos ...", no path), not the OSError the docstring
    promised (the CLI printed it as an internal error)."""
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, make_model(seed=0), metrics={"version": "good"})
    before = path.read_bytes()
    short = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 13248 "
                         "vs 13200")

    def short_write(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04" + b"\0" * 4096)  # what fitted on the disk
        raise short

    monkeypatch.setattr(torch, "save", short_write)
    with pytest.raises(OSError, match=rf"cannot write checkpoint {re.escape(str(path))}: "
                                      r"writing failed \(.*unexpected pos.*is the disk full\? "
                                      r"\(.* still holds the previous checkpoint\)") as caught:
        save_checkpoint(path, make_model(seed=1), metrics={"version": "bad"})
    monkeypatch.undo()
    assert caught.value.__cause__ is short
    assert path.read_bytes() == before  # the previous checkpoint, whole
    assert load_checkpoint(path).metrics == {"version": "good"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no temporary


def test_another_error_of_torch_save_is_not_called_a_full_disk(tmp_path, monkeypatch):
    """Every RuntimeError of torch.save (out of memory too) became "writing failed ...; is the
    disk full?"; only its reports of a failed write are the write's error."""
    path = tmp_path / "checkpoint.pt"
    memory = RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 8 GB")

    def out_of_memory(obj, f, *args, **kwargs):
        raise memory

    monkeypatch.setattr(torch, "save", out_of_memory)
    with pytest.raises(RuntimeError) as caught:
        save_checkpoint(path, make_model(seed=1))
    assert caught.value is memory and not isinstance(caught.value, OSError)
    assert not any(tmp_path.iterdir())  # no temporary


def test_a_checkpoint_that_cannot_be_created_is_named_not_its_temporary(tmp_path, monkeypatch):
    """A read-only folder: the error named the hidden temporary (.checkpoint.pt.<pid>...)."""
    real_open = os.open

    def refuse(file, *args, **kwargs):
        if ".tmp" in str(file):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(PermissionError, match=r"cannot write checkpoint .*m\.pt: Permission "
                                              r"denied \(nothing was written\)$"):
        save_checkpoint(tmp_path / "m.pt", make_model())
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_interrupted_first_write_leaves_nothing(tmp_path, monkeypatch):
    def interrupted(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "m.pt", make_model())
    assert list(tmp_path.iterdir()) == []


def test_saving_onto_a_directory_is_refused(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError, match="is a directory"):
        save_checkpoint(tmp_path / "d", make_model())


def test_creates_parent_folders(tmp_path):
    path = save_checkpoint(tmp_path / "a" / "b" / "m.pt", make_model())
    assert load_checkpoint(path).model.n_components == 3


# ---------------------------------------------------------------------------- bad files


def test_missing_file(tmp_path):
    path = tmp_path / "absent.pt"
    with pytest.raises(CheckpointNotFoundError, match=r"absent\.pt does not exist") as info:
        load_checkpoint(path)
    assert isinstance(info.value, FileNotFoundError)
    assert isinstance(info.value, ValueError)
    with pytest.raises(CheckpointError, match="is a directory"):
        load_checkpoint(tmp_path)


def test_truncated_file(tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", make_model(), trainer_state=trainer_state())
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 30):
        truncated = tmp_path / f"cut{cut}.pt"
        truncated.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=rf"cut{cut}\.pt is truncated or corrupted"):
            load_checkpoint(truncated)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.pt is empty \(0 bytes\)"):
        load_checkpoint(empty)


def test_corrupted_file(tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", make_model())
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("data.pkl"))
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    for i in range(start, start + 40):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"m\.pt.*(corrupted|refusing)"):
        load_checkpoint(path)


def test_garbage_file(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(os.urandom(64) + b"not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match=r"garbage\.pt is not an mfa checkpoint"):
        load_checkpoint(path)
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match=r"notes\.txt is not an mfa checkpoint"):
        load_checkpoint(text)


def test_a_pytorch_file_that_is_not_an_mfa_checkpoint(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"weights\.pt is not an mfa checkpoint.*'format'"):
        load_checkpoint(path)
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match=r"weights\.pt is not an mfa checkpoint"):
        load_checkpoint(path)


def rewrite(path: Path, change) -> None:
    """Load a checkpoint's raw payload, change it and save it again (not atomically)."""
    payload = torch.load(path, weights_only=True)
    change(payload)
    torch.save(payload, path)


def test_newer_format_version(tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", make_model())
    rewrite(path, lambda p: p.update(version=FORMAT_VERSION + 1))
    with pytest.raises(CheckpointError, match=rf"m\.pt has format version {FORMAT_VERSION + 1}"
                                              r".*newer mfa.*upgrade"):
        load_checkpoint(path)
    rewrite(path, lambda p: p.update(version="one"))
    with pytest.raises(CheckpointError, match=r"m\.pt has an invalid format version 'one'"):
        load_checkpoint(path)


def test_state_that_does_not_match_the_config(tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", make_model(k=3, d=12, lat=2))
    rewrite(path, lambda p: p["model_config"].update(n_factors=3))
    with pytest.raises(CheckpointError, match=r"m\.pt: the saved model state does not match "
                                              r"its model config.*size mismatch for loadings"):
        load_checkpoint(path)

    path = save_checkpoint(tmp_path / "m2.pt", make_model())
    rewrite(path, lambda p: p["model_state"].pop("raw_noise"))
    with pytest.raises(CheckpointError, match=r"m2\.pt: the saved model state.*raw_noise"):
        load_checkpoint(path)

    path = save_checkpoint(tmp_path / "m3.pt", make_model())
    rewrite(path, lambda p: p["model_config"].update(noise="full"))
    with pytest.raises(CheckpointError, match=r"m3\.pt has an invalid model config.*noise"):
        load_checkpoint(path)


def test_a_run_config_with_a_device_or_grid_refused_only_at_use_still_loads(tmp_path):
    """A device type the library does not run on, or a fine search grid, is refused where
    it is used, not when a saved run is read back (that blocked resume, sample and evaluate
    of checkpoints the earlier code wrote, even with --device cpu)."""
    config = RunConfig()
    path = save_checkpoint(tmp_path / "m.pt", make_model(), run_config=config)
    def change(payload):
        payload["run_config"]["device"] = "mps"
        payload["run_config"]["train"]["em"]["search_per_decade"] = 200
    rewrite(path, change)
    loaded = load_checkpoint(path).run_config
    assert loaded.device == "mps" and loaded.train.em.search_per_decade == 200


def test_invalid_run_config_inside(tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", make_model(), run_config=RunConfig())
    rewrite(path, lambda p: p["run_config"]["model"].update(n_components=-4))
    with pytest.raises(CheckpointError, match=r"m\.pt holds an invalid run config.*"
                                              r"model\.n_components"):
        load_checkpoint(path)


# ---------------------------------------------------------------------------- hostile files


class Payload:
    """Unpickling this calls ``marker.touch()``: a stand-in for arbitrary code execution."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_malicious_pickle_inside_a_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = save_checkpoint(tmp_path / "m.pt", make_model())
    payload = torch.load(path, weights_only=True)
    payload["trainer_state"] = {"step": Payload(marker)}
    torch.save(payload, path)  # a genuine-looking checkpoint with a hostile object inside
    assert not marker.exists()

    with pytest.raises(CheckpointError, match=r"refusing to load checkpoint .*m\.pt.*"
                                              r"(?s:.*)may be malicious"):
        load_checkpoint(path)
    assert not marker.exists()

    # Sanity check of the test itself: an unrestricted load would have run the payload.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_malicious_raw_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as file:
        pickle.dump({"format": FORMAT_NAME, "x": Payload(marker)}, file)
    with pytest.raises(CheckpointError, match=r"evil\.pt is not an mfa checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()


def test_malicious_legacy_torch_file_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save({"format": FORMAT_NAME, "x": Payload(marker)}, buffer,
               _use_new_zipfile_serialization=False)
    path = tmp_path / "legacy.pt"
    path.write_bytes(buffer.getvalue())
    with pytest.raises(CheckpointError, match=r"legacy\.pt"):
        load_checkpoint(path)
    assert not marker.exists()


# ---------------------------------------------------------------------------- with a trainer


def test_em_trainer_state_round_trips(tmp_path):
    import warnings

    from mfa import em

    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model = make_model(k=2, d=8, lat=1)
    trainer = em.EMTrainer(em.EMConfig(max_iter=2, progress=False, kmeans_iter=3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, x)
    state = trainer.state_dict()
    path = save_checkpoint(tmp_path / "em.pt", model, run_config=RunConfig(),
                           trainer_state=state, metrics={"history": trainer.history})
    loaded = load_checkpoint(path)
    assert_same(loaded.trainer_state, _plain_copy(state))
    assert torch.equal(loaded.model.log_prob(x), model.log_prob(x))
    em.EMTrainer(em.EMConfig(max_iter=2, progress=False, kmeans_iter=3)).load_state_dict(
        loaded.trainer_state)
    # counters no fit of that config reaches are refused, naming the key
    for key, value, top in (("iteration", 10000, 2), ("iteration", -5, 2), ("run", 5, 4),
                            ("runs_done", -1, 4)):
        tampered = {**loaded.trainer_state, key: value}
        with pytest.raises(ValueError, match=rf"EMTrainer state key '{key}' is {value}, "
                                             rf"outside \[0, {top}\]"):
            em.EMTrainer(em.EMConfig(max_iter=2, progress=False, kmeans_iter=3)
                         ).load_state_dict(tampered)


def _plain_copy(state):
    """What a checkpoint stores for ``state``: tensors on the CPU, containers as they are."""
    from mfa.checkpoint import _plain

    return _plain(state, "state")


# ---------------------------------------------------------------------------- stale temporaries


def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.slow  # starts a Python that imports torch (~2 s)
def test_kill_9_during_a_write_leaves_a_temporary_that_the_next_save_removes(tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint(path, make_model(seed=0), metrics={"version": "good"})
    script = (
        "import os, signal, sys, torch\n"
        "from mfa.checkpoint import save_checkpoint\n"
        "from mfa import MixtureOfFactorAnalyzers\n"
        "def killed(obj, f, *args, **kwargs):\n"
        "    f.write(b'PK\\x03\\x04' + bytes(1 << 20))  # a large partial archive\n"
        "    f.flush()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "torch.save = killed\n"
        "save_checkpoint(sys.argv[1], MixtureOfFactorAnalyzers(3, 12, 2))\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()
    stale = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(stale) == 1 and stale[0].name.startswith(".m.pt.")
    assert stale[0].stat().st_size > 1 << 20
    assert load_checkpoint(path).metrics == {"version": "good"}  # not confused by it

    save_checkpoint(path, make_model(seed=1), metrics={"version": "next"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]
    assert load_checkpoint(path).metrics == {"version": "next"}


def test_clean_stale_temporaries_keeps_those_of_live_writers(tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint(path, make_model())
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = tmp_path / f".m.pt.{_dead_pid()}.0a1b2c3d.tmp"
        live = tmp_path / f".m.pt.{writer.pid}.deadbeef.tmp"
        old_live = tmp_path / f".m.pt.{writer.pid}.00c0ffee.tmp"
        others = [tmp_path / f".other.pt.{_dead_pid()}.0a1b2c3d.tmp",  # another checkpoint's
                  tmp_path / ".m.pt.notapid.0a1b2c3d.tmp", tmp_path / "m.pt.bak"]
        for p in (dead, live, old_live, *others):
            p.write_bytes(b"PK\x03\x04 partial")
        two_days_ago = time.time() - 2 * 86400
        os.utime(old_live, (two_days_ago, two_days_ago))

        removed = clean_stale_temporaries(path)
        assert sorted(removed) == sorted([dead, old_live])
        assert not dead.exists() and not old_live.exists()
        assert live.exists() and all(p.exists() for p in others)
        assert clean_stale_temporaries(path) == []

        # A save keeps the live writer's temporary too; after the writer dies, a load keeps
        # it (a reader cannot tell a dead writer from one in another container: below) and
        # the next save removes it.
        save_checkpoint(path, make_model(seed=1))
        assert live.exists()
    finally:
        writer.kill()
        writer.wait()
    assert load_checkpoint(path).model.n_components == 3
    assert live.exists()
    save_checkpoint(path, make_model(seed=1))
    assert not live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["m.pt"] + [p.name for p in others])


def test_a_load_removes_only_day_old_temporaries(tmp_path):
    """Every per-run command loads the checkpoint; its load removed the temporaries whose pid
    named no process here, which is also what a writer in another container or on another
    machine sharing the folder looks like: ``mfa sample`` removed a training run's live
    temporary and the run failed at its rename. A load now removes only those a day old."""
    path = tmp_path / "m.pt"
    save_checkpoint(path, make_model())
    elsewhere = tmp_path / f".m.pt.{_dead_pid()}.0a1b2c3d.tmp"  # (no such pid here)
    abandoned = tmp_path / f".m.pt.{_dead_pid()}.0b1b2c3d.tmp"
    for p in (elsewhere, abandoned):
        p.write_bytes(b"PK\x03\x04 partial")
    two_days_ago = time.time() - 2 * 86400
    os.utime(abandoned, (two_days_ago, two_days_ago))
    assert load_checkpoint(path).model.n_components == 3
    assert elsewhere.exists() and not abandoned.exists()
    assert clean_stale_temporaries(path, by_pid=False) == []
    assert clean_stale_temporaries(path) == [elsewhere]  # (a writer's clean checks the pid)


def test_clean_stale_temporaries_keeps_this_process_s_own_write_in_progress(tmp_path,
                                                                            monkeypatch):
    path = tmp_path / "m.pt"
    mine_stale = tmp_path / f".m.pt.{os.getpid()}.12345678.tmp"  # e.g. a reused pid
    mine_stale.write_bytes(b"PK\x03\x04 partial")
    seen = []
    real_save = torch.save

    def save_and_clean(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.flush()
        seen.append(clean_stale_temporaries(path))  # a second cleaner during the write
        seen.append(sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")))

    monkeypatch.setattr(torch, "save", save_and_clean)
    save_checkpoint(path, make_model())
    monkeypatch.undo()
    assert seen[0] == []  # the stale one was already removed, the one being written is kept
    assert len(seen[1]) == 1 and seen[1][0] != mine_stale.name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


# ---------------------------------------------------------------------------- tampered contents


@pytest.mark.parametrize(("name", "value"), [("loc", float("nan")), ("raw_noise", float("inf")),
                                             ("logits", -float("inf"))])
def test_non_finite_parameters_are_refused(tmp_path, name, value):
    path = save_checkpoint(tmp_path / "m.pt", make_model())
    rewrite(path, lambda p: p["model_state"][name].view(-1).__setitem__(1, value))
    with pytest.raises(CheckpointError, match=rf"m\.pt holds non-finite parameters: "
                                              rf"'{name}' contains 1 non-finite"):
        load_checkpoint(path)


def test_huge_sizes_in_the_config_are_refused_before_anything_is_allocated(tmp_path,
                                                                           monkeypatch):
    path = save_checkpoint(tmp_path / "m.pt", make_model(k=3, d=12, lat=2))
    rewrite(path, lambda p: p["model_config"].update(n_components=100_000, n_features=100_000,
                                                     n_factors=100))
    built = []
    real_init = MixtureOfFactorAnalyzers.__init__

    def spy(self, *args, **kwargs):
        built.append((args, kwargs))
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(MixtureOfFactorAnalyzers, "__init__", spy)
    with pytest.raises(CheckpointError, match=r"m\.pt: the saved model state does not match its "
                                              r"model config.*size mismatch for logits: stored "
                                              r"shape \[3\], expected \[100000\]"):
        load_checkpoint(path)
    assert built == []
    monkeypatch.undo()


def test_huge_shapes_backed_by_a_tiny_storage_are_refused(tmp_path, monkeypatch):
    """Stride-0 tensors let a 2 kB file hold tensors of any shape: they must match their
    stored data, not just the config, before anything is built or computed from them."""
    k, d, lat = 100_000, 100_000, 100
    path = save_checkpoint(tmp_path / "m.pt", make_model(k=3, d=12, lat=2))

    def inflate(payload):
        payload["model_config"].update(n_components=k, n_features=d, n_factors=lat)
        for name, shape in {"logits": (k,), "loc": (k, d), "loadings": (k, d, lat),
                            "raw_noise": (k, d)}.items():
            payload["model_state"][name] = torch.zeros(1, dtype=torch.float64).expand(shape)

    rewrite(path, inflate)
    assert path.stat().st_size < 10_000
    built = []
    monkeypatch.setattr(MixtureOfFactorAnalyzers, "__init__",
                        lambda self, *a, **kw: built.append(a))
    with pytest.raises(CheckpointError, match=r"m\.pt: the saved model state does not match.*"
                                              r"'logits' has 100000 elements but its stored "
                                              r"data holds 1"):
        load_checkpoint(path)
    assert built == []


@pytest.mark.parametrize("kind", ["sparse", "meta"])
def test_sparse_or_meta_parameters_are_refused_naming_the_file(tmp_path, kind):
    """torch's weights_only load lets sparse and meta tensors through; the storage check then
    failed inside torch (NotImplementedError, or 'Tensor.item() cannot be called on meta
    tensors' from `mfa sample`), naming neither the file nor the parameter."""
    path = save_checkpoint(tmp_path / "m.pt", make_model(k=3, d=12, lat=2))

    def damage(payload):
        state = payload["model_state"]
        if kind == "sparse":
            state["logits"] = state["logits"].to_sparse()
        else:
            for name in list(state):
                state[name] = state[name].to("meta")

    rewrite(path, damage)
    with pytest.raises(CheckpointError, match=rf"m\.pt: .*'logits' is a "
                                              rf"{'meta' if kind == 'meta' else 'torch.sparse_coo'}"
                                              r" tensor without dense data"):
        load_checkpoint(path)


def test_aliased_parameters_are_not_shared_by_the_loaded_model(tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", make_model(noise="diagonal"))

    def alias(payload):
        state = payload["model_state"]
        state["raw_noise"] = state["loc"]  # one stored tensor for two parameters

    rewrite(path, alias)
    model = load_checkpoint(path).model
    assert torch.equal(model.raw_noise, model.loc)
    with torch.no_grad():
        model.loc.add_(1.0)
    assert not torch.equal(model.raw_noise, model.loc)


@pytest.mark.parametrize(("name", "shape", "expected"), [
    ("loc", (3, 11), r"\[3, 12\]"), ("loadings", (3, 12, 2, 1), r"\[3, 12, 2\]"),
    ("raw_noise", (3, 1), r"\[3, 12\]"), ("logits", (), r"\[3\]"),
])
def test_each_stored_shape_is_checked_against_the_config(tmp_path, name, shape, expected):
    path = save_checkpoint(tmp_path / "m.pt", make_model(k=3, d=12, lat=2))
    rewrite(path, lambda p: p["model_state"].update({name: torch.zeros(shape,
                                                                        dtype=torch.float64)}))
    with pytest.raises(CheckpointError, match=rf"m\.pt: the saved model state does not match.*"
                                              rf"size mismatch for {name}: stored shape \[.*\], "
                                              rf"expected {expected} from the config"):
        load_checkpoint(path)


def test_stored_dtypes_are_checked(tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", make_model())
    rewrite(path, lambda p: p["model_state"].update(loc=p["model_state"]["loc"].long()))
    with pytest.raises(CheckpointError, match=r"m\.pt: .*'loc' has dtype torch\.int64; "
                                              r"parameters must be floating point"):
        load_checkpoint(path)
    path = save_checkpoint(tmp_path / "m2.pt", make_model())
    rewrite(path, lambda p: p["model_state"].update(loadings=p["model_state"]["loadings"].float()))
    with pytest.raises(CheckpointError, match=r"m2\.pt: .*'loadings' has dtype torch\.float32 "
                                              r"but 'logits' has torch\.float64"):
        load_checkpoint(path)


def test_invalid_sizes_in_the_config(tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", make_model())
    rewrite(path, lambda p: p["model_config"].update(n_components="3"))
    with pytest.raises(CheckpointError, match=r"m\.pt has an invalid model config.*"
                                              r"n_components must be an int, got str"):
        load_checkpoint(path)
    rewrite(path, lambda p: p["model_config"].update(n_components=3, n_factors=13))
    with pytest.raises(CheckpointError, match=r"m\.pt has an invalid model config.*"
                                              r"n_factors must be <= n_features"):
        load_checkpoint(path)
    rewrite(path, lambda p: p["model_config"].pop("n_factors"))
    with pytest.raises(CheckpointError, match=r"m\.pt has an invalid model config.*"
                                              r"missing.*n_factors"):
        load_checkpoint(path)


@pytest.mark.parametrize(("generator", "problem"), [
    (torch.zeros(10, dtype=torch.uint8), "not a valid generator state"),
    (torch.Generator().get_state().float(), "not a valid generator state"),
    ("seed 3", "not a valid generator state"),
])
def test_a_tampered_generator_state_is_refused(tmp_path, generator, problem):
    state = trainer_state()
    path = save_checkpoint(tmp_path / "m.pt", make_model(), trainer_state=state)
    rewrite(path, lambda p: p["trainer_state"].update(generator=generator))
    with pytest.raises(CheckpointError, match=rf"m\.pt holds an invalid trainer state: "
                                              rf"trainer_state\['generator'\] is {problem}"):
        load_checkpoint(path)


def test_a_valid_generator_state_loads_and_resumes_the_stream(tmp_path):
    gen = torch.Generator().manual_seed(5)
    torch.rand(7, generator=gen)
    path = save_checkpoint(tmp_path / "m.pt", make_model(),
                           trainer_state={"generator": gen.get_state()})
    resumed = torch.Generator()
    resumed.set_state(load_checkpoint(path).trainer_state["generator"])
    assert torch.equal(torch.rand(5, generator=resumed), torch.rand(5, generator=gen))


def test_trainer_state_of_the_wrong_type_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", make_model(), trainer_state=trainer_state())
    rewrite(path, lambda p: p.update(trainer_state=[1, 2]))
    with pytest.raises(CheckpointError, match=r"m\.pt holds an invalid trainer state: "
                                              r"it is a list, not a dict"):
        load_checkpoint(path)
    rewrite(path, lambda p: p.update(trainer_state={"history": {"a": 1}}))
    with pytest.raises(CheckpointError, match=r"m\.pt holds an invalid trainer state: "
                                              r"trainer_state\['history'\] is a dict, not a list"):
        load_checkpoint(path)
    rewrite(path, lambda p: p.update(trainer_state={"config": [1]}))
    with pytest.raises(CheckpointError, match=r"trainer_state\['config'\] is a list, not a dict"):
        load_checkpoint(path)
    with pytest.raises(TypeError, match=r"trainer_state must be a dict or None, got list"):
        save_checkpoint(tmp_path / "m2.pt", make_model(), trainer_state=[1, 2])


@pytest.mark.parametrize("metrics, problem", [
    ({"pools": "x"}, r"metrics\['pools'\] must map pool names to \[images, digest\], got 'x'"),
    ({"pools": {"all": 5}}, r"metrics\['pools'\] must map"),
    ({"pools": {"all": [-1, None]}}, r"metrics\['pools'\] must map"),
    ({"image_shape": "abc"}, r"metrics\['image_shape'\] must be 2 or 3 sizes >= 1"),
    ({"image_shape": [1, 0, 28]}, r"metrics\['image_shape'\] must be"),
    ({"train_seconds": "abc"}, r"metrics\['train_seconds'\] must be a finite number >= 0"),
    ({"train_seconds": math.nan}, r"metrics\['train_seconds'\]"),
])
def test_tampered_run_metrics_are_refused(tmp_path, metrics, problem):
    """The values resuming and the per-run commands read from a run's metrics: a tampered
    one gave a traceback (pools 'x': AttributeError) or an error naming no key."""
    good = {"pools": {"all": [5000, None]}, "image_shape": [1, 28, 28], "train_seconds": 1.5}
    path = save_checkpoint(tmp_path / "m.pt", make_model(), metrics=good)
    assert load_checkpoint(path).metrics == good
    rewrite(path, lambda p: p["metrics"].update(metrics))
    with pytest.raises(CheckpointError, match=rf"m\.pt is damaged: {problem}"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match=rf"cannot save checkpoint .*{problem}"):
        save_checkpoint(tmp_path / "m2.pt", make_model(), metrics={**good, **metrics})
    assert not (tmp_path / "m2.pt").exists()


@pytest.mark.parametrize("protocol", [4, 5])
def test_a_malicious_protocol_4_pickle_is_refused_as_not_weights_only(tmp_path, protocol):
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT_NAME, "x": SystemCall("touch pwned")}, path,
               pickle_protocol=protocol)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no warning from torch about the protocol
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path)
    message = str(info.value)
    assert re.search(r"refusing to load checkpoint .*evil\.pt: it is not a weights-only "
                     r"checkpoint.*unsafe or foreign pickle", message), message
    assert "corrupted" not in message and "file an issue" not in message
    assert not (tmp_path / "pwned").exists()


class SystemCall:
    """Unpickling this would run a shell command (it never is: the loader refuses it)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_a_bit_flip_in_a_tensor_record_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "m.pt", make_model())
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if "/data/" in i.filename)
    header = data[info.header_offset:info.header_offset + 30]  # the local file header
    name_length, extra_length = struct.unpack("<HH", header[26:30])  # (torch pads the extra)
    start = info.header_offset + 30 + name_length + extra_length
    data[start + 3] ^= 0x10  # one bit of the first stored value
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"m\.pt is corrupted: archive member "
                                              rf"'{re.escape(info.filename)}' fails its CRC-32"):
        load_checkpoint(path)


# ---------------------------------------------------------------------------- dependencies

ROOT = Path(__file__).resolve().parents[1]
IMPORT_NAMES = {"pillow": "PIL", "pyyaml": "yaml"}  # distribution -> module, where they differ


def _requirements() -> dict[str, str]:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found = {}
    for requirement in project["dependencies"]:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*(.*)", requirement.strip())
        found[match.group(1).lower()] = match.group(2)
    return found


def _minimum(spec: str) -> tuple[int, ...]:
    match = re.search(r">=\s*([\d.]+)", spec)
    assert match, f"no lower bound in {spec!r}"
    return tuple(int(part) for part in match.group(1).split("."))


def test_torch_versions_whose_safe_loader_can_be_bypassed_are_excluded():
    """weights_only=True can be bypassed before torch 2.6 (CVE-2025-32434) and 2.10
    (CVE-2026-24747); torchvision 0.25 is the release built for torch 2.10."""
    requirements = _requirements()
    assert _minimum(requirements["torch"]) >= (2, 10)
    assert _minimum(requirements["torchvision"]) >= (0, 25)
    ci = (ROOT / ".ci" / "run").read_text()
    for name in ("torch", "torchvision"):  # CI installs the range pyproject declares
        spec = re.search(rf'"{name}(>=[^"]*)"', ci).group(1)
        assert _minimum(spec) == _minimum(requirements[name]), (name, spec)


def test_every_declared_dependency_is_imported():
    sources = "\n".join(p.read_text() for p in (ROOT / "mfa").rglob("*.py"))
    for name in _requirements():
        module = IMPORT_NAMES.get(name, name).replace("-", "_")
        assert re.search(rf"^\s*(import|from)\s+{module}\b", sources, flags=re.M), (
            f"{name} is declared in pyproject.toml but no module in mfa/ imports it")


def test_a_tampered_generator_in_a_real_em_state_is_refused(tmp_path):
    import warnings as _warnings

    from mfa.em import EMConfig, EMTrainer

    x = torch.randn(100, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    trainer = EMTrainer(EMConfig(max_iter=3, progress=False, kmeans_iter=2, complete_iter=1,
                                 checkpoint_every=1))
    saved = []
    with _warnings.catch_warnings():
        _warnings.simplefilter("ignore")
        trainer.fit(make_model(k=2, d=6, lat=1), x, checkpoint_fn=lambda t, m: saved.append(
            save_checkpoint(tmp_path / f"em{len(saved)}.pt", m, trainer_state=t.state_dict())))
    path = saved[0]  # written mid-fit, so it holds the generator to resume with
    state = load_checkpoint(path).trainer_state
    assert "generator" in state  # the key EMTrainer writes is the one that is checked
    rewrite(path, lambda p: p["trainer_state"].update(
        generator=p["trainer_state"]["generator"][:100]))
    with pytest.raises(CheckpointError, match=r"em0\.pt holds an invalid trainer state: "
                                              r"trainer_state\['generator'\] is not a valid "
                                              r"generator state: it is rejected by "
                                              r"torch\.Generator\.set_state"):
        load_checkpoint(path)


@pytest.mark.parametrize("trainer_state, match", [
    ({"history": {}}, r"trainer_state\['history'\] is a dict, not a list"),
    ({"generator": 5}, "not a valid generator state"),
    ({"generator": torch.zeros(3, dtype=torch.uint8)}, "not a valid generator state"),
])
def test_save_refuses_what_load_would_refuse_and_keeps_the_earlier_file(
        tmp_path, trainer_state, match):
    path = tmp_path / "m.pt"
    save_checkpoint(path, make_model(), metrics={"version": "good"})
    before = path.read_bytes()
    with pytest.raises(ValueError, match=rf"cannot save checkpoint .*m\.pt: .*{match}"):
        save_checkpoint(path, make_model(seed=1), trainer_state=trainer_state)
    bad = make_model(seed=2)
    with torch.no_grad():
        bad.loc[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"cannot save checkpoint .*'loc'.*nothing was written"):
        save_checkpoint(path, bad)
    assert path.read_bytes() == before
    assert load_checkpoint(path).metrics == {"version": "good"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_a_long_file_name_saves_and_its_stale_temporaries_are_cleaned(tmp_path):
    """The temporary's name added ~20 characters to the file's: a 250-character name that the
    file system takes failed with 'File name too long'."""
    path = tmp_path / ("a" * 245 + ".pt")
    save_checkpoint(path, make_model(), metrics={"version": "long"})
    assert load_checkpoint(path).metrics == {"version": "long"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    from mfa._temporaries import _tag

    stale = tmp_path / f".{_tag(path)}.{_dead_pid()}.0a1b2c3d.tmp"
    stale.write_bytes(b"PK\x03\x04 partial")
    other = tmp_path / f".{_tag(tmp_path / ('a' * 244 + '.pt'))}.{_dead_pid()}.0a1b2c3d.tmp"
    other.write_bytes(b"PK\x03\x04 partial")
    assert len(stale.name) < 255 and clean_stale_temporaries(path) == [stale]
    assert other.exists()  # another long name's temporary


def test_overwriting_keeps_the_files_permissions_and_writes_through_a_symlink(tmp_path):
    """The atomic rename made a 0600 checkpoint 0644 and replaced a symlink (latest.pt) with
    a file, leaving the link's target with the old model."""
    first = MixtureOfFactorAnalyzers(2, 3, 1, generator=torch.Generator().manual_seed(0))
    second = MixtureOfFactorAnalyzers(2, 3, 1, generator=torch.Generator().manual_seed(1))
    path = save_checkpoint(tmp_path / "private.pt", first)
    os.chmod(path, 0o600)
    save_checkpoint(path, second)
    assert os.stat(path).st_mode & 0o777 == 0o600
    link = tmp_path / "latest.pt"
    link.symlink_to(path.name)
    save_checkpoint(link, first)
    assert link.is_symlink()
    assert torch.equal(load_checkpoint(path).model.loc, first.loc)
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_the_temporary_is_fsynced_whole_before_the_rename_and_the_folder_after(tmp_path,
                                                                               monkeypatch):
    """A rename can reach the disk before the data it names: without the temporary's fsync
    before os.replace, a power cut could leave latest.pt empty or cut off where the previous
    checkpoint stood; without the folder's after, the rename itself could be lost."""
    calls = []  # ("fsync", inode, size) / ("replace", source, target), in order
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        info = os.fstat(fd)
        calls.append(("fsync", info.st_ino, info.st_size))
        return real_fsync(fd)

    def replace(source, target):
        calls.append(("replace", Path(source), Path(target)))
        return real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = tmp_path / "latest.pt"
    for kept in (False, True):  # a first save, then one over the previous checkpoint
        calls.clear()
        save_checkpoint(path, make_model(seed=int(kept)))
        written = path.stat()  # the rename keeps the temporary's inode
        renames = [i for i, c in enumerate(calls) if c[0] == "replace" and c[2] == path]
        assert len(renames) == 1, calls
        (at,) = renames
        assert calls[at][1].parent == tmp_path and calls[at][1] != path
        assert ("fsync", written.st_ino, written.st_size) in calls[:at], calls
        assert ("fsync", tmp_path.stat().st_ino) in [c[:2] for c in calls[at + 1 :]], calls
        assert load_checkpoint(path).model.config() == make_model().config()
