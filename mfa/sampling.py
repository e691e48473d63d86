"""Ancestral sampling of a mixture of factor analyzers, chunk by chunk."""

from __future__ import annotations

import torch
from torch import Tensor

from mfa._validation import check_bool, check_generator


def check_options(generator: object, with_noise: object,
                  device: torch.device | None = None) -> None:
    """The sampling options, before any work: ``generator`` a ``torch.Generator`` (on
    ``device`` when given) or ``None``, ``with_noise`` a bool (``'no'`` acted as ``True``,
    ``None`` as ``False``)."""
    check_generator(generator, device=device)
    check_bool(with_noise, "with_noise")


def ancestral_sample(
    means: Tensor,
    loadings: Tensor,
    noise: Tensor,
    components: Tensor,
    chunk_rows: int,
    generator: torch.Generator | None = None,
    with_noise: bool = True,
) -> Tensor:
    """``x = μ_k + A_k z + √d_k ε`` with ``z ~ N(0, I_L)``, ``ε ~ N(0, I_D)`` for given
    components ``k``.

    Args:
        means: ``μ`` [K, D]; loadings: ``A`` [K, D, L]; noise: ``d`` [K, D].
        components: ``[n]`` (int64), the component of every sample.
        chunk_rows: rows drawn at a time (``z`` then ``ε`` per chunk, so the draws depend on
            it).
        generator: on the parameters' device.
        with_noise: ``False`` leaves out ``√d_k ε`` (``E[x | k, z]``).

    Returns:
        ``[n, D]``.
    """
    check_bool(with_noise, "with_noise")
    _, d, n_lat = loadings.shape
    factory = {"dtype": means.dtype, "device": means.device}
    parts = []
    for i in range(0, components.shape[0], chunk_rows):
        comp = components[i : i + chunk_rows]
        m = comp.shape[0]
        z = torch.randn(m, n_lat, 1, generator=generator, **factory)
        eps = torch.randn(m, d, generator=generator, **factory)
        x = means[comp]
        if with_noise:
            x = x + eps * noise[comp].sqrt()
        if n_lat:
            x = x + (loadings[comp] @ z).squeeze(-1)
        parts.append(x)
    return torch.cat(parts) if parts else means.new_zeros(0, d)
