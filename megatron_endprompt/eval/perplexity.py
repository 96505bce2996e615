"""Perplexity by position: does the loss stay flat (or fall) deep into the extended window?

Each held-out document with at least ``L + 1`` tokens is cut into windows of ``L + 1`` tokens
(consecutive windows share one token, so every token but the first is predicted once). A window
is scored as ``L`` inputs at contiguous positions 0..L-1; the loss of the prediction made at input
position p goes to the bucket holding p. Per bucket: mean loss, perplexity = exp(mean loss) and
token count. The default buckets double: [0, 256), [256, 512), [512, 1024), ... up to L.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

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
        }


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
    """
    windows = make_windows(documents, length, max_windows)
    edges = check_bucket_edges(
        default_bucket_edges(length) if bucket_edges is None else bucket_edges, length
    )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    loss_sum = np.zeros(length, dtype=np.float64)
    bar = tqdm(total=len(windows), desc=f"ppl@{length}", file=sys.stderr, disable=not progress)
    with bar:
        for start in range(0, len(windows), batch_size):
            batch = windows[start : start + batch_size]
            loss_sum += token_losses(logits_fn, batch, batch_size=batch_size).sum(axis=0)
            bar.update(len(batch))
    result = PerplexityResult(length, edges, len(windows))
    for lo, hi in zip(edges, edges[1:]):
        count = (hi - lo) * len(windows)
        mean = float(loss_sum[lo:hi].sum() / count)
        result.mean_loss.append(mean)
        result.perplexity.append(math.exp(mean))
        result.token_count.append(int(count))
    result.overall_mean_loss = float(loss_sum.sum() / (length * len(windows)))
    return result
