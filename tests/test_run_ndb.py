"""mfa.run_ndb: the NDB of ``mfa evaluate``, its bins fitted on a seeded subset of a large
training split without a float copy of the whole split."""

from __future__ import annotations

import pytest
import torch
from helpers import random_model

from mfa import run_ndb
from mfa.data import load_dataset
from mfa.data.image_data import ImageData
from mfa.ndb import NDB


@pytest.fixture(scope="module")
def digits():
    return load_dataset("embedded-mnist", dequantize=True, seed=1, limit=300)


def test_a_small_training_split_is_binned_whole(digits):
    assert torch.equal(run_ndb.training_rows(digits, seed=0), digits.train)


def test_a_large_training_split_is_subset_without_a_whole_float_copy(digits, monkeypatch):
    """Above TRAIN_VALUES the bins are fitted on a seeded subset of TRAIN_VALUES // D rows,
    the same rows (with the same dequantisation noise) as the whole split's, and no float
    copy of the whole split is made (CelebA's was 8.0 GB)."""
    whole = digits.train
    n, d = whole.shape
    monkeypatch.setattr(run_ndb, "TRAIN_VALUES", 50 * d + 7)
    copies = []
    as_float = ImageData.as_float

    def spy(self, split, **kwargs):
        copies.append(split)
        return as_float(self, split, **kwargs)

    monkeypatch.setattr(ImageData, "as_float", spy)
    rows = run_ndb.training_rows(digits, seed=4)
    assert copies == [] and rows.shape == (50, d)
    # which rows: 50 distinct rows of the split, seeded
    index = {bytes(row.numpy()): i for i, row in enumerate(whole)}
    picked = [index[bytes(row.numpy())] for row in rows]
    assert len(set(picked)) == 50 and picked == sorted(picked)
    assert torch.equal(run_ndb.training_rows(digits, seed=4), rows)
    assert not torch.equal(run_ndb.training_rows(digits, seed=5), rows)
    # the metrics: bins fitted on those rows, n1 recorded
    model = random_model(3, d, 2, seed=7).float()
    got = run_ndb.ndb_metrics(model, digits, "test", 5, seed=4)
    assert got["ndb_train_rows"] == 50 and got["ndb_bins"] == 5
    bins = NDB.fit(rows, 5, seed=4)
    real = bins.evaluate(as_float(digits, "test"))
    assert (got["ndb_real"], got["ndb_js_real"]) == (real.ndb,
                                                      pytest.approx(real.js_divergence))
    # more bins than the rows they are fitted on: named before any work
    with pytest.raises(ValueError, match="--ndb-bins 51 must be between 1 and the 50 "):
        run_ndb.held_out_split(digits, ("test",), 51)
    assert run_ndb.held_out_split(digits, ("train", "val"), 50) == "val"
