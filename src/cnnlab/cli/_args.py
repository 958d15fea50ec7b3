"""argparse types for number arguments: a bad value fails as an argument error naming the flag, before any work.

Kept free of torch imports so that building the parser (``--help``) stays fast.
"""
from __future__ import annotations

import argparse
import math


def finite_float(text: str) -> float:
    """``type=`` for float options: argparse's ``float`` accepts 'nan', 'inf' and '1e400', which no setting can use."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number (no NaN or infinity)")
    return value

