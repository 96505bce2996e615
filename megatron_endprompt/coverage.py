"""Distance coverage: which relative distances a training configuration lets attention observe.

For one sample with position ids ``p`` (strictly increasing, inside ``[0, L)``), causal attention
pairs every input i with every input j <= i at the assigned distance ``d = p[i] - p[j]``. The
number of pairs at each distance d is the autocorrelation of the indicator of occupied
positions, ``c[d] = sum_k x[k] x[k + d]``, computed exactly with one FFT of length >= 2L
(O(L log L) per sample; sums over samples are taken in frequency space). The paper's observed set
for a fixed EndPrompt layout (a context, t terminal inputs) is
``[0, max(a, t) - 1] U [L - a - t + 1, L - 1]``; the gap between is never seen.

:func:`distance_coverage` histograms the layouts of dataset samples ``0 .. N-1`` drawn exactly as
:class:`~megatron_endprompt.data.dataset.EndPromptDataset` draws them (same ``sample_rng`` keyed
by the run's seed and the sample index, same :func:`~megatron_endprompt.data.layouts.draw_layout`),
and reports the covered fraction of distances ``0 .. L-1``, coverage per band (deciles of L) and
the pair-count histogram; :func:`plot_coverage` draws it as a PNG. ``tools/plan.py
--coverage-samples N [--coverage-png PATH]`` prints it for a run's flags.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from megatron_endprompt.atomic_io import atomic_write
from megatron_endprompt.data.layouts import LayoutSpec, draw_layout, sample_rng

_FFT_BLOCK_BYTES = 1 << 26  # spectra held at once: 64 MiB


def _check_layout(positions: np.ndarray, L: int) -> np.ndarray:
    p = np.asarray(positions, dtype=np.int64)
    if p.ndim != 1 or p.size == 0:
        raise ValueError(f"positions must be a non-empty 1-D array, got shape {p.shape}")
    if p[0] < 0 or p[-1] >= L or np.any(np.diff(p) <= 0):
        raise ValueError(f"positions must be strictly increasing inside [0, {L}), got {p}")
    return p


def pair_counts_bruteforce(positions: np.ndarray, L: int) -> np.ndarray:
    """Pairs (i, j), j <= i, at each distance ``p[i] - p[j]``, by explicit O(S^2) enumeration."""
    p = _check_layout(positions, L)
    diffs = p[:, None] - p[None, :]
    return np.bincount(diffs[diffs >= 0], minlength=L).astype(np.int64)


def layout_pair_counts(layouts: Iterable[np.ndarray], L: int) -> np.ndarray:
    """Pair counts per distance ``0 .. L-1``, summed over layouts, by FFT autocorrelation.

    Layouts are streamed in blocks; identical layouts within a block (fixed placements) are
    transformed once and weighted by their multiplicity.

    Args:
        layouts: position-id arrays, each strictly increasing inside ``[0, L)``.
        L: target window.

    Returns:
        int64 array ``[L]``: ``out[d]`` = number of attention pairs at distance d.
    """
    n = 1 << int(np.ceil(np.log2(max(2 * L, 2))))  # no circular wrap for distances < L
    rows = max(1, min(256, _FFT_BLOCK_BYTES // (16 * (n // 2 + 1))))
    out = np.zeros(L, dtype=np.int64)
    block: Counter[bytes] = Counter()
    for positions in layouts:
        block[_check_layout(positions, L).tobytes()] += 1
        if len(block) == rows:
            out += _block_pair_counts(block, L, n)
            block.clear()
    if block:
        out += _block_pair_counts(block, L, n)
    return out


def _block_pair_counts(block: Counter[bytes], L: int, n: int) -> np.ndarray:
    """Summed autocorrelations of a block of layouts (keys: int64 bytes; values: multiplicity)."""
    indicator = np.zeros((len(block), L), dtype=np.float64)
    for r, key in enumerate(block):
        indicator[r, np.frombuffer(key, dtype=np.int64)] = 1.0
    spectrum = np.fft.rfft(indicator, n=n, axis=1)
    weights = np.fromiter(block.values(), dtype=np.float64, count=len(block))
    power = (weights[:, None] * (spectrum.real**2 + spectrum.imag**2)).sum(axis=0)
    return np.rint(np.fft.irfft(power, n=n)[:L]).astype(np.int64)


def pair_counts(positions: np.ndarray, L: int) -> np.ndarray:
    """Pair counts per distance of one layout (see :func:`layout_pair_counts`)."""
    return layout_pair_counts([positions], L)


@dataclass(frozen=True)
class CoverageReport:
    """Pair counts per distance over a run's samples, and summaries of them."""

    target_length: int
    """L: distances 0 .. L-1."""
    num_samples: int
    """Samples histogrammed."""
    pair_counts: np.ndarray
    """int64 [L]: attention pairs at each distance, over all samples."""

    @property
    def covered_fraction(self) -> float:
        """Fraction of distances 0 .. L-1 observed at least once."""
        return float(np.count_nonzero(self.pair_counts)) / self.target_length

    def bands(self, num_bands: int = 10) -> list[tuple[int, int, float, float]]:
        """``(first, last, observed fraction, share of pairs)`` per band of distances.

        Band k holds distances ``floor(k L / num_bands) .. floor((k+1) L / num_bands) - 1``
        (deciles of L by default; empty bands are skipped).
        """
        L, total = self.target_length, max(int(self.pair_counts.sum()), 1)
        edges = (np.arange(num_bands + 1) * L) // num_bands
        out = []
        for lo, hi in zip(edges[:-1], edges[1:]):
            if hi > lo:
                part = self.pair_counts[lo:hi]
                out.append(
                    (int(lo), int(hi) - 1, np.count_nonzero(part) / (hi - lo), part.sum() / total)
                )
        return out

    def largest_gap(self) -> tuple[int, int] | None:
        """``(first, last)`` distance of the longest run of unobserved distances (None: none)."""
        unseen = np.concatenate(([0], (self.pair_counts == 0).astype(np.int8), [0]))
        starts = np.flatnonzero(np.diff(unseen) == 1)
        ends = np.flatnonzero(np.diff(unseen) == -1)
        if starts.size == 0:
            return None
        k = int(np.argmax(ends - starts))
        return int(starts[k]), int(ends[k]) - 1

    def format(self, indent: str = "") -> str:
        """A few text lines: the covered fraction, the largest gap, the band table."""
        L = self.target_length
        lines = [
            f"{self.num_samples} samples: {100 * self.covered_fraction:.2f}% of distances "
            f"0..{L - 1} observed ({np.count_nonzero(self.pair_counts):,} of {L:,}), "
            f"{int(self.pair_counts.sum()):,} pairs"
        ]
        gap = self.largest_gap()
        if gap is not None:
            lines.append(f"largest unobserved gap {gap[0]}..{gap[1]} ({gap[1] - gap[0] + 1:,})")
        lines.append(f"{'distances':<15} {'observed':>8} {'pairs':>7}")
        for lo, hi, seen, share in self.bands():
            lines.append(f"{f'{lo}-{hi}':<15} {100 * seen:>7.1f}% {100 * share:>6.2f}%")
        return "\n".join(indent + line if i else line for i, line in enumerate(lines))


def sample_layouts(spec: LayoutSpec, seed: int, num_samples: int) -> Iterable[np.ndarray]:
    """Positions of dataset samples ``0 .. num_samples-1``, as EndPromptDataset draws them."""
    for idx in range(num_samples):
        rng = sample_rng(seed, idx) if spec.needs_rng else None
        yield draw_layout(spec, rng).positions


def distance_coverage(
    spec: LayoutSpec, seed: int, num_samples: int, target_length: int | None = None
) -> CoverageReport:
    """Distance coverage of a training configuration over its first ``num_samples`` samples.

    Args:
        spec: the layout configuration (``EndPromptDatasetConfig.layout_spec()`` or built from a
            run's flags).
        seed: the dataset's random seed (the run's ``--seed``).
        num_samples: samples to histogram (>= 1).
        target_length: L; default ``spec.target_length`` (needed for contiguous layouts).

    Returns:
        The :class:`CoverageReport`.
    """
    L = target_length if target_length is not None else spec.target_length
    if L is None or L < spec.sequence_length:
        raise ValueError(f"target_length must be >= sequence_length, got {L}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    counts = layout_pair_counts(sample_layouts(spec, seed, num_samples), L)
    return CoverageReport(int(L), num_samples, counts)


def plot_coverage(report: CoverageReport, path: str | os.PathLike, title: str = "") -> str:
    """PNG: pair count per distance (log scale) and the observed fraction per decile band."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    L = report.target_length
    fig = Figure(figsize=(7.0, 5.0))
    top, bottom = fig.subplots(2, 1, gridspec_kw={"height_ratios": [2, 1]})
    distance = np.arange(L)
    seen = report.pair_counts > 0
    top.vlines(distance[seen], 0.8, report.pair_counts[seen], linewidth=0.6)
    top.set_yscale("log")
    top.set_xlim(-0.5, L - 0.5)
    top.set_ylim(bottom=0.8)
    top.set_ylabel("attention pairs")
    top.set_title(
        (title + ": " if title else "")
        + f"{100 * report.covered_fraction:.1f}% of distances observed, "
        f"{report.num_samples} samples",
        fontsize=10,
    )
    bands = report.bands()
    centres = [(lo + hi) / 2 for lo, hi, _, _ in bands]
    widths = [hi - lo + 1 for lo, hi, _, _ in bands]
    bottom.bar(centres, [100 * s for _, _, s, _ in bands], width=widths, edgecolor="black")
    bottom.set_xlim(-0.5, L - 0.5)
    bottom.set_ylim(0, 100)
    bottom.set_xlabel("relative distance (positions)")
    bottom.set_ylabel("observed (%)")
    fig.tight_layout()
    FigureCanvasAgg(fig)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
