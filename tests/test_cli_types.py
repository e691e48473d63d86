"""The mfa command's argparse value types: each accepts its values and refuses the rest with
a message naming the problem."""

from __future__ import annotations

import argparse

import pytest

from mfa.cli_types import (
    dataset_name,
    finite,
    fraction,
    non_empty,
    non_negative_int,
    one_of_several,
    positive_int,
)


@pytest.mark.parametrize("parse, text, value", [
    (positive_int, "3", 3), (non_negative_int, "0", 0), (fraction, "0.25", 0.25),
    (fraction, "1", 1.0), (fraction, "0", 0.0), (finite, "-2.5", -2.5),
    (dataset_name, "Fashion-MNIST", "fashion-mnist"),
    (non_empty("a device"), "cpu", "cpu"),
    (one_of_several("--split", ("val", "test")), "val", "val"),
    (one_of_several("--components", parse=int), "3", 3),
])
def test_accepts(parse, text, value):
    assert parse(text) == value


@pytest.mark.parametrize("parse, text, message", [
    (positive_int, "0", "must be >= 1, got 0"),
    (non_negative_int, "-1", "must be >= 0, got -1"),
    (positive_int, "2.5", "expected an int, got '2.5'"),
    (positive_int, str(2**63), "must be below 2**63"),
    (fraction, "1.5", "must be in [0, 1], got 1.5"),
    (fraction, "half", "expected a number, got 'half'"),
    (finite, "nan", "must be a finite number, got nan"),
    (finite, "inf", "must be a finite number, got inf"),
    (dataset_name, "no-such-set", "no-such-set"),
    (non_empty("a device"), "", "is empty: give a device"),
    (non_empty("a PNG file"), "  ", "is empty: give a PNG file"),
    (one_of_several("--split", ("val", "test")), "x", "invalid choice: 'x' (choose from val, "
     "test)"),
    (one_of_several("--components", parse=int), "y", "expected an int, got 'y'"),
    (one_of_several("--components", parse=int), ".", "expected an int, got '.'; . is a path: "
     "give the run folder before --components, whose values take every word after it"),
    # a checkpoint file too, not only a run folder
    (one_of_several("--split", ("val", "test")), __file__, f"; {__file__} is a path: give the "
     "run folder before --split"),
])
def test_refuses_naming_the_problem(parse, text, message):
    with pytest.raises(argparse.ArgumentTypeError) as info:
        parse(text)
    assert message in str(info.value)
