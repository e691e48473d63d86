"""Which config changes a resumed run may make: :data:`RESUME_SAFE_KEYS`, the changes of a
run config against the saved one (:func:`check_resume_changes`), the keys of a trainer the
run does not use (:func:`unused_trainer_keys`), and what an interrupted or finished fit can
still take (:func:`check_can_extend`; a hierarchical run's finished stages:
:func:`check_stage_changes`). Re-exported by :mod:`mfa.run_folder`, which applies
them to a run folder (:func:`mfa.run_folder.run_config_of`)."""

from __future__ import annotations

import numbers
import shlex
from collections.abc import Iterable
from dataclasses import fields
from typing import TYPE_CHECKING

import torch

from mfa.config import OutputConfig, RunConfig, config_to_dict
from mfa.config_text import dotted_leaves
from mfa.hierarchical_section import resolve_stages

if TYPE_CHECKING:
    from mfa.checkpoint import Checkpoint

__all__ = ["DEVICE_KEYS", "RESUME_SAFE_KEYS", "check_can_extend", "check_resume_changes",
           "check_stage_changes", "device_change_note", "trainer_sections",
           "unused_trainer_keys"]


_STAGES = ("root_em", "child_em", "final_em")

#: The device settings. A resume may change them (a run trained on CUDA continues on a
#: machine without it; the trainers' own RESUMABLE fields include ``device`` too): the fit
#: is the same, its sums rounded by another device (:func:`device_change_note`).
DEVICE_KEYS: tuple[str, ...] = ("device", "train.em.device", "train.sgd.device",
                                *(f"train.hierarchical.{stage}.device" for stage in _STAGES))

#: What a resumed run may change: how long it runs, how often it saves, whether it shows
#: progress, on which device it computes, what it draws, and where its data files are; not
#: what it computes.
RESUME_SAFE_KEYS: frozenset[str] = frozenset({
    *DEVICE_KEYS,
    "train.em.max_iter", "train.sgd.epochs",
    "train.em.checkpoint_every", "train.sgd.checkpoint_every", "output.checkpoint_every",
    "train.em.progress", "train.sgd.progress",
    *(f"train.hierarchical.{stage}.progress" for stage in _STAGES),
    "data.root", "data.download", "data.num_workers",
    *(f"output.{f.name}" for f in fields(OutputConfig)
      if f.name not in ("dir", "name", "checkpoint_every")),
})


def check_resume_changes(saved: RunConfig, new: RunConfig) -> list[str]:
    """The dotted keys where ``new`` differs from ``saved`` (the config of the run resumed).

    Raises:
        ValueError: a differing key is not in :data:`RESUME_SAFE_KEYS` (naming the first).
    """
    # A null hierarchical stage is train.em: compared as that when the other side sets it.
    saved_stages, new_stages = (
        {stage for stage in ("root_em", "child_em")
         if getattr(c.train.hierarchical, stage) is None} for c in (saved, new))
    if saved_stages != new_stages:
        saved, new = resolve_stages(saved), resolve_stages(new)
    old, now = dotted_leaves(config_to_dict(saved)), dotted_leaves(config_to_dict(new))
    # Both sides' keys: a section set to null on one side has leaves on the other only.
    changed = [key for key in {**now, **old}
               if _spelled_alike(key, now.get(key)) != _spelled_alike(key, old.get(key))]
    for key in changed:
        if key in ("output.dir", "output.name"):  # (it computes the same: not the reason)
            raise ValueError(
                f"cannot change {key} when resuming a run (saved {old.get(key)!r}, given "
                f"{now.get(key)!r}): a resume continues in the folder given to --resume; "
                "to keep the result elsewhere, copy the run folder and resume the copy")
        if (key not in RESUME_SAFE_KEYS and saved.train.method == new.train.method
                and unused_trainer_keys(new.train.method, [key])):  # (not the reason:
            raise _unused_key_error(key, new.train.method)  # "would change what it computes")
        if key not in RESUME_SAFE_KEYS:
            raise ValueError(
                f"cannot change {key} when resuming a run (saved {old.get(key)!r}, given "
                f"{now.get(key)!r}): it would change what the run computes; start a new run. A "
                "resume may change the iterations/epochs, checkpoint cadence, progress, "
                "device, figures and the data location"
            )
    return changed


def _spelled_alike(key: str, value: object) -> object:
    """A device setting's ``value`` in one spelling for each device: ``"cuda"`` (the current
    CUDA device, the first one) is ``"cuda:0"``, ``"cpu:0"`` is ``"cpu"`` (a resume saw a
    change in ``cuda`` → ``cuda:0``); any other value as it is."""
    if key not in DEVICE_KEYS or not isinstance(value, str) or value == "auto":
        return value
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError, TypeError):
        return value
    return device.type if device.type == "cpu" else f"{device.type}:{device.index or 0}"


def device_change_note(saved: RunConfig, new: RunConfig, changed: list[str]) -> str | None:
    """What a resume that changes a device setting (``changed``, of
    :func:`check_resume_changes`) should be told, or ``None`` where it changes none."""
    old, now = dotted_leaves(config_to_dict(saved)), dotted_leaves(config_to_dict(new))
    moved = [f"{key}={now.get(key)!r} (saved {old.get(key)!r})" for key in changed
             if key in DEVICE_KEYS]
    if not moved:
        return None
    return (f"resumed with {', '.join(moved)}: on another device the continued fit's numbers "
            "differ from an uninterrupted run's by rounding (its sums round differently), "
            "and the figures' random draws differ (a random generator per device)")


def _used_sections(method: str) -> tuple[str, ...]:
    return {"em": ("train.em.",), "sgd": ("train.sgd.",)}.get(
        method, ("train.em.", "train.hierarchical."))


def trainer_sections(method: str) -> str:
    """The config sections ``train.method`` reads, for messages (``"train.em.*"``, ...)."""
    return " and ".join(section + "*" for section in _used_sections(method))


def unused_trainer_keys(method: str, keys: Iterable[str]) -> list[str]:
    """The dotted ``keys`` of a trainer section that ``train.method`` does not read (EM's
    settings in an Adam run, ...)."""
    return [key for key in keys if key.startswith(("train.em.", "train.sgd.",
                                                   "train.hierarchical."))
            and not key.startswith(_used_sections(method))]


def _unused_key_error(key: str, method: str) -> ValueError:
    return ValueError(f"cannot change {key} when resuming: this run trains with "
                      f"train.method={method}, which reads {trainer_sections(method)} only")


def check_stage_changes(changed: list[str]) -> None:
    """A hierarchical run with finished stages (its ``hierarchy/`` files, fitted with the
    saved settings) may change none of its ``train.em.*`` and ``train.hierarchical.*`` keys
    (``changed``, of :func:`check_resume_changes`) but progress, checkpoint cadence and
    device: the resumed stages would not be the saved ones' (their files refuse another
    configuration)."""
    for key in changed:
        if key.startswith(("train.em.", "train.hierarchical.")) and not key.endswith(
                (".progress", ".checkpoint_every", ".device")):
            raise ValueError(f"cannot change {key} when resuming a hierarchical run: its "
                             "finished stages were fitted with the saved value; start a "
                             "new run")


def check_can_extend(ckpt: Checkpoint, config: RunConfig, changed: list[str]) -> None:
    """EM that has finished all its restarts and re-seeding rounds does not run again: a
    larger ``max_iter`` given to a finished run would be ignored, so it is refused; so is any
    change once a restart or round has finished under the saved one (the saved config would
    no longer describe the fit), and one below the iterations done. Adam's ``epochs`` may
    change only for an interrupted run with a constant learning rate, not below the epochs
    done (a finished run returned its best epoch; a cosine or step schedule is laid out over
    the saved epochs). The finished stages
    of a hierarchical run were fitted with the saved EM settings: none of those may change."""
    state = ckpt.trainer_state or {}
    method = config.train.method
    for key in unused_trainer_keys(method, changed):  # accepted, saved: and ignored
        raise _unused_key_error(key, method)
    if method == "hierarchical":
        check_stage_changes(changed)
    if "train.sgd.epochs" in changed and config.train.method == "sgd":
        saved = ckpt.run_config.train.sgd
        epoch = _saved_count(ckpt, "epoch")
        if state.get("stopped") or state.get("final", epoch >= saved.epochs):
            raise ValueError(
                "cannot change train.sgd.epochs when resuming: this run's Adam has finished "
                "(it returned its best epoch, not its last), so more epochs would not continue "
                f"the same run; start a new run ({_new_run_hint(ckpt, 'train.sgd.epochs')})")
        if config.train.sgd.epochs < epoch:
            raise ValueError(
                f"cannot lower train.sgd.epochs to {config.train.sgd.epochs} when resuming: "
                f"this run's Adam has already done {epoch} epochs")
        if saved.schedule != "constant":
            raise ValueError(
                f"cannot change train.sgd.epochs when resuming a run with train.sgd.schedule="
                f"{saved.schedule!r}: the learning-rate schedule is laid out over the saved "
                "number of epochs; resume with it, or start a new run")
    saved_em = ckpt.run_config.train.em
    run, iteration = _saved_count(ckpt, "run"), _saved_count(ckpt, "iteration")
    # Checkpoints come after EM iterations (iteration >= 1) and at the end of the fit, where
    # run is n_init + the re-seeding rounds run and iteration 0 (or, when a round did not
    # pay, n_init + reseed_rounds): a run past n_init mid-iteration is a re-seeding round.
    finished = run >= saved_em.n_init and (
        iteration == 0 or run >= saved_em.n_init + saved_em.reseed_rounds)
    done = _saved_count(ckpt, "iteration")
    if ("train.em.max_iter" in changed and config.train.method == "em" and not finished
            and config.train.em.max_iter < done):
        raise ValueError(
            f"cannot lower train.em.max_iter to {config.train.em.max_iter} when resuming: "
            f"this run's EM has already done {done} iterations of its restart")
    if "train.em.max_iter" in changed and config.train.method == "em" and 0 < run and not finished:
        raise ValueError(
            f"cannot change train.em.max_iter when resuming: this run is in restart/round "
            f"{run + 1} and the earlier ones ran with max_iter={saved_em.max_iter}; resume with "
            "it, or start a new run")
    if "train.em.max_iter" in changed and config.train.method == "em" and finished:
        raise ValueError(
            "cannot change train.em.max_iter when resuming: this run's EM has finished, so "
            f"it would not run again; start a new run ({_new_run_hint(ckpt, 'train.em.max_iter')})")


def _saved_count(ckpt: Checkpoint, key: str) -> int:
    """The trainer state's ``key`` (0 when absent) as an int, read before the trainer checks
    the state: a tampered value is named here, as the trainer's check would, not failed on
    in ``int()``."""
    from mfa.checkpoint import CheckpointError

    value = (ckpt.trainer_state or {}).get(key, 0)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        trainer = {"em": "EMTrainer", "sgd": "SGDTrainer"}.get(
            ckpt.run_config.train.method, "the trainer")
        raise CheckpointError(
            f"checkpoint {ckpt.path} holds a trainer state that {trainer} cannot resume "
            f"from: state key {key!r} must be int, got {type(value).__name__} {value!r:.60}")
    return int(value)


def _new_run_hint(ckpt, key: str) -> str:
    """How to start a new run from a run's saved config, changing ``key``: a run folder
    named by ``output.name`` needs another name (the saved one is taken)."""
    hint = f"e.g. --config RUN/config.yaml --set {key}=..."
    if ckpt.run_config.output.name is not None:
        hint += f" --set {shlex.quote(f'output.name={ckpt.run_config.output.name}-2')}"
    return hint
