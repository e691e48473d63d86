"""The E-step share of a float32 model's ill-conditioned components, taken in float64.

A component whose capacitance ``M = I + AᵀD⁻¹A`` has ``ε·cond(M)`` above
:data:`mfa._terms.CONDITION_LIMIT` (a noise variance far below its loadings': a Heywood case)
loses its log-densities and whitened residuals ``p = B(x − μ)`` to rounding in float32: the
Woodbury form subtracts two terms ``cond(M)`` times larger than their difference (one noise
variance at 1e-9 under loadings of size 1: the mass 1.5× off, ``Σ r E[z]E[z]ᵀ`` 130×, log p
3.5 nats a row). Until 2026-12-05 the whole E-step then ran in float64, which cost 2–9× the
time on small image sets, where such components come and go during a fit (the embedded
digits, 4,000 rows, default ``EMConfig``, 2 threads, one machine: K = 200 took 125 s, against
24.6 s before any float64 handling and 30 s now, all with held-out bits/dim 4.103 on the
splits of then). Now only those components' share is taken in float64
(:func:`mfa.statistics.accumulate_statistics` with ``exact=``): their log-densities, ``p``
and sums, from ``B`` and ``C`` derived from the float64 parameters; their responsibilities
are normalised with the other components' float32 log-densities as usual. The other
components keep the mode's precision. Cost: about ``K'/K`` of the E-step's products at
float64's rate, for ``K'`` ill components, and one float64 copy of each chunk of rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mfa import linalg
from mfa.owner_sums import PAIR_THRESHOLD, PAIR_TOLERANCE

__all__ = ["ExactComponents"]


@dataclass(frozen=True)
class ExactComponents:
    """Float64 terms of the components ``index`` [K'] (sorted), centred on the pass's
    reference point ``reference`` [D]: ``weights`` ``[K' + K'·L, D]`` (rows ``μ/d``, then
    ``B = C⁻¹AᵀD⁻¹``), ``constant`` [K'] (``Σ_j μ_j²/d_j``), ``inv_noise`` [K', D],
    ``whitened_means`` [K', L] (``Bμ``), ``offset`` [K'] (``log w + log_norm``) and the
    capacitance factors ``chol`` [K', L, L]; every mean is centred on ``reference``."""

    index: Tensor
    reference: Tensor
    weights: Tensor
    constant: Tensor
    inv_noise: Tensor
    whitened_means: Tensor
    offset: Tensor
    chol: Tensor

    @classmethod
    def build(cls, index: Tensor, log_weights: Tensor, means: Tensor, loadings: Tensor,
              noise: Tensor, reference: Tensor) -> ExactComponents:
        """From the model's log-weights [K], means [K, D], loadings [K, D, L] and noise
        variances [K, D] (any dtype; the ``index`` rows are taken in float64) and the pass's
        reference point [D]."""
        lw, mu, a, d = (t.detach().index_select(0, index).double()
                        for t in (log_weights, means, loadings, noise))
        reference = reference.detach().double()
        centred = mu - reference  # [K', D]
        inv_noise = d.reciprocal()
        chol, whitened = linalg.whitening(a, d)  # [K', L, L], [K', L, D]
        log_norm = linalg.gaussian_log_normaliser(mu.shape[-1], linalg.lowrank_logdet(chol, d))
        return cls(
            index=index, reference=reference,
            weights=torch.cat([centred * inv_noise, whitened.reshape(-1, mu.shape[-1])]),
            constant=(centred * centred * inv_noise).sum(-1),
            inv_noise=inv_noise,
            whitened_means=(whitened @ centred.unsqueeze(-1)).squeeze(-1),
            offset=lw + log_norm, chol=chol,
        )

    def log_joint(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """For rows ``x`` [n, D]: ``(log w_k + log N(x; μ_k, Σ_k) [K', n], p [K', L, n],
        x − c [n, D])``, all float64 (the Woodbury form with float64 ``B``)."""
        k, n_lat = self.whitened_means.shape
        xc = x.double() - self.reference  # [n, D]
        lin = self.weights @ xc.T  # [K' + K'·L, n]
        diag = torch.addmm(self.constant.unsqueeze(-1), self.inv_noise, (xc * xc).T)
        diag.sub_(lin[:k], alpha=2.0)  # Σ_j (x_j − μ_j)²/d_j  [K', n]
        proj = lin[k:].view(k, n_lat, -1) - self.whitened_means.unsqueeze(-1)  # [K', L, n]
        maha = (diag - (proj * proj).sum(1)).clamp_min_(0.0)
        return self.offset.unsqueeze(-1) - 0.5 * maha, proj, xc

    @staticmethod
    def sums(resp: Tensor, proj: Tensor, xc: Tensor) -> list[Tensor]:
        """The components' sums over the rows, in the whitened basis and float64: ``[Σ r
        [K'], Σ r x [K', D], Σ r x² [K', D], Σ r x pᵀ [K', D, L], Σ r p [K', L], Σ r p pᵀ
        [K', L, L]]`` from responsibilities ``resp`` [K', n] and :meth:`log_joint`'s ``p``
        and ``x − c``; rows where every ``r`` is below
        :data:`mfa.owner_sums.PAIR_THRESHOLD` are left out when the mass they hold is
        negligible beside each component's kept mass (the test of
        :func:`mfa.owner_sums.significant_pairs`); else every row is summed."""
        k, n_lat, _ = proj.shape
        resp = resp.double()
        # Rows none of them is responsible for (below the centred mode's pair threshold: on
        # image data most rows) add nothing at float32's precision: left out, unless a
        # component's mass lies there (a component of weight 1e-14 lost all of its 5e-11
        # and its weight for good, where the same component well-conditioned kept it).
        active = (resp >= PAIR_THRESHOLD).any(0)  # [n]
        if not bool(active.all()):
            dropped = resp[:, ~active].sum(-1)  # [K']
            kept = resp[:, active].sum(-1)
            n = resp.shape[1]
            if not bool((dropped > PAIR_TOLERANCE * kept
                         + torch.finfo(torch.float64).eps * n).any()):
                resp, proj, xc = resp[:, active], proj[:, :, active], xc[active]
        n = resp.shape[1]
        rp = resp.unsqueeze(1) * proj  # [K', L, n]
        sums = torch.cat([resp, rp.reshape(k * n_lat, n)]) @ xc  # [K' + K'·L, D]
        sum_xp = sums[k:].view(k, n_lat, -1).mT  # [K', D, L]
        return [resp.sum(-1), sums[:k], resp @ (xc * xc), sum_xp, rp.sum(-1),
                torch.bmm(rp, proj.mT)]
