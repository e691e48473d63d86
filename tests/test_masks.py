"""Tests of mfa.masks: the inpainting mask kinds, their layout, seeding and errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from mfa.masks import MASK_KINDS, make_mask, missing_mask


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------- masks


@pytest.mark.parametrize("c", [1, 3])
def test_half_masks_hide_the_right_half(c):
    h, w = 6, 8
    for kind, hidden_region in [
        ("top", (slice(0, 3), slice(None))),
        ("bottom", (slice(3, 6), slice(None))),
        ("left", (slice(None), slice(0, 4))),
        ("right", (slice(None), slice(4, 8))),
    ]:
        mask = make_mask(kind, (c, h, w), 2)
        assert mask.shape == (2, c * h * w) and mask.dtype == torch.bool
        pixels = mask.view(2, c, h, w)
        expected = torch.ones(h, w, dtype=torch.bool)
        expected[hidden_region] = False
        assert torch.equal(pixels, expected.expand(2, c, h, w)), kind
        assert (~mask).float().mean().item() == pytest.approx(0.5)


def test_center_mask_hides_the_central_half_side_square():
    mask = make_mask("center", (1, 8, 12), 1).view(8, 12)
    hidden = ~mask
    assert hidden.sum().item() == 4 * 6  # a quarter of the pixels
    rows, cols = hidden.nonzero(as_tuple=True)
    assert (rows.min().item(), rows.max().item()) == (2, 5)
    assert (cols.min().item(), cols.max().item()) == (3, 8)



@pytest.mark.parametrize("h, w, rows, cols", [(7, 7, (2, 4), (2, 4)), (3, 3, (1, 1), (1, 1)),
                                              (5, 9, (1, 2), (2, 5))])
def test_center_mask_is_centred_for_odd_sides(h, w, rows, cols):
    """Rows from H//4 put the square off centre on odd sides: rows 1-3 of 7, and the corner
    pixel of a 3×3 image."""
    hidden = ~make_mask("center", (1, h, w), 1).view(h, w)
    r, c = hidden.nonzero(as_tuple=True)
    assert (r.min().item(), r.max().item()) == rows
    assert (c.min().item(), c.max().item()) == cols
    assert hidden.sum().item() == (h // 2) * (w // 2)


@pytest.mark.parametrize("kind, shape", [("center", (1, 1, 8)), ("top", (1, 1, 5)),
                                         ("right", (3, 4, 1))])
def test_a_mask_that_hides_no_pixel_is_refused(kind, shape):
    with pytest.raises(ValueError, match=f"a '{kind}' mask of .* images hides no pixel"):
        make_mask(kind, shape, 1)

def test_random_mask_fraction_seed_and_channels():
    shape = (3, 10, 10)
    mask = make_mask("random", shape, 4, generator=gen(0), fraction=0.3)
    pixels = mask.view(4, 3, 10, 10)
    assert torch.equal(pixels[:, 0], pixels[:, 1]) and torch.equal(pixels[:, 0], pixels[:, 2])
    assert ((~pixels[:, 0]).flatten(1).sum(1) == 30).all()  # exactly 30 % per image
    assert not torch.equal(pixels[0], pixels[1])  # independent per image
    assert torch.equal(mask, make_mask("random", shape, 4, generator=gen(0), fraction=0.3))
    assert not torch.equal(mask, make_mask("random", shape, 4, generator=gen(1), fraction=0.3))
    assert torch.equal(make_mask("random", shape, 2), make_mask("random", shape, 2))  # seeded
    assert make_mask("random", shape, 2, fraction=0.0).all()
    assert not make_mask("random", shape, 2, fraction=1.0).any()


def test_make_mask_names_a_generator_that_is_not_one():
    """generator='x' failed inside torch.rand with a dump of its signatures."""
    for generator in ("x", 0):
        with pytest.raises(TypeError, match=r"generator must be a torch\.Generator or None, "
                                            rf"got {type(generator).__name__}"):
            make_mask("random", (1, 4, 4), 1, generator=generator)
    with pytest.raises(TypeError, match=r"generator must be a torch\.Generator"):
        make_mask("center", (1, 4, 4), 1, generator="x")  # (unused by the kind, still wrong)


def test_image_mask_black_is_hidden(tmp_path):
    picture = Image.new("L", (40, 20), 255)
    picture.paste(0, (0, 0, 20, 20))  # left half black
    path = tmp_path / "mask.png"
    picture.save(path)
    mask = make_mask("image", (3, 4, 6), 2, mask_image=path)
    expected = make_mask("left", (3, 4, 6), 2)
    assert torch.equal(mask, expected)
    assert torch.equal(make_mask("image", (3, 4, 6), 2, mask_image=picture.convert("RGB")), mask)



def test_sixteen_bit_image_mask_hides_below_half_its_range(tmp_path):
    """A 16-bit PNG was converted to 8-bit grey by clipping: every level from 128 of 65,535
    up counted as white, so a 25 % grey row was visible (in 8-bit it is hidden)."""
    levels = np.array([[0] * 6, [16384] * 6, [40000] * 6, [65535] * 6], dtype=np.uint16)
    path = tmp_path / "mask16.png"
    Image.fromarray(levels).save(path)
    with Image.open(path) as opened:
        assert opened.mode.startswith("I")  # what Pillow reads a 16-bit PNG as
    hidden = ~make_mask("image", (1, 4, 6), 1, mask_image=path).view(4, 6)
    assert hidden.all(1).tolist() == [True, True, False, False]
    eight = Image.fromarray((levels // 257).astype(np.uint8))
    assert torch.equal(make_mask("image", (1, 4, 6), 1, mask_image=eight), ~hidden.view(1, -1))

@pytest.mark.parametrize("mode", ["I", "I;16"])
def test_eight_bit_levels_in_an_integer_mode_are_read_as_eight_bit(mode):
    """convert("I") of an 8-bit picture (or Image.fromarray of int32 0/255) was read on the
    16-bit scale: white (255) fell below 32,768 and every pixel was hidden, silently."""
    levels = np.zeros((4, 6), dtype=np.uint8)
    levels[:, 3:] = 255
    picture = Image.fromarray(levels).convert(mode)
    assert picture.mode == mode
    hidden = ~make_mask("image", (1, 4, 6), 1, mask_image=picture).view(4, 6)
    assert torch.equal(hidden, torch.from_numpy(levels == 0))
    wide = Image.fromarray(np.full((4, 6), 70000, dtype=np.int32))
    with pytest.raises(ValueError, match=r"levels must lie in 0\.\.65535.*got 70000\.\.70000"):
        make_mask("image", (1, 4, 6), 1, mask_image=wide)


def test_image_mask_path_expands_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    Image.new("L", (6, 4), 0).save(tmp_path / "mask.png")
    assert not make_mask("image", (1, 4, 6), 2, mask_image="~/mask.png").any()


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        (("blob", (1, 4, 4), 1), {}, ValueError, r"kind must be one of .*'center'.*got 'blob'"),
        (("random", (1, 4, 4), 1), {"fraction": 1.5}, ValueError, r"fraction must be in \[0, 1\]"),
        (("random", (1, 4, 4), 1), {"fraction": True}, TypeError, r"fraction must be a real"),
        (("random", (1, 4, 4), 1), {"fraction": "0.5"}, TypeError, r"fraction must be a real"),
        (("image", (1, 4, 4), 1), {}, ValueError, r"needs mask_image"),
        (("image", (1, 4, 4), 1), {"mask_image": "/nonexistent/m.png"}, FileNotFoundError,
         r"m\.png does not exist"),
        (("top", (1, 4, 4), -1), {}, ValueError, r"n must be an int >= 0"),
    ],
)
def test_mask_errors(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        make_mask(*args, **kwargs)


def test_random_mask_takes_numpy_fractions():
    np = pytest.importorskip("numpy")
    gen = torch.Generator().manual_seed(0)
    mask = make_mask("random", (1, 4, 4), 2, gen, fraction=np.float32(0.5))
    assert mask.shape == (2, 16) and (~mask).sum(1).tolist() == [8, 8]


def test_mask_kinds_are_listed():
    assert set(MASK_KINDS) == {"center", "top", "bottom", "left", "right", "random", "image"}


def test_importing_the_config_and_the_cli_does_not_import_pil():
    """The mask names are needed by the config and the parser; PIL only by mask pictures."""
    code = ("import sys\n"
            "for module in ('mfa.masks', 'mfa.config', 'mfa.cli'):\n"
            "    __import__(module)\n"
            "    print(module, 'PIL' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["mfa.masks", "False", "mfa.config", "False", "mfa.cli",
                                   "False"]


def test_require_hidden_refuses_only_masks_that_hide_nothing():
    from mfa.masks import require_hidden

    some = make_mask("random", (1, 4, 4), 3, fraction=0.1)
    assert require_hidden(some, "random") is some
    with pytest.raises(ValueError, match="'random' mask hides no pixel: its fraction"):
        require_hidden(make_mask("random", (1, 4, 4), 3, fraction=0.01), "random")
    with pytest.raises(ValueError, match="'given' mask hides no pixel; inpainting"):
        require_hidden(torch.ones(2, 5, dtype=torch.bool), "given")


@pytest.mark.parametrize("top", [1.0, 255.0, 65535.0])
def test_a_float_mask_image_reads_its_own_range(top):
    """A mode-F picture (float levels, e.g. from a float array) hid every pixel: convert("L")
    made 0.0 and 1.0 grey levels 0 and 1, both below 128."""
    levels = np.full((4, 6), top, dtype=np.float32)
    levels[:, :3] = 0.0  # left half black
    picture = Image.fromarray(levels)
    assert picture.mode == "F"
    assert torch.equal(make_mask("image", (1, 4, 6), 2, mask_image=picture),
                       make_mask("left", (1, 4, 6), 2))
    levels[0, 0] = float("nan")
    with pytest.raises(ValueError, match="mask image levels must be finite"):
        make_mask("image", (1, 4, 6), 2, mask_image=Image.fromarray(levels))


def test_block_masks_hide_one_square_at_every_place_it_fits():
    """``missing_mask("block")`` on 2×5×7 images, side 3: each mask hides one 3×3 square in
    every channel, and over many draws its top-left corner takes each of the 3×5 places
    where the square fits (the last row and column are hidden too)."""
    c, h, w, b = 2, 5, 7, 3
    observed = missing_mask("block", (c, h, w), 300, torch.Generator().manual_seed(0),
                            block_size=b)
    corners = set()
    for row in observed:
        hidden = ~row.view(c, h, w)
        top, left = (int(i) for i in hidden[0].nonzero().min(0).values)
        square = torch.zeros(h, w, dtype=torch.bool)
        square[top:top + b, left:left + b] = True
        assert torch.equal(hidden, square.expand(c, h, w)), (top, left)
        corners.add((top, left))
    assert corners == {(i, j) for i in range(h - b + 1) for j in range(w - b + 1)}


def test_numpy_integer_counts_are_taken():
    """np.int64 counts were refused as "n must be an int >= 0, got np.int64(3)"."""
    from mfa.masks import missing_mask

    assert make_mask("center", (1, 4, 4), np.int64(3)).shape == (3, 16)
    gen = torch.Generator().manual_seed(0)
    mask = missing_mask("block", (1, 4, 4), np.int64(2), gen, block_size=np.int64(2))
    assert mask.shape == (2, 16) and int((~mask).sum()) == 8


def test_masks_of_no_images():
    """n = 0 failed in a reshape (a run with data.missing and an empty validation split)."""
    for kind in ("center", "bottom", "random"):
        assert make_mask(kind, (1, 4, 4), 0).shape == (0, 16)
    for kind, extra in (("random", {"rate": 0.25}), ("block", {"block_size": 2})):
        observed = missing_mask(kind, (3, 4, 4), 0, torch.Generator(), **extra)
        assert observed.shape == (0, 48) and observed.dtype == torch.bool
