"""Megatron-LM's meanings for the flags a ``pretrain_gpt.py`` launch script gives.

Used by :func:`megatron_endprompt.cli.parse_run_config`. Three jobs:

* the model's defaults without ``--model-preset`` are Megatron-LM's (:func:`megatron_model_base`):
  the shape flags are required as there, and everything else (LayerNorm, GELU, biases, tied
  embeddings, dropout 0.1, ``ffn_hidden_size`` derived, one KV head per query head unless
  ``--group-query-attention``) is Megatron-LM's default;
* Megatron-LM's RoPE flags become our :class:`RopeScalingConfig` (:func:`rope_scaling_from_flags`):
  ``--use-rope-scaling`` [``--rope-scaling-factor``] is Llama-3.x scaling,
  ``--rotary-seq-len-interpolation-factor`` is linear Position Interpolation;
* where Megatron-LM adjusts a flag or this package differs, one notice line
  (:func:`resolve_megatron_semantics`).
"""

from __future__ import annotations

import argparse
import importlib.util
from typing import Any

from megatron_endprompt.cli_utils import finite_float
from megatron_endprompt.config import RopeScalingConfig

REQUIRED_SHAPE = ("num_layers", "hidden_size", "num_attention_heads", "seq_length",
                  "max_position_embeddings")  # fmt: skip
"""Megatron-LM has no default for these (validate_args requires them)."""

MEGATRON_MODEL_DEFAULTS: dict[str, Any] = {
    "normalization": "LayerNorm",
    "swiglu": False,
    "untie_embeddings_and_output_weights": False,
    "add_bias_linear": True,
    "attention_dropout": 0.1,
    "hidden_dropout": 0.1,
    "ffn_hidden_size": None,  # derived as Megatron-LM does (ModelConfig.__post_init__)
    "kv_channels": None,
    "make_vocab_size_divisible_by": 128,
    "rotary_base": 10000.0,
    "rotary_percent": 1.0,
    "norm_epsilon": 1e-5,
    "init_method_std": 0.02,
}
"""Megatron-LM core_v0.16.1's defaults for the model fields (its arguments.py)."""

LLAMA3_SCALING_DEFAULTS = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 8192}  # fmt: skip
"""megatron-core's RotaryEmbedding._apply_scaling constants behind --use-rope-scaling."""


def add_translated_flags(parser: argparse.ArgumentParser) -> None:
    """Megatron-LM flags that set config fields in Megatron-LM's way."""
    g = parser.add_argument_group("Megatron-LM model flags (translated into the fields above)")
    off = argparse.SUPPRESS
    g.add_argument(
        "--group-query-attention",
        action="store_true",
        default=off,
        help="Use --num-query-groups KV heads (without it: one per query head)",
    )
    g.add_argument(
        "--position-embedding-type",
        default=off,
        choices=("learned_absolute", "rope", "mrope", "relative", "none"),
        help="Only rope is supported (this package extends RoPE models); default here: rope",
    )
    g.add_argument(
        "--use-rotary-position-embeddings",
        action="store_true",
        default=off,
        help="Same as --position-embedding-type rope",
    )
    g.add_argument(
        "--no-position-embedding",
        action="store_true",
        default=off,
        help="No learned absolute position embedding (always so with RoPE)",
    )
    g.add_argument(
        "--use-rope-scaling",
        action="store_true",
        default=off,
        help="Llama-3.x RoPE scaling, factor --rope-scaling-factor (default 8)",
    )
    g.add_argument("--rotary-seq-len-interpolation-factor", type=finite_float, default=off,
                   help="Linear Position Interpolation by this factor")  # fmt: skip


def _given(args: argparse.Namespace, name: str) -> bool:
    return hasattr(args, name)


def megatron_model_base(args: argparse.Namespace) -> dict[str, Any]:
    """ModelConfig values for fields not given, without a preset (Megatron-LM's defaults).

    Raises:
        ValueError: When a shape flag Megatron-LM requires is missing.
    """
    missing = [n for n in REQUIRED_SHAPE if not _given(args, n)]
    if missing:
        flags = ", ".join("--" + n.replace("_", "-") for n in missing)
        raise ValueError(
            f"{flags}: required without --model-preset (Megatron-LM has no default for them); "
            "give them, or --model-preset NAME (tools/plan.py --help lists presets)"
        )
    base = {k: v for k, v in MEGATRON_MODEL_DEFAULTS.items() if not _given(args, k)}
    # Megatron-LM: --num-query-groups (default 1) counts only with --group-query-attention.
    if not _given(args, "group_query_attention"):
        base["num_query_groups"] = None  # one KV head per query head
        if _given(args, "num_query_groups"):
            delattr(args, "num_query_groups")
    elif not _given(args, "num_query_groups"):
        base["num_query_groups"] = 1
    return base


def rope_scaling_from_flags(
    args: argparse.Namespace, preset: RopeScalingConfig | None
) -> RopeScalingConfig:
    """The run's RoPE scaling from ours (--rope-scaling-*) or Megatron-LM's flags.

    Raises:
        ValueError: When two ways of scaling are given, or a factor without any scaling.
    """
    ours = {f: getattr(args, f) for f in _ROPE_FIELDS if _given(args, f)}
    llama3 = _given(args, "use_rope_scaling")
    pi = getattr(args, "rotary_seq_len_interpolation_factor", None)
    kind = ours.get("rope_type")
    if llama3 and pi is not None:
        raise ValueError("--use-rope-scaling and --rotary-seq-len-interpolation-factor: give one")
    if (llama3 or pi is not None) and kind not in (None, "llama3" if llama3 else "linear"):
        first = "--use-rope-scaling" if llama3 else "--rotary-seq-len-interpolation-factor"
        raise ValueError(f"{first} conflicts with --rope-scaling-type={kind}: give one")
    if llama3:
        values = {**LLAMA3_SCALING_DEFAULTS, **ours, "rope_type": "llama3"}
        return RopeScalingConfig(**values)
    if pi is not None:
        if "factor" in ours:
            raise ValueError(
                "--rope-scaling-factor with --rotary-seq-len-interpolation-factor: "
                "the interpolation factor is the scaling factor; give one"
            )
        return RopeScalingConfig(**{**ours, "rope_type": "linear", "factor": pi})
    base = preset or RopeScalingConfig()
    if kind is None and base.rope_type == "none" and ours:
        flags = ", ".join("--rope-scaling-" + f.replace("_", "-") for f in ours)
        raise ValueError(
            f"{flags}: no effect without a scaling type: give --rope-scaling-type (or "
            "Megatron-LM's --use-rope-scaling for Llama-3.x scaling)"
        )
    return RopeScalingConfig(**{**base.to_dict(), **ours})


_ROPE_FIELDS = ("rope_type", "factor", "original_max_position_embeddings", "low_freq_factor",
                "high_freq_factor", "beta_fast", "beta_slow", "attention_factor")  # fmt: skip


def transformer_engine_installed() -> bool:
    """Whether Transformer Engine can be imported (without importing it)."""
    return importlib.util.find_spec("transformer_engine") is not None


def resolve_megatron_semantics(
    args: argparse.Namespace, device: str, has_preset: bool, te_available: bool | None = None
) -> list[str]:
    """Apply Megatron-LM's adjustments to ``args`` in place; returns the notices to print.

    Raises:
        ValueError: For a position embedding other than RoPE.
    """
    notices: list[str] = []
    kind = getattr(args, "position_embedding_type", None)
    if kind is not None and kind != "rope":
        raise ValueError(
            f"--position-embedding-type={kind}: not supported: this package extends RoPE models "
            "(give --position-embedding-type rope)"
        )
    if kind is None and not _given(args, "use_rotary_position_embeddings") and not has_preset:
        notices.append(
            "--position-embedding-type: rope (Megatron-LM's default is learned_absolute, which "
            "this package does not support)"
        )
    tp = getattr(args, "tensor_model_parallel_size", 1)
    if getattr(args, "sequence_parallel", False) and tp == 1:
        delattr(args, "sequence_parallel")
        notices.append("--sequence-parallel: disabled, --tensor-model-parallel-size is 1 "
                       "(as Megatron-LM)")  # fmt: skip
    if not _given(args, "transformer_impl"):
        if te_available is None:
            te_available = transformer_engine_installed()
        te = device == "cuda" and te_available
        args.transformer_impl = "te" if te else "local"
        if device == "cuda" and not te:
            notices.append(
                "--transformer-impl: local (megatron-core modules + torch SDPA): "
                "Transformer Engine, Megatron-LM's default, is not installed"
            )
    if getattr(args, "ckpt_format", None) == "torch_dist" and device == "cpu":
        notices.append(
            "--ckpt-format torch_dist: the CPU path writes the torch format (one "
            "file per shard; megatron-core's dist-checkpoint writer needs CUDA)"
        )
    if device == "cpu":
        for name in ("overlap_grad_reduce", "overlap_param_gather", "grad_reduce_in_bf16"):
            if getattr(args, name, False):
                notices.append(
                    f"--{name.replace('_', '-')}: no effect on the CPU path (torch "
                    "DDP over gloo reduces after the backward, in fp32)"
                )
    notices += _mock_data_notices(args)
    if _given(args, "num_query_groups") and not _given(args, "group_query_attention"):
        if not has_preset:
            notices.append(
                f"--num-query-groups={args.num_query_groups}: no effect without "
                "--group-query-attention (as Megatron-LM): one KV head per query head"
            )
    return notices


def _mock_data_notices(args: argparse.Namespace) -> list[str]:
    """--mock-data: megatron-core splits the synthetic documents 1,1,1 whatever --split says."""
    if not getattr(args, "mock_data", False) or not _given(args, "split"):
        return []
    return [
        f"--split={args.split}: no effect with --mock-data: megatron-core splits the mock "
        "documents 1,1,1 (as Megatron-LM)"
    ]


CHECKPOINT_ARGS_IF_UNSET = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "seq_length",
    "num_attention_heads",
    "kv_channels",
    "max_position_embeddings",
)
CHECKPOINT_ARGS_FORCED = ("num_query_groups", "rotary_base", "rotary_percent",
                          "rotary_interleaved", "add_bias_linear", "swiglu",
                          "untie_embeddings_and_output_weights", "layernorm_zero_centered_gamma",
                          "normalization", "attention_dropout", "hidden_dropout")  # fmt: skip
"""Megatron-LM's load_args_from_checkpoint: the first set only where the flag is not given, the
second replacing the flags (``force=True``)."""


def apply_checkpoint_args(args: argparse.Namespace, recorded: dict[str, Any]) -> list[str]:
    """``--use-checkpoint-args``: the recorded model fields into ``args``, as Megatron-LM.

    Returns one notice per flag the checkpoint replaced with another value.
    """
    notices = []
    for name in CHECKPOINT_ARGS_IF_UNSET:
        if not _given(args, name) and recorded.get(name) is not None:
            setattr(args, name, recorded[name])
    for name in CHECKPOINT_ARGS_FORCED:
        if name not in recorded or recorded[name] is None:
            continue
        if _given(args, name) and getattr(args, name) != recorded[name]:
            notices.append(
                f"--{name.replace('_', '-')}={getattr(args, name)}: replaced by the "
                f"checkpoint's {recorded[name]} (--use-checkpoint-args, as Megatron-LM)"
            )
        setattr(args, name, recorded[name])
    if recorded.get("num_query_groups") is not None:
        args.group_query_attention = True  # the recorded count holds as it is
    return notices
