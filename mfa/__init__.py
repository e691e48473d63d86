"""Mixtures of Factor Analyzers: Gaussian mixtures as deep generative models of images.

The public API is re-exported here; see the README for a tour. The outlier names
(:mod:`mfa.outliers`, which needs PIL) are loaded on first use, so ``import mfa`` (and the
``mfa`` command's parser) stays free of imaging libraries.
"""

import importlib

from mfa.em import ConvergenceWarning, EMConfig, EMTrainer
from mfa.hierarchical import HierarchicalConfig, HierarchicalTrainer, fit_hierarchical
from mfa.inference import (
    condition,
    conditional_mean,
    conditional_sample,
    inpaint,
    marginal,
    observed_log_prob,
)
from mfa.init import KMeansResult, fit_complete, kmeans, random_init
from mfa.kde import scott_bandwidth, select_kde_bandwidth
from mfa.metrics import (
    NDB,
    aic,
    bic,
    bits_per_dim,
    mean_log_likelihood,
    n_parameters,
    ndb,
    select_model,
)
from mfa.model import MixtureOfFactorAnalyzers
from mfa.selection import sweep_models
from mfa.sgd import SGDConfig, SGDTrainer

__version__ = "0.1.0"

_LAZY = {name: "mfa.outliers" for name in ("OutlierScorer", "auroc", "aupr",
                                           "evaluate_outliers")}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mfa' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "NDB",
    "ConvergenceWarning",
    "EMConfig",
    "EMTrainer",
    "HierarchicalConfig",
    "HierarchicalTrainer",
    "KMeansResult",
    "MixtureOfFactorAnalyzers",
    "OutlierScorer",
    "SGDConfig",
    "SGDTrainer",
    "aic",
    "aupr",
    "auroc",
    "bic",
    "bits_per_dim",
    "condition",
    "conditional_mean",
    "conditional_sample",
    "evaluate_outliers",
    "fit_complete",
    "fit_hierarchical",
    "inpaint",
    "kmeans",
    "marginal",
    "mean_log_likelihood",
    "n_parameters",
    "ndb",
    "observed_log_prob",
    "random_init",
    "scott_bandwidth",
    "select_kde_bandwidth",
    "select_model",
    "sweep_models",
]
