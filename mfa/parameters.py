"""The parameterisation of a mixture of factor analyzers, and its validation.

The model stores unconstrained parameters, so that gradient training needs no projection:
mixture ``logits`` [K] (``w = softmax(logits)``), ``loc`` [K, D] (the means), ``loadings``
[K, D, L] and ``raw_noise`` ([K, D], or [K, 1] when isotropic) with
``d = min_noise + softplus(raw_noise)``. :func:`unconstrained` turns validated constrained
values (weights, means, loadings, noise variances) into them.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from mfa._terms import check_noise, check_parameters, check_supported_dtype
from mfa._validation import check_finite, check_floating, check_positive_int, check_tensor

NOISE_TYPES = ("diagonal", "isotropic")


def check_config(
    n_components: int, n_features: int, n_factors: int, noise: str, min_noise: float,
    dtype: torch.dtype,
) -> None:
    """The sizes, noise model and dtype of a :class:`~mfa.model.MixtureOfFactorAnalyzers`."""
    check_positive_int(n_components, "n_components")
    check_positive_int(n_features, "n_features")
    check_positive_int(n_factors, "n_factors", minimum=0)
    if n_factors > n_features:
        raise ValueError(f"n_factors must be <= n_features ({n_features}), got {n_factors}")
    if noise not in NOISE_TYPES:
        raise ValueError(f"noise must be one of {NOISE_TYPES}, got {noise!r}")
    try:  # (math.isfinite of an int beyond float's range raises OverflowError)
        ok = (isinstance(min_noise, numbers.Real) and not isinstance(min_noise, bool)
              and math.isfinite(min_noise) and min_noise >= 0)
    except OverflowError:
        ok = False
    if not ok:
        raise ValueError(f"min_noise must be a finite float >= 0, got {min_noise!r}")
    check_dtype(dtype, min_noise)


def check_dtype(dtype: torch.dtype, min_noise: float) -> None:
    """``dtype`` is one the model computes in and holds ``min_noise``: 1e39 became inf in
    float32, and every noise variance with it, which the first evaluation blamed on "a
    training run that diverged"."""
    check_supported_dtype(dtype)
    largest = torch.finfo(dtype).max
    if min_noise > largest:
        raise ValueError(f"min_noise={min_noise!r} is beyond the range of {dtype} (at most "
                         f"{largest:.4g}): the noise variances would be inf; lower min_noise"
                         + (" or use float64" if dtype != torch.float64 else ""))


def check_device(device: torch.device, action: str = "cannot evaluate the model") -> None:
    """The model's parameters hold values: a ``meta`` model (legitimate before
    ``load_state_dict(state, assign=True)``) failed at evaluation with torch's "Tensor.item()
    cannot be called on meta tensors"."""
    if device.type == "meta":
        raise ValueError(f"{action}: its device 'meta': the device type 'meta' is not one "
                         "this library runs on (cpu, cuda); a meta model holds no values: "
                         "give it some with load_state_dict(state, assign=True), or build it "
                         "on 'cpu' or 'cuda'")


def check_usable(model, action: str) -> None:
    """``model`` (a :class:`~mfa.model.MixtureOfFactorAnalyzers`) can be evaluated: its
    device holds values (:func:`check_device`) and its parameters are finite
    (:func:`mfa._terms.check_parameters`)."""
    check_device(model.device, action)
    check_parameters(model.log_weights, model.means, model.factor_loadings,
                     model.noise_variance, action)


def softplus_inverse(y: Tensor) -> Tensor:
    """``log(exp(y) − 1)`` computed stably for ``y > 0``."""
    return y + torch.log(-torch.expm1(-y))


def check_parameter(
    value: object, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
    finite: bool = True,
) -> Tensor:
    """``value`` is a tensor of ``shape``, ``dtype`` and ``device`` (and finite)."""
    value = check_tensor(value, name)
    if tuple(value.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {tuple(value.shape)}")
    check_floating(value, name, dtype, device)
    if finite:
        check_finite(value, name)
    return value


def check_unconstrained(
    values: dict[str, Tensor], shapes: dict[str, tuple[int, ...]], dtype: torch.dtype,
    device: torch.device,
) -> dict[str, Tensor]:
    """Validate unconstrained parameters against the expected ``shapes``: all finite, except
    that ``logits`` may hold ``−inf`` (a component of weight 0) as long as one is finite."""
    out = {
        name: check_parameter(value, name, shapes[name], dtype, device, finite=name != "logits")
        for name, value in values.items()
    }
    if "logits" in out:
        logits = out["logits"]
        if bool(logits.isnan().any()) or bool((logits == math.inf).any()):
            raise ValueError("logits must not contain NaN or +inf")
        if not bool(torch.isfinite(logits).any()):
            raise ValueError("logits must have at least one finite entry")
    return out


def unconstrained(
    config: dict,
    dtype: torch.dtype,
    device: torch.device,
    *,
    weights: Tensor | None = None,
    means: Tensor | None = None,
    factor_loadings: Tensor | None = None,
    noise_variance: Tensor | None = None,
) -> dict[str, Tensor]:
    """The unconstrained parameters (by name) of the given constrained ones, all validated.

    Args:
        config: the model's sizes and noise model (``MixtureOfFactorAnalyzers.config()``).
        dtype, device: the model's.
        weights: ``[K]``, non-negative, summing to one.
        means: ``[K, D]``.
        factor_loadings: ``[K, D, L]``.
        noise_variance: ``[K, D]`` (diagonal); ``[K]``, ``[K, 1]`` or constant rows of
            ``[K, D]`` (isotropic). Every entry ``> min_noise``.
    """
    k, d, lat = config["n_components"], config["n_features"], config["n_factors"]
    min_noise = config["min_noise"]
    new: dict[str, Tensor] = {}
    if weights is not None:
        weights = check_parameter(weights, "weights", (k,), dtype, device)
        if bool((weights < 0).any()):
            raise ValueError(
                f"weights must be non-negative, got minimum {weights.min().item()}"
            )
        total = weights.double().sum().item()  # (no rounding of its own in the check)
        # float64 weights that came from float32 ones (a converted model, a float32
        # softmax) sum to one within ~1e-7, and a normalising sum's rounding grows like
        # log₂ K (pairwise sums); no user's mistake is that small. (Until 2026-12-07 the
        # tolerance grew like √K: 3 % at K = 100,000, and weights summing to 1.005 were
        # taken and renormalised from K = 10,000 on.)
        # float64 weights that are float32 values (a float32 softmax, whose CPU sum is not
        # pairwise: 2.6e-5 off at K = 500,000) take float32's tolerance.
        float32_born = dtype == torch.float64 and bool(
            (weights.float().double() == weights).all())
        low = dtype in (torch.float16, torch.bfloat16, torch.float32) or float32_born
        tol = 1e-4 if low else 1e-6
        if abs(total - 1.0) > tol * max(1.0, math.log2(k)):
            raise ValueError(f"weights must sum to one, got sum {total}")
        new["logits"] = torch.log(weights)
    if means is not None:
        new["loc"] = check_parameter(means, "means", (k, d), dtype, device)
    if factor_loadings is not None:
        new["loadings"] = check_parameter(
            factor_loadings, "factor_loadings", (k, d, lat), dtype, device
        )
    if noise_variance is not None:
        noise_variance = check_tensor(noise_variance, "noise_variance")
        check_floating(noise_variance, "noise_variance", dtype, device)
        check_finite(noise_variance, "noise_variance")
        if config["noise"] == "isotropic":
            if noise_variance.shape in ((k,), (k, 1)):
                nv = noise_variance.reshape(k, 1)
            elif tuple(noise_variance.shape) == (k, d):
                # each row against its own size (a small row may not vary because another
                # row is large)
                spread = (noise_variance - noise_variance[:, :1]).abs().amax(1)
                if bool((spread > 1e-6 * noise_variance.abs().amax(1)).any()):
                    spread = spread.max().item()
                    raise ValueError(
                        "noise_variance of shape [K, D] must be constant along D for "
                        f"isotropic noise; rows vary by up to {spread}"
                    )
                nv = noise_variance[:, :1]
            else:
                raise ValueError(
                    f"noise_variance for isotropic noise must have shape [{k}], [{k}, 1] "
                    f"or [{k}, {d}], got {tuple(noise_variance.shape)}"
                )
        else:
            if tuple(noise_variance.shape) != (k, d):
                raise ValueError(
                    f"noise_variance must have shape [K, D] = [{k}, {d}], "
                    f"got {tuple(noise_variance.shape)}"
                )
            nv = noise_variance
        if bool((nv <= min_noise).any()):
            raise ValueError(
                f"noise_variance must be > min_noise={min_noise} (and > 0), "
                f"got minimum {nv.min().item()}"
            )
        check_noise(nv)
        new["raw_noise"] = softplus_inverse(nv - min_noise)
        if not bool(torch.isfinite(new["raw_noise"]).all()):
            raise ValueError(
                "noise_variance is too close to min_noise to be represented "
                f"(min_noise={min_noise}, minimum {nv.min().item()})"
            )
    return new


def check_sizes(
    means: object, means_name: str, loadings: object, loadings_name: str
) -> tuple[Tensor, Tensor]:
    """``means`` is a tensor ``[K, D]`` and ``loadings`` a tensor ``[K, D, L]``."""
    means = check_tensor(means, means_name)
    if means.dim() != 2:
        raise ValueError(f"{means_name} must have shape [K, D], got {tuple(means.shape)}")
    if not means.is_floating_point():  # they set the model's dtype
        raise TypeError(f"{means_name} must be floating point (float32 or float64), got "
                        f"{means.dtype}")
    n_components, n_features = means.shape
    loadings = check_tensor(loadings, loadings_name)
    if loadings.dim() != 3 or tuple(loadings.shape[:2]) != (n_components, n_features):
        raise ValueError(
            f"{loadings_name} must have shape [K, D, L] = [{n_components}, {n_features}, L], "
            f"got {tuple(loadings.shape)}"
        )
    return means, loadings


def check_assigned_state(module, state_dict, prefix, local_metadata, *args) -> None:
    """A ``load_state_dict`` pre-hook: with ``assign=True`` (the tensors become the
    parameters, unconverted) the four must share one supported dtype and one device; a
    bfloat16 state made a bfloat16 model whose ``log_prob`` failed inside torch's Cholesky.
    A plain load copies into the parameters, converting, and needs no check."""
    if not local_metadata.get("assign_to_params_buffers", False):
        return
    given = {}  # (a name the state leaves out keeps the module's parameter)
    for name in ("logits", "loc", "loadings", "raw_noise"):
        value = state_dict.get(prefix + name)
        given[name] = value if isinstance(value, Tensor) else getattr(module, name)
    kinds = {(t.dtype, t.device) for t in given.values()}
    if len(kinds) > 1:
        described = ", ".join(f"{name} {t.dtype} on {t.device}" for name, t in given.items())
        raise ValueError(f"load_state_dict(assign=True) needs the parameters in one dtype on "
                         f"one device, got {described}")
    for dtype, _ in kinds:
        check_supported_dtype(dtype)

