"""The settings of :class:`mfa.em.EMTrainer` (:class:`EMConfig`) and their checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mfa._validation import (
    check_bool_field,
    check_choice_field,
    check_device_field,
    check_int_fields,
    check_real_field,
)
from mfa.precision import STATS_DTYPES
from mfa.priors import QUANTIZATION_VARIANCE, check_prior_fields

__all__ = ["EMConfig"]


@dataclass
class EMConfig:
    """Settings of :class:`mfa.em.EMTrainer`."""

    max_iter: int = 100  # EM iterations (full passes over the data)
    tol: float = 1e-4  # stop when the MAP objective per sample (mfa.priors) gains less than this
    # Rows per streamed batch. A float64 model's result does not depend on it (up to ~1e-13);
    # a float32 model's sums round differently, which can move where tol or patience stops.
    batch_size: int = 4096
    variance_floor: float = 1e-6  # hard lower bound of every noise variance after each M-step
    # MAP EM (mfa.priors): an inverse-gamma prior of noise_prior_strength pseudo-rows of variance
    # noise_prior_variance on every noise variance ("auto": chosen on validation data inside
    # fit, see mfa.prior_search), a Dirichlet(weight_concentration) prior on the weights and a
    # ridge prior (rows of A ~ N(0, d/loading_ridge)) on the loadings. 0, any, 1, 0: plain EM.
    noise_prior_strength: float = 1.0
    noise_prior_variance: float | Literal["auto"] = "auto"
    weight_concentration: float = 1.0
    loading_ridge: float = 0.0
    # The data's lower bound of a useful noise variance, where the "auto" grid starts: the
    # quantisation variance 1/(12·256²) of (p+u)/256 pixels (1/(12·255²) for p/255 pixels).
    quantization_variance: float = QUANTIZATION_VARIANCE
    search_warmup: int = 1  # "auto": EM iterations with the weakest candidate before the search
    # "auto": searches a restart at most; a stronger s₀ when patience runs out (mfa.prior_search)
    max_searches: int = 4
    search_per_decade: int = 4  # "auto": grid points per decade of noise_prior_variance
    patience: int = 5  # iterations (after search_warmup) without a better validation score (0: off)
    # early stopping: "better" is a mean validation log-likelihood this many nats per row and
    # feature (× D nats a row; with missing="allow", × the validation rows' mean observed
    # count) above the score at which patience last restarted (0: any gain)
    min_delta: float = 1e-4
    val_fraction: float = 0.1  # held out of a tensor/Dataset for "auto"/patience without validation
    device: str | None = None  # None: the model's device
    # E-step precision (mfa.precision): float64 (exact), precise, centred (each row's main
    # component summed in float64 about its own mean), mixed, centred32 (its float32 form, the
    # fastest on CPUs), float32. auto: centred, or float64 on full-rate-float64 GPUs. mixed and
    # float32 trade accuracy for speed: EM's objective may fall by their rounding, and the
    # components far or sharp enough for their sums to break EM are summed in float64.
    stats_dtype: Literal["auto", "float64", "precise", "centred", "mixed", "centred32",
                         "float32"] = "auto"
    # TF32 for the float32 products during fit (CUDA only; set and restored by
    # mfa.training.tf32_matmul). Off until measured on a GPU (tests/test_em.py, bench_gpu.py).
    allow_tf32: bool = False
    seed: int = 0  # seeds initialisation and re-seeding of empty components
    n_init: int = 1  # restarts; the best by final train log-likelihood is kept
    reseed_rounds: int = 3  # then re-seed the components lowering the val score, EM again
    # "auto": then one M-step from tempered responsibilities if it raises the val score
    tempered_step: bool = True  # (mfa.tempering)
    init: Literal["kmeans", "random", "none"] = "kmeans"  # "none": start from the model as is
    kmeans_iter: int = 20  # Lloyd iterations of the K-means initialisation
    complete_iter: int = 2  # factor-analysis iterations of the complete-data initial fit
    init_samples: int = 50_000  # rows (a seeded random subset) used by the initialisation
    # components with less responsibility mass are re-seeded by splitting the heaviest one (0:
    # never; the default, as splitting hurts where components have few rows each)
    min_component_mass: float = 0.0
    checkpoint_every: int = 0  # call checkpoint_fn every this many iterations (0: only at the end)
    progress: bool = True  # tqdm progress bar
    # "allow": NaN marks a missing entry and EM maximises the observed-data likelihood
    # (mfa.missing); "error": data with NaN is refused
    missing: Literal["error", "allow"] = "error"

    def validate(self) -> None:
        """Check every field; the trainer's limits live here only.

        Raises:
            ValueError: naming the field as ``EMConfig.<field>`` with the bad value.
        """
        check_int_fields(self, {"max_iter": 0, "batch_size": 1, "n_init": 1, "kmeans_iter": 1,
                                "init_samples": 1, "complete_iter": 0, "checkpoint_every": 0,
                                "seed": 0, "reseed_rounds": 0})
        check_real_field(self, "tol", minimum=0)
        check_real_field(self, "variance_floor", minimum=0, strict=True)
        check_prior_fields(self, allow_auto=True)
        check_real_field(self, "quantization_variance", minimum=0, strict=True)
        check_int_fields(self, {"search_warmup": 0, "search_per_decade": 1, "patience": 0,
                                "max_searches": 1})
        check_real_field(self, "val_fraction", minimum=0, maximum=1)
        check_real_field(self, "min_delta", minimum=0)
        check_real_field(self, "min_component_mass", minimum=0)
        check_choice_field(self, "stats_dtype", STATS_DTYPES)
        check_choice_field(self, "init", ("kmeans", "random", "none"))
        check_choice_field(self, "missing", ("error", "allow"))
        check_device_field(self)
        check_bool_field(self, "progress")
        check_bool_field(self, "allow_tf32")
        check_bool_field(self, "tempered_step")
        if self.init == "none" and self.n_init > 1:
            raise ValueError(
                f"EMConfig.n_init={self.n_init} > 1 needs a random EMConfig.init ('kmeans' or "
                f"'random'), got {self.init!r}"
            )
