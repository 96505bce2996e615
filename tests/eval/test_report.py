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


def passkey_with_trials() -> PasskeyResult:
    em_trials = [[[1.0, 1.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0]], [[0.0, 0.0, 1.0, 0.0], [0.0] * 4]]
    tok_trials = [[[1.0, 0.8, 0.2, 1.0], [0.4, 1.0, 0.2, 0.2]], [[0.2, 0.0, 1.0, 0.4], [0.2] * 4]]
    mean = lambda grid: [[float(np.mean(c)) for c in row] for row in grid]  # noqa: E731
    return PasskeyResult(
        lengths=[1024, 2048], depths=[0.0, 1.0], trials=4, seed=3, digits=5,
        exact_match=mean(em_trials), token_accuracy=mean(tok_trials),
        exact_match_trials=em_trials, token_accuracy_trials=tok_trials,
        interval_level=0.9, bootstrap_resamples=500,
    )  # fmt: skip


def perplexity_with_windows() -> PerplexityResult:
    window_mean_loss = [[2.0, 1.5], [2.4, 1.1], [1.9, 1.6]]
    losses = np.asarray(window_mean_loss)
    means = losses.mean(axis=0)
    r = PerplexityResult(
        length=512, bucket_edges=[0, 128, 512], num_windows=3,
        mean_loss=[float(x) for x in means], perplexity=[math.exp(x) for x in means],
        token_count=[384, 1152], overall_mean_loss=float((means[0] + 3 * means[1]) / 4),
        window_mean_loss=window_mean_loss,
    )  # fmt: skip
    r.compute_intervals(level=0.8, resamples=300)
    return r


def test_report_intervals_round_trip(tmp_path):
    from megatron_endprompt.eval.intervals import bootstrap_mean_interval, format_interval
    from megatron_endprompt.eval.summary import perplexity_result, summary_markdown

    pk, ppl = passkey_with_trials(), perplexity_with_windows()
    json_path, md_path = write_report({"passkey": pk, "perplexity": ppl}, tmp_path, {})
    data = json.load(open(json_path))["results"]
    # Passkey: per length, trials resampled within each depth.
    values = [v for cell in pk.exact_match_trials[1] for v in cell]
    want = bootstrap_mean_interval(values, level=0.9, resamples=500, strata=[0] * 4 + [1] * 4)
    assert data["passkey"]["exact_match_interval_by_length"]["2048"] == pytest.approx(list(want))
    assert data["passkey"]["interval_level"] == 0.9
    assert data["passkey"]["bootstrap_resamples"] == 500
    assert data["passkey"]["token_accuracy_trials"] == pk.token_accuracy_trials
    # Perplexity: exp of the bootstrap over windows, read back by perplexity_result.
    lo, hi = bootstrap_mean_interval([1.5, 1.1, 1.6], level=0.8, resamples=300)
    assert ppl.perplexity_interval[1] == pytest.approx((math.exp(lo), math.exp(hi)))
    back = perplexity_result(data["perplexity"])
    assert back.window_mean_loss == ppl.window_mean_loss
    assert back.perplexity_interval == pytest.approx(ppl.perplexity_interval)
    assert back.overall_perplexity_interval == pytest.approx(ppl.overall_perplexity_interval)
    assert back.interval_level == 0.8 and back.bootstrap_resamples == 300
    # Markdown: "mean [low, high]" cells.
    md = open(md_path).read()
    cell = format_interval(pk.mean_by_length()[2048], want)
    assert f"| 2048 | 0.25 | 0 | {cell} |" in md
    assert format_interval(ppl.perplexity[1], ppl.perplexity_interval[1]) in md
    assert "90% percentile-bootstrap interval (500 resamples" in md
    summary = summary_markdown({"passkey": pk, "perplexity": ppl})
    assert f"| 2048 | {cell} |" in summary
    assert format_interval(ppl.overall_perplexity, ppl.overall_perplexity_interval) in summary


def test_old_report_entries_have_no_intervals():
    from megatron_endprompt.eval.intervals import format_interval
    from megatron_endprompt.eval.summary import compare_rows
    from megatron_endprompt.eval.summary import perplexity_result as read_back

    old = perplexity_result(1.0).to_dict()
    for key in ("window_mean_loss", "perplexity_interval", "overall_perplexity_interval",
                "interval_level", "bootstrap_resamples", "bootstrap_seed"):  # fmt: skip
        old.pop(key)
    back = read_back(old)
    assert back.perplexity_interval is None and back.overall_perplexity_interval is None
    assert back.window_mean_loss == [] and back.perplexity == old["perplexity"]
    new = {
        "meta": {},
        "results": {
            "passkey": passkey_with_trials().to_dict(),
            "perplexity": perplexity_with_windows().to_dict(),
        },
    }
    old_pk = passkey_result().to_dict()
    for key in [k for k in old_pk if "interval" in k or "trials" in k or "bootstrap" in k]:
        old_pk.pop(key)
    headers, rows = compare_rows(
        {"old": {"meta": {}, "results": {"passkey": old_pk, "perplexity": old}}, "new": new}
    )
    assert headers[2:4] == ["passkey@1024", "passkey@2048"]
    assert rows[0][2:4] == [pytest.approx(2.75 / 3), 0.25]  # plain means, no interval
    assert rows[0][-3] == pytest.approx(math.exp(1.25)) and isinstance(rows[0][-1], float)
    pk = passkey_with_trials()
    assert rows[1][2] == format_interval(pk.mean_by_length()[1024], pk.interval_by_length()[1024])
    assert rows[1][-3].endswith("]") and rows[1][-1].endswith("]")


def test_plots_with_intervals(tmp_path):
    from megatron_endprompt.eval.report import plot_passkey_by_length

    lines = plot_perplexity_by_position(
        {"a": perplexity_with_windows(), "b": perplexity_result(1.0)}, tmp_path / "ppl.png"
    )
    bars = plot_passkey_by_length(passkey_with_trials(), tmp_path / "pk.png")
    plain = plot_passkey_by_length(passkey_result(), tmp_path / "pk_plain.png")
    for path in (lines, bars, plain):
        with open(path, "rb") as f:
            assert f.read(8) == PNG_MAGIC
        assert imread(path).std() > 0.01


def test_accuracy_by_length_panels(tmp_path):
    from megatron_endprompt.eval.report import plot_accuracy_by_length

    panels = {
        "exact": {
            "a": {128: (1.0, None), 256: (0.5, 0.1)},
            "b": {128: (0.8, 0.2), 256: (0.0, 0.0)},
        },
        "digits": {"a": {128: (1.0, None), 256: (0.7, None)}},
    }
    path = plot_accuracy_by_length(panels, tmp_path / "acc.png")
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    image = imread(path)
    assert image.shape[1] > image.shape[0]  # two panels side by side
    assert image.std() > 0.01
    assert os.listdir(tmp_path) == ["acc.png"]
    with pytest.raises(ValueError, match="panels"):
        plot_accuracy_by_length({"exact": {}}, tmp_path / "empty.png")
