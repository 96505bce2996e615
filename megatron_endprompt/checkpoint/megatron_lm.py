"""Megatron-LM core_v0.16.1's legacy (``--ckpt-format torch``) shard contents, both directions.

What ``megatron/training/checkpointing.py`` writes (``generate_state_dict``) and reads
(``load_checkpoint``, ``check_checkpoint_args``, ``load_args_from_checkpoint``) per shard:

=============================================  ==================================================
``args``                                       the run's ``argparse.Namespace``; the load reads
                                               ``consumed_train_samples`` and
                                               ``consumed_valid_samples``
                                               (resume position) and checks ``num_layers``,
                                               ``hidden_size``, ``num_attention_heads``,
                                               ``tensor/pipeline_model_parallel_size``, ...
``checkpoint_version``                         3.0
``iteration``                                  completed iterations
``model`` (``model0``, ... with VPP)           the chunk's state dict
``optimizer``                                  the optimizer's ``state_dict()``: plain torch
                                               ``{"state", "param_groups"}`` (fp32,
                                               ``FP32Optimizer``) or ``{"optimizer": ...,
                                               "grad_scaler", "fp32_from_fp16_params"}`` (bf16)
``opt_param_scheduler``                        ``OptimizerParamScheduler.state_dict()``
``rng_state``                                  a LIST of dicts, one per data-parallel rank with
                                               ``--data-parallel-random-init``, else one:
                                               ``random_rng_state``, ``np_rng_state``,
                                               ``torch_rng_state``, ``cuda_rng_state``,
                                               ``rng_tracker_states`` (a ``ShardedObject`` only in
                                               ``torch_dist``)
``num_floating_point_operations_so_far``       throughput bookkeeping
=============================================  ==================================================
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from megatron.core import tensor_parallel

from megatron_endprompt import device

CHECKPOINT_VERSION = 3.0
SHARD_FORMAT = "megatron_endprompt/v2"
"""Our ``format`` key: v2 = Megatron-LM's keys; v1 (older) had ``scheduler``, ``rng``, no args."""
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TRACKER_NAMES = ("model-parallel-rng", "expert-parallel-rng", "data-parallel-rng")


def _model_args(m: Any, tp: int) -> dict[str, Any]:
    """Megatron-LM's model arguments of a ModelConfig (its names and conventions).

    ``add_position_embedding`` is what its parser leaves for a RoPE run (True: only the deprecated
    ``--no-position-embedding`` clears it, and its Llama examples do not pass that); its
    ``check_checkpoint_args`` asserts the value equals the resuming run's.
    """
    s = m.rope_scaling
    kv = m.kv_channels or m.hidden_size // m.num_attention_heads
    return dict(
        num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads, num_query_groups=m.num_query_groups,
        group_query_attention=m.num_query_groups != m.num_attention_heads, kv_channels=kv,
        seq_length=m.seq_length, max_position_embeddings=m.max_position_embeddings,
        position_embedding_type="rope", add_position_embedding=True,
        use_rotary_position_embeddings=True, rotary_base=m.rotary_base,
        rotary_percent=m.rotary_percent, rotary_interleaved=m.rotary_interleaved,
        rotary_seq_len_interpolation_factor=s.factor if s.rope_type == "linear" else None,
        use_rope_scaling=s.rope_type == "llama3",
        rope_scaling_factor=s.factor if s.rope_type == "llama3" else 8.0,
        normalization=m.normalization, norm_epsilon=m.norm_epsilon, swiglu=m.swiglu,
        squared_relu=False, apply_layernorm_1p=m.layernorm_zero_centered_gamma,
        layernorm_zero_centered_gamma=m.layernorm_zero_centered_gamma, add_qkv_bias=False,
        add_bias_linear=m.add_bias_linear,
        untie_embeddings_and_output_weights=m.untie_embeddings_and_output_weights,
        attention_dropout=m.attention_dropout, hidden_dropout=m.hidden_dropout,
        init_method_std=m.init_method_std, vocab_size=m.vocab_size,
        make_vocab_size_divisible_by=m.make_vocab_size_divisible_by,
        padded_vocab_size=m.padded_vocab_size(tp),
        transformer_impl="transformer_engine" if m.transformer_impl == "te" else "local",
        params_dtype=_DTYPES.get(m.params_dtype, torch.float32),
        bf16=m.params_dtype == "bfloat16", fp16=m.params_dtype == "float16", num_experts=None,
    )  # fmt: skip


def megatron_args(
    run: Any, consumed_train: int, consumed_valid: int, iteration: int, ckpt_format: str = "torch"
):
    """The ``args`` namespace Megatron-LM stores, built from a RunConfig and the progress.

    Holds what ``check_checkpoint_args`` compares, what ``load_checkpoint`` reads back
    (consumed samples) and what ``load_args_from_checkpoint`` (``--use-checkpoint-args``) copies.
    """
    p, t, d = run.parallel, run.training, run.data
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    cp = p.context_parallel_size
    world = int(getattr(run, "world_size", 1) or 1)
    values = _model_args(run.model, tp)
    values.update(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        context_parallel_size=cp, expert_model_parallel_size=1,
        sequence_parallel=p.sequence_parallel,
        use_distributed_optimizer=p.use_distributed_optimizer,
        world_size=world, data_parallel_size=max(world // (tp * pp * cp), 1),
        micro_batch_size=t.micro_batch_size, global_batch_size=t.global_batch_size,
        rampup_batch_size=t.rampup_batch_size, train_iters=run.train_iters,
        train_samples=t.train_samples, lr=t.lr, min_lr=t.min_lr,
        lr_warmup_iters=t.lr_warmup_iters, lr_decay_iters=t.lr_decay_iters,
        lr_warmup_samples=t.lr_warmup_samples, lr_decay_samples=t.lr_decay_samples,
        lr_warmup_fraction=t.lr_warmup_fraction, decoupled_lr=t.decoupled_lr,
        decoupled_min_lr=t.decoupled_min_lr, lr_decay_style=t.lr_decay_style,
        weight_decay=t.weight_decay, clip_grad=t.clip_grad,
        adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_eps=t.adam_eps, optimizer="adam",
        seed=t.seed, data_parallel_random_init=False, tokenizer_type=d.tokenizer_type,
        tokenizer_model=d.tokenizer_model, vocab_file=d.vocab_file, merge_file=d.merge_file,
        legacy_tokenizer=d.legacy_tokenizer, ckpt_format=ckpt_format,
        use_dist_ckpt=ckpt_format == "torch_dist", iteration=iteration,
        consumed_train_samples=consumed_train, consumed_valid_samples=consumed_valid,
        skipped_train_samples=0,
    )  # fmt: skip
    return argparse.Namespace(**values)


def conversion_args(m: Any, tp: int, pp: int) -> argparse.Namespace:
    """The ``args`` of a converted checkpoint (iteration 0, nothing consumed; load it with
    ``--finetune``, or take its model flags with Megatron-LM's ``--use-checkpoint-args``)."""
    values = _model_args(m, tp)
    values.update(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=None, expert_model_parallel_size=1,
        ckpt_format="torch", use_dist_ckpt=False, iteration=0, consumed_train_samples=0,
        consumed_valid_samples=0, skipped_train_samples=0, data_parallel_random_init=False,
    )  # fmt: skip
    return argparse.Namespace(**values)


def model_config_from_megatron_args(args: Any) -> dict[str, Any]:
    """ModelConfig field overrides from a Megatron-LM ``args`` namespace (fields it lacks are
    left out). For ``--use-checkpoint-args`` and for checking a Megatron-LM checkpoint against the
    run's model flags (``shards.check_checkpoint_model``).
    """
    a = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    out: dict[str, Any] = {}
    same = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "seq_length",
            "max_position_embeddings", "make_vocab_size_divisible_by", "rotary_base",
            "rotary_percent", "rotary_interleaved", "normalization", "norm_epsilon", "swiglu",
            "add_bias_linear", "untie_embeddings_and_output_weights", "attention_dropout",
            "hidden_dropout", "init_method_std")  # fmt: skip
    for name in same:
        if a.get(name) is not None:
            out[name] = a[name]
    one_p = a.get("layernorm_zero_centered_gamma", a.get("apply_layernorm_1p"))
    if one_p is not None:  # --apply-layernorm-1p's dest (older Megatron-LM: apply_layernorm_1p)
        out["layernorm_zero_centered_gamma"] = bool(one_p)
    if "disable_bias_linear" in a and "add_bias_linear" not in a:  # older Megatron-LM
        out["add_bias_linear"] = not a["disable_bias_linear"]
    heads = a.get("num_attention_heads")
    if a.get("group_query_attention") and a.get("num_query_groups"):
        out["num_query_groups"] = a["num_query_groups"]
    elif heads is not None:
        out["num_query_groups"] = heads
    vocab = a.get("vocab_size") or a.get("padded_vocab_size")
    if vocab:  # Megatron-LM records only the padded size (ours both)
        out["vocab_size"] = int(vocab)
    if a.get("kv_channels") is not None:
        out["kv_channels"] = a["kv_channels"]
    impl = a.get("transformer_impl")
    if impl is not None:
        out["transformer_impl"] = "te" if impl == "transformer_engine" else "local"
    if a.get("bf16"):
        out["params_dtype"] = "bfloat16"
    elif a.get("fp16"):
        out["params_dtype"] = "float16"
    rope = _rope_from_args(a)
    if rope is not None:
        out["rope_scaling"] = rope
    return out


def _rope_from_args(a: Mapping[str, Any]) -> dict[str, Any] | None:
    """RopeScalingConfig fields of Megatron-LM's RoPE scaling flags (None: no scaling)."""
    if a.get("use_rope_scaling"):  # megatron-core's fixed Llama-3.1 recipe
        return {"rope_type": "llama3", "factor": float(a.get("rope_scaling_factor") or 8.0),
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}  # fmt: skip
    factor = a.get("rotary_seq_len_interpolation_factor")
    if factor:
        return {"rope_type": "linear", "factor": float(factor)}
    return None


# ---------------------------------------------------------------- RNG


def _philox_state(seed: int) -> torch.Tensor:
    """A CUDA generator state (seed, offset 0) as ``torch.cuda.get_rng_state`` returns it."""
    return torch.tensor(np.array([seed, 0], dtype="<u8").view(np.uint8))


def rng_state_list(seed: int, tp_rank: int = 0, pp_rank: int = 0) -> list[dict[str, Any]]:
    """Megatron-LM's ``rng_state``: ``[{random, numpy, torch, cuda, tracker states}]``.

    Without CUDA (CPU runs) the CUDA states are those Megatron-LM's seeding would give this
    rank (``_set_random_seed``: seed + 100 * PP rank; tracker: + 2718 + TP rank, ...) at offset 0:
    the run drew nothing from them. Megatron-LM refuses a shard without them unless --no-load-rng.
    """
    cuda = device.cuda_rng_state()
    base = seed + 100 * pp_rank
    if cuda is None:
        cuda = _philox_state(base)
    tracker = _tracker_states()
    if tracker is None:
        seeds = (base + 2718 + tp_rank, base + 1024 + tp_rank, base)
        tracker = {name: _philox_state(s) for name, s in zip(_TRACKER_NAMES, seeds)}
    return [{
        "random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": cuda,
        "rng_tracker_states": tracker,
    }]  # fmt: skip


def _tracker_states() -> dict[str, torch.Tensor] | None:
    if device.cuda_rng_state() is None:
        return None
    states = tensor_parallel.get_cuda_rng_tracker().get_states()
    return states or None


def restore_rng(shard: Mapping[str, Any]) -> bool:
    """Restore the generators from a shard's ``rng_state`` (Megatron-LM) or ``rng`` (our older
    format); False when it holds neither. CUDA states only where CUDA is in use.
    """
    if "rng_state" in shard:
        states = shard["rng_state"]
        state = states[0] if isinstance(states, (list, tuple)) else states
        random.setstate(state["random_rng_state"])
        np.random.set_state(state["np_rng_state"])
        torch.set_rng_state(state["torch_rng_state"])
        if device.cuda_rng_state() is not None:
            device.set_cuda_rng_state(state["cuda_rng_state"])
        return True
    if "rng" in shard:  # our v1 shards: {"python", "numpy", "torch_cpu"[, "torch_cuda"]}
        ours = shard["rng"]
        random.setstate(ours["python"])
        np.random.set_state(ours["numpy"])
        torch.set_rng_state(ours["torch_cpu"])
        if "torch_cuda" in ours:
            device.set_cuda_rng_state(ours["torch_cuda"])
        return True
    return False


# ---------------------------------------------------------------- progress, schedule, optimizer


def progress(shard: Mapping[str, Any]) -> tuple[int, int, int]:
    """(iteration, consumed training samples, consumed validation samples) of a shard.

    Megatron-LM keeps the samples in ``args.consumed_train_samples`` / ``consumed_valid_samples``
    (read with default 0, as its ``load_checkpoint`` does); our older shards at the top level.
    """
    args = shard.get("args")
    train = getattr(args, "consumed_train_samples", None)
    valid = getattr(args, "consumed_valid_samples", None)
    if train is None:
        train = shard.get("consumed_samples", 0)
    if valid is None:
        valid = shard.get("valid_consumed_samples", 0)
    return int(shard.get("iteration", 0) or 0), int(train or 0), int(valid or 0)


def saved_layout(common: Mapping[str, Any]) -> tuple[int, int, int | None] | None:
    """(TP, PP, virtual pipeline size or None) a checkpoint was saved with; None if unrecorded.

    Ours record ``run_config["parallel"]`` (and ``rng_layout`` = [PP, TP] in ``torch_dist``),
    Megatron-LM's its ``args`` (``tensor_model_parallel_size``, ...), as its load reads them.
    """
    run = common.get("run_config")
    parallel = run.get("parallel") if isinstance(run, Mapping) else None
    args = common.get("args")
    if isinstance(parallel, Mapping):
        get = parallel.get
    elif isinstance(args, argparse.Namespace):
        get = vars(args).get
    else:
        rng = common.get("rng_layout")
        if isinstance(rng, (list, tuple)) and len(rng) == 2:
            return int(rng[1]), int(rng[0]), None
        return None
    vpp = get("virtual_pipeline_model_parallel_size")
    return (int(get("tensor_model_parallel_size") or 1),
            int(get("pipeline_model_parallel_size") or 1), int(vpp) if vpp else None)  # fmt: skip


def load_scheduler_state(scheduler: Any, state: Mapping[str, Any], where: str) -> None:
    """Resume megatron-core's LR/WD scheduler from a checkpoint's ``state``.

    As in Megatron-LM, the run's schedule (its flags) must equal the checkpoint's unless
    --use-checkpoint-opt_param-scheduler (take the checkpoint's) or --override-opt_param-scheduler
    (take the flags') was given; megatron-core asserts it, which becomes a ValueError here.
    """
    try:
        scheduler.load_state_dict(dict(state))
    except AssertionError as err:
        raise ValueError(
            f"{where}: the run's LR/WD schedule differs from the checkpoint's ({err}); pass "
            "--use-checkpoint-opt_param-scheduler to continue the checkpoint's schedule or "
            "--override-opt_param-scheduler to use the flags' (Megatron-LM's flags)"
        ) from err


def scheduler_state(shard: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """``opt_param_scheduler`` (Megatron-LM; ``lr_scheduler`` in its oldest), our ``scheduler``."""
    for key in ("opt_param_scheduler", "lr_scheduler", "scheduler"):
        if key in shard:
            return shard[key]
    return None
