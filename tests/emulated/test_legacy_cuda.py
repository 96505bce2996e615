"""Megatron-LM's legacy ``--ckpt-format torch`` on the (emulated) CUDA path, both ways.

The runs come from the launches in conftest.py: PP=2 (fp32, FP32Optimizer) and bf16 + the
distributed optimizer at DP=2 x PP=2 (``distrib_optim.pt``), each saved in the legacy format at
iteration 2 and resumed to 4; and the bf16 one's torch_dist checkpoint written again by the
test's own copy of Megatron-LM's legacy ``save_checkpoint`` (megatron_state_worker.py), resumed.
The references are independent: the straight runs' floats, a torch_dist checkpoint of the same
training, and the names and keys Megatron-LM core_v0.16.1's ``checkpointing.py`` writes.
"""

from __future__ import annotations

import argparse
import os

import pytest
import torch
from emulated_run import ITERS, assert_refused_save_kept_tracker

from megatron_endprompt import checkpoint as ckpt
from megatron_endprompt.checkpoint.layout import verify_checksum
from megatron_endprompt.checkpoint.shards import safe_load
from megatron_endprompt.checkpoint.stored import open_checkpoint
from megatron_endprompt.checkpoint.weights import rename_to_model_keys

pytestmark = pytest.mark.slow

# megatron/training/checkpointing.py (core_v0.16.1), generate_state_dict's insertion order for
# --ckpt-format torch (no virtual pipeline, optimizer and RNG saved, no rerun state), then
# save_checkpoint's num_floating_point_operations_so_far; our run_config after them.
MEGATRON_LM_KEYS = [
    "args", "checkpoint_version", "iteration", "model", "optimizer", "opt_param_scheduler",
    "rng_state", "num_floating_point_operations_so_far",
]  # fmt: skip
# get_rng_state: one dict per list entry (without --data-parallel-random-init: one entry).
RNG_KEYS = {"random_rng_state", "np_rng_state", "torch_rng_state", "cuda_rng_state",
            "rng_tracker_states"}  # fmt: skip
# get_checkpoint_name with TP = 1, PP = 2: mp_rank_{tp:02d}_{pp:03d}; DP > 0 writes nothing.
STAGES = ["mp_rank_00_000", "mp_rank_00_001"]

RESUMES = [  # (launch, straight run, legacy save at iteration 2 or None, its resume)
    ("two_ranks", "pp2", "pp2_torch_first", "pp2_torch_resumed"),
    ("four_ranks", "dp2_pp2_bf16_distopt", "distopt_torch_first", "distopt_torch_resumed"),
    ("four_ranks", "dp2_pp2_bf16_distopt", None, "distopt_megatron_lm_legacy_resumed"),
]


@pytest.mark.parametrize("launch,straight,first,resumed", RESUMES, ids=[r[3] for r in RESUMES])
def test_legacy_checkpoint_resume_is_bit_exact(request, launch, straight, first, resumed):
    """Saved in the legacy format at iteration 2, resumed to 4: the straight run's floats."""
    runs = request.getfixturevalue(launch)
    if first is not None:
        assert runs[first]["iterations"] == 2 and ckpt.read_tracker(runs[first]["save"]) == 2
    got, want = runs[resumed], runs[straight]
    assert got["iterations"] == ITERS and len(got["losses"]) == ITERS - 2
    assert got["losses"] == want["losses"][2:]
    assert got["grad_norms"] == want["grad_norms"][2:]


def _shards(save: str) -> dict[str, dict]:
    folder = ckpt.iteration_dir(save, 2)
    return {n: safe_load(os.path.join(folder, n, ckpt.SHARD_FILE), "test") for n in STAGES}


@pytest.mark.parametrize("launch,name,distributed", [
    ("two_ranks", "pp2_torch_first", False),
    ("four_ranks", "distopt_torch_first", True),
], ids=["pp2", "dp2_pp2_bf16_distopt"])  # fmt: skip
def test_legacy_save_is_megatron_lm_layout(request, launch, name, distributed):
    """Folders, files and shard keys as Megatron-LM's legacy save_checkpoint writes them."""
    save = request.getfixturevalue(launch)[name]["save"]
    folder = ckpt.iteration_dir(save, 2)
    assert sorted(os.listdir(folder)) == STAGES
    files = [ckpt.SHARD_FILE] + (["distrib_optim.pt"] if distributed else [])
    for stage in STAGES:
        assert sorted(os.listdir(os.path.join(folder, stage))) == sorted(
            [*files, *(f + ".sha256" for f in files)]
        )
        assert all(verify_checksum(os.path.join(folder, stage, f)) for f in files)
    for stage, shard in _shards(save).items():
        assert list(shard) == [*MEGATRON_LM_KEYS, "run_config"], stage
        args = shard["args"]
        assert isinstance(args, argparse.Namespace)
        assert (args.ckpt_format, args.iteration, args.consumed_train_samples) == ("torch", 2, 16)
        assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (1, 2)
        assert args.use_distributed_optimizer is distributed
        assert (shard["checkpoint_version"], shard["iteration"]) == (3.0, 2)
        assert isinstance(shard["rng_state"], list) and len(shard["rng_state"]) == 1
        assert set(shard["rng_state"][0]) == RNG_KEYS
        assert shard["opt_param_scheduler"]["num_steps"] == 16  # samples: 2 iterations x 8
        optimizer = shard["optimizer"]
        if distributed:  # DistributedOptimizer.state_dict(): param groups; tensors in the file
            assert list(optimizer) == ["optimizer"] and "state" not in optimizer["optimizer"]
        else:  # FP32Optimizer.state_dict(): torch Adam's
            assert set(optimizer) == {"state", "param_groups"}
            assert sum(len(g["params"]) for g in optimizer["param_groups"]) == len(
                optimizer["state"]
            )
        assert not any(k.startswith("module.") for k in shard["model"])


@pytest.mark.parametrize("launch,legacy,dist", [
    ("two_ranks", "pp2_torch_first", "pp2_first"),
    ("four_ranks", "distopt_torch_first", "distopt_first"),
], ids=["pp2", "dp2_pp2_bf16_distopt"])  # fmt: skip
def test_legacy_shards_hold_each_stage_and_the_trained_weights(request, launch, legacy, dist):
    """Stage 0 holds the embedding, stage 1 the final norm and output layer, each its layers 0-1
    (numbered per stage); every weight equals the torch_dist checkpoint of the same training."""
    runs = request.getfixturevalue(launch)
    first, last = _shards(runs[legacy]["save"]).values()
    layers = {int(k.split(".")[2]) for k in first["model"] if k.startswith("decoder.layers.")}
    assert layers == {0, 1}
    assert {k.split(".", 3)[3] for k in first["model"] if k.startswith("decoder.layers.")} == {
        k.split(".", 3)[3] for k in last["model"] if k.startswith("decoder.layers.")
    }
    assert "embedding.word_embeddings.weight" in first["model"]
    assert not {"output_layer.weight", "decoder.final_layernorm.weight"} & set(first["model"])
    assert {"output_layer.weight", "decoder.final_layernorm.weight"} <= set(last["model"])
    assert not any(k.startswith("embedding.") for k in last["model"])
    ours, reference = open_checkpoint(runs[legacy]["save"]), open_checkpoint(runs[dist]["save"])
    assert (ours.format, reference.format) == ("torch", "torch_dist") and ours.iteration == 2
    assert torch.equal(ours.embedding(), reference.embedding())
    assert torch.equal(ours.output_layer(), reference.output_layer())
    assert torch.equal(ours.final_norm(), reference.final_norm())
    for i in range(4):  # the local spec's norm names (ours, as Megatron-LM's), TE's in torch_dist
        got = ours.layer(i)
        want = rename_to_model_keys(reference.layer(i), got)
        assert sorted(got) == sorted(want)
        assert all(torch.equal(got[k], want[k]) for k in want), i


def test_megatron_lm_written_legacy_checkpoint_has_its_layout(four_ranks):
    """The test's Megatron-LM writer: its files are what our loader resumed from above."""
    folder = ckpt.iteration_dir(four_ranks["distopt_megatron_lm_legacy_resumed"]["load"], 2)
    for stage in STAGES:
        names = sorted(os.listdir(os.path.join(folder, stage)))
        assert names == ["distrib_optim.pt", ckpt.SHARD_FILE]


def test_full_disk_on_one_rank_fails_every_legacy_save_and_keeps_the_tracker(two_ranks):
    """The legacy write of iteration 4 refused on rank 1 only: the one-line error on every
    rank, iter_0000004.tmp gone, the tracker still on iteration 2, which loads."""
    assert_refused_save_kept_tracker(two_ranks["pp2_torch_disk_full"], "torch")
