"""Launching emulated ``--device cuda`` runs (the CUDA-emulation tests' helpers).

Every run goes through ``emulated_train.py`` (the real ``training.loop.train`` with
``--device cuda`` under :mod:`cuda_emulation`), one process per rank under torchrun on gloo.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "training"))
sys.path.insert(0, str(HERE.parent / "training"))

from train_fixtures import override_flags  # noqa: E402

from megatron_endprompt.device import free_port  # noqa: E402

WORKER = str(HERE / "emulated_train.py")

# A 4-layer model (so PP=2 x VPP=2 has one layer per virtual stage), 4 heads / 2 groups (TP=2
# splits both), a vocabulary padded to 260 at TP=1 and TP=2 alike, and EndPrompt+PoSE layouts
# drawn per sample with a weighted cue terminal: every stage rotates by per-row positions and the
# loss is sum(w * CE) / sum(w) with w in {1, 0.1, 0}.
MODEL = [
    "--model-preset", "tiny",
    "--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "128",
    "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "32",
    "--max-position-embeddings", "256", "--make-vocab-size-divisible-by", "2",
]  # fmt: skip
ENDPROMPT = [
    "--position-mode", "endprompt_pose", "--endprompt-terminal", "cue",
    "--endprompt-cues", "End.", "That is all.", "--target-length", "256",
    "--allow-unscaled-extension",
]  # fmt: skip


def run_flags(data: str, cache: str, *extra: str, warmup: int = 0) -> list[str]:
    """Flags of an emulated run (no --device: the worker sets --device cuda).

    A flag of ``extra`` replaces the default one (the parser refuses a flag given twice).
    """
    base = [
        *MODEL,
        *ENDPROMPT,
        "--tokenizer-type", "ByteTokenizer", "--data-path", data, "--data-cache-path", cache,
        "--split", "90,10,0", "--micro-batch-size", "2", "--global-batch-size", "8",
        "--lr", "1e-3", "--lr-warmup-iters", str(warmup), "--lr-decay-style", "cosine",
        "--lr-decay-iters", "8", "--log-interval", "1", "--num-workers", "0", "--seed", "7",
    ]  # fmt: skip
    return override_flags(base, list(extra))


ITERS = 4
PP2 = ["--pipeline-model-parallel-size", "2"]
VPP2 = ["--num-layers-per-virtual-pipeline-stage", "1"]  # 4 layers / PP 2 / 1 = 2 virtual stages
TP2 = ["--tensor-model-parallel-size", "2"]
BF16_DISTOPT = ["--bf16", "--use-distributed-optimizer"]
LEGACY = ["--ckpt-format", "torch"]  # Megatron-LM's legacy per-shard format


def train_flags(emu_data, *extra, iters: int = ITERS, warmup: int = 0) -> list[str]:
    """run_flags() on the ``emu_data`` fixture's corpus, ``--train-iters`` ITERS."""
    data, cache = emu_data
    return run_flags(data, cache, "--train-iters", str(iters), *extra, warmup=warmup)


RAMP = ["--train-samples", "24", "--rampup-batch-size", "4", "4", "8", "--eval-iters", "1"]
"""Megatron-LM's ramp 4 -> 8 (--global-batch-size) by 4 over 8 samples: one increment every 8
samples, so batches 4 (0 consumed), 4 (4), 8 (8 <= 8: int(8 / 8) = 1 increment), then whole
batches of 8 of the 24 - 16 samples left: 4 iterations (ITERS), 24 samples. Validation (one
batch of the full 8) at the end."""
RAMP_BATCHES = [4, 4, 8, 8]


def ramp_flags(emu_data, *extra) -> list[str]:
    """run_flags() with RAMP: sample-based, so without the iteration-based schedule flags (the
    rate decays over the 24 samples, no warmup)."""
    data, cache = emu_data
    base = run_flags(data, cache, *RAMP, *extra)
    i = base.index("--lr-warmup-iters")
    del base[i : i + 2]
    i = base.index("--lr-decay-iters")
    del base[i : i + 2]
    return base


def launch_plan(
    nproc: int, runs: list[dict], workdir: Path, worker: str = WORKER
) -> dict[str, dict]:
    """Run a list of emulated runs in ONE torchrun launch of ``nproc`` ranks, in order.

    ``runs``: ``{"name", "flags", "sigterm" (optional "R:K")}``. Returns name -> the reporting
    rank's TrainResult as a dict, plus ``ranks`` (every rank's result). ``worker``: another
    script taking the same plan (``megatron_state_worker.py``, whose actions other than
    training report nothing: they are left out here).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    plan = {"runs": [{**r, "out": str(workdir / r["name"])} for r in runs]}
    plan_path = workdir / "plan.json"
    plan_path.write_text(json.dumps(plan))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-port", str(free_port()), worker, str(plan_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    (workdir / "stdout.txt").write_text(proc.stdout)
    assert proc.returncode == 0, _failure(proc)
    trained = [r for r in runs if r.get("action", "train") == "train"]
    return {r["name"]: _read(nproc, workdir / r["name"]) for r in trained}


def _failure(proc: subprocess.CompletedProcess) -> str:
    lines = (proc.stdout + proc.stderr).splitlines()
    causes = [ln for ln in lines if "Error" in ln or "emulated run" in ln][:20]
    return "\n".join(causes) + "\n...\n" + "\n".join(lines[-60:])


def _read(nproc: int, out: Path) -> dict:
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]
    (reporting,) = [r for r in ranks if r["reporting"]]
    return {**reporting, "ranks": ranks}


def assert_refused_save_kept_tracker(run: dict, fmt: str) -> None:
    """A save of iteration 4 refused on one rank: every rank ends with the one-line ENOSPC error
    naming ``iter_0000004.tmp``, nothing partial is left, and the tracker still names iteration
    2, which opens as a checkpoint of format ``fmt``."""
    import os

    from megatron_endprompt import checkpoint as ckpt
    from megatron_endprompt.checkpoint.stored import open_checkpoint

    for rank in run["ranks"]:
        error = rank["error"]
        assert error.startswith("cannot write ") and "iter_0000004.tmp" in error, error
        assert error.endswith("No space left on device (errno 28 ENOSPC)"), error
    save = run["save"]
    assert ckpt.read_tracker(save) == 2 and ckpt.list_checkpoints(save) == [2]
    assert not [n for n in os.listdir(save) if n.endswith((".tmp", ".old"))]
    stored = open_checkpoint(save)
    assert stored.format == fmt and stored.iteration == 2
