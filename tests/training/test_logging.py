"""Console/TensorBoard metrics: ETA arithmetic, FLOP count, TensorBoard scalars."""

import os

import pytest

from megatron_endprompt.training.logging import (
    MetricsLogger,
    format_duration,
    model_flops_per_token,
)


def test_format_duration():
    assert format_duration(3725) == "1h02m05s"
    assert format_duration(65) == "1m05s"
    assert format_duration(float("nan")) == "?"


def test_eta_counts_iterations_since_start(monkeypatch):
    logger = MetricsLogger(None, total_iters=100, start_iter=50)
    logger._t_start = 100.0  # the run (re)started at t = 100 s; the log call comes 10 s later
    monkeypatch.setattr("megatron_endprompt.training.logging.time.perf_counter", lambda: 110.0)
    line = logger.log(60, {"loss": 2.5}, interval_s=10.0)
    # 10 iterations in 10 s since resuming at 50 -> 40 left -> 40 s.
    assert "eta 0m40s" in line and "elapsed 0m10s" in line and "loss 2.5" in line


def test_flops_per_token_hand_worked():
    # 1 layer, h=2, ffn=4, S=2, V=3, MHA, no SwiGLU:
    # attn proj 2*h*h*(2+2) = 32, attn core 2*2*h*S/2 = 8, mlp 2*h*ffn*2 = 32, output 2*h*V = 12
    assert model_flops_per_token(1, 2, 4, 2, 3, 1, 1, False) == pytest.approx(3 * (72 + 12))


def test_tensorboard_scalars_written(tmp_path):
    logger = MetricsLogger(str(tmp_path / "tb"), total_iters=2)
    logger.log(1, {"loss": 1.0, "lr": 0.1}, interval_s=1.0)
    logger.log_eval(1, 0.5)
    logger.close()
    files = os.listdir(tmp_path / "tb")
    assert any(f.startswith("events.out.tfevents") for f in files)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert {"train/loss", "train/lr", "valid/loss", "valid/ppl"} <= set(acc.Tags()["scalars"])
    assert acc.Scalars("train/loss")[0].value == 1.0


def test_disabled_logger_is_silent(capsys):
    assert MetricsLogger(None, total_iters=1, enabled=False).log(1, {"loss": 1.0}, 1.0) is None
    assert capsys.readouterr().out == ""


def test_loss_curve_png(tmp_path):
    path = tmp_path / "sub" / "loss_curve.png"
    logger = MetricsLogger(None, total_iters=3, plot_path=str(path))
    for it, loss in ((1, 3.0), (2, 2.5), (3, 2.0)):
        logger.log(it, {"loss": loss}, interval_s=1.0)
    logger.log_eval(3, 2.2)
    logger.close()
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert sorted(os.listdir(path.parent)) == ["loss_curve.png"]  # no temporary file left


def _clock(monkeypatch, step_s: float):
    """Make ``time.perf_counter`` in the logging module advance ``step_s`` per call."""
    now = [0.0]

    def tick():
        now[0] += step_s
        return now[0]

    monkeypatch.setattr("megatron_endprompt.training.logging.time.perf_counter", tick)


def test_validation_progress_a_line_per_tenth_with_eta(monkeypatch, capsys):
    _clock(monkeypatch, 30.0)  # every iteration takes 30 s: each tenth is due
    progress = MetricsLogger(None, total_iters=1).eval_progress(100)
    for done in range(1, 101):
        progress(done)
    lines = capsys.readouterr().out.splitlines()
    assert [int(line.split()[1].split("/")[0]) for line in lines] == list(range(10, 101, 10))
    # 10 iterations at 30 s each by the first line: elapsed 5m00s, 90 left at that pace: 45m00s.
    assert lines[0] == "validation: 10/100 iterations, elapsed 5m00s eta 45m00s"
    assert lines[-1].endswith("eta 0m00s")


def test_validation_progress_short_pass_prints_nothing(monkeypatch, capsys):
    _clock(monkeypatch, 0.01)
    progress = MetricsLogger(None, total_iters=1).eval_progress(100)
    for done in range(1, 101):
        progress(done)
    assert capsys.readouterr().out == ""


def test_validation_progress_disabled_rank_is_silent(monkeypatch, capsys):
    _clock(monkeypatch, 30.0)
    progress = MetricsLogger(None, total_iters=1, enabled=False).eval_progress(3)
    for done in range(1, 4):
        progress(done)
    assert capsys.readouterr().out == ""
