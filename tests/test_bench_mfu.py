"""benchmarks/bench_mfu.py: its layouts and arithmetic, refused flags, and a tiny CPU run."""

import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_mfu  # noqa: E402

TINY_CPU = ["--device", "cpu", "--tiny"]


def test_position_batches_follow_the_library_layouts():
    args = bench_mfu.parse_args([*TINY_CPU, "--micro-batch-size", "2"])
    S, t, L = args.seq_length, args.tail_length, args.target_length
    (contiguous,) = bench_mfu.position_batches(args, "contiguous", 1)
    assert contiguous.tolist() == [list(range(S))] * 2
    (pose,) = bench_mfu.position_batches(args, "endprompt", 1)
    assert pose.shape == (2, S) and (pose.diff(dim=1) > 0).all()
    assert pose[:, -t:].tolist() == [list(range(L - t, L))] * 2  # fixed terminal ends at L - 1
    assert pose[0].tolist() != pose[1].tolist()  # endprompt_pose: a layout per sample
    args = bench_mfu.parse_args([*TINY_CPU, "--layout", "endprompt"])
    (fixed,) = bench_mfu.position_batches(args, "endprompt", 1)
    assert fixed[0].tolist() == list(range(S - t)) + list(range(L - t, L))


def test_results_arithmetic_hand_worked():
    args = bench_mfu.parse_args([*TINY_CPU, "--peak-tflops", "100", "--fp8-peak-tflops", "200"])
    medians = {"bf16": {"contiguous": 0.5, "endprompt": 0.25}}
    medians["fp8_delayed"] = {"contiguous": 0.25, "endprompt": 0.125}
    out = bench_mfu.results(args, medians)
    fpt = bench_mfu.flops_per_token(args)
    assert out["bf16_endprompt_vs_contiguous_tokens_per_s_ratio"] == 2.0
    assert out["bf16_contiguous_tokens_per_s"] == 256 / 0.5  # S = 256, micro-batch 1
    assert out["bf16_contiguous_mfu"] == pytest.approx(512 * fpt / 100e12)
    assert out["fp8_delayed_endprompt_mfu"] == pytest.approx(2048 * fpt / 200e12)
    assert out["fp8_delayed_vs_bf16_endprompt_tokens_per_s_ratio"] == 2.0


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--precisions", "fp8_delayed"], "--precisions fp8_delayed"),
        (["--precisions", "int4"], "--precisions"),
        (["--impl", "te"], "--impl=te"),
        (["--tail-length", "0"], "--tail-length"),
    ],
)
def test_refused_flags_are_named(argv, flag, capsys):
    assert bench_mfu.main(["--device", "cpu", *argv]) == 2
    assert flag in capsys.readouterr().err


def test_tiny_cpu_run_prints_parseable_results():
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_mfu.py"), *TINY_CPU],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            _, key, value = line.split()
            results[key] = float(value)
    ratio = results["bf16_endprompt_vs_contiguous_tokens_per_s_ratio"]
    assert math.isfinite(ratio) and ratio > 0
    for arm in ("contiguous", "endprompt"):
        assert 0 < results[f"bf16_{arm}_mfu"] < 1
        assert results[f"bf16_{arm}_tokens_per_s"] > 0
