"""Checkpoints that cannot run code when loaded, written atomically.

Format: one ``torch.save`` zip archive holding a dict of tensors and plain Python values
(str, int, float, bool, None, dicts, lists, tuples, torch dtypes)::

    {"format": "mfa-checkpoint", "version": 1, "mfa_version": ..., "torch_version": ...,
     "created": ISO time, "model_class": "MixtureOfFactorAnalyzers",
     "model_config": model.config(), "model_state": model.state_dict() (on the CPU),
     "chunk_elements": model.chunk_elements (since 2026-12-07; older readers ignore it),
     "run_config": config_to_dict(RunConfig) | None,
     "trainer_state": trainer.state_dict() | None, "metrics": dict | None}

It is read with ``torch.load(weights_only=True)``, whose restricted unpickler only rebuilds
tensors and plain containers and refuses every other global, so a crafted ``__reduce__``
payload is rejected before anything runs (:class:`CheckpointError`). Why this rather than
safetensors + JSON: the trainer state is a nested structure of tensors and Python values
(tuples, int keys, dtypes, RNG states) that ``torch.save`` keeps exactly, in a single file
that can be swapped in with one atomic ``os.replace``; safetensors would need a second file or
a flattening scheme with tensor placeholders inside its string metadata. The safety comes
from ``weights_only=True``, which PyTorch maintains for exactly this purpose. What goes in
is checked at save time, so a checkpoint that ``weights_only`` could not read back (say, a
trainer state holding an arbitrary object) is refused when written, not when needed.

Reads first check the zip structure and the CRC-32 of every archive member, so a cut-off or
damaged file is reported as such before any unpickling.

Then, before anything is built, the stored model config and tensors are checked against
each other (names, shapes, dtypes, finite values) and any generator state in the trainer
state is checked to be one ``torch.Generator`` accepts (:mod:`mfa._checkpoint_checks`); the
model is built only once the stored sizes match tensors whose data is really in the file,
and takes those tensors instead of allocating its own.

Writes are atomic: the archive goes to a temporary file ``.<name>.<pid>.<hex>.tmp`` in the
destination folder, is flushed and fsynced, then renamed over ``path`` with ``os.replace``.
A failure at any point removes the temporary file and leaves a previous checkpoint at
``path`` untouched. A writer killed outright (``kill -9``, power loss) cannot remove its
temporary: every save removes those of ``path`` whose writer process is gone, and a load
those untouched for :data:`STALE_TEMPORARY_AGE` (24 h; a reader cannot tell a writer in
another container from a dead one) (:func:`clean_stale_temporaries`).
"""

from __future__ import annotations

import datetime
import os
import pickle
import pickletools
import re
import stat
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mfa._checkpoint_checks import (
    build_model,
    check_model_config,
    check_model_state,
    check_parameters_finite,
    check_run_metrics,
    check_trainer_state,
)
from mfa._temporaries import (
    clean_stale_temporaries,
    fsync_folder,
    naming,
    reserved_temporary,
)
from mfa.config import RunConfig, config_from_dict, config_to_dict, validate_config
from mfa.model import MixtureOfFactorAnalyzers

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "Checkpoint",
    "CheckpointError",
    "CheckpointNotFoundError",
    "clean_stale_temporaries",
    "load_checkpoint",
    "save_checkpoint",
]

FORMAT_NAME = "mfa-checkpoint"
FORMAT_VERSION = 1
_ZIP_MAGIC = b"PK\x03\x04"


class CheckpointError(ValueError):
    """A checkpoint cannot be written or read; the message names the path and the problem."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint file does not exist (also a :class:`FileNotFoundError`)."""


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns."""

    model: MixtureOfFactorAnalyzers  # rebuilt from its config, with the saved parameters
    run_config: RunConfig | None = None
    trainer_state: Any = None  # what trainer.state_dict() returned, for load_state_dict
    metrics: dict[str, Any] | None = None
    path: Path | None = None
    version: int = FORMAT_VERSION  # format version of the file
    mfa_version: str | None = None  # version of mfa that wrote it
    created: str | None = None  # ISO 8601 time of writing (UTC)


# ---------------------------------------------------------------------------- saving


def _plain(value: Any, where: str) -> Any:
    """A copy of ``value`` holding only what ``torch.load(weights_only=True)`` rebuilds.

    Tensors are detached and moved to the CPU (views are copied so only their elements are
    stored); NumPy scalars and arrays become Python numbers and tensors. Anything else raises
    ``TypeError`` naming where it is.
    """
    if value is None:
        return value
    for kind in (bool, int, float, complex, str, bytes):  # exact types: a subclass (an enum,
        if isinstance(value, kind):  # torch's TorchVersion) would be pickled as its class
            return kind(value)
    if isinstance(value, (torch.dtype, torch.device, torch.Size)):
        return value
    if isinstance(value, Tensor):
        tensor = value.detach().cpu()
        if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()
        return tensor
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not (key is None or isinstance(key, (bool, int, float, str))):
                raise TypeError(f"{where} has a key of type {type(key).__name__} ({key!r}); "
                                "checkpoint dict keys must be str, int, float, bool or None")
            out[_plain(key, where)] = _plain(item, f"{where}[{key!r}]")
        return out
    if type(value) in (list, tuple):
        items = [_plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    module = type(value).__module__
    if module == "numpy" or module.startswith("numpy."):
        if hasattr(value, "shape") and value.shape != ():
            return torch.from_numpy(value.copy())
        return value.item()
    raise TypeError(
        f"{where} holds an object of type {type(value).__module__}.{type(value).__qualname__}; "
        "a checkpoint may only hold tensors, numbers, strings, bools, None, dtypes and "
        "dicts/lists/tuples of these (it must load with torch.load(weights_only=True))"
    )


def _short_write(error: RuntimeError) -> bool:
    """Whether torch's ``RuntimeError`` is its report of a failed write of the file (a full
    disk: "[enforce fail at inline_container.cc] . unexpected pos ...", or "PytorchStreamWriter
    failed writing file ...")."""
    return any(text in str(error) for text in ("unexpected pos", "failed writing"))


def save_checkpoint(
    path: str | os.PathLike[str],
    model: MixtureOfFactorAnalyzers,
    *,
    run_config: RunConfig | Mapping[str, Any] | None = None,
    trainer_state: Any = None,
    metrics: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically and return its path.

    Args:
        path: the destination file (conventionally ``*.pt``); its folder is created.
        model: its ``config()`` and ``state_dict()`` (moved to the CPU) are stored.
        run_config: the :class:`RunConfig` (or its dict form), validated and stored as a dict.
        trainer_state: ``trainer.state_dict()``: tensors and plain values only.
        metrics: e.g. ``{"test_bits_per_dim": 1.23}``; tensors and plain values only.

    Raises:
        TypeError: ``model`` is not a MixtureOfFactorAnalyzers, or ``trainer_state`` /
            ``metrics`` hold an object that a safe load could not rebuild.
        ValueError: ``run_config`` is invalid.
        OSError: writing failed (torch's RuntimeError of a short write, as on a full disk,
            too), naming ``path`` (the original error is its cause); ``path`` then still
            holds what it held before, and no temporary is left.
    """
    import mfa

    path = Path(path)
    if not isinstance(model, MixtureOfFactorAnalyzers):
        raise TypeError(f"model must be a MixtureOfFactorAnalyzers, got {type(model).__name__}")
    if isinstance(run_config, Mapping):
        run_config = config_from_dict(run_config)
    elif isinstance(run_config, RunConfig):
        run_config = validate_config(run_config)  # never write a config that cannot be read
    elif run_config is not None:
        raise TypeError(f"run_config must be a RunConfig, a dict or None, "
                        f"got {type(run_config).__name__}")
    if trainer_state is not None and not isinstance(trainer_state, Mapping):
        raise TypeError(f"trainer_state must be a dict or None, "
                        f"got {type(trainer_state).__name__}")
    if metrics is not None and not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a dict or None, got {type(metrics).__name__}")
    if path.is_dir():
        raise IsADirectoryError(f"cannot write checkpoint {path}: it is a directory")
    payload = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "mfa_version": _plain(getattr(mfa, "__version__", None), "mfa.__version__"),
        "torch_version": str(torch.__version__),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model_class": type(model).__name__,
        "model_config": _plain(model.config(), "model.config()"),
        "model_state": _plain(dict(model.state_dict()), "model.state_dict()"),
        # Sampling draws chunk by chunk: a seed gives the saved model's samples only under the
        # same chunk_elements (a loaded model sampled other images). Beside model_config, not
        # in it: an older mfa, which refuses unknown config keys, ignores it.
        "chunk_elements": model.chunk_elements,
        "run_config": _plain(None if run_config is None else config_to_dict(run_config),
                             "run_config"),
        "trainer_state": _plain(trainer_state, "trainer_state"),
        "metrics": _plain(None if metrics is None else dict(metrics), "metrics"),
    }

    try:  # what load_checkpoint would refuse is not written over the file at path
        check_model_state(payload["model_config"], payload["model_state"])
        check_parameters_finite(payload["model_state"])
        check_trainer_state(payload["trainer_state"])
        check_run_metrics(payload["metrics"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"cannot save checkpoint {path}: {error}; load_checkpoint would "
                         "refuse it, so nothing was written") from None
    # Through a symlink (e.g. latest.pt) to its target, which keeps its permissions: the
    # rename replaced the link with a file, and a 0600 file became 0644.
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    folder = target.parent
    folder.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(target)
    kept = target.exists()
    with reserved_temporary(target) as temporary:
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            with os.fdopen(fd, "wb") as file:
                torch.save(payload, file)  # (a short write: torch's RuntimeError)
                file.flush()
                os.fsync(file.fileno())
            if kept:
                os.chmod(temporary, stat.S_IMODE(target.stat().st_mode))
            os.replace(temporary, target)
        except (OSError, RuntimeError) as error:
            temporary.unlink(missing_ok=True)
            if not isinstance(error, OSError) and not _short_write(error):
                raise  # (out of memory, ...: not a failed write, and not "is the disk full?")
            raise naming(error, f"checkpoint {path}", f" ({path} still holds the previous "
                         "checkpoint)" if kept else " (nothing was written)") from error
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
    fsync_folder(folder)
    return path


# ---------------------------------------------------------------------------- loading


_OPCODE_NAMES = {ord(op.code): op.name for op in pickletools.opcodes}


def _refusal_detail(message: str) -> str | None:
    """Why the safe loader refused a pickle, or None if its error is not such a refusal."""
    match = re.search(r"GLOBAL\s+(\S+)", message)
    if match:
        return f"it references {match.group(1)}, which the safe loader does not allow"
    if "Unsupported global" in message:
        return "it references a Python object the safe loader does not allow"
    match = re.search(r"Unsupported operand (\d+)", message)
    if match:
        code = int(match.group(1))
        name = _OPCODE_NAMES.get(code, "unknown")
        return (f"it uses the pickle instruction {name} ({code}), which the safe loader does "
                "not support; mfa writes pickle protocol 2, so this file was pickled by "
                "something else, e.g. with protocol 4 or newer")
    return None


def _unpickling_detail(message: str) -> str:
    """The informative part of a weights_only unpickling error, without torch's advice."""
    match = re.search(r"WeightsUnpickler error:(.*?)(Check the documentation|$)", message,
                      flags=re.S)
    detail = " ".join(match.group(1).split()) if match else ""
    return detail or _first_line_of(message)


def _check_archive(path: Path) -> None:
    """Verify the zip structure and every member's CRC-32 before unpickling anything."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupted: its zip archive cannot be read "
            f"({_first_line_of(str(error)) or type(error).__name__}); the file was probably "
            "cut off, e.g. by an interrupted copy"
        ) from None
    if bad is not None:
        raise CheckpointError(
            f"checkpoint {path} is corrupted: archive member {bad!r} fails its CRC-32 check"
        )


def _read(path: Path, map_location: Any) -> Any:
    if not path.exists():
        raise CheckpointNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory, not a file")
    with open(path, "rb") as file:
        head = file.read(4)
    if not head:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); it was probably "
                              "interrupted while being written by a tool that is not atomic")
    if head != _ZIP_MAGIC:
        raise CheckpointError(
            f"{path} is not an mfa checkpoint: it is not a PyTorch zip archive "
            f"(it starts with {head!r}, not {_ZIP_MAGIC!r})"
        )
    _check_archive(path)
    try:
        with warnings.catch_warnings():  # a refused protocol is reported below, as an error
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        detail = _refusal_detail(str(error))
        if detail is not None:
            raise CheckpointError(
                f"refusing to load checkpoint {path}: it is not a weights-only checkpoint "
                f"(unsafe or foreign pickle refused): {detail}. An mfa checkpoint holds only "
                "tensors and plain Python values; loading this file without the safe loader "
                "could run arbitrary code: it was not written by "
                "mfa.checkpoint.save_checkpoint and may be malicious"
            ) from None
        raise CheckpointError(
            f"checkpoint {path} is corrupted: {_unpickling_detail(str(error))}"
        ) from None
    except Exception as error:  # damaged records, or a map_location this machine lacks
        raise CheckpointError(
            f"checkpoint {path} cannot be read with map_location={map_location!r} "
            f"({type(error).__name__}: {_first_line_of(str(error)) or repr(error)})"
        ) from None


def _first_line_of(text: str) -> str:
    text = text.strip()
    return text.splitlines()[0] if text else ""


def _check_payload(payload: Any, path: Path) -> None:
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_NAME:
        keys = sorted(map(str, payload)) if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(
            f"{path} is not an mfa checkpoint: a PyTorch file without the "
            f"'format': '{FORMAT_NAME}' marker (it holds {keys})"
        )
    version = payload.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"checkpoint {path} has an invalid format version {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {version}, written by a newer mfa "
            f"({payload.get('mfa_version')}); this mfa reads format version {FORMAT_VERSION} "
            "at most: upgrade mfa to load it"
        )
    for key, kind in (("model_config", dict), ("model_state", dict)):
        if not isinstance(payload.get(key), kind):
            raise CheckpointError(f"checkpoint {path} is damaged: '{key}' is missing or not a "
                                  f"{kind.__name__}")
    state = payload["model_state"]
    if not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise CheckpointError(f"checkpoint {path} is damaged: 'model_state' must map "
                              "parameter names to tensors")
    metrics = payload.get("metrics")
    if metrics is not None and not isinstance(metrics, dict):
        raise CheckpointError(f"checkpoint {path} is damaged: 'metrics' is a "
                              f"{type(metrics).__name__}, not a dict")
    try:
        check_run_metrics(metrics)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path} is damaged: {error}") from None


def _rebuild_model(payload: dict, path: Path) -> MixtureOfFactorAnalyzers:
    """Check the stored config and tensors against each other, then build the model from the
    tensors: nothing is allocated from the stored sizes before they match the tensors."""
    config = payload["model_config"]
    state = payload["model_state"]
    try:
        check_model_config(config)
    except (TypeError, ValueError) as error:
        raise CheckpointError(
            f"checkpoint {path} has an invalid model config {config}: {error}"
        ) from None
    try:
        check_model_state(config, state)
    except (TypeError, ValueError) as error:
        raise CheckpointError(
            f"checkpoint {path}: the saved model state does not match its model config "
            f"{config}: {error}"
        ) from None
    try:
        check_parameters_finite(state)
    except ValueError as error:
        raise CheckpointError(f"checkpoint {path} holds non-finite parameters: {error}; "
                              "the model would give NaN results") from None
    try:
        return build_model(config, state)
    except (TypeError, ValueError) as error:
        raise CheckpointError(
            f"checkpoint {path} has an invalid model config {config}: {error}"
        ) from None
    except RuntimeError as error:
        raise CheckpointError(
            f"checkpoint {path}: the saved model state does not match its model config "
            f"{config}: {' '.join(str(error).split())}"
        ) from None


def load_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`, without running any code.

    Args:
        path: the checkpoint file.
        map_location: as in ``torch.load``: where the tensors go (``"cpu"``, ``"cuda"``,
            a ``torch.device``, ...). The model is rebuilt on the device and with the dtype
            of its loaded parameters.

    Returns:
        A :class:`Checkpoint` with the rebuilt model, the :class:`RunConfig` (or None), the
        trainer state and the metrics.

    Raises:
        CheckpointNotFoundError: ``path`` does not exist (a ``FileNotFoundError`` too).
        CheckpointError: the file is empty, truncated or corrupted; not an mfa checkpoint; of
            a newer format version; holds a model state that does not match its config
            (names, shapes, dtypes: checked before anything is allocated), non-finite
            parameters, an invalid run config, or a trainer state that is not a dict or holds
            an invalid generator state; or holds pickled objects other than tensors and plain
            values (a possible code-execution payload, refused before anything runs). A
            subclass of ``ValueError``; every message names the path.

    Temporaries of ``path`` that writers left :data:`STALE_TEMPORARY_AGE` ago are removed
    first (:func:`clean_stale_temporaries` without its pid check: a reader cannot tell a
    writer in another container or on another machine from a dead one).
    """
    path = Path(path)
    clean_stale_temporaries(path, by_pid=False)
    payload = _read(path, map_location)
    _check_payload(payload, path)
    model = _rebuild_model(payload, path)
    chunk = payload.get("chunk_elements")  # (absent before 2026-12-07: the default)
    if chunk is not None:
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
            raise CheckpointError(f"checkpoint {path} holds an invalid chunk_elements "
                                  f"{chunk!r}: a positive int")
        model.chunk_elements = chunk
    try:
        check_trainer_state(payload.get("trainer_state"))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path} holds an invalid trainer state: "
                              f"{error}") from None
    run_config = None
    if payload.get("run_config") is not None:
        try:
            run_config = config_from_dict(payload["run_config"])
        except ValueError as error:
            raise CheckpointError(f"checkpoint {path} holds an invalid run config: "
                                  f"{error}") from None
    return Checkpoint(
        model=model,
        run_config=run_config,
        trainer_state=payload.get("trainer_state"),
        metrics=payload.get("metrics"),
        path=path,
        version=payload["version"],
        mfa_version=payload.get("mfa_version"),
        created=payload.get("created"),
    )
