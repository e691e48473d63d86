"""Tests of mfa.masks: the inpainting mask kinds, their layout, seeding and errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from PIL import Image

from mfa.masks import MASK_KINDS, make_mask


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


def test_image_mask_black_is_hidden(tmp_path):
    picture = Image.new("L", (40, 20), 255)
    picture.paste(0, (0, 0, 20, 20))  # left half black
    path = tmp_path / "mask.png"
    picture.save(path)
    mask = make_mask("image", (3, 4, 6), 2, mask_image=path)
    expected = make_mask("left", (3, 4, 6), 2)
    assert torch.equal(mask, expected)
    assert torch.equal(make_mask("image", (3, 4, 6), 2, mask_image=picture.convert("RGB")), mask)


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
