"""Expected sufficient statistics of an MFA (the E-step's sums; the M-step that maximises
them: :mod:`mfa.m_step`).

For responsibilities ``r_nk = p(k | x_n)`` and the latent posterior
``z | x, k ~ N(E[z], M_k⁻¹)`` with ``E[z] = M_k⁻¹ A_kᵀ D_k⁻¹ (x − μ_k)``, EM for a mixture of
factor analyzers (Ghahramani & Hinton, 1996) needs, per component::

    Σ r,   Σ r x,   Σ r x²  (diagonal),   Σ r x E[z]ᵀ,   Σ r E[z],   Σ r E[z zᵀ]

All of them are sums over rows, so they are accumulated batch by batch: streaming gives the
same M-step as one full batch. They are computed on ``x − c`` (``c`` the precision-weighted mean
of the means at E-step time, :func:`mfa._terms.precision_weighted_reference`, fixed for the
pass).

Cost of one batch of ``n`` rows: ``4·n·D·K·(L+2)`` flops in four matrix products —
``(x−c) @ [μ/d ; B]ᵀ`` and ``(x−c)² @ (1/d)ᵀ`` for the log-densities and the whitened
residuals ``p = B(x − μ)`` (``B = C⁻¹AᵀD⁻¹``, ``M = CCᵀ``), then ``[r ; r⊙p] @ (x−c)`` and
``r @ (x−c)²`` for the sums (which the ``"centred"`` mode's sparse chunks replace by
``2·P·D·(L+2)`` float64 flops for their ``P`` pairs). ``E[z] = C⁻ᵀ p`` is linear in ``p``,
so the latent sums are taken in the whitened basis and moved to ``E[z]`` once per batch
(:func:`whitened_to_latent`, ``O(K·D·L²)``) rather than by a triangular solve per row.
Rows run along the last dimension of every ``[K, n]``/``[K, L, n]`` intermediate (no permute
copies) and each batch is processed in chunks of :data:`CHUNK_ROWS` rows so the ``[rows, D]``
intermediates stay in the cache.

The precision modes (``EMConfig.stats_dtype``, the dtype of each sum): :mod:`mfa.precision`.
The log-densities near each row's top whose Woodbury rounding ``ε·‖w‖²`` passes 1e-2 nats
are recomputed in the residual form (:func:`mfa.residual_form.refine_e_step_chunk`), as
:meth:`MixtureOfFactorAnalyzers.log_prob` does (in float64 too, since 2026-12-07: with noise
variances 10¹⁵ below squared loadings of 1 its log-likelihood was 3.9 nats a row off).

``exp`` of the log-joint is taken at arguments no lower than :func:`mfa.linalg.exp_floor`
(``exp`` of a result below the smallest normal number runs ~10× slower on CPUs, and the
products of such responsibilities with the data far slower on some); the terms this lifts
from 0 to ~6e-30 (float32) change no sum at the dtype's precision.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from mfa import linalg
from mfa._terms import ComponentTerms
from mfa.exact_components import ExactComponents
from mfa.linalg import diagonal_quadratic, latent_posterior_means  # noqa: F401 (its home was here)
from mfa.model import MixtureOfFactorAnalyzers
from mfa.owner_sums import Pairs, owner_sums, significant_pairs
from mfa.precision import FLOAT64_FAR_LIMIT, far_from_reference, float64_components
from mfa.residual_form import refine_e_step_chunk


def __getattr__(name: str):
    """``m_step`` and ``m_steps`` lived here until 2026-12-07 (now :mod:`mfa.m_step`, which
    imports this module): still importable from here."""
    if name in ("m_step", "m_steps"):
        from mfa import m_step as module

        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: Rows per chunk of :func:`accumulate_statistics` (the ``[rows, D]`` intermediates stay in
#: cache; 2,048 beat 1,024 by 4 % on Fashion-MNIST at K=50, L=6 on 1 and 2 Xeon threads).
CHUNK_ROWS = 2048


@dataclass
class SufficientStatistics:
    """Sums over rows (shapes with ``K`` components, ``D`` features, ``L`` factors).

    ``mass`` [K] ``Σ r``; ``sum_x`` [K, D] ``Σ r (x−c)``; ``sum_x2`` [K, D] ``Σ r (x−c)²``;
    ``sum_xz`` [K, D, L] ``Σ r (x−c) E[z]ᵀ``; ``sum_z`` [K, L] ``Σ r E[z]``; ``sum_zz``
    [K, L, L] ``Σ r E[z] E[z]ᵀ`` (the posterior covariance ``M⁻¹`` is added in the M-step);
    ``log_likelihood`` (scalar tensor) ``Σ log p(x)``; ``n_rows`` (scalar tensor);
    ``reference`` [D] ``c``, the same for every batch of one pass.
    """

    mass: Tensor
    sum_x: Tensor
    sum_x2: Tensor
    sum_xz: Tensor
    sum_z: Tensor
    sum_zz: Tensor
    log_likelihood: Tensor
    n_rows: Tensor
    reference: Tensor

    def __add__(self, other: SufficientStatistics) -> SufficientStatistics:
        summed = {
            f.name: getattr(self, f.name) + getattr(other, f.name)
            for f in fields(self)
            if f.name != "reference"
        }
        return SufficientStatistics(reference=self.reference, **summed)


def whitened_to_latent(
    sum_xp: Tensor, sum_p: Tensor, sum_pp: Tensor, chol: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Sums over rows in the whitened basis ``p = B(x − μ)`` → the same sums of ``E[z]``.

    ``E[z] = C⁻ᵀ p`` is linear in ``p``, so ``Σ r x E[z]ᵀ = (Σ r x pᵀ) C⁻¹``,
    ``Σ r E[z] = C⁻ᵀ Σ r p`` and ``Σ r E[z] E[z]ᵀ = C⁻ᵀ (Σ r p pᵀ) C⁻¹`` (exact algebra): one
    triangular solve per component on ``K·D·L`` numbers instead of one per row.

    Args:
        sum_xp: ``[K, D, L]``; sum_p: ``[K, L]``; sum_pp: ``[K, L, L]``; chol: ``C``
            ``[K, L, L]`` (any dtype; the solves run in ``sum_xp``'s).

    Returns:
        ``(sum_xz [K, D, L], sum_z [K, L], sum_zz [K, L, L])``.
    """
    c = chol.to(sum_xp.dtype)  # lower triangular

    def right_solve(s: Tensor) -> Tensor:
        # S C⁻¹. On CPUs a right-hand solve of column-major S (``[K, L, D]`` contiguous, seen
        # as ``[K, D, L]``) runs without a copy, orders of magnitude faster than a left solve.
        return torch.linalg.solve_triangular(c, s, upper=False, left=False)

    sum_xz = right_solve(sum_xp)
    sum_z = right_solve(sum_p.unsqueeze(-2)).squeeze(-2)  # (S_pᵀ C⁻¹)ᵀ = C⁻ᵀ S_p
    sum_zz = right_solve(right_solve(sum_pp).mT)  # ((S C⁻¹)ᵀ) C⁻¹ = C⁻ᵀ S C⁻¹ (S = Sᵀ)
    return sum_xz, sum_z, 0.5 * (sum_zz + sum_zz.mT)


@torch.no_grad()
def accumulate_statistics(
    model: MixtureOfFactorAnalyzers,
    x: Tensor,
    terms: ComponentTerms,
    chol: Tensor | None = None,
    *,
    resp: Tensor | None = None,
    stats_dtype: torch.dtype = torch.float64,
    precise_moments: bool = True,
    precise_latent: bool = False,
    centred: bool = False,
    temperature: float | Sequence[float] = 1.0,
    pair_dtype: torch.dtype | None = None,
    exact: ExactComponents | None = None,
) -> SufficientStatistics | list[SufficientStatistics]:
    """E-step statistics of one batch.

    Four large products: ``(x−c) @ [μ/d ; B]ᵀ`` (the linear terms of the log-density and the
    whitened residuals ``p = B(x − μ)``), ``(x−c)² @ (1/d)ᵀ``, ``(x−c)ᵀ @ [r, r ⊙ p]`` and
    ``((x−c)²)ᵀ @ r``; the latent sums are taken in the whitened basis and moved to ``E[z]``
    once per batch (:func:`whitened_to_latent`) instead of one triangular solve per row.

    Args:
        model: supplies the number of components and factors.
        x: ``[n, D]`` in the model's dtype (unchecked).
        terms: ``model.component_terms()`` computed once for the pass.
        chol: the capacitance Cholesky factors ``[K, L, L]`` (recomputed when ``None``).
        resp: fixed responsibilities ``[n, K]`` (e.g. one-hot labels); by default the
            posterior ``p(k | x)`` under the model.
        stats_dtype: dtype of the returned sums (batches are accumulated in it).
        precise_moments: compute ``Σ r x`` and ``Σ r x²`` in ``stats_dtype`` (exact for
            components far from the reference point, but a float64 product is ~3× slower on a
            CPU); ``False`` computes them in ``x``'s dtype like the other sums.
        precise_latent: also ``Σ r x pᵀ``, ``Σ r p`` and ``Σ r p pᵀ`` in ``stats_dtype``.
            Short of both (``"mixed"``, ``"float32"``), the components too far or sharp for
            sums in ``x``'s dtype take all theirs in ``stats_dtype``
            (:func:`mfa.precision.float64_components`).
        centred: the ``"centred"`` modes (:mod:`mfa.precision`): each row's share of its most
            responsible component in ``pair_dtype`` about that component's mean, the rest in
            ``x``'s dtype (``precise_moments``/``precise_latent`` are then ignored). For
            float64 ``x`` and sums, set by :data:`mfa.precision.FLOAT64_FAR_LIMIT` instead
            (in float64 pairs).
        temperature: ``T ≠ 1``: responsibilities ``∝ p(k, x)^(1/T)`` (:mod:`mfa.tempering`;
            ignored with ``resp``); the log-likelihood stays the model's. A sequence of
            temperatures: the statistics of each (a list), from one computation of the
            log-densities (the same values as one call each).
        pair_dtype: the dtype of the ``centred`` pairs' products (``None``: ``stats_dtype``;
            float32 in ``"centred32"``); their sums are moved to ``c`` in ``stats_dtype``.
        exact: the components whose share (log-densities, ``p`` and sums) is taken in
            float64 whatever the mode (:mod:`mfa.exact_components`); ``chol``'s rows of
            them are replaced by its float64 factors.

    Returns:
        The batch's :class:`SufficientStatistics` (a list of them, one per temperature, for a
        sequence of temperatures).
    """
    several = isinstance(temperature, Sequence)
    temperatures = list(temperature) if several else [temperature]
    k, n_lat, d = terms.whitened.shape
    n = x.shape[0]
    # One product for −2 x·(μ/d) and B(x − c): [K + K·L, D].
    weights = torch.cat([terms.means * terms.inv_noise, terms.whitened.reshape(k * n_lat, d)])
    constant = (terms.means * terms.means * terms.inv_noise).sum(-1)  # [K]
    if x.dtype == stats_dtype == torch.float64:  # every sum in float64, about c unless far
        centred = far_from_reference(terms, x.dtype, FLOAT64_FAR_LIMIT)
        pair_dtype = None
    else:
        centred = centred and stats_dtype != x.dtype
    # (the dense chunks of "centred" take the other components' Σ r x, Σ r x² in stats_dtype
    # too where their moments about c would cancel: mfa.precision.far_from_reference)
    precise = stats_dtype != x.dtype and (
        (precise_moments and not centred) or (centred and far_from_reference(terms, x.dtype)))
    # "float32" and "mixed": the components too far or sharp for their sums in x's dtype
    # take them in stats_dtype (mfa.precision.float64_components)
    promoted = (float64_components(terms, x.dtype, moments=not precise)
                if stats_dtype != x.dtype and not centred
                and not (precise_moments and precise_latent) else None)
    precise_latent = precise_latent and not centred
    each = [([None] * 7, [], []) for _ in temperatures]  # totals, pairs, exact sums per T
    # Components of weight 0 keep responsibilities of exactly 0 (one check a batch).
    dead = torch.isneginf(terms.log_weights.detach())
    dead = dead.unsqueeze(-1) if bool(dead.any()) else None
    # [rows, D] scratch for x − c and (x − c)², reused by every chunk.
    scratch = x.new_empty((2, min(n, CHUNK_ROWS), d))
    # Rows in chunks small enough that the [rows, D] intermediates stay in the cache. The
    # chunks' sums are added in their own dtype (a batch's few chunks add an error far below
    # each product's own) and moved to stats_dtype once per batch.
    for start in range(0, n, CHUNK_ROWS):
        stop = min(n, start + CHUNK_ROWS)
        parts = _chunk_sums(
            x[start:stop], terms, weights, constant,
            None if resp is None else resp[start:stop], stats_dtype if precise else None,
            precise_latent, [p for _, p, _ in each] if centred else None,
            scratch[:, :stop - start], start, temperatures, exact, [e for _, _, e in each],
            dead, None if promoted is None else (promoted, stats_dtype),
        )
        for (totals, _, _), part in zip(each, parts, strict=True):
            for i, value in enumerate(part):  # None: a sum this chunk left to its pairs
                if value is not None:
                    totals[i] = (value.detach() if totals[i] is None
                                 else totals[i].add_(value.detach()))
    if n_lat:
        if chol is None:
            chol = linalg.capacitance_cholesky(model.factor_loadings, model.noise_variance)
        if exact is not None:  # their sums are in the basis of their float64 B
            chol = chol.detach().to(stats_dtype).index_copy(0, exact.index,
                                                             exact.chol.to(stats_dtype))
    shapes = [(k,), (k, d), (k, d), (k, d, n_lat), (k, n_lat), (k, n_lat, n_lat), ()]
    out = []
    for totals, pairs, exact_sums in each:
        totals = [x.new_zeros(shape, dtype=stats_dtype) if value is None else
                  value.to(stats_dtype) for value, shape in zip(totals, shapes, strict=True)]
        if pairs:
            own = owner_sums(x, terms, pairs, stats_dtype, pair_dtype)
            totals = [a + b for a, b in zip(totals, own, strict=True)]
        for part in exact_sums:  # the float64 share of the ill-conditioned components
            for total, value in zip(totals, part, strict=False):
                total.index_add_(0, exact.index, value.to(stats_dtype))
        mass, sum_x, sum_x2, sum_xp, sum_p, sum_pp, log_likelihood = totals
        if n_lat:
            sum_xz, sum_z, sum_zz = whitened_to_latent(sum_xp, sum_p, sum_pp, chol.detach())
        else:
            sum_xz, sum_z, sum_zz = sum_xp, sum_p, sum_pp
        out.append(SufficientStatistics(
            mass=mass, sum_x=sum_x, sum_x2=sum_x2, sum_xz=sum_xz, sum_z=sum_z, sum_zz=sum_zz,
            log_likelihood=log_likelihood,
            n_rows=torch.full((), float(n), dtype=stats_dtype, device=x.device),  # (no copy)
            reference=terms.reference.detach().to(stats_dtype),
        ))
    return out if several else out[0]


def _chunk_sums(
    x: Tensor, terms: ComponentTerms, weights: Tensor, constant: Tensor,
    resp: Tensor | None, moment_dtype: torch.dtype | None, precise_latent: bool = False,
    pairs: list[list[Pairs]] | None = None, scratch: Tensor | None = None,
    row_offset: int = 0, temperatures: Sequence[float] = (1.0,),
    exact: ExactComponents | None = None, exact_sums: list[list[list[Tensor]]] | None = None,
    dead: Tensor | None = None, promoted: tuple[Tensor, torch.dtype] | None = None,
) -> list[list[Tensor | None]]:
    """For each of ``temperatures`` (as in :func:`accumulate_statistics`; the log-densities
    computed once), with its list of ``pairs`` and of ``exact_sums``, the sums of one chunk
    of rows ``x`` [n, D], the latent ones in the whitened basis:
    ``[mass [K], Σ r x [K, D], Σ r x² [K, D], Σ r x pᵀ [K, D, L], Σ r p [K, L],
    Σ r p pᵀ [K, L, L], Σ log p(x)]``; ``moment_dtype``: the dtype of ``Σ r x`` and
    ``Σ r x²`` (``None``: ``x``'s). With ``pairs`` (the ``"centred"`` mode) the chunk's
    float64 pairs are appended to it for :func:`mfa.owner_sums.owner_sums`
    (:func:`mfa.owner_sums.significant_pairs`: then every sum but the log-likelihood is
    ``None``; else each row's most responsible component, left out of the products' sums).
    ``row_offset``: the chunk's first row in the batch. With ``exact``, those components'
    log-densities and ``p`` come from float64 and their float64 sums are appended to
    ``exact_sums`` (their shares are then left out of every other sum). ``dead`` [K, 1]
    (bool, or ``None`` when there are none): the components of weight 0, whose
    responsibilities stay exactly 0 (not lifted to ``exp`` of the floor). ``promoted``: the
    components ``[K']`` whose sums are taken in the given dtype whatever ``moment_dtype``
    and ``precise_latent`` say (:func:`mfa.precision.float64_components`)."""
    k, n_lat, d = terms.whitened.shape
    n = x.shape[0]
    # Rows run along the last dimension ([K, n], [K, L, n]): every reduction over components
    # or factors is then a vectorised column sum and no [n, K, L] permute is ever copied.
    if scratch is None:
        xc = x - terms.reference  # [n, D]
        xc2 = xc * xc  # [n, D]
    else:  # into reused memory (a fresh [n, D] allocation costs more than the subtraction)
        xc = torch.sub(x, terms.reference, out=scratch[0])
        xc2 = torch.mul(xc, xc, out=scratch[1])
    lin = weights @ xc.T  # [K + K·L, n]
    if terms.precise:
        diag_quad = diagonal_quadratic(xc, terms.means, terms.inv_noise, True).T  # [K, n]
    else:
        diag_quad = torch.addmm(constant.unsqueeze(-1), terms.inv_noise, xc2.T)  # [K, n]
        diag_quad.sub_(lin[:k], alpha=2.0)
    proj = lin[k:].view(k, n_lat, n).sub_(terms.whitened_means.unsqueeze(-1))  # B(x − μ) [K, L, n]
    proj_sq = (proj * proj).sum(1)  # [K, n]
    offset = (terms.log_weights + terms.log_norm).unsqueeze(-1)  # [K, 1]
    if terms.refine:  # the entries near each row's top, recomputed directly
        estimate = offset - 0.5 * (diag_quad - proj_sq)
        diag_quad = linalg.refine_near_top(diag_quad.T, estimate.T, xc, terms.means,
                                           terms.inv_noise, terms.rounding).T
    log_joint = offset - 0.5 * (diag_quad - proj_sq).clamp_min_(0.0)  # Woodbury  [K, n]
    if n_lat and terms.factors is not None:  # (float64 too: one comparison where none qualify)
        log_joint = refine_e_step_chunk(log_joint, offset, xc, terms, proj, proj_sq, diag_quad)
    exact_proj = exact_xc = None
    if exact is not None:
        exact_joint, exact_proj, exact_xc = exact.log_joint(x)
        log_joint.index_copy_(0, exact.index, exact_joint.to(log_joint.dtype))
        proj.index_copy_(0, exact.index, exact_proj.to(proj.dtype))
    # log p(x) and p(k | x) from one exp (a logsumexp, then the posterior, would take two).
    if pairs is None or resp is not None:
        top, owner = log_joint.amax(0), None  # [n]
    else:  # each row's most responsible component ("owner") too: one max (argmax is slower)
        top, owner = log_joint.max(0)  # [n], [n]
    # exp of arguments whose result is subnormal or 0 takes a slow path (~10× on CPUs), and
    # so do the products below with subnormal results: clamp them to linalg.exp_floor, whose
    # exp (~5e8 × the smallest normal number) changes no responsibility or log-density at the
    # dtype's precision.
    floor = linalg.exp_floor(log_joint.dtype)
    log_joint.sub_(top)
    tempered = resp is None and any(t != 1.0 for t in temperatures)
    # Tempered before the clamp: a component 10⁴ nats below the top is 10⁴/T below it.
    shifted = log_joint.clone() if tempered else None
    log_joint.clamp_min_(floor)
    if dead is not None:  # (the floor lifted them to ~6e-30: EM regrew them, 1e-21 in 4 steps)
        log_joint.masked_fill_(dead, -math.inf)
    # [r ; r ⊙ p] stacked, so one product gives Σ r x and Σ r x pᵀ.
    rhs = torch.empty(k * (n_lat + 1), n, dtype=x.dtype, device=x.device)  # [K + K·L, n]
    alone = resp is None and not tempered and len(temperatures) == 1  # exp straight into rhs
    joint = torch.exp(log_joint, out=rhs[:k] if alone else None)
    total = joint.sum(0)  # [n]
    log_p = top + total.log()  # [n]
    # log p summed in float64: a float32 sum of ~1,000 rows of ~10³ nats is off by ~0.1 nat.
    log_likelihood = log_p.sum(dtype=torch.float64)
    out = []
    for i, temperature in enumerate(temperatures):
        if i:
            rhs = torch.empty_like(rhs)
        if resp is not None:
            rhs[:k] = resp.T
            if pairs is not None:
                owner = resp.argmax(-1)  # [n]
        elif temperature != 1.0:  # r ∝ p(k, x)^(1/T)
            scaled = (shifted / temperature).clamp_min_(floor)
            if dead is not None:
                scaled.masked_fill_(dead, -math.inf)
            torch.exp(scaled, out=rhs[:k])
            rhs[:k].div_(rhs[:k].sum(0))
        elif alone:
            joint.div_(total)  # p(k | x)
        else:
            torch.div(joint, total, out=rhs[:k])
        out.append(_weighted_sums(
            rhs, x, xc, xc2, proj, owner, moment_dtype, precise_latent, row_offset,
            terms.reference, log_likelihood.clone() if i else log_likelihood,  # (added to)
            None if pairs is None else pairs[i],
            exact, exact_proj, exact_xc, None if exact is None else exact_sums[i], promoted))
    return out


def _weighted_sums(
    rhs: Tensor, x: Tensor, xc: Tensor, xc2: Tensor, proj: Tensor, owner: Tensor | None,
    moment_dtype: torch.dtype | None, precise_latent: bool, row_offset: int,
    reference: Tensor, log_likelihood: Tensor, pairs: list[Pairs] | None,
    exact: ExactComponents | None, exact_proj: Tensor | None, exact_xc: Tensor | None,
    exact_sums: list[list[Tensor]] | None, promoted: tuple[Tensor, torch.dtype] | None = None,
) -> list[Tensor | None]:
    """:func:`_chunk_sums`' sums of one temperature, from ``rhs`` ``[K + K·L, n]`` holding
    the responsibilities ``r`` ``[K, n]`` in its first ``K`` rows (the rest is filled with
    ``r ⊙ p`` here; ``r`` is changed in place) and the chunk's ``x``, ``x − c``, ``(x − c)²``
    ``[n, D]`` and ``p`` ``[K, L, n]``."""
    k, n_lat, n = proj.shape
    d = x.shape[1]
    resp = rhs[:k]  # [K, n]
    if exact is not None:
        exact_sums.append(exact.sums(resp.index_select(0, exact.index), exact_proj, exact_xc))
        resp.index_fill_(0, exact.index, 0.0)
    if pairs is not None:
        significant = significant_pairs(resp, proj, row_offset)
        if significant is not None:  # every share that counts, in float64 (owner_sums)
            pairs.append(significant)
            return [None] * 6 + [log_likelihood]
        # Each row's most responsible component ("owner") is summed apart, exactly, about its
        # own mean (owner_sums); the products below take the other components' shares.
        own = resp.gather(0, owner.unsqueeze(0)).squeeze(0)  # [n]
        p_own = proj.gather(0, owner.view(1, 1, n).expand(1, n_lat, n)).squeeze(0)  # [L, n]
        rows = torch.arange(row_offset, row_offset + n, device=x.device)
        pairs.append((owner, rows, own, p_own))
        resp.scatter_(0, owner.unsqueeze(0), 0.0)
    rp = rhs[k:].view(k, n_lat, n)
    torch.mul(resp.unsqueeze(1), proj, out=rp)  # r ⊙ p  [K, L, n]
    if moment_dtype is None:
        sums = rhs @ xc  # [K + K·L, D]
        sum_x, sum_xp = sums[:k], sums[k:]
        sum_x2 = resp @ xc2  # [K, D]
    else:
        # Σ r x and Σ r x² in float64: the M-step subtracts the squared mean from the second
        # moment, which cancels in float32 for components far from c. x − c taken in float64
        # (exact for float32 x and c): the float32 difference loses ε·|x − c| per entry.
        xc_s = x.to(moment_dtype) - reference.to(moment_dtype)
        sum_x2 = resp.to(moment_dtype) @ (xc_s * xc_s)  # [K, D]
        if precise_latent:
            sums = rhs.to(moment_dtype) @ xc_s  # [K + K·L, D]
            sum_x, sum_xp = sums[:k], sums[k:]
        else:
            sum_x = resp.to(moment_dtype) @ xc_s  # [K, D]
            sum_xp = rhs[k:] @ xc  # [K·L, D]
    sum_xp = sum_xp.view(k, n_lat, d).mT  # [K, D, L]
    if precise_latent and moment_dtype is not None:
        rp, proj = rp.to(moment_dtype), proj.to(moment_dtype)
    sum_p = rp.sum(-1)  # [K, L]
    sum_pp = torch.bmm(rp, proj.mT)  # [K, L, L]
    # (the mass in moment_dtype too: Σ r x² − (Σ r x)²/Σ r cancels in it as in the others)
    sums = [resp.sum(-1, dtype=moment_dtype), sum_x, sum_x2, sum_xp, sum_p, sum_pp]
    if promoted is not None:
        sums = _promoted_sums(sums, *promoted, resp, rp, proj, x, reference)
    return [*sums, log_likelihood]


def _promoted_sums(sums: list[Tensor], index: Tensor, dtype: torch.dtype, resp: Tensor,
                   rp: Tensor, proj: Tensor, x: Tensor, reference: Tensor) -> list[Tensor]:
    """:func:`_weighted_sums`' six sums (mass to ``Σ r p pᵀ``), all in ``dtype``, with the
    components ``index`` [K'] taken again in ``dtype`` from ``r`` [K, n], ``r ⊙ p``
    [K, L, n], ``p`` [K, L, n] and ``x − c`` in ``dtype`` (exact for float32 ``x``)."""
    n_lat, n, d = rp.shape[1], rp.shape[2], x.shape[1]
    r = resp.index_select(0, index).to(dtype)  # [K', n]
    rp = rp.index_select(0, index).to(dtype)  # [K', L, n]
    xc = x.to(dtype) - reference.to(dtype)  # [n, D]
    mine = [r.sum(-1), None, None,
            (rp.reshape(-1, n) @ xc).view(index.shape[0], n_lat, d).mT, rp.sum(-1),
            torch.bmm(rp, proj.index_select(0, index).to(dtype).mT)]
    if sums[1].dtype != dtype:  # (else the moments are in dtype already: "mixed")
        mine[1:3] = r @ xc, r @ (xc * xc)
    return [s.to(dtype) if m is None else s.to(dtype).index_copy_(0, index, m)
            for s, m in zip(sums, mine, strict=True)]
