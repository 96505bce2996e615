"""Distance coverage: hand-counted small cases, FFT against brute force, the plan's report."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_endprompt.coverage import (
    CoverageReport,
    distance_coverage,
    layout_pair_counts,
    pair_counts,
    pair_counts_bruteforce,
    plot_coverage,
)
from megatron_endprompt.data.layouts import LayoutSpec
from megatron_endprompt.plan import main as plan_main

DESIGN_EXAMPLE = np.array([0, 1, 2, 3, 4, 61, 62, 63])  # S = 8, a = 5, t = 3, L = 64, fixed


def test_contiguous_hand_counts():
    counts = pair_counts(np.arange(8), 64)
    assert counts[:8].tolist() == [8, 7, 6, 5, 4, 3, 2, 1]
    assert counts[8:].sum() == 0
    assert counts.sum() == 8 * 9 // 2


def test_design_worked_example_hand_counts():
    # Context 0..4 and terminal 61..63: local distances 0..4, long ones 57..63 (L - a - t + 1 ..).
    # d = 1: 4 context pairs + 2 terminal pairs; d = 60: (61,1) (62,2) (63,3); ...
    expected = {0: 8, 1: 6, 2: 4, 3: 2, 4: 1, 57: 1, 58: 2, 59: 3, 60: 3, 61: 3, 62: 2, 63: 1}
    counts = pair_counts(DESIGN_EXAMPLE, 64)
    assert {d: int(c) for d, c in enumerate(counts) if c} == expected
    report = CoverageReport(64, 1, counts)
    assert report.covered_fraction == 12 / 64
    assert report.largest_gap() == (5, 56)  # the paper's unseen gap [max(a, t), L - a - t]


@st.composite
def layouts(draw):
    L = draw(st.integers(1, 3000))
    S = draw(st.integers(1, min(L, 300)))
    seed = draw(st.integers(0, 2**32 - 1))
    return np.sort(np.random.default_rng(seed).choice(L, size=S, replace=False)), L


@settings(max_examples=150, deadline=None)
@given(layouts())
def test_fft_equals_brute_force(layout):
    positions, L = layout
    np.testing.assert_array_equal(pair_counts(positions, L), pair_counts_bruteforce(positions, L))


@settings(max_examples=30, deadline=None)
@given(st.lists(layouts(), min_size=1, max_size=6))
def test_sum_over_layouts_equals_brute_force(items):
    L = max(L for _, L in items)
    expected = sum(pair_counts_bruteforce(p, L) for p, _ in items)
    np.testing.assert_array_equal(layout_pair_counts([p for p, _ in items], L), expected)


def test_repeated_layouts_are_weighted():
    counts = layout_pair_counts([DESIGN_EXAMPLE] * 5 + [np.arange(8)], 64)
    expected = 5 * pair_counts(DESIGN_EXAMPLE, 64) + pair_counts(np.arange(8), 64)
    np.testing.assert_array_equal(counts, expected)


def test_bands_and_format():
    report = CoverageReport(64, 1, pair_counts(DESIGN_EXAMPLE, 64))
    bands = report.bands()
    assert [(lo, hi) for lo, hi, _, _ in bands][:2] == [(0, 5), (6, 11)]
    assert bands[0][2] == pytest.approx(5 / 6)  # distances 0..4 of 0..5
    assert bands[-1][:2] == (57, 63) and bands[-1][2] == 1.0
    assert sum(share for *_, share in bands) == pytest.approx(1.0)
    text = report.format()
    assert "18.75% of distances 0..63 observed (12 of 64), 36 pairs" in text
    assert "largest unobserved gap 5..56" in text


def test_distance_coverage_fixed_and_random():
    fixed = LayoutSpec("endprompt", 8, 64, "fixed", (3,))
    report = distance_coverage(fixed, seed=1, num_samples=10)
    np.testing.assert_array_equal(report.pair_counts, 10 * pair_counts(DESIGN_EXAMPLE, 64))
    contiguous = distance_coverage(LayoutSpec("contiguous", 8, None), 1, 3, target_length=64)
    assert contiguous.pair_counts[:8].tolist() == [24, 21, 18, 15, 12, 9, 6, 3]
    random = distance_coverage(LayoutSpec("endprompt", 8, 64, "random", (3,)), 1, 200)
    assert random.covered_fraction == 1.0  # start ~ U{5 .. 61} reaches every distance
    with pytest.raises(ValueError, match="num_samples"):
        distance_coverage(fixed, 1, 0)
    with pytest.raises(ValueError, match="target_length"):
        distance_coverage(LayoutSpec("contiguous", 8, None), 1, 3)


def test_invalid_layout_is_refused():
    with pytest.raises(ValueError, match="strictly increasing"):
        pair_counts(np.array([0, 2, 2]), 8)
    with pytest.raises(ValueError, match="strictly increasing"):
        pair_counts(np.array([0, 8]), 8)


def test_plot_coverage_writes_a_png(tmp_path):
    report = CoverageReport(64, 1, pair_counts(DESIGN_EXAMPLE, 64))
    path = plot_coverage(report, tmp_path / "cov.png", "example")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["cov.png"]  # no temporary left behind


PLAN = [
    "--tokenizer-type",
    "ByteTokenizer",
    "--data-path",
    "x",
    "--train-iters",
    "10",
    "--model-preset",
    "tiny",
    "--seq-length",
    "8",
    "--max-position-embeddings",
    "64",
    "--target-length",
    "64",
    "--allow-unscaled-extension",
]


def test_plan_prints_coverage_and_plot(tmp_path, capsys):
    png = tmp_path / "plan.png"
    flags = ["--endprompt-terminal", "tail", "--endprompt-tail-length", "3"]
    assert plan_main([*PLAN, *flags, "--coverage-samples", "4", "--coverage-png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "layout            endprompt (tail, fixed, text contiguous): 0 1 2 3 4 61 62 63" in out
    assert "coverage          4 samples: 18.75% of distances 0..63 observed (12 of 64)" in out
    assert "largest unobserved gap 5..56" in out and png.is_file() and "PLAN_OK" in out


def test_plan_cue_lengths_and_no_coverage(capsys):
    assert plan_main([*PLAN, "--coverage-cue-lengths", "3", "--coverage-samples", "2"]) == 0
    assert "observed (12 of 64)" in capsys.readouterr().out  # one 3-token cue: the same layout
    assert plan_main([*PLAN, "--coverage-samples", "0"]) == 0
    assert "coverage" not in capsys.readouterr().out
    assert plan_main([*PLAN, "--coverage-cue-lengths", "8"]) == 2
    assert "error: --coverage-cue-lengths=8" in capsys.readouterr().out
    assert plan_main([*PLAN, "--coverage-samples", "-1"]) == 2
