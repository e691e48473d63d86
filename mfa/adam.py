"""Adam for the parameters of a :class:`~mfa.model.MixtureOfFactorAnalyzers`
(:class:`mfa.sgd.SGDTrainer`): the optimiser, its step scaled by the noise standard
deviation, the check of a saved Adam state, and the training rows behind the prior penalty's
``1/N``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset

from mfa.data.quantized import QuantizedRows
from mfa.model import MixtureOfFactorAnalyzers

__all__ = [
    "add_weight_decay", "check_adam_state", "count_rows", "drop_saved_weight_decay", "make_adam",
    "relative_step_factor", "scaled_step", "step_buffers", "unknown_rows",
]


def scaled_step(optimizer: torch.optim.Optimizer, model: MixtureOfFactorAnalyzers,
                by_noise: bool, before: tuple[Tensor, Tensor, Tensor] | None = None) -> None:
    """One Adam step; with ``by_noise`` the change of each mean entry ``μ_kj`` and loading row
    ``A_kj`` is multiplied by ``√d_kj`` (before the step), which is Adam on ``μ/√d`` and
    ``A/√d`` with ``d`` held fixed for the step: each moves by about ``lr`` noise standard
    deviations. Adam's step is about ``lr`` per entry whatever its gradient's scale, so in
    pixel units it moved the mean of a near-constant pixel (noise std ~0.001 on 8-bit images)
    by several of its standard deviations a step.

    The change of each noise parameter ``r`` (``d = min_noise + softplus(r)``) is multiplied
    by ``softplus(r)/sigmoid(r)``, which is Adam on ``log softplus(r)`` (for that step): the
    noise variances move by about ``lr`` relative to themselves, at data scales up to about
    10³ (pixels in 0-255 included). The factor is ``≈ 1 + d/2`` for small ``d`` (a step on
    ``r`` already is one on ``log d`` there), but for ``d ≫ 1`` a step of about ``lr`` on ``r``
    moved ``d`` by about ``lr`` in absolute terms: the noise variances stayed where they
    started. Beyond that scale Adam's ``eps`` (1e-8) outgrows the gradient of ``r`` (about
    ``1/d``) and the noise steps shrink (a review, 2026-12-07, first step at lr 0.01: ``|Δ log
    d|`` 0.0099–0.0100 on data ×1 or ×100, 0.007–0.0099 at ×10³, 0.0003–0.008 at ×10⁴,
    2e-6–3e-4 at ×10⁵); rescale such data (the means and loadings steps are unaffected).

    ``before``: buffers shaped like ``(model.loc, model.loadings, model.raw_noise)`` that
    hold the parameters before the step, reused across steps instead of new tensors a step
    (:func:`step_buffers`)."""
    if not by_noise:
        optimizer.step()
        return
    with torch.no_grad():
        if before is None:
            before = step_buffers(model)
        before[0].copy_(model.loc)
        before[1].copy_(model.loadings)
        before[2].copy_(model.raw_noise)
        keep = 1.0 - model.noise_variance.sqrt()  # [K, D]: the share of the old value kept
        keep_raw = 1.0 - relative_step_factor(model.raw_noise)
    optimizer.step()
    with torch.no_grad():  # after + (1 − s)(before − after) = before + s (after − before)
        model.loc.lerp_(before[0], keep)
        model.loadings.lerp_(before[1], keep.unsqueeze(-1))
        model.raw_noise.lerp_(before[2], keep_raw)


def relative_step_factor(raw: Tensor) -> Tensor:
    """``softplus(r)/sigmoid(r)`` elementwise (``≥ 1``; ``→ 1`` as ``r → −∞``, ``≈ r`` for
    large ``r``), without overflow: with ``u = e^(−|r|)`` it is ``(r + log1p(u))(1 + u)``
    for ``r > 0`` and ``log1p(u)(1 + u)/u`` otherwise (``1 + u/2 + …``: 1 where ``u`` is
    below the dtype's epsilon, and so where it is subnormal or 0)."""
    u = torch.exp(-raw.abs())
    tiny = u < torch.finfo(u.dtype).eps
    below = torch.log1p(u) * (1 + u) / torch.where(tiny, torch.ones_like(u), u)
    above = (raw + torch.log1p(u)) * (1 + u)
    return torch.where(raw > 0, above, torch.where(tiny, torch.ones_like(u), below))


def step_buffers(model: MixtureOfFactorAnalyzers) -> tuple[Tensor, Tensor, Tensor]:
    """Uninitialised buffers shaped like ``(model.loc, model.loadings, model.raw_noise)``
    for :func:`scaled_step`'s ``before``."""
    return (torch.empty_like(model.loc), torch.empty_like(model.loadings),
            torch.empty_like(model.raw_noise))


def check_adam_state(state: dict, model: MixtureOfFactorAnalyzers) -> None:
    """Refuse a saved Adam state whose moment buffers do not have the shapes of ``model``'s
    parameters (Adam's fused kernel would read past them)."""
    params = list(model.parameters())
    groups = state.get("param_groups")
    moments = state.get("state")
    if (not isinstance(groups, list) or len(groups) != 1 or not isinstance(moments, dict)
            or list(groups[0].get("params", ())) != list(range(len(params)))):
        raise ValueError("SGDTrainer state key 'optimizer' is not an Adam state of this "
                         f"model's {len(params)} parameters")
    for index, buffers in moments.items():
        if not 0 <= int(index) < len(params) or not isinstance(buffers, dict):
            raise ValueError(f"SGDTrainer state key 'optimizer' has no parameter {index}")
        shape = params[int(index)].shape
        for key in ("exp_avg", "exp_avg_sq"):
            value = buffers.get(key)
            if not isinstance(value, Tensor) or value.shape != shape:
                got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(
                    f"SGDTrainer state: Adam's {key} of parameter {index} has shape {got}, but "
                    f"the model's is {tuple(shape)}: the state was saved for another model")


def make_adam(params: list[Tensor], lr: float) -> torch.optim.Adam:
    """Adam with its fused kernel where the parameters' device has one (the same update in
    one pass over each tensor: 0.3 against 0.7 ms a step for K=50, D=784, L=6 on one CPU
    thread), else the default ``foreach`` implementation. Without weight decay: see
    :func:`add_weight_decay`."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except RuntimeError:  # no fused kernel for this device or dtype
        return torch.optim.Adam(params, lr=lr)


def add_weight_decay(params: Iterable[Tensor], weight_decay: float) -> None:
    """Add ``weight_decay · p`` to each parameter's gradient: Adam's (L2, not decoupled)
    weight decay, as ``torch.optim.Adam(weight_decay=)`` adds it, except at entries that are
    infinite: the logit ``−inf`` of a component of weight 0 (its gradient is 0) would get a
    gradient ``−inf`` and Adam would make it NaN."""
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p.grad.add_(p.nan_to_num(posinf=0.0, neginf=0.0), alpha=weight_decay)


def drop_saved_weight_decay(optimizer: torch.optim.Optimizer) -> None:
    """After ``optimizer.load_state_dict``: a state saved when the optimizer itself applied
    ``SGDConfig.weight_decay`` restores it in its parameter group; the decay is now added to
    the gradients (:func:`add_weight_decay`), so the group's must be 0."""
    for group in optimizer.param_groups:
        group["weight_decay"] = 0.0


def count_rows(train, dataset_if_unknown: bool = False) -> int | None:
    """Rows of the training data (for the prior penalty's ``1/N``); ``None`` when its
    length is unknown (an iterable of batches, an unsized ``IterableDataset``, a DataLoader's
    unsized sampler or batch sampler of another kind than ``BatchSampler`` or a list: with
    ``dataset_if_unknown``, where no pass will count them, its dataset's length)."""
    if isinstance(train, (Tensor, QuantizedRows)):
        return train.shape[0]
    if isinstance(train, Dataset):
        with contextlib.suppress(TypeError):  # (an IterableDataset may have no length)
            return len(train)
        return None
    if isinstance(train, DataLoader) and train.batch_sampler is None:
        return None  # automatic batching off: each item is a batch of unknown rows
    if isinstance(train, DataLoader) and train.batch_size is None:
        # A batch_sampler of the user's: its own sampler draws the rows (the loader's
        # `sampler` is then a default one over the whole dataset, which counted a process's
        # BatchSampler(ShardSampler(...)) as every row, twice over two processes); a list of
        # index lists, its indices; another kind: the rows the start's pass reads (it may
        # draw a subset or a shard), else the dataset's.
        batches = train.batch_sampler
        if isinstance(batches, BatchSampler) and not isinstance(train.dataset,
                                                                IterableDataset):
            with contextlib.suppress(TypeError):
                return len(batches.sampler)
        if isinstance(batches, (list, tuple)):
            return sum(len(b) for b in batches)
        if not dataset_if_unknown:
            return None
    sampler = getattr(train, "sampler", None)  # a DataLoader's: the rows it draws an epoch
    if sampler is not None and not isinstance(train.dataset, IterableDataset):
        with contextlib.suppress(TypeError):
            return len(sampler)
        if not dataset_if_unknown:  # (an unsized sampler may draw a subset: the pass counts)
            return None
    dataset = getattr(train, "dataset", None)
    if dataset is not None and hasattr(dataset, "__len__"):
        return len(dataset)
    return None


def unknown_rows(train) -> ValueError:
    """The error of priors whose penalty needs the training rows (:func:`count_rows`) where
    ``train`` does not tell them."""
    return ValueError(
        "SGDConfig priors (noise_prior_strength > 0, weight_concentration > 1 or "
        "loading_ridge > 0) need the number of training rows: pass a tensor, a Dataset or a "
        "DataLoader with a sized dataset, keep em_start (its pass counts them), or set "
        f"noise_prior_strength=0, got {type(train).__name__}")
