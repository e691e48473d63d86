"""Components that hurt held-out data: found on validation rows, then re-seeded.

A fitted mixture can hold components that raise the training likelihood but lower the
validation likelihood: with few rows per component (K = 200 on 4,000 digits), some
components settle on a handful of training rows and give the rest of the data almost no
density, while their weight is taken from every other component. Removing component ``k``
(and renormalising the other weights) changes each validation row's log-density by::

    log p₋ₖ(x) − log p(x) = log(1 − r_k(x)) − log(1 − w_k)

with ``r_k(x)`` its responsibility for the row and ``w_k`` its weight, both under the
mixture of the components kept so far. :func:`harmful_components` removes, greedily, the
component whose removal raises the mean validation log-likelihood most, until none does;
:func:`reseed_components` puts those components back where the data are (each one a split
of the heaviest component, :func:`mfa.init.split_heaviest`), so that ``K`` is unchanged and
EM, run again from there, gives them rows it can use.

The round :class:`mfa.em.EMTrainer` runs after its restarts (``EMConfig.reseed_rounds``)
starts with :func:`reseed_round`. Measured before it was built in (the default fit; then
the harmful components re-seeded and the default fit run again from there with
``init="none"``; held-out bits/dim): the embedded digits, K = 200: 5.774 → 4.087 (130 of 200
components harmful); Fashion-MNIST (10,000 rows), K = 200: 18 of 200 harmful.
``docs/results/baselines.md`` has the figures of the built-in round.
"""

from __future__ import annotations

import logging
import numbers

import torch
from torch import Tensor

from mfa import distributed
from mfa._data_stream import DataSource
from mfa.init import split_heaviest
from mfa.model import MixtureOfFactorAnalyzers

logger = logging.getLogger(__name__)


def validation_log_joint(
    model: MixtureOfFactorAnalyzers, validation, batch_size: int = 4096
) -> Tensor:
    """``log w_k + log N(x; μ_k, Σ_k)`` of every validation row, in float64: ``[N, K]``.

    Args:
        model: the fitted mixture.
        validation: a :class:`~mfa._data_stream.DataSource` (a sharded one: every process's
            rows), or a tensor ``[N, D]``, :class:`~mfa.data.QuantizedRows`, ``Dataset`` or
            iterable of batches (as the trainers take it).
        batch_size: rows per batch for tensors and datasets.
    """
    source = (validation if isinstance(validation, DataSource)
              else DataSource(validation, model, batch_size, name="validation"))
    with torch.no_grad():
        parts = [model.component_log_prob(batch).double() for batch in source]
    log_joint = torch.cat(parts) if parts else torch.zeros(
        0, model.n_components, dtype=torch.float64, device=model.means.device)
    if source.sharded:  # every process's rows, in rank order, on every process
        log_joint = distributed.concat_rows(log_joint, max_rows=2**62)
    if log_joint.shape[0] == 0:
        raise ValueError("validation is empty")
    return log_joint


def removal_gains(log_joint: Tensor, weights: Tensor, keep: Tensor) -> Tensor:
    """The change of the mean validation log-likelihood when each kept component is removed
    from the mixture of the kept ones (weights renormalised over them): ``[K]``; ``-inf``
    where the component is not kept or is some row's only support.

    Args:
        log_joint: ``[N, K]`` (:func:`validation_log_joint`).
        weights: the model's mixture weights ``[K]``.
        keep: bool ``[K]``, the components still in the mixture.
    """
    n_components = log_joint.shape[-1]
    if keep.dtype != torch.bool or keep.shape != (n_components,):
        raise ValueError(f"keep must be a bool mask of shape ({n_components},) (one entry per "
                         f"column of log_joint), got {keep.dtype} of shape {tuple(keep.shape)}")
    if weights.shape != (n_components,):
        raise ValueError(f"weights must have shape ({n_components},), got {tuple(weights.shape)}")
    if not bool(keep.any()):
        raise ValueError("keep marks no component: removal gains need a mixture to remove from")
    if int(keep.sum()) == 1:  # the last component is every row's only support
        return torch.full_like(weights, float("-inf"))
    per_row, _ = _row_terms(log_joint[:, keep])
    gains = torch.full_like(weights, float("-inf"))
    gains[keep] = per_row.mean(0) - _weight_terms(weights, keep)
    return gains


def _row_terms(kept: Tensor) -> tuple[Tensor, Tensor]:
    """``log(1 − r_k(x))`` ``[n, K']`` of the log-joints ``kept`` ``[n, K']`` of the kept
    components, and each row's ``log Σ_k exp ℓ_k`` ``[n]``."""
    total = torch.logsumexp(kept, dim=1, keepdim=True)  # [n, 1]
    # log(1 − r_k(x)): log1p is exact where r ≤ ½; a row's top component (r up to 1, where
    # 1 − r cancels) takes log Σ_{j≠k} exp ℓ_j − log Σ_j exp ℓ_j instead.
    per_row = torch.log1p(-(kept - total).exp().clamp(max=1.0))  # [n, K']
    top = kept.argmax(dim=1, keepdim=True)  # [n, 1]
    others = kept.scatter(1, top, float("-inf"))
    per_row.scatter_(1, top, torch.logsumexp(others, dim=1, keepdim=True) - total)
    return per_row, total.squeeze(1)


def _weight_terms(weights: Tensor, keep: Tensor) -> Tensor:
    """``log(1 − w_k)`` ``[K']`` of the kept components' renormalised weights."""
    w = weights[keep] / weights[keep].sum()  # [K']
    # log(1 − w_k): the largest weight (up to 1 − 1e-16, where 1 − w rounds to 0) takes the
    # log of the others' sum.
    rest = torch.log1p(-w.clamp(max=1.0))  # [K']
    heaviest = int(w.argmax())
    rest[heaviest] = torch.cat([w[:heaviest], w[heaviest + 1:]]).sum().log()
    return rest


#: A removed component whose share of a row's density, and of the density of the row's
#: components other than its top one, is below ``exp(UNMOVED_LOG_SHARE)`` (1e-20) leaves
#: that row's terms as they were: the non-top terms depend on the row's density, the top
#: one's on the others' (where the top holds nearly all of it, a component far below the top
#: can hold most of the rest), and both move by less than that share, far below their
#: rounding (a float64 ulp of 1 is 2.2e-16).
UNMOVED_LOG_SHARE = -46.0


def harmful_components(
    model: MixtureOfFactorAnalyzers, validation, batch_size: int = 4096
) -> list[int]:
    """The components whose removal raises the mean validation log-likelihood, removed one
    at a time (the largest gain first, gains recomputed after each: on the rows the removed
    component had a share of, the others' terms being unmoved) until none raises it; at
    least one component always stays. Deterministic. Cost ``O(N·K)`` a removal for the
    gains' mean plus ``O(N_k·K)`` for the ``N_k`` rows recomputed.

    Returns:
        The component indices in the order they were removed (empty: none hurts).
    """
    log_joint = validation_log_joint(model, validation, batch_size)
    weights = model.weights.detach().to(log_joint)
    keep = torch.ones(model.n_components, dtype=torch.bool, device=log_joint.device)
    removed: list[int] = []
    # The gains of removal_gains, kept up to date: after a removal only the rows the removed
    # component had a share of (UNMOVED_LOG_SHARE) change. Recomputing every row after each
    # removal cost O(N·K) a removal: 83 ms at K = 3,000 on 500 rows, 2.5 minutes for a round
    # that removed 2,700 components.
    per_row, total = _row_terms(log_joint)  # [N, K] (columns of removed ones: stale), [N]
    top = log_joint.argmax(dim=1)  # [N], each row's top kept component
    rows = torch.arange(log_joint.shape[0], device=log_joint.device)
    while int(keep.sum()) > 1:
        gains = torch.full_like(weights, float("-inf"))
        gains[keep] = per_row.mean(0)[keep] - _weight_terms(weights, keep)
        best = int(gains.argmax())
        if not bool(gains[best] > 0):
            break
        share = log_joint[:, best] - total  # of the row's density, and of the others':
        rest = share - per_row[rows, top]  # (per_row[top] = log(others) − total)
        moved = ((share > UNMOVED_LOG_SHARE) | (rest > UNMOVED_LOG_SHARE)).nonzero().squeeze(-1)
        keep[best] = False
        removed.append(best)
        if moved.numel():
            columns = keep.nonzero().squeeze(-1)
            kept = log_joint[moved][:, columns]
            terms, total[moved] = _row_terms(kept)
            per_row[moved.unsqueeze(-1), columns] = terms
            top[moved] = columns[kept.argmax(dim=1)]
    return removed


def reseed_components(
    model: MixtureOfFactorAnalyzers, components: list[int], generator: torch.Generator
) -> None:
    """Re-seed ``components`` of ``model`` in place, each as a split of the heaviest
    component (:func:`mfa.init.split_heaviest`: the means moved by ± half a noise standard
    deviation per feature along a direction drawn from ``generator``, the weight shared);
    ``K`` is unchanged.
    """
    if not components:
        return
    k = model.n_components
    bad = [c for c in components if isinstance(c, bool) or not isinstance(c, numbers.Integral)
           or not 0 <= int(c) < k]
    if bad:
        raise ValueError(f"components must be ints in [0, {k}), got {bad}")
    if len(set(map(int, components))) != len(components):
        raise ValueError(f"components must be distinct, got {list(components)}")
    if len(components) >= k:
        raise ValueError(f"cannot re-seed all {k} components: each is split from a kept one")
    with torch.no_grad():
        params = {name: getattr(model, name).detach().clone() for name in
                  ("weights", "means", "factor_loadings", "noise_variance")}
        split_heaviest(params, [int(c) for c in components], generator)
        model.set_parameters(**params)


def reseed_round(model: MixtureOfFactorAnalyzers, validation, batch_size: int,
                 seed: int) -> bool:
    """The start of :class:`~mfa.em.EMTrainer`'s re-seeding round: re-seed ``model``'s
    harmful components in place (under :mod:`torch.distributed` found on every process from
    all of a sharded :class:`~mfa._data_stream.DataSource`'s rows, else on rank 0, and the
    model broadcast, so every process starts the round alike), with a generator seeded by
    ``seed``. ``False`` (the model untouched) when no component is harmful."""
    if isinstance(validation, DataSource) and validation.sharded:  # (the same on every one)
        harmful = harmful_components(model, validation, batch_size)
    else:
        harmful = distributed.broadcast_from_main(harmful_components, model, validation,
                                                  batch_size)
    if harmful:
        logger.info("EM: re-seeding %d component(s) that lower the validation score",
                    len(harmful))
        reseed_components(model, harmful, torch.Generator().manual_seed(seed))
        distributed.broadcast_model(model)
    return bool(harmful)
