"""mfa._data_stream: what DataSource and gather_rows read from each kind of data (the
rows are compared with the data themselves, in the order they were given)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, TensorDataset

from mfa._data_stream import DataSource, gather_rows
from mfa.data import QuantizedRows


def _model(n_features: int):
    return SimpleNamespace(n_features=n_features, dtype=torch.float64,
                           device=torch.device("cpu"))


class _Items(Dataset):
    """Items of any shape: ``rows[i]`` reshaped to ``shape``."""

    def __init__(self, rows, shape):
        self.rows, self.shape = rows, shape

    def __len__(self):
        return self.rows.shape[0]

    def __getitem__(self, index):
        return self.rows[index].reshape(self.shape)


ROWS = torch.arange(60.0).reshape(10, 6) / 60


@pytest.mark.parametrize("shape", [(1, 6), (2, 3), (6,)])
def test_a_datasets_items_of_any_image_shape_are_rows(shape):
    """Only items that are batches of rows ([b, D], b > 1) are refused: a [1, D] item or a
    2-d image whose rows are not D features wide is one row."""
    source = DataSource(_Items(ROWS, shape), _model(6), batch_size=4)
    assert torch.equal(torch.cat(list(source)), ROWS.double())


def test_a_datasets_items_that_are_batches_are_refused():
    with pytest.raises(ValueError, match=r"yields batches of shape \(2, 6\), not rows of 6"):
        list(DataSource(_Items(ROWS.reshape(5, 12), (2, 6)), _model(6), batch_size=4))


def test_reading_a_dataset_leaves_the_global_random_state_alone():
    """A DataLoader without a generator draws its base seed from torch's global RNG: a fit
    on a Dataset moved the user's random state."""
    torch.manual_seed(0)
    list(DataSource(TensorDataset(ROWS), _model(6), batch_size=4))
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(3))


def test_gather_rows_of_a_tensor_with_max_rows_rows_keeps_their_order():
    source = DataSource(ROWS.double(), _model(6), batch_size=4)
    assert torch.equal(gather_rows(source, 10, seed=3), ROWS.double())
    fewer = gather_rows(source, 4, seed=3)  # a seeded subset of 4 distinct rows
    assert fewer.shape == (4, 6) and len({tuple(r.tolist()) for r in fewer}) == 4
    assert torch.equal(fewer, gather_rows(source, 4, seed=3))


def test_gather_rows_of_a_small_shuffled_loader_reads_its_dataset_in_order():
    """All the rows of a shuffled loader whose Dataset has at most max_rows: the Dataset's
    order, not the shuffle (which followed torch's global seed)."""
    loader = DataLoader(TensorDataset(ROWS), batch_size=4, shuffle=True)
    for seed in (0, 1):
        torch.manual_seed(seed)
        got = gather_rows(DataSource(loader, _model(6), batch_size=4), 100, seed=0)
        assert torch.equal(got, ROWS.double())


def test_gather_rows_reads_a_loader_through_its_own_collation():
    """A DataLoader whose collate_fn changes the rows (scales them here) is read as it
    yields them, not its Dataset's items."""
    def scaled(items):
        return torch.stack([item[0] for item in items]) * 2

    loader = DataLoader(TensorDataset(ROWS), batch_size=4, collate_fn=scaled)
    got = gather_rows(DataSource(loader, _model(6), batch_size=4), 100, seed=0)
    assert torch.equal(got, 2 * ROWS.double())


def test_gather_rows_of_a_loader_that_draws_some_rows_reads_what_it_draws():
    """A RandomSampler of 3 of the 10 rows: the 3 rows it yields, not all 10."""
    data = TensorDataset(ROWS)
    sampler = RandomSampler(data, num_samples=3, generator=torch.Generator().manual_seed(1))
    got = gather_rows(DataSource(DataLoader(data, batch_size=4, sampler=sampler), _model(6),
                                 batch_size=4), 100, seed=0)
    assert got.shape == (3, 6)
    assert all(any(torch.equal(row, r) for r in ROWS.double()) for row in got)


def test_a_loader_drawing_some_rows_each_pass_has_no_fixed_order():
    data = TensorDataset(ROWS)
    loader = DataLoader(data, batch_size=4, sampler=RandomSampler(data, num_samples=5))
    with pytest.raises(ValueError, match=r"draws its rows at random each pass"):
        DataSource(loader, _model(6), batch_size=4).in_fixed_order()
    fixed = DataSource(DataLoader(data, batch_size=4, shuffle=True), _model(6),
                       batch_size=4).in_fixed_order()
    assert torch.equal(torch.cat(list(fixed)), ROWS.double())


def test_quantized_rows_of_another_width_are_refused():
    pixels = torch.zeros(4, 5, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"must have 6 features per row, got QuantizedRows "
                                         r"of shape \(4, 5\)"):
        DataSource(QuantizedRows(pixels), _model(6), batch_size=4)


def test_a_non_finite_value_names_its_item_through_a_subset():
    """The error names the item of the Dataset under the Subset (the rows hold_out left)."""
    rows = ROWS.clone()
    rows[7, 2] = float("nan")
    subset = torch.utils.data.Subset(TensorDataset(rows), [9, 8, 7, 6, 5, 4])
    with pytest.raises(ValueError, match=r"batch 0, row 2 \(item 7 of the TensorDataset\), "
                                         r"feature 2"):
        list(DataSource(subset, _model(6), batch_size=4))
    subset = torch.utils.data.Subset(TensorDataset(rows), [0, 1, 2, 3, 4, 7])
    with pytest.raises(ValueError, match=r"batch 1, row 1 \(item 7 of the TensorDataset\)"):
        list(DataSource(subset, _model(6), batch_size=4))


def test_a_loader_through_a_batch_sampler_of_its_own_kind_has_no_fixed_order():
    """Only torch's BatchSampler is re-made over the rows in order: another batch sampler
    (a subclass here) may batch otherwise."""
    from torch.utils.data import BatchSampler

    class Pairs(BatchSampler):
        pass

    data = TensorDataset(ROWS)
    mine = DataLoader(data, batch_sampler=Pairs(RandomSampler(data), 2, False))
    with pytest.raises(ValueError, match="draws its rows at random each pass"):
        DataSource(mine, _model(6), batch_size=4).in_fixed_order()
    torchs = DataLoader(data, batch_sampler=BatchSampler(RandomSampler(data), 3, False))
    fixed = DataSource(torchs, _model(6), batch_size=4).in_fixed_order()
    assert [b.shape[0] for b in fixed] == [3, 3, 3, 1]
    assert torch.equal(torch.cat(list(fixed)), ROWS.double())


def test_with_missing_allowed_an_infinity_is_named_not_the_nans_before_it():
    rows = ROWS.clone()
    rows[0, 0] = rows[1, 1] = float("nan")
    rows[1, 4] = float("inf")
    with pytest.raises(ValueError, match=r"an infinite value .*: batch 0, row 1 \(item 1 of "
                                         r"the TensorDataset\), feature 4"):
        list(DataSource(TensorDataset(rows), _model(6), batch_size=4, allow_missing=True))


def test_a_datasets_labelled_batches_are_refused_too():
    data = TensorDataset(ROWS.reshape(5, 2, 6), torch.arange(5))
    with pytest.raises(ValueError, match=r"yields batches of shape \(2, 6\), not rows of 6"):
        list(DataSource(data, _model(6), batch_size=4))


def test_a_numpy_array_is_refused_with_the_conversion():
    numpy = pytest.importorskip("numpy")
    with pytest.raises(TypeError, match=r"data is a numpy array; convert it with "
                                        r"torch\.from_numpy\(data\)\.float\(\)"):
        DataSource(numpy.zeros((4, 6)), _model(6), batch_size=4)


def test_an_empty_iterable_is_refused():
    with pytest.raises(ValueError, match="^data is empty$"):
        list(DataSource([], _model(6), batch_size=4))
