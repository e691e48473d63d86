"""Tests of mfa.hierarchical_rows: the rows a hierarchical fit reads (checks, batches in row
order, hard assignment to the root) against hand counts and a dense float64 reference."""

from __future__ import annotations

import pytest
import torch
from helpers import F64, gen, random_model
from torch.distributions import MultivariateNormal
from torch.utils.data import Dataset

from mfa.hierarchical_rows import assign_rows, check_rows, row_batches, rows_of


class Images(Dataset):
    """``n`` images ``[1, 2, 3]`` (row ``i`` holds ``i * 6 + 0..5``), as ``(image, label)``
    tuples when ``labelled``."""

    def __init__(self, n: int, labelled: bool = False, dtype: torch.dtype = F64) -> None:
        self.rows = torch.arange(n * 6, dtype=dtype).reshape(n, 1, 2, 3) / (n * 6)
        self.labelled = labelled

    def __len__(self) -> int:
        return self.rows.shape[0]

    def __getitem__(self, i: int):
        return (self.rows[i], i % 3) if self.labelled else self.rows[i]


def dense_labels(model, x: torch.Tensor) -> torch.Tensor:
    """``argmax_k log π_k + log N(x; μ_k, A_k A_kᵀ + diag d_k)`` in dense float64."""
    w = model.weights.detach().to(F64)
    mu = model.means.detach().to(F64)
    a = model.factor_loadings.detach().to(F64)
    d = model.noise_variance.detach().to(F64).reshape(w.shape[0], -1).expand_as(mu)
    covs = a @ a.transpose(-1, -2) + torch.diag_embed(d)
    joint = torch.stack([w[k].log() + MultivariateNormal(mu[k], covs[k]).log_prob(x.to(F64))
                         for k in range(w.shape[0])], -1)
    return joint.argmax(-1)


@pytest.mark.parametrize("labelled", [False, True])
def test_an_image_dataset_is_read_as_flat_rows_in_row_order(labelled):
    """A dataset of [C, H, W] images has D = C·H·W features, its batches are rows [B, D]
    in the dataset's order (the last batch shorter), labels dropped."""
    images = Images(7, labelled)
    assert check_rows(images) == (7, 6, F64)
    batches = list(row_batches(images, 3))
    assert [tuple(b.shape) for b in batches] == [(3, 6), (3, 6), (1, 6)]
    assert torch.equal(torch.cat(batches), images.rows.reshape(7, 6))
    subset = rows_of(images, torch.tensor([5, 1]))
    assert len(subset) == 2 and check_rows(subset) == (2, 6, F64)
    assert torch.equal(torch.cat(list(row_batches(subset, 4))), images.rows[[5, 1]].reshape(2, 6))


def test_tensor_batches_cover_every_row_once():
    x = torch.arange(14.0).reshape(7, 2)
    for size in (1, 2, 3, 6, 7, 8):
        batches = list(row_batches(x, size))
        assert [b.shape[0] for b in batches] == [min(size, 7 - i) for i in range(0, 7, size)]
        assert torch.equal(torch.cat(batches), x)
    assert torch.equal(rows_of(x, torch.tensor([6, 0])), x[[6, 0]])


def test_an_empty_dataset_and_a_tensor_not_n_by_d_are_refused():
    with pytest.raises(ValueError, match="data is empty"):
        check_rows(Images(0))
    with pytest.raises(TypeError, match=r"validation must be floating point.*got torch\.int64"):
        check_rows(torch.ones(3, 2, dtype=torch.long), "validation")
    with pytest.raises(ValueError, match=r"rows must have shape \[N, D\], got \(2, 3, 1\)"):
        check_rows(torch.ones(2, 3, 1), "rows")
    with pytest.raises(ValueError, match=r"data must have shape \[N, D\], got \(3,\)"):
        check_rows(torch.ones(3))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_assign_rows_is_the_most_likely_root_component_of_every_row(dtype):
    """Every row's label is the dense reference's argmax, whatever the batch size (a last
    batch of one row included) and whatever the data's dtype against the model's."""
    root = random_model(4, 3, 1, seed=3)
    x, _ = root.sample(9, generator=gen(1))
    expected = dense_labels(root, x)
    assert len(set(expected.tolist())) > 1  # (a test that can tell rows apart)
    for size in (2, 4, 9, 100):
        labels = assign_rows(root, x.to(dtype), batch_size=size)
        assert labels.dtype == torch.int64 and labels.device.type == "cpu"
        assert labels.tolist() == expected.tolist(), size
    dataset = Images(8)
    flat = dataset.rows.reshape(8, 6)
    image_root = random_model(3, 6, 2, seed=4)
    image_root.means.data.copy_(flat[[0, 4, 7]])  # (rows near each of three means)
    assert assign_rows(image_root, dataset, batch_size=3).tolist() == (
        dense_labels(image_root, flat).tolist())


def test_check_rows_names_the_first_non_finite_entry():
    x = torch.zeros(4, 3)
    x[2, 1], x[3, 0] = float("inf"), float("nan")
    with pytest.raises(ValueError, match=r"^validation contains non-finite values \(NaN or "
                                         r"inf\): row 2, feature 1$"):
        check_rows(x, "validation")
    assert check_rows(x[:2]) == (2, 3, torch.float32)
