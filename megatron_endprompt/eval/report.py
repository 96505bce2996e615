"""Evaluation reports: ``report.json`` (every number), ``report.md`` (tables) and PNG plots.

Every file is written to a temporary name in its directory and renamed into place, so a crash
never leaves a half-written report. Plots use matplotlib's object API with the Agg canvas: no
pyplot, no global backend switch, so importing this module never changes a caller's matplotlib.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from megatron_endprompt.atomic_io import atomic_write, atomic_write_text
from megatron_endprompt.eval.intervals import format_interval
from megatron_endprompt.eval.needle import NeedleResult
from megatron_endprompt.eval.passkey import PasskeyResult
from megatron_endprompt.eval.perplexity import PerplexityResult


def _cell(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.4g}"
    return str(value).replace("|", "\\|")


def format_table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """A GitHub markdown table; floats get 4 significant digits.

    Raises:
        ValueError: when ``headers`` is empty or a row has a different number of cells.
    """
    if not headers:
        raise ValueError(f"headers must not be empty, got {list(headers)!r}")
    lines = ["| " + " | ".join(_cell(h) for h in headers) + " |"]
    lines.append("|" + "|".join("---" for _ in headers) + "|")
    for i, row in enumerate(rows):
        if len(row) != len(headers):
            raise ValueError(f"rows[{i}] has {len(row)} cells, headers have {len(headers)}")
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return "\n".join(lines) + "\n"


def interval_note(level: float, resamples: int, over: str) -> str:
    """The sentence under a table whose cells read ``mean [low, high]`` (blank line first)."""
    return (
        f"\nBrackets: {100 * level:g}% percentile-bootstrap interval ({resamples} resamples "
        f"over {over}).\n"
    )


def passkey_means_with_intervals(r: PasskeyResult, metric: str) -> dict[int, Any]:
    """Mean ``metric`` per length: ``"mean [low, high]"`` cells with intervals, else floats."""
    means = r.mean_by_length(metric)
    if not r.has_intervals:
        return means
    intervals = r.interval_by_length(metric)
    return {n: format_interval(means[n], intervals[n]) for n in means}


def needle_accuracy_cells(r: NeedleResult) -> list[Any]:
    """Accuracy per length: ``"mean [low, high]"`` cells with intervals, else floats."""
    if not r.has_intervals:
        return list(r.accuracy)
    intervals = r.interval_by_length()
    return [format_interval(a, intervals[n]) for n, a in zip(r.lengths, r.accuracy)]


def perplexity_cells(r: PerplexityResult) -> list[Any]:
    """Perplexity per bucket: ``"ppl [low, high]"`` cells with intervals, else floats."""
    if r.perplexity_interval is None:
        return list(r.perplexity)
    return [format_interval(p, i) for p, i in zip(r.perplexity, r.perplexity_interval)]


def perplexity_rows(r: PerplexityResult) -> list[list[Any]]:
    """Rows ``[positions, mean loss, perplexity (with interval), tokens]`` of the tables."""
    return [
        list(x) for x in zip(r.bucket_labels(), r.mean_loss, perplexity_cells(r), r.token_count)
    ]


def _passkey_md(r: PasskeyResult) -> str:
    headers = ["length"] + [f"depth {d:g}" for d in r.depths] + ["mean"]
    exact = passkey_means_with_intervals(r, "exact_match")
    soft = passkey_means_with_intervals(r, "token_accuracy")
    em = [[n, *row, exact[n]] for n, row in zip(r.lengths, r.exact_match)]
    tok = [[n, *row, soft[n]] for n, row in zip(r.lengths, r.token_accuracy)]
    note = ""
    if r.has_intervals:
        note = interval_note(r.interval_level, r.bootstrap_resamples, "trials, within each depth")
    counted = "prompt + answer" if r.answer_in_length else "prompt (the answer follows)"
    return (
        f"Trials per cell: {r.trials}, seed {r.seed}, {r.digits}-digit keys; "
        f"length = {counted}.\n\n"
        "Exact match (greedy):\n\n" + format_table(em, headers) + "\n"
        "Digit accuracy (teacher-forced, the key's digit tokens):\n\n"
        + format_table(tok, headers) + note
    )  # fmt: skip


def _needle_md(r: NeedleResult) -> str:
    rows = [[n, a] for n, a in zip(r.lengths, needle_accuracy_cells(r))]
    note = ""
    if r.has_intervals:
        note = interval_note(r.interval_level, r.bootstrap_resamples, "trials")
    return (
        f"Trials per length: {r.trials}, seed {r.seed}.\n\n"
        + format_table(rows, ["length", "accuracy"]) + note
    )  # fmt: skip


def _perplexity_md(r: PerplexityResult) -> str:
    overall = format_interval(r.overall_perplexity, r.overall_perplexity_interval)
    note = ""
    if r.perplexity_interval is not None:
        note = interval_note(r.interval_level, r.bootstrap_resamples, "windows")
    return (
        f"Context {r.length}, {r.num_windows} windows, overall perplexity {overall}.\n\n"
        + format_table(perplexity_rows(r), ["positions", "mean loss", "perplexity", "tokens"])
        + note
    )  # fmt: skip


def _section(name: str, result: Any) -> str:
    if isinstance(result, PasskeyResult):
        body = _passkey_md(result)
    elif isinstance(result, NeedleResult):
        body = _needle_md(result)
    elif isinstance(result, PerplexityResult):
        body = _perplexity_md(result)
    else:
        body = "```json\n" + json.dumps(_jsonable(result), indent=2) + "\n```\n"
    return f"## {name}\n\n{body}"


def _jsonable(value: Any) -> Any:
    """Result objects via ``to_dict``; numpy scalars/arrays as Python; NaN/inf as strings."""
    if hasattr(value, "to_dict"):
        return _jsonable(value.to_dict())
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # strict JSON has no NaN/inf
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ValueError(f"results/meta value {value!r} ({type(value).__name__}) is not JSON-able")


def write_report(
    results: Mapping[str, Any], out_dir: str | os.PathLike, meta: Mapping[str, Any]
) -> tuple[str, str]:
    """Write ``report.json`` and ``report.md`` into ``out_dir``.

    Args:
        results: name -> PasskeyResult / NeedleResult / PerplexityResult (or any JSON-able
            value, shown as JSON in the markdown).
        out_dir: output directory (created if missing).
        meta: run description: checkpoint, rope scaling, seeds, ... (JSON-able).

    Returns:
        ``(json path, markdown path)``.
    """
    if not isinstance(results, Mapping) or not results:
        raise ValueError(f"results must be a non-empty mapping, got {results!r}")
    if not isinstance(meta, Mapping):
        raise ValueError(f"meta must be a mapping, got {meta!r}")
    payload = {"meta": _jsonable(meta), "results": _jsonable(results)}
    json_path = atomic_write_text(
        os.path.join(out_dir, "report.json"), json.dumps(payload, indent=2) + "\n"
    )
    meta_rows = [[k, json.dumps(v)] for k, v in payload["meta"].items()]
    parts = ["# Long-context evaluation\n"]
    if meta_rows:
        parts.append(format_table(meta_rows, ["meta", "value"]))
    parts.extend(_section(name, r) for name, r in results.items())
    md_path = atomic_write_text(os.path.join(out_dir, "report.md"), "\n".join(parts))
    return json_path, md_path


def _save_figure(fig: Figure, path: str | os.PathLike) -> str:
    FigureCanvasAgg(fig)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def plot_passkey_heatmap(result: PasskeyResult, path: str | os.PathLike) -> str:
    """Depth (rows) x length (columns) heatmap of exact-match accuracy, cells annotated (PNG)."""
    grid = np.asarray(result.exact_match, dtype=np.float64).T  # [depth, length]
    if grid.shape != (len(result.depths), len(result.lengths)):
        raise ValueError(f"result.exact_match has shape {grid.T.shape}, expected lengths x depths")
    # Wide enough for the title even with one or two lengths.
    width = max(5.0, 1.5 + 0.9 * len(result.lengths))
    fig = Figure(figsize=(width, max(3.0, 1.0 + 0.5 * len(result.depths))))
    ax = fig.add_subplot()
    percent = 100.0 * grid  # cells, colour scale and title all in percent
    image = ax.imshow(percent, cmap="RdYlGn", vmin=0.0, vmax=100.0, aspect="auto")
    for (i, j), value in np.ndenumerate(percent):
        ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(result.lengths)), [str(n) for n in result.lengths])
    ax.set_yticks(range(len(result.depths)), [f"{d:g}" for d in result.depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(f"Passkey exact match (%), {result.trials} trials per cell", fontsize=10)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return _save_figure(fig, path)


def plot_perplexity_by_position(
    results_by_model: Mapping[str, PerplexityResult], path: str | os.PathLike
) -> str:
    """Perplexity against position (bucket midpoints, log x), one line per model (PNG).

    A model's bootstrap intervals, when it has them, are shaded around its line.
    """
    if not results_by_model:
        raise ValueError(f"results_by_model must not be empty, got {results_by_model!r}")
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    levels = set()
    for name, r in results_by_model.items():
        mids = [(a + b) / 2 for a, b in zip(r.bucket_edges, r.bucket_edges[1:])]
        (line,) = ax.plot(mids, r.perplexity, marker="o", label=f"{name} (L={r.length})")
        if r.perplexity_interval is not None:
            low, high = zip(*r.perplexity_interval)
            ax.fill_between(mids, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
            levels.add(r.interval_level)
    ax.set_xscale("log")
    ax.set_xlabel("position (bucket midpoint)")
    ax.set_ylabel("perplexity")
    title = "Perplexity by position"
    if len(levels) == 1:
        title += f" (shaded: {100 * levels.pop():g}% bootstrap interval)"
    elif levels:
        title += " (shaded: bootstrap intervals)"
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save_figure(fig, path)


def plot_passkey_by_length(result: PasskeyResult, path: str | os.PathLike) -> str:
    """Mean accuracy over depths against length, exact match and digit accuracy (PNG).

    With per-trial scores the bootstrap intervals are drawn as error bars.
    """
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    x = np.arange(len(result.lengths))
    for offset, metric, label in ((-0.05, "exact_match", "exact match"),
                                  (0.05, "token_accuracy", "digit accuracy")):  # fmt: skip
        means = result.mean_by_length(metric)
        y = np.array([means[n] for n in result.lengths])
        yerr = None
        if result.has_intervals:
            iv = result.interval_by_length(metric)
            low = np.array([iv[n][0] for n in result.lengths])
            high = np.array([iv[n][1] for n in result.lengths])
            yerr = np.clip(np.stack([y - low, high - y]), 0.0, None)
        ax.errorbar(x + offset, y, yerr=yerr, marker="o", capsize=4, label=label)
    ax.set_xticks(x, [str(n) for n in result.lengths])
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("mean over depths")
    title = f"Passkey accuracy, {result.trials} trials per cell"
    if result.has_intervals:
        title += f" (bars: {100 * result.interval_level:g}% bootstrap)"
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save_figure(fig, path)


def plot_accuracy_by_length(
    panels: Mapping[str, Mapping[str, Mapping[int, tuple[float, float | None]]]],
    path: str | os.PathLike,
) -> str:
    """Accuracy against context length (log x), one panel per title, one line per model (PNG).

    Args:
        panels: title -> model name -> length -> ``(value, error)``; ``error`` (e.g. a standard
            deviation over seeds) is drawn as an error bar, None draws none.
        path: output PNG.
    """
    if not panels or any(not models for models in panels.values()):
        raise ValueError(f"panels must map titles to non-empty model series, got {panels!r}")
    fig = Figure(figsize=(6.0 * len(panels), 4.5))
    for k, (title, models) in enumerate(panels.items()):
        ax = fig.add_subplot(1, len(panels), k + 1)
        for name, by_length in models.items():
            lengths = sorted(by_length)
            values = [by_length[n][0] for n in lengths]
            errors = [by_length[n][1] or 0.0 for n in lengths]
            ax.errorbar(lengths, values, yerr=errors, marker="o", capsize=3, label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        if k == 0:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return _save_figure(fig, path)
