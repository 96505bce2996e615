"""Bootstrap intervals of means, checked against a loop implementation and analytic limits."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest

from megatron_endprompt.eval.intervals import (
    bootstrap_mean_interval,
    check_interval_options,
    format_interval,
    interval_or_none,
)
from megatron_endprompt.eval.progress import ProgressLines, format_duration


def linear_quantile(sorted_values: list[float], q: float) -> float:
    """Quantile with linear interpolation between order statistics (numpy's default rule)."""
    h = (len(sorted_values) - 1) * q
    lo = math.floor(h)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (h - lo) * (sorted_values[hi] - sorted_values[lo])


def loop_bootstrap(values, level, resamples, seed, strata=None):
    """Straightforward reference: one resample at a time, stratum by stratum, same rng draws."""
    rng = np.random.default_rng(seed)
    labels = list(strata) if strata is not None else [0] * len(values)
    groups: dict = {}
    for v, label in zip(values, labels):
        groups.setdefault(label, []).append(v)
    totals = [0.0] * resamples
    for members in groups.values():
        for r in range(resamples):
            picks = rng.integers(0, len(members), size=len(members))
            totals[r] += sum(members[int(i)] for i in picks)
    means = sorted(t / len(values) for t in totals)
    alpha = (1 - level) / 2
    return linear_quantile(means, alpha), linear_quantile(means, 1 - alpha)


@pytest.mark.parametrize("level,resamples,seed", [(0.95, 500, 0), (0.8, 301, 7)])
def test_matches_loop_reference(level, resamples, seed):
    values = list(np.random.default_rng(1).normal(2.0, 1.5, size=23))
    got = bootstrap_mean_interval(values, level=level, resamples=resamples, seed=seed)
    want = loop_bootstrap(values, level, resamples, seed)
    assert got == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert got[0] < float(np.mean(values)) < got[1]


def test_stratified_matches_loop_reference():
    rng = np.random.default_rng(2)
    values = list(rng.uniform(size=17))
    strata = [("b", "a", "c")[i % 3] for i in range(17)]  # first appearance order: b, a, c
    got = bootstrap_mean_interval(values, level=0.9, resamples=400, seed=3, strata=strata)
    assert got == pytest.approx(loop_bootstrap(values, 0.9, 400, 3, strata), rel=1e-12)


def test_degenerate_and_single_values():
    low, high = bootstrap_mean_interval([0.7] * 5)
    assert low == high == pytest.approx(0.7)
    assert bootstrap_mean_interval([3.25]) == (3.25, 3.25)
    assert bootstrap_mean_interval([3.25], strata=["x"]) == (3.25, 3.25)


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (1, 7)])
def test_binary_sample_interval_contains_proportion(k, n):
    values = [1.0] * k + [0.0] * (n - k)
    low, high = bootstrap_mean_interval(values, level=0.9)
    assert 0.0 <= low <= k / n <= high <= 1.0
    if k in (0, n):
        assert low == high == k / n


def test_stratified_resampling_keeps_stratum_sizes():
    # Strata of constant values 0 (three) and 1 (one): every resample has mean exactly 1/4.
    values, strata = [0.0, 0.0, 0.0, 1.0], ["a", "a", "a", "b"]
    assert bootstrap_mean_interval(values, strata=strata) == (0.25, 0.25)
    # Unstratified, the single 1 can be drawn 0..4 times: the interval is wide.
    low, high = bootstrap_mean_interval(values)
    assert low < 0.25 < high


def test_seed_level_and_determinism():
    values = list(np.random.default_rng(4).exponential(size=30))
    a = bootstrap_mean_interval(values, seed=5)
    assert a == bootstrap_mean_interval(values, seed=5)
    assert a != bootstrap_mean_interval(values, seed=6)
    narrow = bootstrap_mean_interval(values, level=0.5, seed=5)
    wide = bootstrap_mean_interval(values, level=0.99, seed=5)
    assert wide[0] < narrow[0] < narrow[1] < wide[1]


def test_coverage_of_normal_means():
    # 200 samples of n = 40 from N(1, 2^2): a 90% interval should cover 1 roughly 90% of the time
    # (the percentile bootstrap under-covers a little at this n).
    rng = np.random.default_rng(11)
    covered = 0
    for rep in range(200):
        sample = rng.normal(1.0, 2.0, size=40)
        low, high = bootstrap_mean_interval(sample, level=0.9, resamples=500, seed=rep)
        covered += low <= 1.0 <= high
    assert 0.80 <= covered / 200 <= 0.97


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="values must not be empty"):
        bootstrap_mean_interval([])
    with pytest.raises(ValueError, match="values must be finite"):
        bootstrap_mean_interval([1.0, float("nan")])
    with pytest.raises(ValueError, match="values must be one-dimensional"):
        bootstrap_mean_interval([[1.0, 2.0]])
    for level in (0.0, 1.0, 1.5, -0.1, True):
        with pytest.raises(ValueError, match="level"):
            bootstrap_mean_interval([1.0, 2.0], level=level)
    for resamples in (0, -1, 2.5):
        with pytest.raises(ValueError, match="resamples"):
            bootstrap_mean_interval([1.0, 2.0], resamples=resamples)
    with pytest.raises(ValueError, match="strata must have one label per value: 1 != 2"):
        bootstrap_mean_interval([1.0, 2.0], strata=["a"])
    check_interval_options(0.95, 0)  # 0 resamples: intervals disabled, allowed by default
    with pytest.raises(ValueError, match="--bootstrap-resamples must be >= 0"):
        check_interval_options(0.95, -3, resamples_name="--bootstrap-resamples")
    with pytest.raises(ValueError, match=r"--interval-level must be in \(0, 1\)"):
        check_interval_options(2.0, 10, level_name="--interval-level")


def test_format_interval():
    assert format_interval(0.85, (0.7, 0.95)) == "0.85 [0.7, 0.95]"
    assert format_interval(12.3456, None) == "12.35"
    assert format_interval(1 / 3, [0.25, 0.5]) == f"{1 / 3:.4g} [0.25, 0.5]"
    assert interval_or_none([1, 2]) == (1.0, 2.0)
    assert interval_or_none(None) is None and interval_or_none("nan") is None


def test_progress_lines_eta():
    now = [100.0]
    out = io.StringIO()
    lines = ProgressLines(10, stream=out, clock=lambda: now[0])
    lines.update(4)
    now[0] += 12.0
    lines.report("passkey@1024", 4, 10, "trials")
    # 12 s for 4 of 10 units: the other 6 take 12 * 6 / 4 = 18 s.
    assert out.getvalue() == "passkey@1024: 4/10 trials, elapsed 0m12s eta 0m18s\n"
    lines.update(1)
    assert lines.line("x", 1, 2, "trials") == (
        "x: 1/2 trials (5/10 total), elapsed 0m12s eta " + format_duration(12.0 * 5 / 5)
    )
    silent = io.StringIO()
    ProgressLines(3, enabled=False, stream=silent).report("y", 1, 3, "windows")
    assert silent.getvalue() == ""
    assert format_duration(3723) == "1h02m03s" and format_duration(59.6) == "1m00s"
