"""Perplexity by position: does the loss stay flat (or fall) deep into the extended window?

Each held-out document with at least ``L + 1`` tokens is cut into windows of ``L + 1`` tokens
(consecutive windows share one token, so every token but the first is predicted once). A window
is scored as ``L`` inputs at contiguous positions 0..L-1; the loss of the prediction made at input
position p goes to the bucket holding p. Per bucket: mean loss, perplexity = exp(mean loss) and
token count. The default buckets double: [0, 256), [256, 512), [512, 1024), ... up to L.

Every window's mean loss per bucket is kept too (``window_mean_loss[window][bucket]``). Each
window puts the same number of tokens into a bucket, so a bucket's mean loss is the mean of its
per-window means, and a percentile bootstrap over windows (``eval/intervals.py``) of that mean,
exponentiated at both ends, gives the perplexity interval of the bucket (and of the overall
perplexity, from the windows' mean losses over all positions).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from megatron_endprompt.eval.intervals import (
    DEFAULT_LEVEL,
    DEFAULT_RESAMPLES,
    bootstrap_mean_interval,
    check_interval_options,
    resolve_options,
)
from megatron_endprompt.eval.progress import ProgressLines
from megatron_endprompt.eval.scoring import LogitsFn, token_losses


def default_bucket_edges(length: int, first: int = 256) -> list[int]:
    """Doubling bucket edges ``[0, first, 2 first, 4 first, ..., length]`` (last edge clipped)."""
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    if first < 1:
        raise ValueError(f"first must be >= 1, got {first}")
    edges, edge = [0], first
    while edge < length:
        edges.append(edge)
        edge *= 2
    edges.append(length)
    return edges


def check_bucket_edges(edges: Sequence[int], length: int) -> list[int]:
    """Edges must be strictly increasing ints from 0 to ``length``; else ValueError."""
    edges = [int(e) for e in edges]
    if len(edges) < 2 or edges[0] != 0 or edges[-1] != length:
        raise ValueError(f"bucket_edges must start at 0 and end at length={length}, got {edges}")
    if any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"bucket_edges must be strictly increasing, got {edges}")
    return edges


@dataclass
class PerplexityResult:
    """Loss by position bucket at one context length."""

    length: int
    bucket_edges: list[int]
    num_windows: int
    mean_loss: list[float] = field(default_factory=list)
    perplexity: list[float] = field(default_factory=list)
    token_count: list[int] = field(default_factory=list)
    overall_mean_loss: float = float("nan")
    # Mean loss of every window in every bucket: window_mean_loss[window][bucket] (empty for a
    # result of bucket means only, e.g. an old report).
    window_mean_loss: list[list[float]] = field(default_factory=list)
    # Bootstrap intervals (over windows) of the bucket perplexities and the overall one; None
    # when not computed (no per-window losses, or resamples = 0).
    perplexity_interval: list[tuple[float, float]] | None = None
    overall_perplexity_interval: tuple[float, float] | None = None
    interval_level: float = DEFAULT_LEVEL
    bootstrap_resamples: int = DEFAULT_RESAMPLES
    bootstrap_seed: int = 0

    def window_overall_loss(self) -> list[float]:
        """Each window's mean loss over all positions (bucket means weighted by bucket size)."""
        sizes = np.diff(np.asarray(self.bucket_edges, dtype=np.float64))
        losses = np.asarray(self.window_mean_loss, dtype=np.float64).reshape(-1, len(sizes))
        return [float(x) for x in losses @ sizes / sizes.sum()]

    def compute_intervals(
        self, level: float | None = None, resamples: int | None = None, seed: int | None = None
    ) -> None:
        """Fill ``perplexity_interval`` / ``overall_perplexity_interval`` from the windows.

        ``level`` / ``resamples`` / ``seed`` default to (and are stored as) ``interval_level``,
        ``bootstrap_resamples`` and ``bootstrap_seed``; resamples = 0 clears the intervals.

        Raises:
            ValueError: when the result keeps no per-window losses, or bad level / resamples.
        """
        level, resamples, seed = resolve_options(self, level, resamples, seed)
        check_interval_options(level, resamples)
        self.interval_level, self.bootstrap_resamples, self.bootstrap_seed = level, resamples, seed
        if resamples == 0:
            self.perplexity_interval = self.overall_perplexity_interval = None
            return
        if not self.window_mean_loss:
            raise ValueError("window_mean_loss: this result keeps no per-window losses")
        losses = np.asarray(self.window_mean_loss, dtype=np.float64)

        def interval(values) -> tuple[float, float]:
            lo, hi = bootstrap_mean_interval(values, level=level, resamples=resamples, seed=seed)
            return math.exp(lo), math.exp(hi)

        self.perplexity_interval = [interval(losses[:, b]) for b in range(losses.shape[1])]
        self.overall_perplexity_interval = interval(self.window_overall_loss())

    @property
    def overall_perplexity(self) -> float:
        """exp of the mean loss over every scored token."""
        return math.exp(self.overall_mean_loss)

    def bucket_labels(self) -> list[str]:
        """``"[lo, hi)"`` for each bucket."""
        return [f"[{a}, {b})" for a, b in zip(self.bucket_edges, self.bucket_edges[1:])]

    def to_dict(self) -> dict:
        """Every number, JSON-ready."""
        return {
            "task": "perplexity",
            "length": self.length,
            "bucket_edges": self.bucket_edges,
            "num_windows": self.num_windows,
            "mean_loss": self.mean_loss,
            "perplexity": self.perplexity,
            "token_count": self.token_count,
            "overall_mean_loss": self.overall_mean_loss,
            "overall_perplexity": self.overall_perplexity,
            "window_mean_loss": self.window_mean_loss,
            "perplexity_interval": (
                None if self.perplexity_interval is None
                else [list(x) for x in self.perplexity_interval]
            ),
            "overall_perplexity_interval": (
                None if self.overall_perplexity_interval is None
                else list(self.overall_perplexity_interval)
            ),
            "interval_level": self.interval_level,
            "bootstrap_resamples": self.bootstrap_resamples,
            "bootstrap_seed": self.bootstrap_seed,
        }  # fmt: skip


def make_windows(
    documents: Sequence[Sequence[int]], length: int, max_windows: int | None = None
) -> np.ndarray:
    """Windows of ``length + 1`` tokens [n, length + 1] (stride ``length``) from the documents.

    Raises:
        ValueError: naming ``length`` when no document has ``length + 1`` tokens.
    """
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be >= 1 or None, got {max_windows}")
    windows = []
    for doc in documents:
        doc = np.asarray(doc, dtype=np.int64).reshape(-1)
        for start in range(0, len(doc) - length, length):
            windows.append(doc[start : start + length + 1])
            if max_windows is not None and len(windows) == max_windows:
                return np.stack(windows)
    if not windows:
        raise ValueError(
            f"length: no document has {length + 1} tokens, needed to score a context of "
            f"{length} (got {len(documents)} documents)"
        )
    return np.stack(windows)


def perplexity_by_position(
    logits_fn: LogitsFn,
    documents: Sequence[Sequence[int]],
    length: int,
    bucket_edges: Sequence[int] | None = None,
    batch_size: int = 1,
    max_windows: int | None = None,
    progress: bool = True,
    interval_level: float = DEFAULT_LEVEL,
    bootstrap_resamples: int = DEFAULT_RESAMPLES,
    progress_lines: bool = False,
) -> PerplexityResult:
    """Mean next-token loss per position bucket over windows of ``length`` inputs.

    Args:
        logits_fn: the model.
        documents: held-out token-id sequences.
        length: context length L (inputs per window; positions 0..L-1).
        bucket_edges: explicit edges ``[0, ..., L]``; default ``default_bucket_edges(L)``.
        batch_size: windows per forward pass.
        max_windows: stop after this many windows (None: all).
        progress: show a tqdm bar on stderr.
        interval_level: coverage of the bootstrap intervals (over windows), in (0, 1).
        bootstrap_resamples: bootstrap resamples (0: no intervals).
        progress_lines: print progress lines with an ETA on stderr (about one per tenth of the
            windows; for logs, with ``progress=False``).
    """
    check_interval_options(interval_level, bootstrap_resamples)
    windows = make_windows(documents, length, max_windows)
    edges = check_bucket_edges(
        default_bucket_edges(length) if bucket_edges is None else bucket_edges, length
    )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    loss_sum = np.zeros(length, dtype=np.float64)
    window_means = []
    bar = tqdm(total=len(windows), desc=f"ppl@{length}", file=sys.stderr, disable=not progress)
    lines = ProgressLines(len(windows), enabled=progress_lines)
    every = max(1, -(-len(windows) // 10))  # about ten lines
    with bar:
        for start in range(0, len(windows), batch_size):
            batch = windows[start : start + batch_size]
            losses = token_losses(logits_fn, batch, batch_size=batch_size)  # [batch, L]
            loss_sum += losses.sum(axis=0)
            window_means.extend(
                [float(row[lo:hi].mean()) for lo, hi in zip(edges, edges[1:])] for row in losses
            )
            bar.update(len(batch))
            lines.update(len(batch))
            done = start + len(batch)
            if done // every > start // every or done == len(windows):
                lines.report(f"ppl@{length}", done, len(windows), "windows")
    result = PerplexityResult(
        length, edges, len(windows), window_mean_loss=window_means,
        interval_level=float(interval_level), bootstrap_resamples=int(bootstrap_resamples),
    )  # fmt: skip
    for lo, hi in zip(edges, edges[1:]):
        count = (hi - lo) * len(windows)
        mean = float(loss_sum[lo:hi].sum() / count)
        result.mean_loss.append(mean)
        result.perplexity.append(math.exp(mean))
        result.token_count.append(int(count))
    result.overall_mean_loss = float(loss_sum.sum() / (length * len(windows)))
    result.compute_intervals()
    return result
