"""Checkpoints both ways with Megatron-LM core_v0.16.1's legacy ``torch`` format.

Megatron-LM is not needed: its layout is written here by hand from these facts of
``megatron/training/checkpointing.py`` and ``megatron/core/optimizer``:

* ``get_checkpoint_name``: ``iter_%07d/mp_rank_%02d`` when PP = 1, ``mp_rank_%02d_%03d`` when
  PP > 1 (``_%03d`` more with expert parallelism); the file is ``model_optim_rng.pt``.
* ``generate_state_dict``: ``args`` (argparse.Namespace), ``checkpoint_version`` = 3.0,
  ``iteration``, ``model``, ``optimizer`` (``FP32Optimizer``: the torch optimizer's state dict;
  param groups carry ``wd_mult``, ``lr_mult``, ``is_expert_parallel``, ``is_decoupled_lr``,
  ``default_config``, ``max_lr``, ``min_lr``), ``opt_param_scheduler``, ``rng_state`` (a list with
  one dict: ``random_rng_state``, ``np_rng_state``, ``torch_rng_state``, ``cuda_rng_state``,
  ``rng_tracker_states``), ``num_floating_point_operations_so_far``.
* ``load_checkpoint``: consumed samples from ``args.consumed_train_samples`` /
  ``consumed_valid_samples``; ``check_checkpoint_args`` reads ``num_layers``, ``hidden_size``,
  ``num_attention_heads``, ``tensor_model_parallel_size``, ``pipeline_model_parallel_size``.
* Transformer Engine layers (its default ``--transformer-impl``) fuse the norms:
  ``self_attention.linear_qkv.layer_norm_weight``, ``mlp.linear_fc1.layer_norm_weight``, and
  every TE module has an ``_extra_state`` entry.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))

from train_fixtures import make_corpus, train_flags  # noqa: E402

from megatron_endprompt import checkpoint as ckpt  # noqa: E402
from megatron_endprompt.checkpoint.megatron_lm import model_config_from_megatron_args  # noqa: E402
from megatron_endprompt.cli import parse_run_config  # noqa: E402
from megatron_endprompt.training.loop import train  # noqa: E402

TE_NORMS = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    "input_layernorm.bias": "self_attention.linear_qkv.layer_norm_bias",
    "pre_mlp_layernorm.bias": "mlp.linear_fc1.layer_norm_bias",
}
MEGATRON_KEYS = {"args", "checkpoint_version", "iteration", "model", "optimizer",
                 "opt_param_scheduler", "rng_state",
                 "num_floating_point_operations_so_far"}  # fmt: skip
SCHEDULER_KEYS = {"max_lr", "lr_warmup_steps", "num_steps", "lr_decay_style", "lr_decay_steps",
                  "min_lr", "start_wd", "end_wd", "wd_incr_style", "wd_incr_steps"}  # fmt: skip
RNG_KEYS = {"random_rng_state", "np_rng_state", "torch_rng_state", "cuda_rng_state",
            "rng_tracker_states"}  # fmt: skip
GROUP_IDS = ("wd_mult", "lr_mult", "is_expert_parallel", "is_decoupled_lr")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    return make_corpus(str(d)), str(d / "cache")


def run(flags):
    return train(parse_run_config([*flags, "--eval-iters", "0"]))


def _shard_file(save: str, iteration: int, name: str) -> str:
    return os.path.join(save, f"iter_{iteration:07d}", name, "model_optim_rng.pt")


def _te_model(sd: dict) -> dict:
    """Our local-spec state dict as a Megatron-LM TE model writes it (fused norms, extra state)."""
    out = {}
    for key, value in sd.items():
        for local, te in TE_NORMS.items():
            if key.endswith("." + local):
                key = key[: -len(local)] + te
        if key.endswith("_extra_state"):
            value = torch.zeros(0, dtype=torch.uint8)  # TE's serialised (empty) FP8 metadata
        out[key] = value
    for i in sorted({k.split(".")[2] for k in sd if k.startswith("decoder.layers.")}):
        out[f"decoder.layers.{i}.self_attention.core_attention._extra_state"] = torch.zeros(0)
    return out


def _megatron_args(consumed: int, iteration: int, **model) -> argparse.Namespace:
    """Megatron-LM's args of the tiny model (train_fixtures.TINY_MODEL, ByteTokenizer)."""
    values = dict(
        num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
        num_query_groups=2, group_query_attention=True, kv_channels=16, seq_length=32,
        max_position_embeddings=256, position_embedding_type="rope", rotary_base=10000,
        rotary_percent=1.0, rotary_interleaved=False, normalization="RMSNorm", norm_epsilon=1e-5,
        swiglu=True, add_bias_linear=False, untie_embeddings_and_output_weights=True,
        make_vocab_size_divisible_by=1, padded_vocab_size=259, tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1, transformer_impl="transformer_engine", bf16=False,
        consumed_train_samples=consumed, consumed_valid_samples=0, train_iters=6,
        global_batch_size=4, micro_batch_size=2, iteration=iteration, vocab_file=None,
    )  # fmt: skip
    values.update(model)
    return argparse.Namespace(**values)


def _run_model_args(shard: dict) -> dict:
    """Model args of the run that saved ``shard`` (whatever the CLI's defaults are today)."""
    m = shard["run_config"]["model"]
    names = ("num_query_groups", "normalization", "swiglu", "add_bias_linear",
             "untie_embeddings_and_output_weights", "norm_epsilon", "rotary_base")  # fmt: skip
    out = {n: m[n] for n in names}
    out["group_query_attention"] = m["num_query_groups"] != m["num_attention_heads"]
    return out


def _megatron_optimizer(ours: dict, fused: bool) -> dict:
    """FP32Optimizer.state_dict(): torch AdamW's, or TE FusedAdam's (step in the groups)."""
    groups = [{"params": list(g["params"]), "lr": g["lr"], "weight_decay": g["weight_decay"],
               "betas": g["betas"], "eps": g["eps"], "wd_mult": g["wd_mult"], "lr_mult": 1.0,
               "is_expert_parallel": False, "is_decoupled_lr": False, "default_config": True,
               "max_lr": 1e-3, "min_lr": 0.0} for g in ours["param_groups"]]  # fmt: skip
    state = {}
    for idx, entry in ours["state"].items():
        entry = {k: v.clone() for k, v in entry.items()}
        if fused:
            step = int(entry.pop("step"))
            for g in groups:
                if idx in g["params"]:
                    g["step"] = step
        state[idx] = entry
    return {"state": state, "param_groups": groups}


def _as_megatron_checkpoint(ours_dir: str, out_dir: str, iteration: int, fused: bool) -> None:
    """Rewrite our saved shard into exactly what Megatron-LM writes (PP = 1: mp_rank_00)."""
    shard = torch.load(_shard_file(ours_dir, iteration, "mp_rank_00"), weights_only=False)
    rng = shard["rng_state"][0]
    megatron = {
        "args": _megatron_args(
            shard["args"].consumed_train_samples, iteration, **_run_model_args(shard)
        ),
        "checkpoint_version": 3.0,
        "iteration": iteration,
        "model": _te_model(shard["model"]),
        "optimizer": _megatron_optimizer(shard["optimizer"], fused),
        "opt_param_scheduler": dict(shard["opt_param_scheduler"]),
        "rng_state": [
            {
                "random_rng_state": rng["random_rng_state"],
                "np_rng_state": rng["np_rng_state"],
                "torch_rng_state": rng["torch_rng_state"],
                "cuda_rng_state": torch.zeros(16, dtype=torch.uint8),
                "rng_tracker_states": {"model-parallel-rng": torch.zeros(16, dtype=torch.uint8)},
            }
        ],  # fmt: skip
        "num_floating_point_operations_so_far": 123.0,
    }
    path = _shard_file(out_dir, iteration, "mp_rank_00")
    os.makedirs(os.path.dirname(path))
    torch.save(megatron, path)
    with open(os.path.join(out_dir, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(f"{iteration}\n")


@pytest.mark.parametrize("fused", [False, True], ids=["torch_adam", "fused_adam_steps"])
def test_resume_from_megatron_lm_checkpoint_continues_the_run(corpus, tmp_path, fused):
    data, cache = corpus
    straight = run(train_flags(data, cache, "--train-iters", "6"))
    ours = str(tmp_path / "ours")
    first = run(train_flags(data, cache, "--train-iters", "6", "--exit-interval", "3",
                            "--save", ours))  # fmt: skip
    assert first.iterations == 3
    megatron = str(tmp_path / "megatron")
    _as_megatron_checkpoint(ours, megatron, 3, fused)
    second = run(train_flags(data, cache, "--train-iters", "6", "--load", megatron))
    assert second.iterations == 6 and len(second.losses) == 3
    # model (TE names), optimizer, schedule, RNG and consumed samples all came back:
    assert first.losses + second.losses == straight.losses


def test_saved_shard_has_megatron_lm_structure(corpus, tmp_path):
    data, cache = corpus
    save = str(tmp_path / "ckpt")
    run(train_flags(data, cache, "--train-iters", "2", "--save", save))
    assert os.listdir(os.path.join(save, "iter_0000002")) == ["mp_rank_00"]  # PP = 1
    shard = torch.load(_shard_file(save, 2, "mp_rank_00"), weights_only=False)
    assert MEGATRON_KEYS <= set(shard)
    assert shard["checkpoint_version"] == 3.0 and shard["iteration"] == 2
    args = shard["args"]
    assert isinstance(args, argparse.Namespace)
    expect = dict(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                  max_position_embeddings=256, seq_length=32,
                  make_vocab_size_divisible_by=1, padded_vocab_size=259,
                  tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                  consumed_train_samples=8, consumed_valid_samples=0, train_iters=2,
                  global_batch_size=4, micro_batch_size=2, add_position_embedding=True,
                  tokenizer_type="ByteTokenizer", transformer_impl="local",
                  ckpt_format="torch")  # fmt: skip
    assert {k: getattr(args, k) for k in expect} == expect
    model = shard["run_config"]["model"]
    for name in ("num_query_groups", "normalization", "swiglu", "rotary_base", "norm_epsilon"):
        assert getattr(args, name) == model[name], name
    assert set(shard["opt_param_scheduler"]) == SCHEDULER_KEYS
    assert shard["opt_param_scheduler"]["num_steps"] == 8  # counted in samples
    rng = shard["rng_state"]
    assert isinstance(rng, list) and len(rng) == 1 and set(rng[0]) == RNG_KEYS
    assert rng[0]["cuda_rng_state"].dtype == torch.uint8 and rng[0]["rng_tracker_states"]
    opt = shard["optimizer"]
    assert set(opt) == {"state", "param_groups"}
    assert [g["wd_mult"] for g in opt["param_groups"]] == [1.0, 0.0]  # Megatron's group order
    for group in opt["param_groups"]:
        assert all(key in group for key in GROUP_IDS) and "max_lr" in group and "min_lr" in group
    assert all("step" in s and "exp_avg" in s for s in opt["state"].values())
    assert "decoder.layers.0.input_layernorm.weight" in shard["model"]  # the model's own spec


def test_older_checkpoints_still_load(tmp_path):
    """Our v1 shards: mp_rank_00_000 at PP = 1, ``scheduler``/``rng``, top-level samples."""
    save = str(tmp_path / "old")
    path = _shard_file(save, 5, "mp_rank_00_000")
    os.makedirs(os.path.dirname(path))
    torch.save({"model": {}, "iteration": 5, "consumed_samples": 20, "scheduler": {"x": 1},
                "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                        "torch_cpu": torch.get_rng_state()}}, path)  # fmt: skip
    with open(os.path.join(save, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("5\n")
    from megatron_endprompt.checkpoint import megatron_lm

    shard = ckpt.load_checkpoint(save, ckpt.ShardRank())
    assert megatron_lm.progress(shard) == (5, 20, 0)
    assert megatron_lm.scheduler_state(shard) == {"x": 1} and megatron_lm.restore_rng(shard)


def test_shard_folder_names_follow_megatron_lm():
    assert ckpt.ShardRank(0, 0, 0, 1).shard_name == "mp_rank_00"
    assert ckpt.ShardRank(1, 0, 0, 1).shard_name == "mp_rank_01"
    assert ckpt.ShardRank(0, 0, 0, 2).shard_name == "mp_rank_00_000"
    assert ckpt.ShardRank(1, 1, 0, 2).shard_name == "mp_rank_01_001"
    assert ckpt.ShardRank(0, 0, 0, 1).shard_names == ("mp_rank_00", "mp_rank_00_000")
    assert ckpt.ShardRank(0, 1, 0, 2).shard_names == ("mp_rank_00_001",)


def test_megatron_args_mismatch_is_refused_naming_the_flag(corpus, tmp_path):
    data, cache = corpus
    ours = str(tmp_path / "ours")
    run(train_flags(data, cache, "--train-iters", "2", "--save", ours))
    megatron = str(tmp_path / "megatron")
    _as_megatron_checkpoint(ours, megatron, 2, fused=False)
    flags = train_flags(data, cache, "--train-iters", "4", "--load", megatron,
                        "--rotary-base", "500000")  # fmt: skip
    with pytest.raises(ValueError, match=r"--rotary-base: checkpoint 10000(\.0)?, run 500000"):
        run(flags)


def test_model_config_from_megatron_args():
    args = _megatron_args(0, 0, rotary_base=500000, group_query_attention=False, bf16=True,
                          use_rope_scaling=True, rope_scaling_factor=8.0)  # fmt: skip
    got = model_config_from_megatron_args(args)
    assert got["rotary_base"] == 500000 and got["num_query_groups"] == 4  # no GQA: one per head
    assert got["ffn_hidden_size"] == 128 and got["normalization"] == "RMSNorm" and got["swiglu"]
    assert got["transformer_impl"] == "te" and got["params_dtype"] == "bfloat16"
    assert got["rope_scaling"]["rope_type"] == "llama3" and got["rope_scaling"]["factor"] == 8.0
    assert got["vocab_size"] == 259 and got["kv_channels"] == 16
    linear = model_config_from_megatron_args(
        _megatron_args(0, 0, rotary_seq_len_interpolation_factor=4)
    )
    assert linear["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}


def test_no_load_optim_keeps_progress_and_says_the_schedule_restarts(corpus, tmp_path, capsys):
    data, cache = corpus
    ours = str(tmp_path / "ours")
    run(train_flags(data, cache, "--train-iters", "6", "--exit-interval", "3", "--save", ours))
    megatron = str(tmp_path / "megatron")
    _as_megatron_checkpoint(ours, megatron, 3, fused=False)
    capsys.readouterr()
    second = run(train_flags(data, cache, "--train-iters", "4", "--load", megatron,
                             "--no-load-optim"))  # fmt: skip
    assert second.iterations == 4 and len(second.losses) == 1  # resumed at iteration 3
    assert "LR schedule (warmup included) start afresh" in capsys.readouterr().out
