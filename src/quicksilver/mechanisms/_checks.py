"""Validation helpers shared by the mechanism dataclasses: one clear sentence per bad setting."""

from __future__ import annotations

from ..errors import QuicksilverError


def check_choice(owner: str, name: str, value, choices) -> None:
    if value not in choices:
        raise QuicksilverError(f"{owner}.{name} must be one of {', '.join(map(str, choices))}, got {value!r}")


def check_range(owner: str, name: str, value, lo=None, hi=None, integer: bool = False, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if integer and (not isinstance(value, int) or isinstance(value, bool)):
        raise QuicksilverError(f"{owner}.{name} must be an integer, got {value!r}")
    if not integer and (not isinstance(value, (int, float)) or isinstance(value, bool)):
        raise QuicksilverError(f"{owner}.{name} must be a number, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        span = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise QuicksilverError(f"{owner}.{name} must be {span}, got {value!r}")
