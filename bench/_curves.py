"""Held-out accuracy curves of the benches: when a run first reaches a target.

A curve is [(seconds, accuracy)] in time order, one point per evaluation. Imported by the bench
scripts, which run as `python bench/NAME.py` (their own directory is then on sys.path).
"""

from __future__ import annotations

Curve = list[tuple[float, float]]


def time_to(curve: Curve, target: float) -> float | None:
    """Seconds of the first evaluation at or above `target` (None: never reached)."""
    return next((t for t, acc in curve if acc >= target - 1e-9), None)


def time_to_stay(curve: Curve, target: float) -> float | None:
    """Seconds of the first evaluation from which every later one is at or above `target` (a
    single lucky evaluation does not count; None: the run ends below it)."""
    stay = None
    for t, acc in curve:
        if acc >= target - 1e-9:
            stay = t if stay is None else stay
        else:
            stay = None
    return stay
