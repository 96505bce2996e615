"""``torch_dist`` checkpoints both ways with Megatron-LM core_v0.16.1.

Megatron-LM is not needed. What its ``megatron/training/checkpointing.py`` writes and reads for
``--ckpt-format torch_dist``:

* ``save_checkpoint``: ``generate_state_dict`` (``args`` = its argparse namespace,
  ``checkpoint_version`` 3.0, ``iteration``, ``model`` = the chunk's ``sharded_state_dict``,
  ``optimizer`` = the optimizer's ``sharded_state_dict``, ``opt_param_scheduler``, ``rng_state`` =
  ``ShardedObject('rng_state', [rng dict], (pp, tp), (pp_rank, tp_rank))``), then
  ``num_floating_point_operations_so_far``, saved by megatron-core's ``dist_checkpointing.save``
  into ``iter_%07d`` with ``content_metadata`` (``_build_sharded_state_dict_metadata``); the
  tracker file holds the iteration. No consumed-samples key: they are in ``args``.
* ``load_checkpoint``: ``args.tensor_model_parallel_size`` / ``pipeline_model_parallel_size``
  decide whether RNG (and a ``dp_reshardable`` optimizer) can be loaded; ``world_size``,
  ``data_parallel_size`` the rerun state; ``check_checkpoint_args`` asserts ``num_layers``,
  ``hidden_size``, ``num_attention_heads``, ``add_position_embedding`` (and with a vocab file
  ``max_position_embeddings``, ``make_vocab_size_divisible_by``, ``tokenizer_type``) equal the
  run's; the progress comes from ``args.consumed_train_samples``, ``skipped_train_samples``,
  ``consumed_valid_samples``; ``load_args_from_checkpoint`` (``--use-checkpoint-args``) copies
  the model fields listed in ``USE_CHECKPOINT_ARGS``.

The Megatron-LM checkpoint here is written by ``megatron_state_worker.py`` from exactly that
recipe (megatron-core's own save, Transformer Engine's extra ``core_attention._extra_state``
objects included) from the state of our bf16 distributed-optimizer run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "emulated"))

from optimizer_checkpoints import ITERS, SAVED_AT, SAVES, optimizer_runs  # noqa: E402

from megatron_endprompt.checkpoint.dist_reader import DistCheckpointReader  # noqa: E402
from megatron_endprompt.convert.checkpoint import convert_megatron_to_hf  # noqa: E402
from megatron_endprompt.data.tokenizers import ByteTokenizer  # noqa: E402

pytestmark = pytest.mark.slow
MEGATRON_COMMON = {"args", "checkpoint_version", "iteration", "optimizer", "opt_param_scheduler",
                   "num_floating_point_operations_so_far", "content_metadata"}  # fmt: skip
SCHEDULER_KEYS = {"max_lr", "lr_warmup_steps", "num_steps", "lr_decay_style", "lr_decay_steps",
                  "min_lr", "start_wd", "end_wd", "wd_incr_style", "wd_incr_steps"}  # fmt: skip
RNG_KEYS = {"random_rng_state", "np_rng_state", "torch_rng_state", "cuda_rng_state",
            "rng_tracker_states"}  # fmt: skip
USE_CHECKPOINT_ARGS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "seq_length", "num_attention_heads",
    "num_query_groups", "group_query_attention", "kv_channels", "max_position_embeddings",
    "position_embedding_type", "add_position_embedding", "use_rotary_position_embeddings",
    "rotary_base", "rotary_percent", "rotary_interleaved", "add_bias_linear", "add_qkv_bias",
    "squared_relu", "swiglu", "untie_embeddings_and_output_weights", "apply_layernorm_1p",
    "normalization", "attention_dropout", "hidden_dropout", "tokenizer_model", "tokenizer_type",
    "padded_vocab_size", "ckpt_format", "tensor_model_parallel_size",
    "pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size",
    "expert_model_parallel_size",
)  # fmt: skip
GLOBAL_BATCH = 4  # train_fixtures' --global-batch-size
VOCAB = ByteTokenizer().vocab_size  # the runs' tokenizer


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return optimizer_runs(tmp_path_factory)


def _iteration_dir(save: str) -> str:
    with open(os.path.join(save, "latest_checkpointed_iteration.txt")) as f:
        return os.path.join(save, f"iter_{int(f.read()):07d}")


def _entries(path: str) -> tuple[set[str], set[str]]:
    """(tensor keys, object keys) of a torch_dist directory, from torch's own metadata."""
    md = FileSystemReader(path).read_metadata().state_dict_metadata
    tensors = {k for k, v in md.items() if isinstance(v, TensorStorageMetadata)}
    return tensors, {k for k, v in md.items() if isinstance(v, BytesStorageMetadata)}


def test_megatron_lm_torch_dist_resumes_on_the_cuda_path(runs):
    """Megatron-LM's checkpoint of our bf16 distributed-optimizer run (DP = 2, dp_reshardable)
    resumed by the CUDA path at DP = 1: the state megatron-core then holds equals what it holds
    from our own checkpoint of the same run, bit for bit (weights, master weights, moments,
    step, schedule, progress, RNG), and both continue with the same losses."""
    path = _iteration_dir(runs["megatron_lm"]["save"])
    assert path.endswith(f"iter_{SAVED_AT:07d}")
    common = torch.load(os.path.join(path, "common.pt"), weights_only=False)
    assert set(common) == MEGATRON_COMMON  # no run_config, no consumed_samples, no rng_layout
    assert isinstance(common["args"], argparse.Namespace)
    _, objects = _entries(path)
    assert "rng_state/shard_0.0_1.1" in objects
    assert "decoder.layers.self_attention.core_attention._extra_state/shard_3_4" in objects

    theirs = torch.load(runs["megatron_lm"]["state"], weights_only=False)
    ours = torch.load(runs["bf16_dp2"]["state"], weights_only=False)
    assert theirs["progress"] == ours["progress"] == [SAVED_AT, SAVED_AT * GLOBAL_BATCH, 0]
    assert theirs["scheduler"] == ours["scheduler"]
    assert theirs["scheduler"]["num_steps"] == SAVED_AT * GLOBAL_BATCH  # counted in samples
    assert theirs["step"] == ours["step"] == SAVED_AT
    assert theirs["rng"]["python"] == ours["rng"]["python"]
    assert set(theirs["params"]) == set(ours["params"])
    for name, entry in theirs["params"].items():
        for key, value in entry.items():
            assert torch.equal(value, ours["params"][name][key]), (name, key)

    resumed, reference = runs["megatron_lm_cuda"], runs["bf16_dp2_cuda_dp1"]
    assert resumed["iterations"] == ITERS and resumed["consumed_samples"] == ITERS * GLOBAL_BATCH
    assert len(resumed["losses"]) == ITERS - SAVED_AT
    assert resumed["losses"] == reference["losses"]
    assert resumed["grad_norms"] == reference["grad_norms"]


def _expected_args(name: str) -> dict:
    """The values Megatron-LM's parser would hold for the run ``name`` (its flags, by hand)."""
    nproc, flags = SAVES[name]
    tp_flag = "--tensor-model-parallel-size"
    tp = int(flags[flags.index(tp_flag) + 1]) if tp_flag in flags else 1
    divisor = 2 * tp  # --make-vocab-size-divisible-by 2, times TP (Megatron-LM's padding)
    return dict(
        num_layers=4, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
        num_query_groups=2, group_query_attention=True, kv_channels=16, seq_length=32,
        max_position_embeddings=256, position_embedding_type="rope", add_position_embedding=True,
        make_vocab_size_divisible_by=2, padded_vocab_size=-(-VOCAB // divisor) * divisor,
        tokenizer_type="ByteTokenizer", tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=1, virtual_pipeline_model_parallel_size=None,
        world_size=nproc, data_parallel_size=nproc // tp, ckpt_format="torch_dist",
        consumed_train_samples=SAVED_AT * GLOBAL_BATCH, skipped_train_samples=0,
        consumed_valid_samples=0, use_distributed_optimizer="--use-distributed-optimizer" in flags,
    )  # fmt: skip


@pytest.mark.parametrize("name", ["fp32", "bf16_dp2", "tp2"])
def test_our_torch_dist_save_has_what_megatron_lm_load_reads(runs, name):
    """Key by key, what Megatron-LM's ``load_checkpoint`` reads from a torch_dist directory."""
    path = _iteration_dir(runs[name]["save"])
    with open(os.path.join(path, "metadata.json")) as f:  # check_is_distributed_checkpoint
        assert json.load(f)["sharded_backend"] == "torch_dist"
    common = torch.load(os.path.join(path, "common.pt"), weights_only=True)  # megatron's loader
    assert MEGATRON_COMMON <= set(common)
    assert common["checkpoint_version"] == 3.0 and common["iteration"] == SAVED_AT
    assert isinstance(common["num_floating_point_operations_so_far"], (int, float))
    assert set(common["opt_param_scheduler"]) == SCHEDULER_KEYS
    args = common["args"]
    assert isinstance(args, argparse.Namespace)
    missing = [k for k in USE_CHECKPOINT_ARGS if not hasattr(args, k)]
    assert not missing
    want = _expected_args(name)
    assert {k: getattr(args, k) for k in want} == want

    distopt = want["use_distributed_optimizer"]
    metadata = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    if distopt:
        metadata["distrib_optim_sharding_type"] = "dp_reshardable"  # Megatron-LM's default
    assert common["content_metadata"] == metadata

    tensors, objects = _entries(path)
    tp = want["tensor_model_parallel_size"]
    rng = [f"rng_state/shard_0.{r}_1.{tp}" for r in range(tp)]  # (pp, tp) offsets _ grid
    assert set(rng) == {o for o in objects if o.startswith("rng_state/")}
    for state in DistCheckpointReader(path, "test").read_objects(rng).values():
        assert isinstance(state, list) and len(state) == 1 and set(state[0]) == RNG_KEYS
    model = {k for k in tensors if k.startswith(("embedding.", "decoder.", "output_layer."))}
    assert "decoder.layers.self_attention.linear_qkv.layer_norm_weight" in model  # TE names
    assert not any("input_layernorm" in k or "pre_mlp_layernorm" in k for k in model)
    if distopt:  # one group of buckets per model-parallel rank (TP x PP)
        for group in range(tp):
            prefix = f"optimizer.distributed.dp_group_idx_{group}."
            assert {prefix + n + "/shard_0_1" for n in ("optimizer", "per_bucket_numel",
                    "per_bucket_numel_unpadded")} <= objects  # fmt: skip
            assert any(k.startswith(prefix + "gbuf_idx_0.") for k in tensors)
    else:
        for state in ("exp_avg", "exp_avg_sq"):
            assert {f"optimizer.state.{state}.{k}" for k in model} <= tensors


def test_megatron_to_hf_strips_the_padding_of_megatron_lm_torch_dist(runs, tmp_path):
    """Megatron-LM's torch_dist records only the padded vocabulary (260 rows): exported with
    --vocab-size 259, it is our own checkpoint's export (which records 259), tensor for tensor."""
    theirs, ours = str(tmp_path / "theirs"), str(tmp_path / "ours")
    with pytest.raises(ValueError, match=r"--vocab-size: .*records only its padded vocabulary"):
        convert_megatron_to_hf(runs["megatron_lm"]["save"], theirs, progress=False)
    config = convert_megatron_to_hf(
        runs["megatron_lm"]["save"], theirs, progress=False, vocab_size=VOCAB
    )
    assert config == convert_megatron_to_hf(runs["bf16_dp2"]["save"], ours, progress=False)
    assert config["vocab_size"] == VOCAB
    got = load_file(os.path.join(theirs, "model.safetensors"))
    want = load_file(os.path.join(ours, "model.safetensors"))
    assert set(got) == set(want) and got["model.embed_tokens.weight"].shape[0] == VOCAB
    for key, value in want.items():
        assert torch.equal(got[key], value), key
