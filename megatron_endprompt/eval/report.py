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


def _passkey_md(r: PasskeyResult) -> str:
    headers = ["length"] + [f"depth {d:g}" for d in r.depths] + ["mean"]
    exact = r.mean_by_length()
    soft = r.mean_by_length("token_accuracy")
    em = [[n, *row, exact[n]] for n, row in zip(r.lengths, r.exact_match)]
    tok = [[n, *row, soft[n]] for n, row in zip(r.lengths, r.token_accuracy)]
    return (
        f"Trials per cell: {r.trials}, seed {r.seed}, {r.digits}-digit keys.\n\n"
        "Exact match (greedy):\n\n" + format_table(em, headers) + "\n"
        "Digit accuracy (teacher-forced, the key's digit tokens):\n\n" + format_table(tok, headers)
    )


def _needle_md(r: NeedleResult) -> str:
    rows = [[n, a] for n, a in zip(r.lengths, r.accuracy)]
    return f"Trials per length: {r.trials}, seed {r.seed}.\n\n" + format_table(
        rows, ["length", "accuracy"]
    )


def _perplexity_md(r: PerplexityResult) -> str:
    rows = [list(x) for x in zip(r.bucket_labels(), r.mean_loss, r.perplexity, r.token_count)]
    return (
        f"Context {r.length}, {r.num_windows} windows, overall perplexity "
        f"{r.overall_perplexity:.4g}.\n\n"
        + format_table(rows, ["positions", "mean loss", "perplexity", "tokens"])
    )


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
    """Perplexity against position (bucket midpoints, log x), one line per model (PNG)."""
    if not results_by_model:
        raise ValueError(f"results_by_model must not be empty, got {results_by_model!r}")
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    for name, r in results_by_model.items():
        mids = [(a + b) / 2 for a, b in zip(r.bucket_edges, r.bucket_edges[1:])]
        ax.plot(mids, r.perplexity, marker="o", label=f"{name} (L={r.length})")
    ax.set_xscale("log")
    ax.set_xlabel("position (bucket midpoint)")
    ax.set_ylabel("perplexity")
    ax.set_title("Perplexity by position")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save_figure(fig, path)
