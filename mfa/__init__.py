"""Mixtures of Factor Analyzers: Gaussian mixtures as deep generative models of images.

The public API is re-exported here; see the README for a tour.
"""

from mfa.checkpoint import load_checkpoint
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
from mfa.init import fit_complete, random_init
from mfa.kde import scott_bandwidth, select_kde_bandwidth
from mfa.kmeans import KMeansResult, kmeans
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
from mfa.outliers import OutlierScorer, aupr, auroc, evaluate_outliers
from mfa.selection import sweep_models
from mfa.sgd import SGDConfig, SGDTrainer

__version__ = "0.1.0"

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
    "load_checkpoint",
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
