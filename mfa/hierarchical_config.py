"""Settings of hierarchical training (:mod:`mfa.hierarchical`): the dataclass, its checks and
the rule that sizes each child mixture."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from mfa._validation import check_int_fields, check_real_field
from mfa.em import EMConfig, EMTrainer

__all__ = [
    "HierarchicalConfig",
    "check_final_em",
    "child_components",
    "stage_devices",
    "total_components",
    "validate_hierarchical_config",
]


@dataclass
class HierarchicalConfig:
    """Settings of :class:`HierarchicalTrainer`."""

    root_components: int = 10  # K₁, components of the root mixture
    n_factors: int = 10  # L, latent factors of every component (root and children)
    noise: Literal["diagonal", "isotropic"] = "diagonal"  # noise type of every component
    min_noise: float = 1e-6  # the floor added to every noise variance (root and children)
    rows_per_component: int = 1000  # a child of rows_k rows gets rows_k // this components
    min_child_components: int = 1  # lower clamp of a child's component count
    max_child_components: int = 100  # upper clamp of a child's component count
    # root components with fewer hard-assigned rows keep their own parameters as their single
    # child (no fit); None: rows_per_component
    min_child_rows: int | None = None
    root_em: EMConfig = field(default_factory=EMConfig)  # EM of the root (its seed is ignored)
    child_em: EMConfig = field(default_factory=EMConfig)  # EM of each child (seed ignored)
    # optional EM on the flattened model; its init must be "none" and its n_init 1 (it
    # continues from the flattened parameters); None: no final EM
    final_em: EMConfig | None = None
    assign_batch_size: int = 4096  # rows per batch of the hard assignment
    seed: int = 0  # seeds the root (seed) and child k (derived from seed and k)


def validate_hierarchical_config(config: HierarchicalConfig) -> None:
    """Raise ``TypeError``/``ValueError`` naming the first bad field of ``config``."""
    if not isinstance(config, HierarchicalConfig):
        raise TypeError(f"config must be a HierarchicalConfig, got {type(config).__name__}")
    minimum = {"root_components": 1, "n_factors": 0, "rows_per_component": 1,
               "min_child_components": 1, "max_child_components": 1, "assign_batch_size": 1,
               "seed": 0}
    check_int_fields(config, minimum)
    if config.min_child_components > config.max_child_components:
        raise ValueError(
            "HierarchicalConfig.min_child_components must be <= max_child_components, got "
            f"{config.min_child_components} > {config.max_child_components}"
        )
    rows = config.min_child_rows
    if rows is not None and (isinstance(rows, bool) or not isinstance(rows, numbers.Integral)
                             or not 1 <= rows < 2**63):
        raise ValueError(f"HierarchicalConfig.min_child_rows must be None or an int >= 1, "
                         f"got {rows!r}")
    if rows is not None:
        config.min_child_rows = int(rows)  # (a numpy integer: the config is saved as YAML)
    check_real_field(config, "min_noise", minimum=0)
    if config.noise not in ("diagonal", "isotropic"):
        raise ValueError(
            f"HierarchicalConfig.noise must be 'diagonal' or 'isotropic', got {config.noise!r}"
        )
    for name in ("root_em", "child_em", "final_em"):
        value = getattr(config, name)
        if value is None and name == "final_em":
            continue
        if not isinstance(value, EMConfig):
            raise TypeError(
                f"HierarchicalConfig.{name} must be an EMConfig, got {type(value).__name__}"
            )
        if name == "final_em":  # (before EMConfig's own rule, which asks n_init > 1 for a
            check_final_em(value)  # random init: this stage takes neither)
        try:
            EMTrainer(value)  # validates the nested config
        except (ValueError, TypeError) as err:  # named as the stage's field
            text = str(err)
            named = (text.replace("EMConfig.", f"HierarchicalConfig.{name}.", 1)
                     if text.startswith("EMConfig.") else f"HierarchicalConfig.{name}: {text}")
            raise type(err)(named) from None
        if value.missing != "error":
            raise ValueError(
                f"HierarchicalConfig.{name}.missing must be 'error': hierarchical training "
                "assigns every row to a root component and needs complete rows (train on "
                "incomplete rows with EMTrainer and missing='allow')")


def check_final_em(em: EMConfig, name: str = "HierarchicalConfig.final_em") -> None:
    """The final EM continues from the flattened model: one start (``init`` ``"none"``,
    ``n_init`` 1), no initialisation of its own and no restarts. ``name``: the stage as the
    message names it (a run config's reader passes ``"EMConfig"``, read as the YAML key)."""
    if em.init != "none":
        raise ValueError(f"{name}.init must be 'none' (the final EM continues from the "
                         f"flattened model), got {em.init!r}")
    if em.n_init != 1:
        raise ValueError(f"{name}.n_init must be 1 (the final EM continues from the flattened "
                         f"model: it has one start, so no restarts to choose from), got "
                         f"{em.n_init!r}")


def child_components(rows: int, config: HierarchicalConfig) -> int:
    """How many components the child of a root component with ``rows`` rows gets.

    ``0`` means *keep the root component as it is* (``rows < min_child_rows``, or the
    child's EM would hold out every row for validation); otherwise
    ``min(rows', clamp(rows // rows_per_component, min_child_components,
    max_child_components))`` — never more components than the child's EM trains on:
    ``rows'`` is ``rows`` less the validation rows that EM holds out (``child_em.val_fraction``
    when its automatic noise prior or early stopping needs them), and at most
    ``child_em.init_samples``, the rows its initialisation reads (unless ``init="none"``).
    """
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
        raise ValueError(f"rows must be an int >= 0, got {rows!r}")
    threshold = config.rows_per_component if config.min_child_rows is None else (
        config.min_child_rows)
    if rows < threshold:
        return 0
    n = min(max(rows // config.rows_per_component, config.min_child_components),
            config.max_child_components)
    em = config.child_em
    held = 0
    if (em.noise_prior_variance == "auto" and em.noise_prior_strength > 0) or em.patience:
        held = int(round(rows * em.val_fraction))  # as mfa.training.hold_out
        if held == rows:  # hold_out refuses to hold out every row: keep the root component
            return 0
    if em.init != "none":  # (K-means needs K rows: more was refused after the root's fit)
        n = min(n, em.init_samples)
    return max(1, min(n, rows - held))


def total_components(counts: Tensor | Sequence[int], config: HierarchicalConfig) -> int:
    """``K = Σ_k max(1, n_k)`` of the flattened model for root rows ``counts`` ``[K₁]``."""
    values = counts.tolist() if isinstance(counts, Tensor) else list(counts)
    return int(sum(max(1, child_components(int(c), config)) for c in values))


def stage_devices(config: HierarchicalConfig, device, data) -> tuple:
    """``(home, root device, child device)`` of a fit (``home``: ``device``, else ``data``'s,
    the CPU for a dataset), each stage's device (``final_em`` too) refused before any work
    where this machine lacks it: a ``final_em.device`` of ``cuda`` on a CPU failed with
    torch's own error after the root and every child were fitted."""
    from mfa.config import resolve_device  # (mfa.config imports this module)

    checked = {}
    for name in ("device", "root_em", "child_em", "final_em"):
        stage = getattr(config, name, None) if name != "device" else None
        value = device if name == "device" else getattr(stage, "device", None)
        if value is None:
            continue
        try:
            checked[name] = resolve_device(value)
        except (ValueError, TypeError) as err:
            field = "device" if name == "device" else f"HierarchicalConfig.{name}.device"
            raise type(err)(f"{field}: {err}") from None
    home = checked.get("device") or (data.device if isinstance(data, Tensor)
                                     else torch.device("cpu"))
    return (home, checked.get("root_em", home), checked.get("child_em", home))
