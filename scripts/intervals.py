"""Mean and 95% interval of a few runs (Student's t), and whether a floor is kept by the interval.

Used by the studies: a figure from one run is noise as often as not, so every utility number is a
mean over seeds with its interval, and a floor counts as kept only when the interval's lower end
keeps it.
"""

from __future__ import annotations

import math
from statistics import mean, stdev

# two-sided 95% quantiles of Student's t by degrees of freedom (beyond 30: the normal's 1.96)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
        10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}  # fmt: skip


def t95(df: int) -> float:
    """The two-sided 95% t quantile for `df` degrees of freedom (the next tabulated df down)."""
    if df < 1:
        raise ValueError("an interval needs at least two runs")
    return _T95[max(d for d in _T95 if d <= df)] if df <= 30 else 1.96


def interval(values: list[float]) -> dict:
    """{'n', 'mean', 'low', 'high', 'values'}: the mean and its 95% t-interval (one run: no interval)."""
    vals = [float(v) for v in values]
    m = mean(vals)
    if len(vals) < 2:
        return {"n": len(vals), "mean": m, "low": None, "high": None, "values": vals}
    half = t95(len(vals) - 1) * stdev(vals) / math.sqrt(len(vals))
    return {"n": len(vals), "mean": m, "low": m - half, "high": m + half, "values": vals}


def kept(iv: dict, floor: float) -> bool | None:
    """Whether the interval's lower end keeps `floor` (None with a single run: not certified)."""
    return None if iv["low"] is None else iv["low"] >= floor


def fmt(iv: dict, scale: float = 1.0, digits: int = 1, unit: str = "", signed: bool = False) -> str:
    """'72.1% [68.0, 76.2]' style text for tables; `signed` puts a sign on the mean (differences)."""
    f = lambda v, sign="": f"{scale * v:{sign}.{digits}f}"  # noqa: E731
    mean = f(iv["mean"], "+" if signed else "")
    if iv["low"] is None:
        return f"{mean}{unit} (n=1)"
    return f"{mean}{unit} [{f(iv['low'])}, {f(iv['high'])}]"
