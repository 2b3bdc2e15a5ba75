"""Small statistics used in metrics: pure functions over plain lists."""

from __future__ import annotations


def mean(values) -> float | None:
    """The mean of the values that are not None (None when there are none)."""
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def pearson(x: list[float], y: list[float]) -> float | None:
    """r = sum((x - mean x)(y - mean y)) / sqrt(sum((x - mean x)^2) sum((y - mean y)^2)); None
    with fewer than 2 points or a constant series."""
    n = len(x)
    if n != len(y):
        raise ValueError(f"pearson: {n} x values but {len(y)} y values")
    if n < 2:
        return None
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return None
    return sxy / (sxx * syy) ** 0.5
