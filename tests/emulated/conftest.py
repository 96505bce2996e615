"""Fixtures of the CUDA-emulation tests: a corpus, one initial checkpoint, three launches.

Every emulated run of the module-level plans happens in one of three torchrun launches (1, 2 and
4 ranks), in order, so megatron-core and torch are imported three times, not once per run:

* 1 rank: the initial checkpoint, the one-process references (fp32, bf16), a fresh run for the
  CPU-path comparison, an fp16 run, and --rampup-batch-size runs (fresh, and from the initial
  checkpoint);
* 2 ranks: PP=2, PP=2 x VPP=2, a PP=2 run preempted by SIGTERM at iteration 2, its resume at
  PP=2 and at TP=2; a PP=2 ramp straight, stopped mid-ramp and resumed; PP=2 with a full disk
  on one rank, in either checkpoint format; PP=2 saved in Megatron-LM's legacy format
  (``--ckpt-format torch``) at iteration 2 and resumed;
* 4 ranks (``megatron_state_worker.py``): DP=2 x PP=2, TP=2 x PP=2, bf16 + distributed optimizer
  at DP=2 x PP=2 straight, saved at iteration 2 and resumed, in either format; that checkpoint
  re-saved as Megatron-LM's own ``save_checkpoint`` writes the legacy format, and resumed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "training"))

from emulated_run import (  # noqa: E402
    BF16_DISTOPT,
    LEGACY,
    PP2,
    TP2,
    VPP2,
    launch_plan,
    ramp_flags,
    train_flags,
)
from megatron_scripts import llama3_8b_h100_fp8  # noqa: E402
from train_fixtures import make_corpus, make_jsonl  # noqa: E402

from megatron_endprompt.prep.preprocess import preprocess_jsonl  # noqa: E402

OVERLAP = ["--overlap-grad-reduce", "--overlap-param-gather"]
STATE_WORKER = str(HERE / "megatron_state_worker.py")
FP8_SCRIPT_SHRUNK = {
    "--num-layers": "2", "--hidden-size": "64", "--ffn-hidden-size": "128",
    "--num-attention-heads": "4", "--num-query-groups": "2", "--kv-channels": "16",
    "--seq-length": "32", "--max-position-embeddings": "256", "--global-batch-size": "4",
    "--train-samples": "8", "--lr-decay-samples": "8", "--lr-warmup-samples": "2",
    "--eval-iters": "1",
}  # fmt: skip
"""Megatron-LM's Llama-3-8B FP8 example shrunk to CPU size (DTYPE=bf16: no TE here)."""
ENDPROMPT_ADDED = ["--position-mode", "endprompt", "--target-length", "256",
                   "--rope-scaling-type", "linear", "--rope-scaling-factor", "8",
                   "--endprompt-terminal", "tail", "--endprompt-tail-length", "4"]  # fmt: skip


def pytest_collection_modifyitems(items):
    for item in items:
        if str(HERE) in str(item.fspath):
            item.add_marker(pytest.mark.emulated)


@pytest.fixture(scope="session")
def emu_data(tmp_path_factory):
    """(data prefix, cache dir) of a tiny byte-level corpus."""
    d = tmp_path_factory.mktemp("emu_data")
    return make_corpus(str(d), num_docs=80), str(d / "cache")


@pytest.fixture(scope="session")
def emu_hf_data(tmp_path_factory, tiny_hf_tokenizer):
    """(data prefix, cache dir, tokenizer dir): the same kind of corpus, Hugging Face tokens."""
    d = tmp_path_factory.mktemp("emu_hf_data")
    prefix = str(d / "corpus")
    preprocess_jsonl([make_jsonl(str(d), num_docs=80)], prefix, "HuggingFaceTokenizer",
                     tiny_hf_tokenizer, append_eod=True, progress=False)  # fmt: skip
    return prefix + "_text_document", str(d / "cache"), tiny_hf_tokenizer


@pytest.fixture(scope="session")
def emu_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("emu_runs")


@pytest.fixture(scope="session")
def one_rank(emu_data, emu_hf_data, emu_dir) -> dict[str, dict]:
    """The initial checkpoint and the one-process runs.

    ``init``: one iteration warmed up from lr 0, an update of size zero, so the saved weights
    are the initial ones. Every parity run loads them with --finetune: the same weights whatever
    the layout (TP/PP resharding through dist_checkpointing).
    """
    init = str(emu_dir / "init_ckpt")
    ref = ["--load", init, "--finetune"]
    runs = [
        {"name": "init", "flags": train_flags(emu_data, "--save", init, iters=1, warmup=1)},
        {"name": "ref", "flags": train_flags(emu_data, *ref)},
        {"name": "ref_bf16", "flags": train_flags(emu_data, *ref, "--bf16")},
        {"name": "fresh", "flags": train_flags(emu_data)},
        {
            "name": "fp16",
            "flags": train_flags(
                emu_data, "--params-dtype", "float16", "--save", str(emu_dir / "fp16_ckpt"),
                iters=3,
            ),
        },
        {"name": "megatron_fp8_script", "flags": megatron_script_flags(emu_hf_data, emu_dir)},
        {"name": "ramp_fresh", "flags": ramp_flags(emu_data)},
        {"name": "ramp_ref", "flags": ramp_flags(emu_data, *ref)},
    ]  # fmt: skip
    results = launch_plan(1, runs, emu_dir / "one_rank")
    results["init"]["path"] = init
    return results


@pytest.fixture(scope="session")
def two_ranks(emu_data, emu_dir, one_rank) -> dict[str, dict]:
    ref = ["--load", one_rank["init"]["path"], "--finetune"]
    first, again = str(emu_dir / "pp2_first"), str(emu_dir / "pp2_again")
    ramp_first, ramp_again = str(emu_dir / "pp2_ramp_first"), str(emu_dir / "pp2_ramp_again")
    disk_full = str(emu_dir / "pp2_disk_full")
    runs = [
        {"name": "pp2", "flags": train_flags(emu_data, *ref, *PP2)},
        {"name": "pp2_vpp2", "flags": train_flags(emu_data, *ref, *PP2, *VPP2)},
        # Preempted: rank 0 alone receives SIGTERM before the loop's 2nd exit-signal poll.
        {"name": "pp2_first", "flags": train_flags(emu_data, *ref, *PP2, "--save", first),
         "sigterm": "0:2"},
        {"name": "pp2_resumed",
         "flags": train_flags(emu_data, "--load", first, "--save", again, *PP2)},
        {"name": "tp2_resumed", "flags": train_flags(emu_data, "--load", first, *TP2)},
        {"name": "pp2_ramp", "flags": ramp_flags(emu_data, *ref, *PP2)},
        # Stopped after iteration 2 (4 + 4 samples), resumed where the batch grows to 8.
        {"name": "pp2_ramp_first", "flags": ramp_flags(
            emu_data, *ref, *PP2, "--save", ramp_first, "--exit-interval", "2")},
        {"name": "pp2_ramp_resumed", "flags": ramp_flags(
            emu_data, "--load", ramp_first, "--save", ramp_again, *PP2)},
        # A full disk seen by rank 1 alone when saving iteration 4 (iteration 2 saved fine).
        {"name": "pp2_disk_full", "flags": train_flags(
            emu_data, *ref, *PP2, "--save", disk_full, "--save-interval", "2"),
         "enospc": "1:4"},
        {"name": "pp2_torch_disk_full", "flags": train_flags(
            emu_data, *ref, *PP2, "--save", f"{disk_full}_torch", "--save-interval", "2",
            *LEGACY), "enospc": "1:4"},
        # Megatron-LM's legacy format: saved at iteration 2, resumed to 4.
        {"name": "pp2_torch_first", "flags": train_flags(
            emu_data, *ref, *PP2, "--save", f"{first}_torch", *LEGACY, "--exit-interval", "2")},
        {"name": "pp2_torch_resumed", "flags": train_flags(
            emu_data, "--load", f"{first}_torch", "--save", f"{again}_torch", *PP2, *LEGACY)},
    ]  # fmt: skip
    results = launch_plan(2, runs, emu_dir / "two_ranks")
    results["pp2_disk_full"]["save"] = disk_full
    results["pp2_torch_disk_full"]["save"] = f"{disk_full}_torch"
    results["pp2_torch_first"]["save"] = f"{first}_torch"
    results["pp2_first"]["save"] = first
    results["pp2_ramp_first"]["save"] = ramp_first
    return results


@pytest.fixture(scope="session")
def four_ranks(emu_data, emu_dir, one_rank) -> dict[str, dict]:
    ref = ["--load", one_rank["init"]["path"], "--finetune"]
    first, again = str(emu_dir / "distopt_first"), str(emu_dir / "distopt_again")
    mlm_legacy = str(emu_dir / "distopt_megatron_lm_legacy")
    runs = [
        {"name": "dp2_pp2", "flags": train_flags(emu_data, *ref, *PP2)},
        {"name": "tp2_pp2", "flags": train_flags(emu_data, *ref, *TP2, *PP2)},
        {"name": "dp2_pp2_bf16_distopt", "flags": train_flags(emu_data, *ref, *PP2, *BF16_DISTOPT)},
        {"name": "dp2_pp2_bf16_distopt_overlap",
         "flags": train_flags(emu_data, *ref, *PP2, *BF16_DISTOPT, *OVERLAP)},
        {"name": "distopt_first", "flags": train_flags(
            emu_data, *ref, *PP2, *BF16_DISTOPT, "--save", first, "--exit-interval", "2")},
        {"name": "distopt_resumed", "flags": train_flags(
            emu_data, "--load", first, "--save", again, *PP2, *BF16_DISTOPT)},
        {"name": "distopt_torch_first", "flags": train_flags(
            emu_data, *ref, *PP2, *BF16_DISTOPT, "--save", f"{first}_torch", *LEGACY,
            "--exit-interval", "2")},
        {"name": "distopt_torch_resumed", "flags": train_flags(
            emu_data, "--load", f"{first}_torch", *PP2, *BF16_DISTOPT)},
        # Our torch_dist checkpoint of iteration 2, loaded and written again by the test's own
        # copy of Megatron-LM's legacy save_checkpoint; then resumed by our CUDA path.
        {"name": "distopt_megatron_lm_legacy", "action": "megatron_lm_legacy_save",
         "save": mlm_legacy, "flags": train_flags(emu_data, "--load", first, *PP2, *BF16_DISTOPT)},
        {"name": "distopt_megatron_lm_legacy_resumed", "flags": train_flags(
            emu_data, "--load", mlm_legacy, *PP2, *BF16_DISTOPT)},
    ]  # fmt: skip
    results = launch_plan(4, runs, emu_dir / "four_ranks", worker=STATE_WORKER)
    results["distopt_first"]["save"] = first
    results["distopt_torch_first"]["save"] = f"{first}_torch"
    results["distopt_megatron_lm_legacy_resumed"]["load"] = mlm_legacy
    return results


def megatron_script_flags(emu_hf_data, emu_dir: Path) -> list[str]:
    """The shrunken Llama-3-8B FP8 example's flags plus the EndPrompt ones, nothing else."""
    data, cache, tokenizer = emu_hf_data
    ckpt, tb = str(emu_dir / "megatron_script_ckpt"), str(emu_dir / "megatron_script_tb")
    argv = llama3_8b_h100_fp8(ckpt, tb, tokenizer, data, cache, dtype="bf16",
                              shrink=FP8_SCRIPT_SHRUNK)  # fmt: skip
    return argv + ENDPROMPT_ADDED
