"""Argument checks at the API edge: each bad value becomes one `JaxttsError` line that names the
argument, the value and what is allowed. NumPy scalars are accepted wherever Python numbers are."""

from __future__ import annotations

import math
import numbers

from jaxtts.errors import JaxttsError

SEED_MAX = 2**32 - 1  # seeds are unsigned 32-bit (one PRNG key per row)


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def integer(name: str, value, *, low: int | None = None, high: int | None = None) -> int:
    """`value` as a Python int within [low, high] (bools and non-integral numbers refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise JaxttsError(f"{name} must be an integer, got {_show(value)}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise JaxttsError(f"{name} must be in {_range(low, high)}, got {value}")
    return value


def number(
    name: str,
    value,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """`value` as a finite Python float within the range (open ends where asked)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise JaxttsError(f"{name} must be a number, got {_show(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise JaxttsError(f"{name} must be a finite number, got {value}")
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        raise JaxttsError(f"{name} must be in {_range(low, high, low_open, high_open)}, got {value:g}")
    return value


def optional_number(name: str, value, **limits) -> float | None:
    return None if value is None else number(name, value, **limits)


def seed(value, name: str = "seed") -> int | None:
    """None (a random seed) or an integer in [0, 2**32 - 1]."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise JaxttsError(f"{name} must be an integer in [0, {SEED_MAX}] (unsigned 32-bit) or None, got {_show(value)}")
    if not 0 <= int(value) <= SEED_MAX:
        raise JaxttsError(f"{name} must be an integer in [0, {SEED_MAX}] (unsigned 32-bit), got {int(value)}")
    return int(value)


def boolean(name: str, value) -> bool:
    if not isinstance(value, (bool,)) and type(value).__name__ != "bool_":
        raise JaxttsError(f"{name} must be True or False, got {_show(value)}")
    return bool(value)


def _range(low, high, low_open=False, high_open=False) -> str:
    show = lambda v: str(v) if isinstance(v, int) else f"{v:g}"  # noqa: E731
    lo = "-inf" if low is None else show(low)
    hi = "inf" if high is None else show(high)
    return f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
