"""The README's main job and the launch examples keep working (so the docs never rot)."""

import json
import os
import shlex
import shutil
import subprocess

import pytest

from megatron_endprompt.cli import parse_run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("script", ["llama3_8b_64k.sh", "llama3_70b_64k.sh"])
def test_example_dry_run_validates_the_full_config(script):
    proc = subprocess.run(
        ["bash", os.path.join(ROOT, "examples", script)],
        env={**os.environ, "DRY_RUN": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PLAN_OK" in proc.stdout
    assert "target L=65536" in proc.stdout
    assert "65535" in proc.stdout  # the fixed terminal ends at L - 1


def test_example_dry_run_rejects_a_bad_layout():
    # 8 GPUs cannot hold TP=2 x PP=1 with a global batch the data-parallel size does not divide.
    env = {**os.environ, "DRY_RUN": "1", "GPUS_PER_NODE": "6"}
    proc = subprocess.run(
        ["bash", os.path.join(ROOT, "examples", "llama3_8b_64k.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "error: --global-batch-size=64" in proc.stdout


@pytest.mark.slow
def test_quickstart_smoke(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "qs")}
    proc = subprocess.run(
        ["bash", os.path.join(ROOT, "examples", "quickstart_cpu.sh"), "--smoke"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = proc.stdout
    assert "quickstart done" in out
    assert out.count("TRAIN_SUMMARY") == 3
    # The long-context table: one row per model (the control too), perplexity by position; no
    # passkey columns (all zeros at this size), one line pointing to the replication instead.
    rows = ("| base (S=256) |", "| PI x8, no training |", "| PI x8 + contiguous S=256 (control) |",
            "| EndPrompt, PI x8 |")  # fmt: skip
    for row in rows:
        assert row in out
    assert "passkey@" not in out and "examples/replicate_small.sh" in out
    # The control trained on the EndPrompt run's budget: same iterations and physical length.
    summaries = [json.loads(line.split(" ", 1)[1]) for line in out.splitlines()
                 if line.startswith("TRAIN_SUMMARY")]  # fmt: skip
    assert summaries[1]["consumed_samples"] == summaries[2]["consumed_samples"] > 0
    assert (tmp_path / "qs_smoke" / "tb" / "endprompt" / "loss_curve.png").is_file()
    compare = tmp_path / "qs_smoke" / "eval" / "compare"
    assert (compare / "compare.md").is_file() and (compare / "compare_perplexity.png").is_file()
    assert os.path.isfile(
        tmp_path / "qs_smoke" / "ckpt_endprompt" / "latest_checkpointed_iteration.txt"
    )


GPU_CHECKS = os.path.join(ROOT, "scripts", "gpu_checks.sh")


def test_gpu_checks_script_is_valid_bash():
    proc = subprocess.run(["bash", "-n", GPU_CHECKS], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    if shutil.which("shellcheck"):
        proc = subprocess.run(["shellcheck", GPU_CHECKS], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout


def test_gpu_checks_training_runs_pass_the_training_parser(tmp_path):
    # --print-train-argv lists every training run (TE and FP8 assumed present) and runs nothing.
    out = tmp_path / "gpu_checks"
    proc = subprocess.run(
        ["bash", GPU_CHECKS, "--print-train-argv", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert not out.exists()  # nothing was run or written
    runs = {}
    for line in proc.stdout.splitlines():
        tag, name, *argv = shlex.split(line)
        assert tag == "TRAIN_ARGV" and argv[:2] == ["-m", "megatron_endprompt.train"], line
        # Full validation as on a one-GPU machine: flag names, values, FP8 shapes, batch sizes.
        runs[name] = parse_run_config(argv[2:], world_size=1, cuda_available=True)
    assert {r.device for r in runs.values()} == {"cuda"}
    assert runs["te_fused_rope_bf16"].model.transformer_impl == "te"
    assert not runs["te_fused_rope_bf16"].endprompt.is_per_sample_random
    assert runs["te_unfused_per_sample_bf16"].endprompt.is_per_sample_random
    assert {runs[f"fp8_{r}"].training.fp8_recipe for r in ("delayed", "tensorwise")} == {
        "delayed",
        "tensorwise",
    }
    assert runs["recompute_full"].training.recompute_granularity == "full"
    assert runs["recompute_selective"].training.recompute_granularity == "selective"
    saved, resumed = runs["distopt_save_at_10"], runs["distopt_resume_to_20"]
    straight = runs["distopt_straight_20"]
    assert saved.training.exit_interval == 10 and resumed.checkpoint.load == saved.checkpoint.save
    for run in (saved, resumed, straight):
        assert run.parallel.use_distributed_optimizer and run.train_iters == 20
