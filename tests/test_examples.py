"""The README's main job and the launch examples keep working (so the docs never rot)."""

import os
import subprocess

import pytest

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
    assert out.count("TRAIN_SUMMARY") == 2
    # The long-context table: one row per model, passkey and perplexity columns.
    for row in ("| base (S=256) |", "| PI x8, no training |", "| EndPrompt, PI x8 |"):
        assert row in out
    assert (tmp_path / "qs_smoke" / "tb" / "endprompt" / "loss_curve.png").is_file()
    compare = tmp_path / "qs_smoke" / "eval" / "compare"
    assert (compare / "compare.md").is_file() and (compare / "compare_perplexity.png").is_file()
    assert os.path.isfile(
        tmp_path / "qs_smoke" / "ckpt_endprompt" / "latest_checkpointed_iteration.txt"
    )
