"""Two-level training for a large number of components (Richardson & Weiss, 2018, §4).

The recipe that reached the best CelebA model of *On GANs and GMMs*, where a flat mixture of
thousands of components does not fit one device:

1. fit a **root** MFA of ``K₁`` components to all rows with EM;
2. **hard-assign** every row to its most likely root component (streamed in batches: never
   an ``[N, K₁]`` matrix);
3. fit a **child** MFA to the rows of each root component ``k``, one child after another,
   with a number of components proportional to its rows::

       rows_k < min_child_rows  →  the root component is kept as it is (one child, its own
                                   parameters, no fit)
       otherwise                →  n_k = min(rows_k − held_k, clamp(rows_k // rows_per_component,
                                             min_child_components, max_child_components))

   at least 1, where ``held_k = round(rows_k · child_em.val_fraction)`` are the rows the
   child's EM holds out for validation when ``child_em`` needs them (the automatic noise
   prior or early stopping; else 0); a component whose rows would all be held out is kept as
   it is (:func:`mfa.hierarchical_config.child_components`).

4. **flatten** root and children into one :class:`~mfa.model.MixtureOfFactorAnalyzers` of
   ``K = Σ_k n_k`` components with weights ``π_k · π_{k,j}``, means, loadings and noise of
   child ``k``'s component ``j``::

       p(x) = Σ_k π_k Σ_j π_{k,j} N(x; μ_{k,j}, A_{k,j} A_{k,j}ᵀ + diag(d_{k,j}))

The flattened model is an exact MFA (its densities, samples and conditionals are those of the
formula above), but it is *not* the maximum-likelihood fit of a ``K``-component mixture: the
children were fitted to hard-assigned rows, so a row near the border of two root components
informs only one child, and ``π_k`` comes from the root's soft responsibilities while child
``k`` saw the hard share. A few EM iterations on the flat model (``final_em``) remove that
approximation at the cost of full ``K``-component passes.

Cost per EM iteration: ``O(N·D·K₁·L)`` for the root, ``O(rows_k·D·n_k·L)`` for child ``k``
(``≤ O(N·D·max_k n_k·L)`` for all children) against ``O(N·D·K·L)`` for a flat model; only one
child's rows and EM state are in memory at a time (the fitted children are kept, together the
size of the flat model). Each child pays its own initialisation.

Resuming: with ``checkpoint_dir`` the root (``root.pt``), every finished child
(``child-00007.pt``) and the flattened result (``model.pt``) are written with
:func:`mfa.checkpoint.save_checkpoint` as they finish. A later :meth:`HierarchicalTrainer.fit`
with the same folder, data and configuration loads them and continues at the first
unfinished child; because every child is seeded from ``(seed, k)`` alone, the final model is
the same as that of an uninterrupted run. Each file keeps its stage's history record
(``HierarchicalTrainer.fitted`` once loaded), for a run whose own checkpoint missed it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from mfa import distributed, parameters, training
from mfa.checkpoint import load_checkpoint, save_checkpoint
from mfa.em import EMConfig, EMTrainer
from mfa.hierarchical_config import (
    HierarchicalConfig,
    child_components,
    stage_devices,
    total_components,
    validate_hierarchical_config,
)
from mfa.hierarchical_rows import assign_rows, check_rows, rows_of
from mfa.model import MixtureOfFactorAnalyzers

logger = logging.getLogger(__name__)

__all__ = ["HierarchicalConfig", "HierarchicalTrainer", "assign_rows", "child_components",
           "fit_hierarchical", "flatten_hierarchy", "total_components"]

#: Keys of a nested EMConfig that do not change the fitted parameters (ignored when a
#: checkpoint folder is matched against the configuration; each stage's seed is derived from
#: HierarchicalConfig.seed).
_NEUTRAL_EM_KEYS = ("progress", "device", "checkpoint_every", "seed")


def _child_seed(seed: int, k: int) -> int:
    """Seed of child ``k``: distinct from the root's ``seed`` and from every other child."""
    return (seed * 1_000_003 + k + 1) % (2**62)


def flatten_hierarchy(
    root: MixtureOfFactorAnalyzers, children: Sequence[MixtureOfFactorAnalyzers]
) -> MixtureOfFactorAnalyzers:
    """One MFA equal to the two-level mixture ``Σ_k π_k Σ_j π_{k,j} N(x; μ_{k,j}, Σ_{k,j})``.

    Args:
        root: ``K₁`` components; only its weights ``π`` ``[K₁]`` are used.
        children: ``K₁`` models, child ``k`` with ``n_k`` components; all with the root's
            ``n_features`` ``D``, and one ``n_factors`` ``L``, noise type, dtype and device.

    Returns:
        A model of ``K = Σ_k n_k`` components, child ``k``'s components in order after those
        of children ``0..k-1``: weights ``[K]`` (``π_k · π_{k,j}``), means ``[K, D]``,
        loadings ``[K, D, L]``, noise ``[K, D]``; ``min_noise`` the smallest of the children's.
    """
    if not isinstance(root, MixtureOfFactorAnalyzers):
        raise TypeError(f"root must be a MixtureOfFactorAnalyzers, got {type(root).__name__}")
    children = list(children)
    if len(children) != root.n_components:
        raise ValueError(
            f"need one child per root component ({root.n_components}), got {len(children)}"
        )
    for k, child in enumerate(children):
        if not isinstance(child, MixtureOfFactorAnalyzers):
            raise TypeError(f"child {k} must be a MixtureOfFactorAnalyzers, "
                            f"got {type(child).__name__}")
        first = children[0]
        for name in ("n_features", "n_factors", "noise", "dtype", "device"):
            if getattr(child, name) != getattr(first, name):
                raise ValueError(
                    f"children must share {name}: child 0 has {getattr(first, name)!r}, "
                    f"child {k} has {getattr(child, name)!r}"
                )
    if children[0].n_features != root.n_features:
        raise ValueError(f"children have {children[0].n_features} features, the root "
                         f"{root.n_features}")
    with torch.no_grad():
        dtype, device = children[0].dtype, children[0].device
        # log π_k + log π_{k,j}: products of small weights underflowed in float32
        root_log = root.log_weights.to(dtype=dtype, device=device)  # [K₁]
        logits = torch.cat([root_log[k] + c.log_weights for k, c in enumerate(children)])
        floor = min(c.min_noise for c in children)
        # the children's own raw noise where their floor is the common one: a variance at
        # that floor (Adam's, a marginal's) was refused by from_parameters
        raw = torch.cat([c.raw_noise if c.min_noise == floor else
                         parameters.softplus_inverse(c.noise_variance[:, :c.raw_noise.shape[1]]
                                                     - floor) for c in children])
        return MixtureOfFactorAnalyzers.from_raw_parameters(
            logits, torch.cat([c.means for c in children]),
            torch.cat([c.factor_loadings for c in children]), raw,
            noise=children[0].noise, min_noise=floor, chunk_elements=children[0].chunk_elements,
        )


def _component_as_model(model: MixtureOfFactorAnalyzers, k: int) -> MixtureOfFactorAnalyzers:
    """Component ``k`` of ``model`` as a one-component model of weight 1."""
    with torch.no_grad():
        return MixtureOfFactorAnalyzers.from_raw_parameters(
            model.logits.new_zeros(1), model.means[k : k + 1].clone(),
            model.factor_loadings[k : k + 1].clone(), model.raw_noise[k : k + 1].clone(),
            noise=model.noise, min_noise=model.min_noise, chunk_elements=model.chunk_elements,
        )


# ---------------------------------------------------------------------------- trainer


def _summary(trainer: EMTrainer | None) -> dict:
    """The last training log-likelihood and the seconds of the EM iterations of a stage."""
    history = trainer.history if trainer is not None else []
    return {"train_log_likelihood": history[-1]["train_log_likelihood"] if history else None,
            "em_seconds": sum(r["seconds"] for r in history)}

Callback = Callable[["HierarchicalTrainer", dict], None]


class HierarchicalTrainer:
    """Fit a root MFA, then one child MFA per root component, and flatten them.

    Args:
        config: a :class:`HierarchicalConfig` (defaults when ``None``).

    Attributes (after :meth:`fit`):
        root: the root model, ``K₁`` components.
        children: ``K₁`` child models (a kept root component is a one-component child).
        counts: ``[K₁]`` int64, the number of rows hard-assigned to each root component.
        kept: ``[K₁]`` bool, root components kept as they are (too few rows).
        model: the flattened model (after ``final_em`` when configured).
        history: one dict per stage: ``stage`` (``"root"``, ``"child"``, ``"final"``),
            ``component`` (root index, children only), ``rows``, ``n_components``,
            ``kept`` (children), ``resumed`` (loaded from ``checkpoint_dir``),
            ``train_log_likelihood`` (the last of the stage's ``EMTrainer.history``, nats
            per row of its own rows; ``None`` when kept, resumed or not trained),
            ``em_seconds`` (its EM iterations, without the initialisation) and ``seconds``
            (the whole stage).
        fitted: ``(stage, component) → record`` of the stages loaded from ``checkpoint_dir``:
            the record the session that fitted the stage wrote (``None`` in older files).
    """

    def __init__(self, config: HierarchicalConfig | None = None) -> None:
        self.config = config or HierarchicalConfig()
        validate_hierarchical_config(self.config)
        self.root: MixtureOfFactorAnalyzers | None = None
        self.children: list[MixtureOfFactorAnalyzers] = []
        self.counts: Tensor | None = None
        self.kept: Tensor | None = None
        self.model: MixtureOfFactorAnalyzers | None = None
        self.history: list[dict] = []
        self.fitted: dict[tuple[str, int | None], dict | None] = {}

    def _fingerprint(self) -> dict:
        """The configuration as plain values, without the keys that do not change the fit."""
        plain = asdict(self.config)
        plain.pop("assign_batch_size")  # the hard assignment is the same in any batch size
        if plain["min_noise"] == 1e-6:  # folders from before the field fitted with this value
            plain.pop("min_noise")
        for name in ("root_em", "child_em", "final_em"):
            if plain[name] is not None:
                for key in _NEUTRAL_EM_KEYS:
                    plain[name].pop(key, None)
        return plain

    def _em(self, em: EMConfig, seed: int) -> EMTrainer:
        return EMTrainer(replace(em, seed=seed))

    def _stage_file(self, path: Path | None, what: str, n_features: int,
                    dtype: torch.dtype) -> tuple[MixtureOfFactorAnalyzers, dict] | None:
        """A stage's saved ``(model, state)`` as rank 0 reads it, on every process (``None``
        where rank 0 has no such file): under torch.distributed only rank 0 writes them, and
        the others' view of the folder raced its writes."""
        if path is None:
            return None
        return distributed.broadcast_from_main(
            lambda: self._load(path, what, n_features, dtype) if path.exists() else None)

    def _load(self, path: Path, what: str, n_features: int,
              dtype: torch.dtype) -> tuple[MixtureOfFactorAnalyzers, dict]:
        loaded = load_checkpoint(path)
        state = loaded.trainer_state
        if not isinstance(state, dict) or state.get("config") != self._fingerprint():
            raise ValueError(
                f"{path} was written with a different HierarchicalConfig; resume with the "
                "configuration that wrote it or use an empty checkpoint_dir"
            )
        if loaded.model.n_features != n_features:
            raise ValueError(f"{path} holds a {what} over {loaded.model.n_features} features, "
                             f"the data has {n_features}")
        if loaded.model.dtype != dtype:  # (else found only when the children are flattened)
            raise ValueError(f"{path} holds a {str(loaded.model.dtype).removeprefix('torch.')} "
                             f"{what}, the data is {str(dtype).removeprefix('torch.')}; resume "
                             "with data of the dtype that wrote the folder")
        return loaded.model, state

    def fit(
        self,
        data: Tensor | Dataset,
        validation: Tensor | Dataset | None = None,
        *,
        checkpoint_dir: str | Path | None = None,
        callbacks: Sequence[Callback] = (),
        device: torch.device | str | None = None,
        root: MixtureOfFactorAnalyzers | None = None,
    ) -> MixtureOfFactorAnalyzers:
        """Train root and children and return the flattened model.

        Args:
            data: training rows: a floating tensor ``[N, D]`` or a map-style ``Dataset`` of
                rows ``[D]`` (or ``(row, label)`` tuples), read in row order; children get the
                rows of their root component (a ``Subset`` of a dataset).
            validation: optional held-out rows (same forms), scored by the root's and the
                final EM's history.
            checkpoint_dir: folder for ``root.pt``, ``child-#####.pt`` and ``model.pt``; what
                it already holds is loaded (it must come from the same configuration and
                data) and the fit continues at the first unfinished child.
            callbacks: ``cb(trainer, record)`` after the root, after each child (once its
                checkpoint is written) and after the final model; an exception raised there
                stops the fit, which can then be resumed from ``checkpoint_dir``.
            device: where the root and children are fitted unless ``root_em.device`` /
                ``child_em.device`` say otherwise (default: ``data``'s device, the CPU for a
                dataset).
            root: the root's starting model (the config's ``K₁``, ``L``, noise and floor; a
                run's model, seeded by the run's ``seed``), copied in the data's dtype; default:
                a new one seeded with ``config.seed``; unused once ``root.pt`` is saved.

        Returns:
            The flattened :class:`MixtureOfFactorAnalyzers` (also in :attr:`model`), on the
            device and in the dtype of the children.
        """
        cfg = self.config
        n_rows, n_features, dtype = check_rows(data)
        if n_rows < cfg.root_components:
            raise ValueError(f"data has {n_rows} rows, fewer than root_components="
                             f"{cfg.root_components}")
        if cfg.n_factors > n_features:
            raise ValueError(f"HierarchicalConfig.n_factors={cfg.n_factors} exceeds the "
                             f"{n_features} features of the data")
        if validation is not None:
            _, val_features, _ = check_rows(validation, "validation")
            if val_features != n_features:
                raise ValueError(f"validation has {val_features} features, data {n_features}")
        # where fresh models live; every stage's device checked before any work
        home, root_device, child_device = stage_devices(cfg, device, data)
        folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
        fingerprint = self._fingerprint()
        self.history, self.children, self.model, self.fitted = [], [], None, {}

        # ---- root
        started = time.perf_counter()
        root_path = folder / "root.pt" if folder is not None else None
        saved = self._stage_file(root_path, "root", n_features, dtype)
        if saved is not None:
            self.root, state = saved
            self.root.to(root_device)
            saved_counts, trainer = state.get("counts"), None
            self.fitted[("root", None)] = state.get("record")
        else:
            saved_counts, trainer = None, self._em(cfg.root_em, cfg.seed)
            root = self._start_root(root, n_features, dtype, home)
            self.root = self._fit_stage("root", trainer, root, n_rows, data, validation)
        record = {"stage": "root", "rows": n_rows, "n_components": self.root.n_components,
                  "resumed": saved is not None, **_summary(trainer)}
        labels = assign_rows(self.root, data, cfg.assign_batch_size)  # [N]
        self.counts = torch.bincount(labels, minlength=cfg.root_components)  # [K₁]
        if saved_counts is not None and not torch.equal(saved_counts, self.counts):
            raise ValueError(
                f"{root_path} was fitted to other data: its rows per root component "
                f"{saved_counts.tolist()} differ from this data's {self.counts.tolist()}"
            )
        record["seconds"] = time.perf_counter() - started
        if root_path is not None and not record["resumed"] and distributed.is_main_process():
            save_checkpoint(root_path, self.root, trainer_state={
                "config": fingerprint, "counts": self.counts, "n_rows": n_rows,
                "record": record})
        self._emit(record, callbacks)

        # ---- children, one after another
        self.kept = torch.zeros(cfg.root_components, dtype=torch.bool)
        for k in range(cfg.root_components):
            started = time.perf_counter()
            rows_k = int(self.counts[k])
            n_k = child_components(rows_k, cfg)
            self.kept[k] = n_k == 0
            path = folder / f"child-{k:05d}.pt" if folder is not None else None
            trainer, stage = None, f"child {k + 1}/{cfg.root_components}"
            saved = self._stage_file(path, f"child {k}", n_features, dtype)
            if saved is not None:
                child, state = saved
                found = (state.get("component"), state.get("rows"), child.n_components)
                if found != (k, rows_k, n_k or 1):  # (swapped files gave another model)
                    raise ValueError(
                        f"{path} holds the child of root component {found[0]} ({found[1]} "
                        f"rows, {found[2]} components), not that of component {k} ({rows_k} "
                        f"rows, {n_k or 1}): the folder's files were renamed or mixed; use it "
                        "as written or an empty checkpoint_dir")
                resumed, self.fitted[("child", k)] = True, state.get("record")
            else:
                resumed = False
                if n_k == 0:
                    child = _component_as_model(self.root, k)
                    logger.info("%s: %d rows < min_child_rows: root component %d kept as it is",
                                stage, rows_k, k)
                else:
                    seed = _child_seed(cfg.seed, k)
                    child = MixtureOfFactorAnalyzers(
                        n_k, n_features, cfg.n_factors, cfg.noise, dtype=dtype,
                        min_noise=cfg.min_noise, generator=torch.Generator().manual_seed(seed),
                        device=home,
                    )
                    index = (labels == k).nonzero().flatten()  # [rows_k]
                    trainer = self._em(cfg.child_em, seed)
                    try:
                        self._fit_stage(stage, trainer, child, rows_k, rows_of(data, index))
                    except (FloatingPointError, ValueError) as error:
                        raise type(error)(
                            f"child of root component {k} ({rows_k} rows, {n_k} components): "
                            f"{error}") from error
            record = {"stage": "child", "component": k, "rows": rows_k,
                      "n_components": child.n_components, "kept": n_k == 0,
                      "resumed": resumed, **_summary(trainer),
                      "seconds": time.perf_counter() - started}
            if not resumed and path is not None and distributed.is_main_process():
                save_checkpoint(path, child, trainer_state={
                    "config": fingerprint, "component": k, "rows": rows_k, "record": record})
            self.children.append(child.to(child_device))
            self._emit(record, callbacks)

        # ---- flatten (and optionally a few EM iterations on the flat model)
        started = time.perf_counter()
        final_path = folder / "model.pt" if folder is not None else None
        saved = self._stage_file(final_path, "model", n_features, dtype)
        if saved is not None:
            self.model = saved[0]
            self.model.to(torch.device(cfg.final_em.device or child_device)
                          if cfg.final_em is not None else child_device)
            resumed, trainer, self.fitted[("final", None)] = True, None, saved[1].get("record")
        else:
            resumed, trainer = False, None
            self.model = flatten_hierarchy(self.root, self.children)
            if cfg.final_em is not None:
                trainer = self._em(cfg.final_em, cfg.seed)
                self._fit_stage("final", trainer, self.model, n_rows, data, validation)
        record = {"stage": "final", "rows": n_rows, "n_components": self.model.n_components,
                  "resumed": resumed, **_summary(trainer), "seconds": time.perf_counter() - started}
        if not resumed and final_path is not None and distributed.is_main_process():
            save_checkpoint(final_path, self.model, trainer_state={"config": fingerprint,
                                                                   "record": record})
        self._emit(record, callbacks)
        return self.model

    def _fit_stage(self, stage: str, trainer: EMTrainer, model: MixtureOfFactorAnalyzers,
                   rows: int, data: Tensor | Dataset, validation=None) -> MixtureOfFactorAnalyzers:
        """``trainer.fit(model, data, validation)`` of ``stage`` (``"root"``, ``"child 2/3"``,
        ``"final"``), logged before it starts; its warnings name it at their end (as ``"EM run 1/1:
        stopped at max_iter=... [child 2/3]"``)."""
        logger.info("%s: %d rows, %d component%s", stage, rows, model.n_components,
                    "" if model.n_components == 1 else "s")
        with training.stage_warnings(stage):
            return trainer.fit(model, data, validation=validation)

    def _start_root(self, start: MixtureOfFactorAnalyzers | None, n_features: int,
                    dtype: torch.dtype, device: torch.device) -> MixtureOfFactorAnalyzers:
        """The root before its EM: ``start`` in ``dtype`` on ``device``, or seeded anew."""
        cfg = self.config
        wanted = (cfg.root_components, n_features, cfg.n_factors, cfg.noise, cfg.min_noise)
        if start is None:
            return MixtureOfFactorAnalyzers(*wanted[:4], dtype=dtype, min_noise=cfg.min_noise,
                                            generator=torch.Generator().manual_seed(cfg.seed),
                                            device=device)
        found = tuple(getattr(start, name) for name in ("n_components", "n_features",
                                                        "n_factors", "noise", "min_noise"))
        if found != wanted:
            raise ValueError(f"the root's starting model has (K, D, L, noise, min_noise) = "
                             f"{found}; the config and data give {wanted}")
        return MixtureOfFactorAnalyzers.from_raw_parameters(
            *(p.detach().to(dtype=dtype, device=device, copy=True) for p in
              (start.logits, start.loc, start.loadings, start.raw_noise)),
            noise=start.noise, min_noise=start.min_noise, chunk_elements=start.chunk_elements)

    def _emit(self, record: dict, callbacks: Sequence[Callback]) -> None:
        self.history.append(record)
        for callback in callbacks:
            callback(self, record)


def fit_hierarchical(
    data: Tensor | Dataset,
    config: HierarchicalConfig | None = None,
    validation: Tensor | Dataset | None = None,
    *,
    checkpoint_dir: str | Path | None = None,
) -> MixtureOfFactorAnalyzers:
    """``HierarchicalTrainer(config).fit(data, validation, checkpoint_dir=...)``: the
    flattened model of ``Σ_k n_k`` components (see :class:`HierarchicalTrainer`)."""
    return HierarchicalTrainer(config).fit(data, validation, checkpoint_dir=checkpoint_dir)
