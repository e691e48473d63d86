"""Mixtures of Factor Analyzers: Gaussian mixtures as deep generative models of images.

The public API is re-exported here; see the README for a tour.
"""

from mfa.inference import condition, conditional_mean, conditional_sample, inpaint, marginal
from mfa.model import MixtureOfFactorAnalyzers, scott_bandwidth, select_kde_bandwidth

__version__ = "0.1.0"

__all__ = [
    "MixtureOfFactorAnalyzers",
    "condition",
    "conditional_mean",
    "conditional_sample",
    "inpaint",
    "marginal",
    "scott_bandwidth",
    "select_kde_bandwidth",
]
