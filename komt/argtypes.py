"""The `type=` of every numeric command-line flag: a number in a range, or argparse's one-line error.

    p.add_argument("--batch-size", type=positive_int)              # 1, 2, ...
    p.add_argument("--top-p", type=number(0, 1, low_open=True))    # (0, 1]

argparse prefixes the flag (`argument --batch-size: must be a positive integer, got '0'`), so the
messages do not repeat it. Floats must be finite: `nan` and `inf` are refused whatever the range.
"""

from __future__ import annotations

import argparse
import math
from typing import Callable


def integer(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    """An integer in [low, high] (an end that is None is open)."""
    if low == 1 and high is None:
        what = "a positive integer"
    elif low == 0 and high is None:
        what = "a non-negative integer"
    elif high is None:
        what = f"an integer >= {low}"
    else:
        what = f"an integer in [{low}, {high}]"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    return parse


positive_int = integer(1)
non_negative_int = integer(0)


def number(low: float = -math.inf, high: float = math.inf, *, low_open: bool = False,
           high_open: bool = False) -> Callable[[str], float]:
    """A finite float in [low, high], or with an open end: `number(0, 1, high_open=True)` is [0, 1)."""
    span = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open or high == math.inf else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (math.isfinite(value) and above and below):
            raise argparse.ArgumentTypeError(f"must be a number in {span}, got {text!r}")
        return value

    return parse
