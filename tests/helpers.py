"""Dense float64 references for the tests: no Woodbury, no low-rank tricks.

Everything here assembles the full covariance ``A Aᵀ + diag(d)`` from the parameters and uses
``torch.distributions.MultivariateNormal`` and ``torch.linalg.solve`` in float64, so it shares
no formula with the library beyond the definition of the model.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.distributions import MultivariateNormal

from mfa import MixtureOfFactorAnalyzers

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    """A CPU generator with an explicit seed."""
    return torch.Generator().manual_seed(seed)


def assert_finite(t: Tensor, shape: Sequence[int], dtype: torch.dtype = F64) -> None:
    """``t`` is a tensor of exactly this shape and dtype with only finite entries."""
    assert isinstance(t, Tensor), f"expected a Tensor, got {type(t).__name__}"
    assert tuple(t.shape) == tuple(shape), f"shape {tuple(t.shape)} != {tuple(shape)}"
    assert t.dtype == dtype, f"dtype {t.dtype} != {dtype}"
    assert bool(torch.isfinite(t).all()), "tensor has non-finite entries"


# ---------------------------------------------------------------------- random parameters


def random_parameters(
    n_components: int,
    n_features: int,
    n_factors: int,
    noise: str = "diagonal",
    seed: int = 0,
    dtype: torch.dtype = F64,
    offset: float = 0.0,
) -> dict[str, Tensor]:
    """Well-conditioned random parameters with clearly non-uniform weights.

    Weights are proportional to ``1, 2, ..., K`` in a random order (so every component carries
    mass and none is negligible); means are spread ``N(offset, 1.5²)``; loadings ``N(0, 1/L)``;
    noise variances in ``[0.2, 1.0]`` (one per component when isotropic, shape ``[K]``).
    """
    g = gen(seed)
    k, d, lat = n_components, n_features, n_factors
    raw = torch.arange(1, k + 1, dtype=F64)[torch.randperm(k, generator=g)]
    weights = raw / raw.sum()
    means = offset + 1.5 * torch.randn(k, d, generator=g, dtype=F64)
    loadings = torch.randn(k, d, lat, generator=g, dtype=F64) / max(lat, 1) ** 0.5
    if noise == "isotropic":
        noise_variance = 0.2 + 0.8 * torch.rand(k, generator=g, dtype=F64)
    else:
        noise_variance = 0.2 + 0.8 * torch.rand(k, d, generator=g, dtype=F64)
    out = {
        "weights": weights,
        "means": means,
        "factor_loadings": loadings,
        "noise_variance": noise_variance,
    }
    out = {name: value.to(dtype) for name, value in out.items()}
    if dtype != F64:  # renormalise after rounding so the sum-to-one check sees a clean sum
        out["weights"] = out["weights"] / out["weights"].sum()
    return out


def random_model(
    n_components: int,
    n_features: int,
    n_factors: int,
    noise: str = "diagonal",
    seed: int = 0,
    dtype: torch.dtype = F64,
    *,
    offset: float = 0.0,
    chunk_elements: int | None = None,
) -> MixtureOfFactorAnalyzers:
    """A model built with :meth:`from_parameters` from :func:`random_parameters`."""
    params = random_parameters(n_components, n_features, n_factors, noise, seed, dtype, offset)
    kwargs = {} if chunk_elements is None else {"chunk_elements": chunk_elements}
    return MixtureOfFactorAnalyzers.from_parameters(**params, noise=noise, **kwargs)


def random_data(n: int, model: MixtureOfFactorAnalyzers, seed: int = 1, scale: float = 2.0):
    """Rows spread around the model's means (not samples: independent of ``model.sample``)."""
    g = gen(seed)
    means = model.means.detach()
    idx = torch.randint(0, model.n_components, (n,), generator=g)
    noise = scale * torch.randn(n, model.n_features, generator=g, dtype=means.dtype)
    return means[idx] + noise


# ---------------------------------------------------------------------- dense reference


@dataclass
class DenseMixture:
    """A dense float64 Gaussian mixture: ``weights [K]``, ``means [K, D]``, ``covs [K, D, D]``."""

    weights: Tensor
    means: Tensor
    covs: Tensor

    @classmethod
    def from_parameters(cls, weights, means, factor_loadings, noise_variance) -> DenseMixture:
        w = weights.detach().to(F64)
        mu = means.detach().to(F64)
        a = factor_loadings.detach().to(F64)
        k, d = mu.shape
        nv = noise_variance.detach().to(F64).reshape(k, -1).expand(k, d)
        covs = a @ a.transpose(-1, -2) + torch.diag_embed(nv)
        return cls(w, mu, covs)

    @classmethod
    def from_model(cls, model: MixtureOfFactorAnalyzers) -> DenseMixture:
        """From the constrained parameters the model reports (its outputs, cast to float64)."""
        return cls.from_parameters(
            model.weights, model.means, model.factor_loadings, model.noise_variance
        )

    @property
    def n_components(self) -> int:
        return self.means.shape[0]

    @property
    def n_features(self) -> int:
        return self.means.shape[1]

    def components(self) -> MultivariateNormal:
        return MultivariateNormal(self.means, covariance_matrix=self.covs)

    def component_log_prob(self, x: Tensor) -> Tensor:
        """``log w_k + log N(x; μ_k, Σ_k)``, ``[..., D] → [..., K]``."""
        x = x.detach().to(F64)
        return self.weights.log() + self.components().log_prob(x.unsqueeze(-2))

    def log_prob(self, x: Tensor) -> Tensor:
        return torch.logsumexp(self.component_log_prob(x), dim=-1)

    def mean(self) -> Tensor:
        return self.weights @ self.means

    def covariance(self) -> Tensor:
        """``Σ_k w_k (Σ_k + μ_k μ_kᵀ) − μ μᵀ``."""
        m = self.mean()
        second = self.covs + self.means.unsqueeze(-1) * self.means.unsqueeze(-2)
        return (self.weights[:, None, None] * second).sum(0) - torch.outer(m, m)

    def marginal(self, idx: Sequence[int] | Tensor) -> DenseMixture:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return DenseMixture(
            self.weights.clone(), self.means[:, idx], self.covs[:, idx][:, :, idx]
        )

    def condition(self, observed: Sequence[int] | Tensor, values: Tensor) -> DenseMixture:
        """Block formulas; the result is over the hidden features in increasing order.

        ``μ_h + Σ_ho Σ_oo⁻¹ (x_o − μ_o)``, ``Σ_hh − Σ_ho Σ_oo⁻¹ Σ_oh``,
        ``w̃_k ∝ w_k N(x_o; μ_k,o, Σ_k,oo)``.
        """
        obs = torch.as_tensor(observed, dtype=torch.long)
        hid = torch.tensor(
            [j for j in range(self.n_features) if j not in set(obs.tolist())], dtype=torch.long
        )
        values = values.detach().to(F64)
        s_oo = self.covs[:, obs][:, :, obs]
        s_ho = self.covs[:, hid][:, :, obs]
        s_hh = self.covs[:, hid][:, :, hid]
        resid = (values - self.means[:, obs]).unsqueeze(-1)  # [K, |o|, 1]
        means = self.means[:, hid] + (s_ho @ torch.linalg.solve(s_oo, resid)).squeeze(-1)
        covs = s_hh - s_ho @ torch.linalg.solve(s_oo, s_ho.transpose(-1, -2))
        evidence = MultivariateNormal(self.means[:, obs], covariance_matrix=s_oo).log_prob(values)
        log_w = self.weights.log() + evidence
        weights = torch.softmax(log_w, dim=-1)
        return DenseMixture(weights, means, covs)


def dense_kde_log_prob(x: Tensor, data: Tensor, bandwidth: float) -> Tensor:
    """``log (1/N) Σ_i N(x; x_i, σ² I)`` written out by hand (float64)."""
    x, data = x.to(F64), data.to(F64)
    d = data.shape[1]
    sq = ((x.unsqueeze(1) - data.unsqueeze(0)) ** 2).sum(-1)  # [M, N]
    log_kernel = -0.5 * sq / bandwidth**2 - 0.5 * d * torch.log(
        torch.tensor(2 * torch.pi * bandwidth**2, dtype=F64)
    )
    n = torch.tensor(float(data.shape[0]), dtype=F64)
    return torch.logsumexp(log_kernel, dim=1) - n.log()


def roundtrip(obj):
    """``obj`` through ``torch.save`` and ``torch.load(weights_only=True)``."""
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def heywood_float32_models(seed: int = 4, noise: float = 1e-9):
    """A float32 model (K=3, D=6, L=2) whose component 1 has one noise variance at ``noise``
    under loadings of size ~1 (a Heywood case), its exact float64 copy, and 2,000 float32 rows
    drawn from that copy."""
    import copy

    params = random_parameters(3, 6, 2, seed=seed, dtype=torch.float32)
    params["noise_variance"][1, 2] = noise
    m32 = MixtureOfFactorAnalyzers.from_parameters(**params)
    m64 = copy.deepcopy(m32).double()
    x, _ = m64.sample(2000, generator=gen(5))
    return m32, m64, x.float()


# ---------------------------------------------------------------------------- figures


def saved_figures(monkeypatch) -> list:
    """The matplotlib figures saved from now on (to read back what was drawn, not pixels)."""
    from matplotlib.figure import Figure

    saved, original = [], Figure.savefig

    def savefig(self, *args, **kwargs):
        saved.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return saved


def drawn_lines(figure) -> dict[str, tuple[list, list]]:
    """``{label: (xs, ys)}`` of the lines of a figure's one axes."""
    (axes,) = figure.axes
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
            for line in axes.get_lines()}


# ---------------------------------------------------------------------- CUDA test modules

#: The device of the CUDA tests (tests/test_cuda_*.py): ``MFA_CUDA_TEST_DEVICE=cpu`` runs
#: them CPU against CPU, a dry run of their code on a machine without a GPU.
CUDA_TEST_DEVICE = os.environ.get("MFA_CUDA_TEST_DEVICE", "cuda")


def cuda_test_marks(*fixtures: str) -> list:
    """A CUDA test module's ``pytestmark``: one intra-op thread for the CPU halves (tiny
    problems), the ``cuda`` marker, skipped where the device is CUDA and none is present;
    ``fixtures`` used by every test too (e.g. ``"no_tf32"``)."""
    import pytest

    return [
        pytest.mark.usefixtures("one_thread", *fixtures),
        pytest.mark.cuda,
        pytest.mark.skipif(CUDA_TEST_DEVICE.startswith("cuda") and not torch.cuda.is_available(),
                           reason="needs a CUDA device"),
    ]


def initialise_on_the_cpu(monkeypatch) -> None:
    """EM's K-means start (``mfa.init.initialise``, as :mod:`mfa.em` calls it) made on the CPU
    for a model on either device, so a CUDA fit starts where the CPU's does: a CUDA generator
    draws other numbers than the CPU's for the same seed (a CUDA test comparing two default
    fits then compared two different starts, which only a real GPU shows). The rest of the
    fit runs on the model's device."""
    import copy

    from mfa import em

    real = em.initialise

    def on_the_cpu(model, rows, *args, **kwargs):
        twin = copy.deepcopy(model).cpu()
        real(twin, rows.cpu(), *args, **kwargs)
        model.load_state_dict(twin.state_dict())

    monkeypatch.setattr(em, "initialise", on_the_cpu)


#: Fragments of a tqdm bar (tests/test_progress*.py).
BAR = ("EM run", "Adam", "it/s", "s/it", "%|")


def screen(text: str) -> list[str]:
    """The lines a terminal shows for ``text`` (``\\r``: back to column 0, overwriting)."""
    lines = []
    for raw in text.split("\n"):
        cells: list[str] = []
        for i, part in enumerate(raw.split("\r")):
            column = 0 if i else len(cells)
            for char in part:
                cells[column:column + 1] = [char]
                column += 1
        lines.append("".join(cells).rstrip())
    return [line for line in lines if line]
