"""Single input values, checked where they enter: argparse types for numbers, seeds and thread counts.

The bottom layer (beside errors.py), so that every layer that declares options (training's TrainOptions,
the CLI's parsers) can share them. A bad value becomes argparse's one-line error (`ctc-drafter: error:
argument --bs: ...`, exit 2) before any model loads; each message names the rule that failed. The caps
are resource limits, not tuning advice.
"""

from __future__ import annotations

import argparse
import math
from typing import Callable

from .errors import CTCDrafterError

MAX_SEED = 2**62  # torch generators take 64-bit seeds; eval adds 1000 * choice + turn to the seed


def int_in(low: int, high: int | None = None, what: str = ""):
    """argparse type: an integer in [low, high]."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < low or (high is not None and v > high):
            bound = f"between {low} and {high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"{v} is out of range: must be {bound}{what}")
        return v
    return parse


def finite_float(low: float | None = None, high: float | None = None, low_open: bool = False):
    """argparse type: a finite float in [low, high] ((low, high] with low_open)."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        too_low = low is not None and (v <= low if low_open else v < low)
        if too_low or (high is not None and v > high):
            lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
            hi = "" if high is None else f"<= {high:g}"
            raise argparse.ArgumentTypeError(f"{v:g} is out of range: must be {' and '.join(x for x in (lo, hi) if x)}")
        return v
    return parse


def threads(text: str):
    """--threads: 'auto' or a positive thread count."""
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a positive integer, got {text!r}")
    return n


def accepted_by(check: Callable[[str], object]):
    """argparse type: the text itself, once `check(text)` accepts it; the CTCDrafterError it raises
    otherwise becomes argparse's one-line error. (The rules stay with the layer that owns them, e.g.
    models/base.py's resolve_device, which the Python API applies too.)"""
    def parse(text: str) -> str:
        try:
            check(text)
        except CTCDrafterError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return text
    return parse
