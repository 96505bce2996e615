"""Uncertainty intervals of evaluation means: a percentile bootstrap (Efron 1979).

Every accuracy and perplexity the evaluation reports is a mean over a few trials or windows, so
two models can differ by noise alone. ``bootstrap_mean_interval`` resamples the values with
replacement ``resamples`` times and returns the ``(1 - level) / 2`` and ``(1 + level) / 2``
quantiles of the resampled means. With ``strata`` (one label per value) each stratum is
resampled within itself, keeping its size: a passkey length's mean over depths is resampled by
trials within each depth, so the depth mix never changes between resamples.

The draws are one vectorised index matrix ``[resamples, n]`` per stratum (in order of the
strata's first appearance) from ``np.random.default_rng(seed)``, so an interval is reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import numpy as np

DEFAULT_LEVEL = 0.95
DEFAULT_RESAMPLES = 2000


def check_interval_options(
    level: float,
    resamples: int,
    *,
    allow_zero: bool = True,
    level_name: str = "interval_level",
    resamples_name: str = "bootstrap_resamples",
) -> None:
    """Validate an interval level in (0, 1) and a resample count (>= 0, or >= 1).

    Args:
        level: the interval's coverage.
        resamples: the bootstrap resamples (0 allowed with ``allow_zero``: no intervals).
        level_name / resamples_name: the names the errors give them (argument or flag).

    Raises:
        ValueError: naming ``level_name`` or ``resamples_name``.
    """
    if isinstance(level, bool) or not isinstance(level, (int, float, np.number)):
        raise ValueError(f"{level_name} must be a number in (0, 1), got {level!r}")
    if not 0.0 < float(level) < 1.0:
        raise ValueError(f"{level_name} must be in (0, 1), got {level!r}")
    least = 0 if allow_zero else 1
    if isinstance(resamples, bool) or not isinstance(resamples, (int, np.integer)):
        raise ValueError(f"{resamples_name} must be an integer >= {least}, got {resamples!r}")
    if resamples < least:
        raise ValueError(f"{resamples_name} must be >= {least}, got {resamples!r}")


def resolve_options(
    result: object, level: float | None, resamples: int | None, seed: int | None
) -> tuple[float, int, int]:
    """``(level, resamples, seed)``: each given value, else ``result``'s ``interval_level``,
    ``bootstrap_resamples`` or ``bootstrap_seed``."""
    return (
        result.interval_level if level is None else level,  # type: ignore[attr-defined]
        result.bootstrap_resamples if resamples is None else resamples,  # type: ignore[attr-defined]
        result.bootstrap_seed if seed is None else seed,  # type: ignore[attr-defined]
    )


def bootstrap_mean_interval(
    values: Sequence[float],
    *,
    level: float = DEFAULT_LEVEL,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    strata: Sequence[Hashable] | None = None,
) -> tuple[float, float]:
    """Percentile-bootstrap interval ``(low, high)`` of the mean of ``values``.

    Args:
        values: the sample (non-empty, finite).
        level: coverage of the interval, in (0, 1).
        resamples: bootstrap resamples (>= 1).
        seed: seed of ``np.random.default_rng``.
        strata: optional label per value; values are resampled within their stratum, keeping
            every stratum's size, and the mean is over all values.

    Returns:
        ``(low, high)``; ``(v, v)`` for a single value.

    Raises:
        ValueError: naming ``values``, ``level``, ``resamples`` or ``strata``.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"values must be one-dimensional, got shape {x.shape}")
    if x.size == 0:
        raise ValueError("values must not be empty")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"values must be finite, got {x.tolist()!r}")
    check_interval_options(
        level, resamples, allow_zero=False, level_name="level", resamples_name="resamples"
    )
    if strata is not None:
        strata = list(strata)
        if len(strata) != x.size:
            raise ValueError(f"strata must have one label per value: {len(strata)} != {x.size}")
    if x.size == 1:
        return float(x[0]), float(x[0])
    rng = np.random.default_rng(seed)
    if strata is None:
        groups = [np.arange(x.size)]
    else:
        order: dict[Hashable, list[int]] = {}
        for i, label in enumerate(strata):
            order.setdefault(label, []).append(i)
        groups = [np.asarray(g) for g in order.values()]
    sums = np.zeros(resamples, dtype=np.float64)
    for g in groups:
        idx = rng.integers(0, g.size, size=(resamples, g.size))
        sums += x[g][idx].sum(axis=1)
    means = sums / x.size
    alpha = (1.0 - float(level)) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    # Rounding can put an endpoint a hair outside the range of the means; clip it back.
    low, high = max(float(low), float(means.min())), min(float(high), float(means.max()))
    return low, high


def format_interval(value: float, interval: Sequence[float] | None) -> str:
    """``"0.85 [0.7, 0.95]"`` (4 significant digits, as report tables); the value alone if no
    interval."""
    text = _num(value)
    if interval is None:
        return text
    low, high = interval
    return f"{text} [{_num(low)}, {_num(high)}]"


def _num(value: float | str) -> str:
    if isinstance(value, str):
        return value
    value = float(value)
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def interval_or_none(value: object) -> tuple[float, float] | None:
    """A ``[low, high]`` pair from a report.json back as a tuple; None for a missing one."""
    if value is None or isinstance(value, str):
        return None
    low, high = value  # type: ignore[misc]
    return float(low), float(high)
