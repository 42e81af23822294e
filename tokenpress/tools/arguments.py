"""argparse value types of the command line: a value out of range is refused in one line (exit 2)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def whole_number(minimum: int) -> Callable[[str], int]:
    """argparse type: an integer >= ``minimum`` (a seed or a count below it is refused in one line)."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {number}")
        return number

    return parse


#: argparse types: counts of at least one, and counts or seeds of at least zero.
positive_int = whole_number(1)
non_negative_int = whole_number(0)


def positive_float(value: str) -> float:
    """argparse type: a finite number > 0 (a learning rate)."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not (number > 0 and math.isfinite(number)):
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {value}")
    return number
