"""Report files: JSON round trip, markdown tables, PNG plots, atomic writes."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
from matplotlib.image import imread

from megatron_endprompt.eval.needle import NeedleResult
from megatron_endprompt.eval.passkey import PasskeyResult
from megatron_endprompt.eval.perplexity import PerplexityResult
from megatron_endprompt.eval.report import (
    format_table,
    plot_passkey_heatmap,
    plot_perplexity_by_position,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def passkey_result() -> PasskeyResult:
    return PasskeyResult(
        lengths=[1024, 2048],
        depths=[0.0, 0.5, 1.0],
        trials=4,
        seed=3,
        digits=5,
        exact_match=[[1.0, 0.75, 1.0], [0.5, 0.0, 0.25]],
        token_accuracy=[[1.0, 0.9, 1.0], [0.8, 0.4, 0.6]],
    )


def perplexity_result(scale: float) -> PerplexityResult:
    losses = [2.0 * scale, 1.5 * scale, 1.25 * scale]
    return PerplexityResult(
        length=1024,
        bucket_edges=[0, 256, 512, 1024],
        num_windows=2,
        mean_loss=losses,
        perplexity=[math.exp(x) for x in losses],
        token_count=[512, 512, 1024],
        overall_mean_loss=(losses[0] + losses[1] + 2 * losses[2]) / 4,
    )


def test_format_table():
    table = format_table([["a", 0.123456, 3], ["b|c", 2.0, np.int64(4)]], ["name", "x", "n"])
    assert table == ("| name | x | n |\n|---|---|---|\n| a | 0.1235 | 3 |\n| b\\|c | 2 | 4 |\n")
    with pytest.raises(ValueError, match=r"rows\[0\]"):
        format_table([[1, 2]], ["a"])
    with pytest.raises(ValueError, match="headers"):
        format_table([], [])


def test_passkey_means():
    r = passkey_result()
    assert r.mean_by_length() == {1024: pytest.approx(2.75 / 3), 2048: pytest.approx(0.25)}
    assert r.mean_by_length("token_accuracy")[2048] == pytest.approx(0.6)


def test_write_report_round_trip(tmp_path):
    results = {
        "passkey": passkey_result(),
        "needle_single": NeedleResult("single", [1024], 2, 0, [0.5], [[1.0, 0.0]]),
        "ppl_1024": perplexity_result(1.0),
    }
    meta = {
        "checkpoint": "ckpt/iter_100",
        "rope_scaling": {"type": "linear", "factor": 4.0},
        "seeds": [1, 2],
        "note": np.float32(0.5),
    }
    json_path, md_path = write_report(results, tmp_path / "out", meta)
    assert sorted(os.listdir(tmp_path / "out")) == ["report.json", "report.md"]
    with open(json_path) as f:
        data = json.load(f)
    assert data["meta"] == {
        "checkpoint": "ckpt/iter_100",
        "rope_scaling": {"type": "linear", "factor": 4.0},
        "seeds": [1, 2],
        "note": 0.5,
    }
    assert data["results"]["needle_single"]["accuracy"] == [0.5]
    assert data["results"]["passkey"]["exact_match"] == [[1.0, 0.75, 1.0], [0.5, 0.0, 0.25]]
    assert data["results"]["passkey"]["mean_token_accuracy_by_length"]["2048"] == pytest.approx(0.6)
    ppl = data["results"]["ppl_1024"]
    assert ppl["perplexity"] == pytest.approx([math.exp(2.0), math.exp(1.5), math.exp(1.25)])
    assert ppl["overall_perplexity"] == pytest.approx(math.exp(1.5))
    md = open(md_path).read()
    assert "## passkey" in md and "## ppl_1024" in md
    assert "| 2048 | 0.5 | 0 | 0.25 | 0.25 |" in md
    assert "| [256, 512) | 1.5 | 4.482 | 512 |" in md
    assert '| checkpoint | "ckpt/iter_100" |' in md


def test_write_report_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="results"):
        write_report({}, tmp_path, {})
    with pytest.raises(ValueError, match="not JSON-able"):
        write_report({"x": 1}, tmp_path, {"checkpoint": object()})
    # Nothing half-written is left behind.
    assert os.listdir(tmp_path) == []


def test_plots_are_valid_pngs(tmp_path):
    heat = plot_passkey_heatmap(passkey_result(), tmp_path / "passkey.png")
    lines = plot_perplexity_by_position(
        {"endprompt": perplexity_result(1.0), "pose": perplexity_result(1.2)},
        tmp_path / "ppl.png",
    )
    for path in (heat, lines):
        with open(path, "rb") as f:
            assert f.read(8) == PNG_MAGIC
        image = imread(path)
        assert image.ndim == 3 and min(image.shape[:2]) > 100
        assert image.std() > 0.01  # not a blank canvas
    assert sorted(os.listdir(tmp_path)) == ["passkey.png", "ppl.png"]
    with pytest.raises(ValueError, match="results_by_model"):
        plot_perplexity_by_position({}, tmp_path / "empty.png")
