"""NDB of a run's model on its data (``mfa evaluate --ndb-bins``).

The bins (:class:`mfa.ndb.NDB`) are fitted once on the training split's float rows, then the
model's samples (clamped to the pixel range ``[0, 1]``, the protocol of ``docs/results.md``)
and a held-out split of real images are each binned and tested against the training
proportions. A training split above :data:`TRAIN_VALUES` values (rows × features) fits them on
a seeded subset of ``TRAIN_VALUES // D`` of its rows, read without a float copy of the whole
split: CelebA's 162,770 training images at 64×64×3 were one 8.0 GB float32 tensor, the copy
``docs/data.md`` says a large set never gets (K-means reads its rows every iteration, so
streaming alone would not bound it). The subset's size is the tests' training sample size
``n1``, recorded as ``ndb_train_rows``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mfa.data import ImageData
from mfa.model import MixtureOfFactorAnalyzers
from mfa.ndb import NDB

__all__ = ["TRAIN_VALUES", "held_out_split", "ndb_metrics", "training_rows"]

#: The most values (rows × features) of training rows the bins are fitted on, as float32:
#: 1 GiB (``mfa.workflow.STREAM_ABOVE``, above which a run trains on uint8 rows made float per
#: batch).
TRAIN_VALUES = 2**28

def held_out_split(data: ImageData, splits, ndb_bins: int) -> str:
    """The split of real held-out images NDB compares with (the first of ``splits`` that is
    not train, else val, else test, whichever has images), with ``ndb_bins`` checked against
    the training images; ``ValueError`` naming the problem otherwise."""
    held = next((s for s in (*splits, "val", "test")
                 if s != "train" and data.pixels(s).shape[0] > 0), None)
    if held is None:
        raise ValueError(f"NDB needs real held-out images, but {data.name}'s val and test "
                         "splits are empty")
    n_train = data.pixels("train").shape[0]
    if not 1 <= ndb_bins <= min(n_train, TRAIN_VALUES // max(data.n_features, 1)):
        raise ValueError(f"--ndb-bins {ndb_bins} must be between 1 and the "
                         f"{min(n_train, TRAIN_VALUES // max(data.n_features, 1))} training "
                         "images the bins are fitted on")
    return held


def training_rows(data: ImageData, seed: int) -> Tensor:
    """The training rows ``[n, D]`` (float32) the bins are fitted on: every row up to
    :data:`TRAIN_VALUES` values, else a seeded subset of ``TRAIN_VALUES // D`` rows
    (:meth:`mfa.data.ImageData.seeded_rows`)."""
    return data.seeded_rows("train", max(1, TRAIN_VALUES // max(data.n_features, 1)), seed)


def ndb_metrics(model: MixtureOfFactorAnalyzers, data: ImageData, held: str, ndb_bins: int,
                seed: int) -> dict:
    """``mfa evaluate``'s NDB entries: the model's samples (as many as the ``held`` split's
    images, drawn with ``seed`` on the model's device) and the ``held`` images themselves,
    each against ``ndb_bins`` bins fitted with ``seed`` (:func:`training_rows`)."""
    train = training_rows(data, seed)
    bins = NDB.fit(train, ndb_bins, seed=seed)  # once, for both sample sets
    n_train = train.shape[0]
    del train
    reference = data.as_float(held)
    gen = torch.Generator(device=model.device).manual_seed(seed)
    with torch.no_grad():
        samples, _ = model.sample(reference.shape[0], generator=gen)
    # clamped to the pixel range, as docs/results.md's protocol (scripts/results.py)
    model_ndb = bins.evaluate(samples.float().clamp(0.0, 1.0).cpu())
    real_ndb = bins.evaluate(reference)
    return {
        "ndb_bins": ndb_bins, "ndb_reference": held, "ndb_train_rows": n_train,
        "ndb": model_ndb.ndb, "ndb_over_k": model_ndb.ndb_over_k,
        "ndb_js": model_ndb.js_divergence, "ndb_real": real_ndb.ndb,
        "ndb_over_k_real": real_ndb.ndb_over_k, "ndb_js_real": real_ndb.js_divergence,
    }
