"""Summaries of evaluation results: the console table of one run, the ``compare`` table of many.

``summary_markdown`` turns the results of one evaluation into the table printed at its end;
``read_report`` / ``compare_rows`` read ``report.json`` files back and lay several models side by
side (passkey per length, last-bucket perplexity), as ``tools/evaluate.py compare`` prints them.
"""

from __future__ import annotations

import json
import os
from typing import Any

from megatron_endprompt.eval.perplexity import PerplexityResult
from megatron_endprompt.eval.report import format_table


def summary_markdown(results: dict[str, Any]) -> str:
    """Accuracy per length (passkey exact match / digit accuracy, needle) and perplexity."""
    by_length: dict[str, dict[int, float]] = {}
    if "passkey" in results:
        by_length["passkey exact"] = results["passkey"].mean_by_length()
        by_length["passkey digits"] = results["passkey"].mean_by_length("token_accuracy")
    for name, r in results.items():
        if name.startswith("needle_"):
            by_length[name.replace("_", " ")] = dict(zip(r.lengths, r.accuracy))
    parts = []
    if by_length:
        lengths = sorted({n for column in by_length.values() for n in column})
        rows = [[n, *(col.get(n, "-") for col in by_length.values())] for n in lengths]
        parts.append(format_table(rows, ["length", *by_length]))
    if "perplexity" in results:
        r = results["perplexity"]
        rows = [list(x) for x in zip(r.bucket_labels(), r.mean_loss, r.perplexity, r.token_count)]
        parts.append(
            f"Perplexity at context {r.length} ({r.num_windows} windows):\n\n"
            + format_table(rows, ["positions", "mean loss", "perplexity", "tokens"])
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
    """``(headers, rows)``: one row per model; passkey per length, last-bucket perplexity."""
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
        exact = passkey.get("mean_exact_match_by_length", {})
        digits = passkey.get("mean_token_accuracy_by_length", {})
        row = [name, rope_label(payload["meta"])]
        row += [exact.get(str(n), "-") for n in lengths]
        row += [digits.get(str(n), "-") for n in lengths]
        ppl = payload["results"].get("perplexity")
        if ppl:
            edges = ppl["bucket_edges"]
            row += [ppl["perplexity"][-1], f"[{edges[-2]}, {edges[-1]})", ppl["overall_perplexity"]]
        else:
            row += ["-", "-", "-"]
        rows.append(row)
    return headers, rows


def perplexity_result(d: dict[str, Any]) -> PerplexityResult:
    """A ``PerplexityResult`` back from its ``report.json`` entry."""
    return PerplexityResult(
        int(d["length"]), list(d["bucket_edges"]), int(d["num_windows"]),
        [float(x) for x in d["mean_loss"]], [float(x) for x in d["perplexity"]],
        list(d["token_count"]), float(d["overall_mean_loss"]),
    )  # fmt: skip
