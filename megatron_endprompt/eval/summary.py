"""Summaries of evaluation results: the console table of one run, the ``compare`` table of many.

``summary_markdown`` turns the results of one evaluation into the table printed at its end;
``read_report`` / ``compare_rows`` read ``report.json`` files back and lay several models side by
side (passkey per length, last-bucket perplexity), as ``tools/evaluate.py compare`` prints them.
"""

from __future__ import annotations

import json
import os
from typing import Any

from megatron_endprompt.eval.intervals import format_interval, interval_or_none
from megatron_endprompt.eval.perplexity import PerplexityResult
from megatron_endprompt.eval.report import (
    format_table,
    interval_note,
    needle_accuracy_cells,
    passkey_means_with_intervals,
    perplexity_rows,
)


def summary_markdown(results: dict[str, Any]) -> str:
    """Accuracy per length (passkey exact match / digit accuracy, needle) and perplexity.

    Cells read ``mean [low, high]`` where the results carry bootstrap intervals.
    """
    by_length: dict[str, dict[int, Any]] = {}
    notes = set()
    if "passkey" in results:
        r = results["passkey"]
        by_length["passkey exact"] = passkey_means_with_intervals(r, "exact_match")
        by_length["passkey digits"] = passkey_means_with_intervals(r, "token_accuracy")
        if r.has_intervals:
            notes.add(interval_note(r.interval_level, r.bootstrap_resamples, "trials"))
    for name, r in results.items():
        if name.startswith("needle_"):
            by_length[name.replace("_", " ")] = dict(zip(r.lengths, needle_accuracy_cells(r)))
            if r.has_intervals:
                notes.add(interval_note(r.interval_level, r.bootstrap_resamples, "trials"))
    parts = []
    if by_length:
        lengths = sorted({n for column in by_length.values() for n in column})
        rows = [[n, *(col.get(n, "-") for col in by_length.values())] for n in lengths]
        parts.append(format_table(rows, ["length", *by_length]) + "".join(sorted(notes)))
    if "perplexity" in results:
        r = results["perplexity"]
        overall = format_interval(r.overall_perplexity, r.overall_perplexity_interval)
        note = ""
        if r.perplexity_interval is not None:
            note = interval_note(r.interval_level, r.bootstrap_resamples, "windows")
        parts.append(
            f"Perplexity at context {r.length} ({r.num_windows} windows, overall {overall}):\n\n"
            + format_table(perplexity_rows(r), ["positions", "mean loss", "perplexity", "tokens"])
            + note
        )
    return "\n".join(parts)


def read_report(directory: str) -> dict[str, Any]:
    """The ``report.json`` of a report directory (``meta`` and ``results``).

    Raises:
        FileNotFoundError / ValueError: naming the directory or file.
    """
    path = os.path.join(directory, "report.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"compare: {directory} has no report.json")
    try:
        with open(path, encoding="utf-8") as f:
            payload = json.load(f)
        payload["meta"], payload["results"]  # noqa: B018 (shape check)
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"compare: {path} is not an evaluation report") from err
    return payload


def rope_label(meta: dict[str, Any]) -> str:
    """``"none"`` or e.g. ``"linear x8"`` for a report's RoPE scaling."""
    rope = meta.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "none"))
    if kind in ("none", "default", None):
        return "none"
    return f"{kind} x{rope.get('factor', 1):g}"


def compare_rows(reports: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """``(headers, rows)``: one row per model; passkey per length, last-bucket perplexity.

    Cells are ``"mean [low, high]"`` strings where a report has bootstrap intervals, the plain
    mean where it has none (older reports), ``"-"`` where it lacks the task or length.
    """
    lengths = sorted(
        {int(n) for p in reports.values() for n in p["results"].get("passkey", {}).get(
            "mean_exact_match_by_length", {})}
    )  # fmt: skip
    headers = ["model", "rope scaling"]
    headers += [f"passkey@{n}" for n in lengths] + [f"digits@{n}" for n in lengths]
    headers += ["ppl last bucket", "bucket", "ppl overall"]
    rows = []
    for name, payload in reports.items():
        passkey = payload["results"].get("passkey", {})
        row = [name, rope_label(payload["meta"])]
        for metric in ("exact_match", "token_accuracy"):
            means = passkey.get(f"mean_{metric}_by_length", {})
            intervals = passkey.get(f"{metric}_interval_by_length") or {}
            row += [_with_interval(means.get(str(n)), intervals.get(str(n))) for n in lengths]
        ppl = payload["results"].get("perplexity")
        if ppl:
            edges = ppl["bucket_edges"]
            buckets = ppl.get("perplexity_interval") or [None] * len(ppl["perplexity"])
            row += [
                _with_interval(ppl["perplexity"][-1], buckets[-1]),
                f"[{edges[-2]}, {edges[-1]})",
                _with_interval(ppl["overall_perplexity"], ppl.get("overall_perplexity_interval")),
            ]
        else:
            row += ["-", "-", "-"]
        rows.append(row)
    return headers, rows


def _with_interval(value: Any, interval: Any) -> Any:
    """``"-"`` for a missing value, the value alone without an interval, else ``"v [lo, hi]"``."""
    if value is None:
        return "-"
    interval = interval_or_none(interval)
    if interval is None or isinstance(value, str):
        return value
    return format_interval(value, interval)


def perplexity_result(d: dict[str, Any]) -> PerplexityResult:
    """A ``PerplexityResult`` back from its ``report.json`` entry.

    Reports written before intervals existed have no per-window losses: intervals are None.
    """
    buckets = d.get("perplexity_interval")
    r = PerplexityResult(
        int(d["length"]), list(d["bucket_edges"]), int(d["num_windows"]),
        [float(x) for x in d["mean_loss"]], [float(x) for x in d["perplexity"]],
        list(d["token_count"]), float(d["overall_mean_loss"]),
        window_mean_loss=[[float(x) for x in w] for w in d.get("window_mean_loss") or []],
        perplexity_interval=(
            None if buckets is None else [interval_or_none(x) for x in buckets]
        ),
        overall_perplexity_interval=interval_or_none(d.get("overall_perplexity_interval")),
    )  # fmt: skip
    for key in ("interval_level", "bootstrap_resamples", "bootstrap_seed"):
        if d.get(key) is not None:
            setattr(r, key, type(getattr(r, key))(d[key]))
    return r
