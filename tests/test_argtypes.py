"""komt.argtypes: the numeric flag types every CLI uses, each value at and past its range's ends."""

from __future__ import annotations

import argparse

import pytest

from komt.argtypes import integer, non_negative_int, number, positive_int


@pytest.mark.parametrize("parse, good, bad, message", [
    (positive_int, ["1", "7"], ["0", "-1", "1.5", "two", ""], "must be a positive integer"),
    (non_negative_int, ["0", "3"], ["-1", "x"], "must be a non-negative integer"),
    (integer(0, 65535), ["0", "65535"], ["-1", "65536"], "must be an integer in [0, 65535]"),
    (integer(1024), ["1024"], ["1023"], "must be an integer >= 1024"),
    (number(0, low_open=True), ["1e-9", "3"], ["0", "-1", "inf", "nan", "hot"], "must be a number in (0, inf)"),
    (number(0), ["0", "2.5"], ["-0.1", "inf"], "must be a number in [0, inf)"),
    (number(0, 1, high_open=True), ["0", "0.99"], ["1", "-0.01", "nan"], "must be a number in [0, 1)"),
    (number(0, 1, low_open=True), ["1", "0.5"], ["0", "1.01"], "must be a number in (0, 1]"),
])
def test_values_in_range_parse_and_the_rest_name_the_range(parse, good, bad, message):
    for text in good:
        assert parse(text) == (int(text) if isinstance(parse(text), int) else float(text))
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError) as err:
            parse(text)
        assert str(err.value) == f"{message}, got {text!r}"
