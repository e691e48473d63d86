"""The E-step's precision modes (``EMConfig.stats_dtype``): which dtype each sum of
:func:`mfa.statistics.accumulate_statistics` is taken in, and what ``"auto"`` resolves to on
a device. ``c`` is the pass's reference point and ``p = B(x − μ)`` the whitened residuals
(:mod:`mfa.statistics`); batch totals are always summed in float64.

* ``"float64"``: the whole E-step in float64 — the reference (every mode is this one for a
  float64 model). Its sums are about ``c`` unless the rows lie so far from ``c`` beside
  their noise that float64 sums about it cancel (:data:`FLOAT64_FAR_LIMIT`); then about each
  share's own mean, as ``"centred"`` takes them (in float64). What is left is the M-step's
  own rounding of sums about ``c``, ~2·ε₆₄·max (μ − c)²/d of a noise variance (components
  ±1e4 apart, noise 1e-2: 7e-6, where the sums about ``c`` had put it 3.5e-5 to 6e-5 off).
* ``"precise"``: log-densities and ``p`` in the data's dtype, every sum (``Σ r x``,
  ``Σ r x²``, ``Σ r x pᵀ``, ``Σ r p``, ``Σ r p pᵀ``) in float64. The M-step subtracts a
  squared mean and ``Ã·Σ r x z̃ᵀ`` from ``Σ r x²``, which cancels for components far from
  ``c`` and for loadings that explain most of the variance; float64 sums keep both (the
  tests' cases: relative noise error 5e-6 and 1e-5, against 0.12 and 6 with float32 sums).
* ``"centred"``: log-densities and ``p`` in the data's dtype; the sums in float64, each
  (row, component) share about that component's own mean ``μ_k`` (exact in float64) and
  moved to ``c`` by exact algebra (:func:`mfa.owner_sums.owner_sums`). On image data almost
  every responsibility is 0 to float precision, so a chunk of rows goes *sparse*
  (:func:`mfa.owner_sums.significant_pairs`): only its shares ``r ≥ 1e-12`` are summed, one
  float64 pair each, and the two sum products are skipped (Fashion-MNIST, K=50, L=6: 1.06
  pairs a row, the left-out mass ≤ 1.2e-14 of any component's). A chunk whose shares are too
  many (more than ``1 + K/32`` a row) or whose left-out mass is not negligible (above 1e-9
  of a component's kept mass) goes *dense*: each row's most responsible component (its
  *owner*) as a float64 pair, the other components' shares by the products in the data's
  dtype about ``c``. The float64 pairs are where both cancellations live (a component's own
  rows, far from ``c``; its own loadings' variance), so this mode keeps them like
  ``"precise"`` (the tests' cases: 6.3e-6, 3e-6); the sparse form is also the fastest mode
  of that accuracy on CPUs. What the dense form does not cover: the non-owner shares are
  float32 sums about ``c``, which cancel for components far from ``c`` beside their
  variance: past :data:`FAR_LIMIT` (:func:`far_from_reference`) the dense chunks take
  ``Σ r x``, ``Σ r x²`` in float64 as ``"precise"`` does (overlapping components 1e4 from
  ``c``, variance 0.5: noise variances 0.9 off in one M-step before, 4e-6 now).
* ``"mixed"``: only the moment sums ``Σ r x``, ``Σ r x²`` in float64 (far components
  without loadings are kept); ``Σ r x pᵀ`` is a float32 sum about ``c``, which loses
  ~2·ε·max (|μ − c|·|a| + |a|²)/d of a noise variance: a component for which that passes
  :data:`LOSSY_LIMIT` has all its sums in float64 (:func:`float64_components`). Without
  that, pixel-like rows with noise at 1e-6 under loadings of 0.3 lost 0.14 in one M-step
  and EM's objective fell by 904 nats a row (floor 1e-9); the high signal-to-noise case
  now loses 2.7e-4 (8.9e-4 before).
* ``"centred32"``: ``"centred"``'s form with the pairs' products in float32 (about each
  component's own mean, then moved to ``c`` in float64): far components are kept, the high
  signal-to-noise case loses ~6e-4 (float32's error on a variance the loadings dwarf); a
  component sharper than that allows (``ε·max |a_j|²/d_j`` above
  :data:`mfa.owner_sums.SHARP_LIMIT`) has its pairs in float64: on pixel-like rows with
  noise at 1e-6 its float32 pairs erred by 1.2 in one M-step and ran the noise variances to
  the floor (9e-6 now; on a Fashion-MNIST fit, K = 50, 4–9 such components, +2–5 % an
  E-step). It was the
  fastest mode on CPUs while the pairs were summed in torch ops, bound by memory traffic that
  float32 halves (Fashion-MNIST 50,000 rows, K=50, L=6: the pair sums 0.113 → 0.070 s an
  E-step on one thread); with the compiled kernel (:mod:`mfa.pair_kernel`, the default where
  numba is installed) it gains nothing measurable (0.292 against 0.291 s an iteration on two
  threads; ``docs/benchmarks.md``).
* ``"float32"``: every product in the data's dtype, which loses ~4·ε·max ((μ − c)² +
  |a|²)/d of a noise variance; a component for which that passes :data:`LOSSY_LIMIT` has
  its sums in float64 (:func:`float64_components`). Without that, the far-apart and high
  signal-to-noise cases lost 6× and 0.12 (now 7e-8 and 5e-3), the pixel-like rows above 0.4
  (now 7e-6), and a default fit of two clusters ±1000 apart ran its objective from 3.9 to
  −44 nats a row. On image data the sparse ``"centred"`` forms are faster on CPUs.
* ``"mixed"`` and ``"float32"`` are speed trade-offs: below :data:`LOSSY_LIMIT` their sums
  still err by up to a few 1e-3 of a noise variance, more than the other modes', and EM's
  objective is monotone only up to that rounding; past it, without the float64 sums, they
  broke EM (the falls above, silently).
* How far is far: in every mode but ``"float64"`` the log-densities and ``p`` are float32
  products about ``c``, which carry a relative error of about ``ε·|μ_k − c|/σ`` into the
  latent sums — the size of float32's own rounding of rows that far out (and ``"float64"``
  keeps the M-step's own ~2·ε₆₄·max (μ − c)²/d, above). One M-step of
  components 1e3 from ``c`` (noise 1e-2, loadings 0.3, L = 2) puts the noise variances
  ~7e-5 off in ``"precise"`` and ``"centred"``, at 1e4 ~5e-4 (noise 1e-3: 1e-3); on pixel
  data (``|μ_k − c| ≤ 1``) this is below the tests' tolerances.
* ``"auto"`` (the default, :func:`resolve_stats_dtype`): ``"centred"`` for float32 models,
  except ``"float64"`` on GPUs with full-rate float64 (P100/V100/A100/H100), where the
  exact E-step costs what float32 without TF32 costs (measured on an H200, CelebA-shaped:
  0.81 s an epoch in ``"float64"``, 0.92 s in ``"float32"``, 1.30 s in ``"centred"``;
  ``docs/benchmarks.md``).
  On a 2-core CPU ``"centred"`` is the fastest mode that keeps the tests' cancellation
  cases (Fashion-MNIST 50,000 rows, K=50, L=6: 1.11× the FLOP limit on one thread, against
  1.33× for ``"float32"`` and 2.45× for ``"precise"``, whose float64 products run at half
  the float32 rate; ``docs/benchmarks.md``). On real images the float32 log-densities move
  the M-step as much as the sums' dtype does (Fashion-MNIST, K=50, L=6: the train
  log-likelihood after one M-step differs from float64's by 0.011–0.018 of 1,649 nats/row
  in every float32-based mode).

Whatever the mode, a float32 model with a component whose capacitance ``I + AᵀD⁻¹A`` is too
ill-conditioned for float32 (a noise variance far below its loadings': the Heywood case;
:data:`mfa._terms.CONDITION_LIMIT`) has that component's share of the E-step taken in float64
(:mod:`mfa.exact_components`): every float32 mode's sums were wrong there (the mass 1.5×
off at a noise variance of 1e-9).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from mfa._terms import ComponentTerms

#: The E-step precision modes of :meth:`mfa.em.EMTrainer.e_step`, most exact first after
#: ``"auto"`` (see the module docstring; ``"centred"`` is as exact as ``"precise"`` on the
#: tests' cancellation cases).
STATS_DTYPES = ("auto", "float64", "precise", "centred", "mixed", "centred32", "float32")

#: CUDA compute capabilities whose float64 matrix products run at (about) the float32 rate
#: without tensor cores: P100, V100, A100, H100/H200.
FULL_RATE_FLOAT64 = ((6, 0), (7, 0), (8, 0), (9, 0))


def resolve_stats_dtype(mode: str, device: torch.device | str, dtype: torch.dtype) -> str:
    """The precision mode ``"auto"`` stands for on ``device`` for a model of ``dtype``
    (other modes are returned as given).

    ``"float64"`` for float64 models and on GPUs with full-rate float64
    (:data:`FULL_RATE_FLOAT64`), where the exact E-step costs about what float32 costs;
    ``"centred"`` elsewhere (CPUs, consumer GPUs): it passes the same cancellation tests as
    ``"float64"`` at little more than the float32 cost.
    """
    if mode not in STATS_DTYPES:
        raise ValueError(f"stats_dtype must be one of {list(STATS_DTYPES)}, got {mode!r}")
    if mode != "auto":
        return mode
    device = torch.device(device)
    if dtype == torch.float64:
        return "float64"
    if device.type == "cuda" and torch.cuda.get_device_capability(device) in FULL_RATE_FLOAT64:
        return "float64"
    return "centred"


#: ``ε·max (μ_kj − c_j)²/d_kj`` above which the ``"centred"`` modes' dense chunks take the
#: non-owner shares' ``Σ r x``, ``Σ r x²`` in float64: their float32 sums about ``c`` err by
#: about that much of a variance, times the shares' part of the component's mass (components
#: 1e4 from ``c`` beside a variance of 0.5: noise variances 0.9 off in one M-step, and the
#: MAP objective fell by 0.5 nats a row). Pixel rows (``|μ − c| ≤ 1``) pass it only with
#: noise variances below ~1e-5 (``|μ − c| = 1``) to 3e-6 (0.5), at the quantisation level,
#: where it is the only precise choice: the float64 moments cost a dense chunk (rare on
#: images, which are sparse) a float64 product; on GPUs without full-rate float64 more.
FAR_LIMIT = 1e-2


def far_from_reference(terms: ComponentTerms, dtype: torch.dtype,
                       limit: float = FAR_LIMIT) -> bool:
    """Whether the moments about ``c`` in ``dtype`` of some component lose more than
    ``limit`` of its variance (``terms.means`` are the means less ``c``)."""
    spread = (terms.means * terms.means * terms.inv_noise).amax()
    return bool(torch.finfo(dtype).eps * spread > limit)


#: ``ε₆₄·max (μ_kj − c_j)²/d_kj`` above which float64 rows' sums are taken about each
#: share's own mean (the ``"centred"`` form, its pairs in float64) in every mode: float64
#: sums about ``c`` lose 10–20× that of a noise variance in one M-step (components ±1e4
#: apart, noise 1e-2, loadings 0.3: ``ε₆₄·spread`` = 3e-6, noise variances 6.1e-5 off the
#: dense float64 M-step, 7.8e-6 now, where the M-step from the exact sums is 7.4e-6 off).
#: Below it the sums lose at most ~2e-6, and the pass is the same as before. Pixel rows
#: (``|μ − c| ≤ 0.5``) stay below it down to noise variances of ~5e-10.
FLOAT64_FAR_LIMIT = 1e-7


#: ``ε·max_j v_kj/d_kj`` above which the ``"float32"`` and ``"mixed"`` modes take component
#: ``k``'s sums in float64 (:func:`float64_components`), ``v`` the variance their sums about
#: ``c`` in the data's dtype must resolve beside the noise ``d``: ``(μ − c)² + |a|²`` for
#: ``"float32"``'s ``Σ r (x−c)²`` (measured: noise variances ~4× this off in one M-step),
#: ``|μ − c|·|a| + |a|²`` for ``"mixed"``'s ``Σ r (x−c) pᵀ`` (~2× on pixel-like rows; ``a``
#: the row of loadings). Without it, two clusters ±1000 apart (spread 0.3) ran a default
#: ``"float32"`` fit from 3.9 to −44 nats a row, and ``"mixed"`` fell 904 nats a row at
#: noise 1e-6 under loadings of 0.3. A default Fashion-MNIST fit (20,000 rows, K = 50,
#: L = 6, 40 iterations) stays below it (3e-4 at most): the modes run there as before, the
#: worst noise variance of their M-step as far from ``"float64"``'s as ``"centred"``'s
#: (2.1e-3 after 8 iterations: the float32 log-densities move it more than these sums do).
LOSSY_LIMIT = 1e-3


def float64_components(terms: ComponentTerms, dtype: torch.dtype, moments: bool = True
                       ) -> Tensor | None:
    """The components ``[K']`` (indices) whose sums about ``c`` in ``dtype`` lose more than
    :data:`LOSSY_LIMIT` of their noise variances, taken in float64 instead by the
    ``"float32"`` mode (``moments``: its ``Σ r x``, ``Σ r x²`` are in ``dtype`` too) and
    the ``"mixed"`` one; ``None`` when none does. One ``O(K·D·L)`` check and one
    synchronisation a batch."""
    explained = (torch.zeros_like(terms.means) if terms.factors is None
                 else terms.factors.detach().square().sum(-1))  # |a|²  [K, D]
    far = terms.means.detach().abs()  # |μ − c|  [K, D]
    spread = far.square() if moments else far * explained.sqrt()
    spread = (spread + explained) * terms.inv_noise.detach()
    risky = torch.finfo(dtype).eps * spread.amax(-1) > LOSSY_LIMIT  # [K]
    return risky.nonzero().flatten() if bool(risky.any()) else None
