"""Settings of :class:`mfa.sgd.SGDTrainer` (Adam): the dataclass and its checks, and which
of them a resumed fit may change (:func:`check_resumed_state`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mfa import training
from mfa._validation import (
    check_bool_field,
    check_choice_field,
    check_device_field,
    check_int_fields,
    check_real_field,
)
from mfa.priors import QUANTIZATION_VARIANCE, check_prior_fields

__all__ = ["RESUMABLE", "SGDConfig", "check_resumed_state"]

#: What a resumed fit's config may change from the saved one (how long and where it runs,
#: how often it saves, progress); anything else would be ignored, so it is refused.
RESUMABLE = frozenset({"epochs", "checkpoint_every", "progress", "device"})


@dataclass
class SGDConfig:
    """Settings of :class:`mfa.sgd.SGDTrainer`."""

    # Adam learning rate. With step_scale "noise" a step moves a mean or loading entry by
    # about lr noise standard deviations of its component and feature, and a noise variance
    # by about lr of itself (weights' logits: lr itself); with "none", lr in the data's own
    # units (and on the noise's softplus parameter).
    lr: float = 0.05
    step_scale: Literal["noise", "none"] = "noise"
    batch_size: int = 256  # rows per step
    epochs: int = 20  # passes over the training data
    # Learning-rate schedule, stepped per batch: "cosine" anneals lr to 0 over all epochs;
    # "step" multiplies it by 0.3 every max(1, epochs // 3) epochs.
    schedule: Literal["constant", "cosine", "step"] = "constant"
    grad_clip: float | None = 10.0  # max global gradient norm; None disables clipping
    val_fraction: float = 0.1  # held out for early stopping when no validation data is given
    patience: int = 5  # epochs without a better validation score than the best so far (0: never)
    seed: int = 0  # seeds the split, the shuffling and the initialisation
    device: str | None = None  # None: the model's device
    init: Literal["kmeans", "random", "none"] = "kmeans"  # "none": start from the model as is
    kmeans_iter: int = 20  # Lloyd iterations of the K-means initialisation
    complete_iter: int = 2  # factor-analysis iterations of the complete-data initial fit
    init_samples: int = 50_000  # rows (a seeded random subset) used by the initialisation
    variance_floor: float = 1e-6  # noise-variance floor of the initialisation and its EM step
    # the initialisation ends with one MAP EM step over the training rows (mfa.sgd_start)
    em_start: bool = True
    weight_decay: float = 0.0  # Adam weight decay
    # The priors of MAP EM (mfa.priors) as a penalty: −log p(θ) / N_train added to the loss.
    # Strength 0, concentration 1, ridge 0: no penalty. noise_prior_variance "auto": s₀ chosen
    # on the validation data from the start's statistics (mfa.sgd_start, mfa.prior_search).
    noise_prior_strength: float = 1.0  # ν, pseudo-rows of the inverse-gamma noise prior
    noise_prior_variance: float | Literal["auto"] = "auto"  # s₀, their noise variance
    # "auto": the grid's lower end (8-bit pixels dequantised as (p + u)/256: 1/(12·256²))
    quantization_variance: float = QUANTIZATION_VARIANCE
    search_per_decade: int = 4  # "auto": grid points per decade of noise_prior_variance
    # α of the Dirichlet prior on the weights. α > 1 refuses a start with a weight of 0 (with
    # init="none", the model's own): its log-prior is −inf at any lr (EM's counts N_k + α − 1
    # make such a weight positive; Adam cannot move a logit of −inf).
    weight_concentration: float = 1.0
    loading_ridge: float = 0.0  # λ of the Gaussian prior on the loading rows
    checkpoint_every: int = 0  # call checkpoint_fn every this many epochs (0: only at the end)
    progress: bool = True  # tqdm progress bar
    # TF32 tensor cores for the float32 products during fit (CUDA only; see EMConfig.allow_tf32)
    allow_tf32: bool = False
    # "allow": NaN marks a missing entry and Adam maximises the observed-data likelihood
    # (mfa.missing.row_log_prob); "error": data with NaN is refused
    missing: Literal["error", "allow"] = "error"

    @property
    def auto_noise_prior(self) -> bool:
        """Whether ``s₀`` is chosen on validation data (``"auto"`` with a noise prior on)."""
        return self.noise_prior_variance == "auto" and self.noise_prior_strength > 0

    def validate(self) -> None:
        """Check every field; the trainer's limits live here only.

        Raises:
            ValueError: naming the field as ``SGDConfig.<field>`` with the bad value.
        """
        check_real_field(self, "lr", minimum=0, strict=True)
        check_choice_field(self, "step_scale", ("noise", "none"))
        check_real_field(self, "weight_decay", minimum=0)
        check_prior_fields(self, allow_auto=True)
        check_real_field(self, "quantization_variance", minimum=0, strict=True)
        check_real_field(self, "variance_floor", minimum=0, strict=True)
        check_int_fields(self, {"batch_size": 1, "epochs": 1, "kmeans_iter": 1,
                                "init_samples": 1, "complete_iter": 0, "checkpoint_every": 0,
                                "patience": 0, "seed": 0, "search_per_decade": 1})
        check_choice_field(self, "schedule", ("constant", "cosine", "step"))
        check_real_field(self, "grad_clip", minimum=0, strict=True, allow_none=True)
        check_real_field(self, "val_fraction", minimum=0, maximum=1)
        check_choice_field(self, "init", ("kmeans", "random", "none"))
        check_choice_field(self, "missing", ("error", "allow"))
        check_device_field(self)
        check_bool_field(self, "progress")
        check_bool_field(self, "allow_tf32")
        check_bool_field(self, "em_start")


def check_resumed_state(resume: dict, config: SGDConfig) -> None:
    """Refuse resuming the :meth:`mfa.sgd.SGDTrainer.state_dict` ``resume`` under ``config``:
    negative counters, a field other than :data:`RESUMABLE` changed, or ``epochs`` changed
    where the saved run cannot continue under it (a finished fit, fewer epochs than done, a
    schedule laid out over the saved epochs). Run at ``load_state_dict`` and again by
    ``fit``: restoring the optimizer and scheduler overwrites their settings (lr, the
    schedule's length) with the saved ones, so a field set between them would be ignored
    while the next checkpoint recorded it."""
    for key in ("epoch", "bad_epochs"):
        if resume.get(key, 0) < 0:
            raise ValueError(f"SGDTrainer state key {key!r} must be >= 0, got {resume[key]}")
    training.check_resumed_config(resume, config, "SGDTrainer", RESUMABLE)
    saved, epochs = resume.get("config"), config.epochs
    if not isinstance(saved, dict) or saved.get("epochs", epochs) == epochs:
        return
    # "final": saved after fit() returned (before 2026-12: read from the epoch count)
    if resume.get("stopped") or resume.get("final", resume["epoch"] >= saved["epochs"]):
        raise ValueError(
            f"SGDTrainer state is of a finished fit ({resume['epoch']} of "
            f"{saved['epochs']} epochs{', stopped early' if resume.get('stopped') else ''}"
            f"): its model holds the best epoch, not the last one its Adam state "
            f"continues from, so epochs={epochs} would not continue the same "
            "run; start a new fit from the model (init='none')")
    if epochs < resume["epoch"]:
        raise ValueError(f"SGDTrainer state has already done {resume['epoch']} epochs; "
                         f"epochs={epochs} is below that")
    if saved.get("schedule", "constant") != "constant":
        raise ValueError(
            f"SGDTrainer state was saved with schedule={saved['schedule']!r}, laid out "
            f"over epochs={saved['epochs']}; resume with that many epochs (not "
            f"{epochs}) or start a new fit")
