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


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny problems: intra-op threads only add overhead, and on a shared
    2-core machine OpenMP's spin-waits make small linalg calls ~100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_tf32():
    """IEEE float32 products on the GPU for the duration of a test (the CUDA tests compare
    float32 results with the CPU's)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before
