"""Shared test setup: make ``tests/helpers.py`` importable and keep CPU runs predictable."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(autouse=True)
def _default_dtype_guard():
    """Fail loudly if a test leaks a changed default dtype into the others."""
    before = torch.get_default_dtype()
    yield
    assert torch.get_default_dtype() == before, "a test changed torch's default dtype"
