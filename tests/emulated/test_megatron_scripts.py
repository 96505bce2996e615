"""Megatron-LM's own launch script on the CUDA path: only the entry point changed.

The shrunken Llama-3-8B FP8 example (tests/training/megatron_scripts.py; DTYPE=bf16, since
Transformer Engine cannot be installed here) plus the EndPrompt flags trains 2 iterations through
megatron-core's DDP, distributed optimizer (with its overlapped gradient reduction and parameter
gather) and dist checkpointing; and overlapping changes no number.
"""

from __future__ import annotations

import argparse
import math
import os

import megatron.core  # noqa: F401  (registers argparse.Namespace for weights_only loads)
import torch
from test_parallel_parity import assert_parity


def test_llama3_fp8_example_trains_with_only_the_entry_point_changed(one_rank):
    result = one_rank["megatron_fp8_script"]
    # --train-samples 8 at --global-batch-size 4: 2 iterations; --eval-iters 1 at the end.
    assert (result["iterations"], result["consumed_samples"]) == (2, 8)
    assert all(math.isfinite(x) for x in result["losses"]) and len(result["losses"]) == 2
    assert result["valid_loss"] is not None and math.isfinite(result["valid_loss"])
    path = result["checkpoint"]  # --ckpt-format torch_dist: megatron-core's dist checkpoint
    assert os.path.basename(path) == "iter_0000002"
    assert os.path.isfile(os.path.join(path, "metadata.json"))
    # What Megatron-LM's load_checkpoint reads from the common state: args with the progress
    # (consumed_train_samples) and the model flags check_checkpoint_args compares.
    common = torch.load(os.path.join(path, "common.pt"), weights_only=True)
    args = common["args"]
    assert isinstance(args, argparse.Namespace) and common["checkpoint_version"] == 3.0
    assert (args.consumed_train_samples, args.iteration, args.ckpt_format) == (8, 2, "torch_dist")
    assert (args.num_layers, args.hidden_size, args.num_query_groups) == (2, 64, 2)
    assert args.group_query_attention and args.layernorm_zero_centered_gamma


def test_overlapped_grad_reduce_and_param_gather_change_nothing(four_ranks):
    assert_parity(
        "DP=2 x PP=2 bf16 distopt, --overlap-grad-reduce --overlap-param-gather",
        four_ranks["dp2_pp2_bf16_distopt_overlap"],
        four_ranks["dp2_pp2_bf16_distopt"],
        rel=1e-6,
    )
