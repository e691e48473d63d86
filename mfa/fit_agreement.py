"""The check that every process of a ``torch.distributed`` fit was given the same fit.

Under :mod:`torch.distributed` every process runs its own ``fit`` and the processes meet in
its collectives (one all-reduce per EM iteration or Adam step, see :mod:`mfa.distributed`).
Processes given different fits either mixed them silently — ``seed=rank`` (a common DDP
idiom) gave each process its own re-seeding draws and shuffled order, and the all-reduce
added them into one wrong model; a different ``lr`` left each process with its own model
while rank 0 saved its own — or met different collectives: a different ``K``, ``L``, dtype
or resumed state made gloo abort the process (a C++ ``SIGABRT``, "Received data size doesn't
match"), and a different ``max_iter`` or validation on one process only left the others
waiting for the process group's timeout, then blaming a crash.

:func:`check_same_fit` gathers a summary of each process's fit (:func:`fit_summary`) with one
``all_gather_object``, so every process sees every summary and raises the same
``ValueError`` naming the first difference; nothing is waited for after it. Without a
process group it warns when ``torchrun`` launched the process (each process would fit every
row and write the checkpoint).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict

from torch import distributed as dist

from mfa import distributed

__all__ = ["PER_PROCESS_FIELDS", "check_same_fit", "fit_summary", "resumed_position"]

#: Fields of :class:`~mfa.em.EMConfig` and :class:`~mfa.sgd.SGDConfig` that may differ between
#: the processes, as they change nothing any process computes:
#:
#: * ``device``: each process has its own (``cuda:LOCAL_RANK``); the sums meet in float64.
#: * ``progress``: only rank 0 shows a progress bar.
#: * ``checkpoint_every``: only rank 0's ``checkpoint_fn`` is called, and saving starts no
#:   collective.
#:
#: Every other field changes what is computed or when the processes meet: ``batch_size``
#: Adam's global batches (and the rounding of EM's float32 sums), ``allow_tf32`` and
#: ``stats_dtype`` the rounding of each process's products, whose models would drift apart
#: (every process takes the M-step and the Adam step itself), the rest the fit itself.
PER_PROCESS_FIELDS = frozenset({"device", "progress", "checkpoint_every"})


def resumed_position(state) -> str | None:
    """Where a trainer's resumed state stands: EM's :class:`~mfa.em_state.RunState` as
    ``"run r, iteration i"``, Adam's state dict as ``"epoch e, step s"`` (its scheduler's
    steps); ``None`` for a fit that starts afresh (no state, or Adam's empty dict)."""
    if state is None or (isinstance(state, dict) and not state):
        return None
    if isinstance(state, dict):
        scheduler = state.get("scheduler")
        step = scheduler.get("last_epoch") if isinstance(scheduler, dict) else None
        return f"epoch {state.get('epoch')}, step {step}"
    return f"run {state.run}, iteration {state.iteration}"


def fit_summary(config, model, validation, resumed_at: str | None) -> dict:
    """What must be the same on every process: ``{key: value}`` of primitives (picklable),
    in the order :func:`check_same_fit` compares them.

    Args:
        config: the trainer's config dataclass (:data:`PER_PROCESS_FIELDS` left out).
        model: the model to fit: its class, ``K``, ``D``, ``L``, noise type and dtype.
        validation: the validation data passed to ``fit`` (whether any is given).
        resumed_at: where the resumed state stands (e.g. ``"run 0, iteration 3"``), or
            ``None`` for a fit that starts afresh.
    """
    name = type(config).__name__
    summary = {
        "the model's class": type(model).__name__,
        "n_components": model.n_components,
        "n_features": model.n_features,
        "n_factors": model.n_factors,
        "the noise type": model.noise,
        "the model's dtype": str(model.dtype).removeprefix("torch."),
        "validation data": "none" if validation is None else "given",
        "the resumed state": resumed_at or "none (a fresh fit)",
    }
    for key, value in asdict(config).items():
        if key not in PER_PROCESS_FIELDS:
            summary[f"{name}.{key}"] = value
    return summary


def check_same_fit(trainer: str, config, model, validation, resumed) -> None:
    """Refuse, on every process, a fit that is not the same on all of them (one
    ``all_gather_object``; nothing without an active process group). Call it in ``fit``
    after the per-process checks of its inputs and before any other collective.

    Under NCCL the objects travel through the current CUDA device, as every collective of
    :mod:`mfa.distributed` does (:func:`~mfa.distributed.init_from_env` sets it to
    ``cuda:LOCAL_RANK``; a process group made by hand needs ``torch.cuda.set_device``).

    Args:
        trainer: ``"EMTrainer"`` or ``"SGDTrainer"``, for the messages.
        config, model, validation: as :func:`fit_summary` takes them.
        resumed: the trainer's resumed state (:func:`resumed_position`), or ``None``.

    Raises:
        ValueError: naming the first key that differs and each process's value of it.
    """
    if not distributed.is_initialized():
        if distributed.launched_by_torchrun():
            warnings.warn(
                f"{trainer}.fit runs under torchrun (WORLD_SIZE={os.environ['WORLD_SIZE']}) "
                "without a process group, so every process fits all the rows on its own and "
                "writes the checkpoint: call mfa.distributed.init_from_env() before fit (or "
                "torch.distributed.init_process_group) to train data-parallel",
                UserWarning, stacklevel=4)
        return
    if not distributed.is_active():
        return
    summary = fit_summary(config, model, validation, resumed_position(resumed))
    gathered: list = [None] * distributed.get_world_size()
    # (a failure, e.g. another process crashed before it, as the other collectives say it)
    with distributed._collective(f"the check that every process was given the same "
                                f"{trainer}.fit"):
        dist.all_gather_object(gathered, summary)
    for key in summary:  # (every process holds every summary: all raise the same error)
        values = [other.get(key, "(missing)") for other in gathered]
        if any(value != values[0] for value in values):
            raise ValueError(_difference(trainer, key, values))


def _difference(trainer: str, key: str, values: list) -> str:
    """The message for ``key``, whose value on rank ``r`` is ``values[r]``."""
    groups: dict[str, list[int]] = {}
    for rank, value in enumerate(values):
        groups.setdefault(repr(value), []).append(rank)
    each = "; ".join(f"{value} on {_ranks(ranks)}" for value, ranks in groups.items())
    hint = ("; a seed per process is not needed: every process draws the same "
            "initialisation and order, and each streams its own shard of the rows"
            if key.endswith(".seed") else "")
    return (
        f"{trainer}.fit was given a different fit on the processes: {key} is {each}. Under "
        "torch.distributed the processes add up their work every iteration, so every process "
        f"must run the same fit: the same model, the same config (only "
        f"{', '.join(sorted(PER_PROCESS_FIELDS))} may differ), the same resumed state, and "
        f"validation data on all of them or on none{hint}"
    )


def _ranks(ranks: list[int]) -> str:
    """``[0, 1, 2, 5]`` as ``"ranks 0-2, 5"``."""
    runs: list[list[int]] = []
    for rank in ranks:
        if runs and rank == runs[-1][1] + 1:
            runs[-1][1] = rank
        else:
            runs.append([rank, rank])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
    return f"rank{'s' if len(ranks) > 1 else ''} {text}"
