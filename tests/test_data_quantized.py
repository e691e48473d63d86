"""Tests of mfa.data.quantized: uint8 rows made float per batch, their hashed dequantisation
noise, and their use as data by the streaming helpers (batches, initialisation rows, shards)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mfa import MixtureOfFactorAnalyzers, distributed
from mfa._data_stream import DataSource, gather_rows
from mfa.data import QuantizedRows, load_dataset, pixels_to_float
from mfa.data.quantized import hashed_uniform


def pixels(n=300, d=40, seed=0) -> torch.Tensor:
    return torch.randint(0, 256, (n, d), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dequantize", [False, True])
def test_batches_equal_the_whole_set_converted_up_front(dequantize):
    rows = QuantizedRows(pixels(), dequantize=dequantize, seed=7, stream=1)
    whole = rows[0:300]  # [300, 40]
    for size in (1, 7, 64, 300):
        assert torch.equal(torch.cat([rows[i : i + size] for i in range(0, 300, size)]), whole)
    index = torch.randperm(300, generator=torch.Generator().manual_seed(1))[:50]
    assert torch.equal(rows[index], whole[index])
    assert torch.equal(rows[torch.tensor([-1])], whole[-1:])
    sub = rows.subset(index)  # uint8 rows that keep their own noise
    assert sub.pixels.dtype == torch.uint8 and torch.equal(sub[0:50], whole[index])
    assert torch.equal(sub[torch.tensor([3, 0])], whole[index[[3, 0]]])
    assert torch.equal(rows.to("cpu", torch.float64)[0:300].float(), whole)


def test_noise_key_parts_must_be_ints():
    """seed, stream and epoch went through int(): 1.5 ran as 1, "1" as 1, True as 1 (where
    load_dataset and NDB refuse 1.5), and a negative stream or epoch was taken."""
    p = pixels(3, 4)
    for name, bad in [("seed", 1.5), ("seed", "1"), ("seed", True), ("stream", 1.0),
                      ("epoch", 0.9), ("epoch", True)]:
        with pytest.raises(TypeError, match=f"{name} must be an int"):
            QuantizedRows(p, dequantize=True, **{name: bad})
    for name in ("stream", "epoch"):
        with pytest.raises(ValueError, match=f"{name} must be >= 0, got -1"):
            QuantizedRows(p, dequantize=True, **{name: -1})
    # numpy integers, and a negative seed (load_dataset takes one), run as their ints
    a = QuantizedRows(p, dequantize=True, seed=np.int64(-3), stream=np.int32(1), epoch=np.int64(2))
    assert type(a.seed) is int and type(a.epoch) is int
    assert torch.equal(a[0:3], QuantizedRows(p, dequantize=True, seed=-3, stream=1, epoch=2)[0:3])


def test_plain_rows_are_pixel_over_255():
    p = pixels()
    assert torch.equal(QuantizedRows(p)[0:300], pixels_to_float(p))
    data = load_dataset("embedded-mnist", limit=40, seed=1)
    assert torch.equal(data.quantized("val", dequantize=False)[0:40], data.as_float("val"))


def test_dequantised_rows_lie_in_their_pixel_bins_with_uniform_noise():
    p = pixels(2000, 300)
    x = QuantizedRows(p, dequantize=True, seed=3, dtype=torch.float64)[0:2000]  # [2000, 300]
    u = x * 256 - p.double()  # exact in float64
    assert (u >= 0).all() and (u < 1).all()
    # float32 keeps 24 bits of p + u, but a value never rounds up into the next level
    x32 = QuantizedRows(p, dequantize=True, seed=3)[0:2000]
    assert (x32.double() - x).abs().max() <= 2.0**-24
    x32, levels = x32.double(), p.double()
    assert ((x32 >= levels / 256) & (x32 < (levels + 1) / 256)).all()
    white = QuantizedRows(torch.full((4000, 1000), 255, dtype=torch.uint8), dequantize=True)
    assert white[0:4000].max() < 1  # (without the bound: 20 values of exactly 1.0)
    for half in (torch.float16, torch.bfloat16):  # 24-bit noise must not overflow them
        u_half = hashed_uniform(torch.arange(2000), 300, 5, half)
        assert u_half.dtype == half and (u_half >= 0).all() and (u_half < 1).all(), half
    assert abs(u.mean().item() - 0.5) < 3e-3  # 6e5 draws: standard error 3.7e-4
    assert abs(u.var().item() - 1 / 12) < 1e-3
    counts = torch.histc(u, bins=16, min=0, max=1)
    expected = u.numel() / 16
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 50  # 15 degrees of freedom: 50 is far in the tail
    c = u - 0.5
    for a, b in ((c[:, 1:], c[:, :-1]), (c[1:], c[:-1])):  # neighbouring columns, rows
        corr = (a * b).mean() / (a.std() * b.std())
        assert abs(corr.item()) < 0.01


def test_noise_depends_on_seed_stream_and_epoch_only():
    p = pixels()
    base = QuantizedRows(p, dequantize=True, seed=5, stream=1)[0:300]
    assert torch.equal(QuantizedRows(p, dequantize=True, seed=5, stream=1)[0:300], base)
    for other in ({"seed": 6, "stream": 1}, {"seed": 5, "stream": 2},
                  {"seed": 5, "stream": 1, "epoch": 1}):
        changed = QuantizedRows(p, dequantize=True, **other)[0:300]
        assert (changed != base).float().mean() > 0.99


def test_pinned_noise_values():
    """The hash is integer arithmetic: the same 24-bit noise on every device and build (a
    changed hash changes every dequantised run, so it must be deliberate)."""
    rows = QuantizedRows(torch.zeros(2, 3, dtype=torch.uint8), dequantize=True, seed=0)
    u = (rows[0:2].double() * 256 * 2**24).round().long()  # u · 2²⁴
    assert u.tolist() == [[2927701, 7535849, 378484], [2762691, 5074688, 1564565]]


def test_image_data_quantized_keys_the_noise_by_split():
    data = load_dataset("embedded-mnist", limit=40, seed=1, dequantize=True)
    train, val = data.quantized("train"), data.quantized("val")
    assert train.dequantize and train.stream != val.stream and train.seed == 1
    x = train[0:len(train)]
    p = data.train_pixels.double()
    assert ((x.double() >= p / 256) & (x.double() <= (p + 1) / 256)).all()


def test_bad_input_is_refused():
    with pytest.raises(TypeError, match="uint8"):
        QuantizedRows(torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"shape \[N, D\]"):
        QuantizedRows(torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(TypeError, match="floating-point"):
        QuantizedRows(pixels(), dtype=torch.int32)
    with pytest.raises(ValueError, match="row_ids"):
        QuantizedRows(pixels(), row_ids=torch.arange(5))
    with pytest.raises(TypeError, match="1-d int64 tensor"):
        QuantizedRows(pixels())[3]
    model = MixtureOfFactorAnalyzers(2, 41, 1)
    with pytest.raises(ValueError, match="41 features"):
        DataSource(QuantizedRows(pixels()), model, 32)


def test_data_source_streams_quantized_rows_like_their_float_tensor(monkeypatch):
    rows = QuantizedRows(pixels(301), dequantize=True, seed=2)
    model = MixtureOfFactorAnalyzers(2, 40, 1).double()
    whole = rows.to(dtype=torch.float64)[0:301]  # made float in the model's dtype
    assert (whole - rows[0:301].double()).abs().max() <= 2.0**-24
    source = DataSource(rows, model, 32)
    batches = list(source)
    assert all(b.dtype == torch.float64 for b in batches)
    assert torch.equal(torch.cat(batches), whole)
    # initialisation rows: the same seeded subset as from the float tensor
    floats = DataSource(whole, model, 32)
    assert torch.equal(gather_rows(source, 100, seed=4), gather_rows(floats, 100, seed=4))
    assert torch.equal(gather_rows(source, 1000, seed=4), whole)
    # under torch.distributed each rank streams its shard_range, as for a tensor
    monkeypatch.setattr(distributed, "is_active", lambda: True)
    monkeypatch.setattr(distributed, "get_world_size", lambda: 2)
    shards = []
    for rank in (0, 1):
        monkeypatch.setattr(distributed, "get_rank", lambda rank=rank: rank)
        sharded = DataSource(rows, model, 32, shard=True)
        tensor = DataSource(whole, model, 32, shard=True)
        got = torch.cat(list(sharded))
        assert torch.equal(got, torch.cat(list(tensor)))
        shards.append(got)
    assert torch.equal(torch.cat(shards), whole)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_rows_equal_cpu_rows():
    rows = QuantizedRows(pixels(500, 3000), dequantize=True, seed=9, stream=2)
    cuda = rows.to("cuda")
    assert cuda.pixels.device.type == "cuda"
    index = torch.arange(0, 500, 3)
    assert torch.equal(cuda[0:500].cpu(), rows[0:500])
    assert torch.equal(cuda[index].cpu(), rows[index])


def test_to_and_subset_keep_the_noise_epoch():
    """.to() and .subset() must carry the epoch: with epoch=0 the rows got another epoch's
    noise (a mean log-likelihood over rows.to(dtype=...) then scored other data)."""
    p = pixels(200, 16)
    rows = QuantizedRows(p, dequantize=True, seed=7, epoch=3, dtype=torch.float64)
    # not vacuous: epoch 3's noise is not epoch 0's
    epoch0 = QuantizedRows(p, dequantize=True, seed=7, dtype=torch.float64)[0:200]
    assert (rows[0:200] != epoch0).float().mean() > 0.99
    index = torch.randperm(200, generator=torch.Generator().manual_seed(2))[:60]
    moved, sub = rows.to(dtype=torch.float32), rows.subset(index)
    assert moved.epoch == sub.epoch == 3
    assert torch.equal(sub[0:60], rows[index])  # each row keeps its own epoch-3 noise
    direct = QuantizedRows(p, dequantize=True, seed=7, epoch=3, dtype=torch.float32)
    assert torch.equal(moved[0:200], direct[0:200])


def test_subset_of_a_subset_keeps_each_rows_noise():
    """A subset of a subset must key each row's noise by its row in the whole set (the
    validation rows EMTrainer holds out of a user's subset go through this); keyed by its
    place in the first subset, every row got another row's noise."""
    rows = QuantizedRows(pixels(100, 8), dequantize=True, seed=7, dtype=torch.float64)
    a = torch.arange(50, 100)
    b = torch.tensor([0, 5, 9, 49])
    twice = rows.subset(a).subset(b)
    assert torch.equal(twice[0:4], rows[a[b]])
    assert torch.equal(twice[torch.tensor([2])], rows[a[b[2:3]]])
    x, levels = twice[0:4], rows.pixels[a[b]].double()  # still in their own pixel bins
    assert ((x >= levels / 256) & (x < (levels + 1) / 256)).all()
