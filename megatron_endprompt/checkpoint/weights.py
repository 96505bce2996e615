"""Megatron weight layout: norm names per layer spec, tensor-parallel split and merge, shapes.

What both checkpoint formats and the converters need to know about megatron-core's parameters
(no Hugging Face knowledge here: that is convert/hf_llama.py). Shapes are computed by arithmetic
from the ModelConfig, so a 70B checkpoint can be verified without building the model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from megatron_endprompt.config import ModelConfig, ParallelConfig


def norm_keys(model_config: ModelConfig, prefix: str) -> tuple[str, str]:
    """(pre-attention, pre-MLP) norm weight names of one layer for the model's spec."""
    if model_config.transformer_impl == "te":
        return (
            f"{prefix}self_attention.linear_qkv.layer_norm_weight",
            f"{prefix}mlp.linear_fc1.layer_norm_weight",
        )
    return f"{prefix}input_layernorm.weight", f"{prefix}pre_mlp_layernorm.weight"


def _pad_vocab(weight: torch.Tensor, padded: int) -> torch.Tensor:
    if weight.shape[0] > padded:
        raise ValueError(f"vocabulary rows {weight.shape[0]} exceed the padded size {padded}")
    pad = weight.new_zeros(padded - weight.shape[0], weight.shape[1])
    return torch.cat([weight, pad], dim=0)


def load_megatron_state_dict(model: torch.nn.Module, sd: Mapping[str, torch.Tensor]) -> None:
    """Load a converted state dict, tolerating only missing ``_extra_state`` entries.

    Raises:
        ValueError: Listing missing or unexpected keys otherwise.
    """
    missing, unexpected = model.load_state_dict(dict(sd), strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(
            f"state dict does not match the model: missing {missing[:8]}, unexpected "
            f"{unexpected[:8]} (check --transformer-impl and the model shape)"
        )


def shard_for_tensor_parallel(
    sd: Mapping[str, Any], model_config: ModelConfig, tp_size: int, tp_rank: int
) -> dict[str, torch.Tensor]:
    """One tensor-parallel rank's shard of a full (TP = 1) megatron state dict.

    megatron-core's rules: column-parallel weights (``linear_qkv``, ``linear_fc1``, the output
    layer) split along dim 0, row-parallel ones (``linear_proj``, ``linear_fc2``) along dim 1,
    the vocabulary of embedding and output layer is re-padded to ``padded_vocab_size(tp_size)``
    (zero rows; already that size, its padding rows are kept as trained) and split along dim 0;
    norms are replicated. ``linear_qkv`` is grouped per query group, so a
    contiguous split hands each rank whole groups; ``linear_fc1`` = cat(gate, up) is split per half.

    Raises:
        ValueError: If the model does not split over ``tp_size`` or ``tp_rank`` is out of range.
    """
    model_config.validate_against(ParallelConfig(tensor_model_parallel_size=tp_size))
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank={tp_rank}: must be in [0, {tp_size})")
    padded = model_config.padded_vocab_size(tp_size)
    out = {}
    for key, value in sd.items():
        if value is None or key.endswith("_extra_state"):
            continue
        if key in ("embedding.word_embeddings.weight", "output_layer.weight"):
            if value.shape[0] != padded:  # same padding: keep the trained padding rows
                value = _pad_vocab(value[: model_config.vocab_size], padded)
            value = value.chunk(tp_size, dim=0)[tp_rank]
        elif key.endswith("mlp.linear_fc1.weight") and model_config.swiglu:
            gate, up = value.chunk(2, dim=0)
            value = torch.cat([gate.chunk(tp_size)[tp_rank], up.chunk(tp_size)[tp_rank]])
        elif key.endswith(("linear_qkv.weight", "linear_fc1.weight")):
            value = value.chunk(tp_size, dim=0)[tp_rank]
        elif key.endswith(("linear_proj.weight", "linear_fc2.weight")):
            value = value.chunk(tp_size, dim=1)[tp_rank]
        elif not key.endswith(("norm.weight", "layer_norm_weight")):
            raise ValueError(f"{key}: no tensor-parallel rule for this parameter")
        out[key] = value.clone().contiguous()
    return out


def megatron_shard_shapes(
    m: ModelConfig, tp: int, pp: int, pp_rank: int
) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the state dict of (any TP rank, stage ``pp_rank``), by shape arithmetic.

    Matches ``build_model(m, ParallelConfig(tp, pp)).state_dict()`` without ``_extra_state``
    entries and without building the model.
    """
    h, f = m.hidden_size, m.ffn_hidden_size
    q, kv = m.num_attention_heads * m.kv_channels, m.num_query_groups * m.kv_channels
    vocab_rows = m.padded_vocab_size(tp) // tp
    shapes: dict[str, tuple[int, ...]] = {}
    if pp_rank == 0:
        shapes["embedding.word_embeddings.weight"] = (vocab_rows, h)
    for i in range(m.num_layers // pp):
        p = f"decoder.layers.{i}."
        shapes[f"{p}self_attention.linear_qkv.weight"] = ((q + 2 * kv) // tp, h)
        shapes[f"{p}self_attention.linear_proj.weight"] = (h, q // tp)
        shapes[f"{p}mlp.linear_fc1.weight"] = ((2 if m.swiglu else 1) * f // tp, h)
        shapes[f"{p}mlp.linear_fc2.weight"] = (h, f // tp)
        for norm in norm_keys(m, p):
            shapes[norm] = (h,)
    if pp_rank == pp - 1:
        shapes["decoder.final_layernorm.weight"] = (h,)
        if m.untie_embeddings_and_output_weights or pp > 1:
            shapes["output_layer.weight"] = (vocab_rows, h)
    return shapes


def check_shapes(
    found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]], where: str
) -> None:
    """Raise ValueError naming the first missing, unexpected or mis-shaped tensor."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    if missing or unexpected:
        raise ValueError(
            f"{where}: tensors do not match the model config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]} ({len(found)} found, {len(expected)} expected)"
        )
    for key, shape in expected.items():
        if tuple(found[key]) != tuple(shape):
            raise ValueError(
                f"{where}: tensor {key} has shape {tuple(found[key])}, expected {tuple(shape)}"
            )


# ---------------------------------------------------------------- tensor parallelism


def merge_tensor_parallel(
    shards: Sequence[Mapping[str, torch.Tensor]], model_config: ModelConfig
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`shard_for_tensor_parallel`: the TP = 1 tensors of the given TP slices.

    Works on any subset of keys (one layer at a time). Vocabulary tensors come back with
    ``padded_vocab_size(1)`` rows; replicated norms must agree across ranks.

    Raises:
        ValueError: On a key without a rule or norms that differ between ranks.
    """
    padded, out = model_config.padded_vocab_size(1), {}
    for key, first in shards[0].items():
        if first is None or key.endswith("_extra_state"):
            continue
        parts = [s[key] for s in shards]
        if key in ("embedding.word_embeddings.weight", "output_layer.weight"):
            value = torch.cat(parts)[:padded]
        elif key.endswith("mlp.linear_fc1.weight") and model_config.swiglu:
            halves = [p.chunk(2, dim=0) for p in parts]
            value = torch.cat(
                [torch.cat([g for g, _ in halves]), torch.cat([u for _, u in halves])]
            )
        elif key.endswith(("linear_qkv.weight", "linear_fc1.weight")):
            value = torch.cat(parts, dim=0)
        elif key.endswith(("linear_proj.weight", "linear_fc2.weight")):
            value = torch.cat(parts, dim=1)
        elif key.endswith(("norm.weight", "layer_norm_weight")):
            if any(not torch.equal(p, first) for p in parts[1:]):
                raise ValueError(f"{key}: replicated norm weight differs between TP ranks")
            value = first.clone()
        else:
            raise ValueError(f"{key}: no tensor-parallel rule for this parameter")
        out[key] = value  # torch.cat already made a fresh tensor
    return out


# ---------------------------------------------------------------- output directories


# ---------------------------------------------------------------- layer-spec key names

# Transformer Engine fuses the pre-attention / pre-MLP norms into linear_qkv / linear_fc1
# (megatron-core's TE spec); the local spec keeps them as separate modules.
_TE_TO_LOCAL = (
    ("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight"),
    ("self_attention.linear_qkv.layer_norm_bias", "input_layernorm.bias"),
    ("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight"),
    ("mlp.linear_fc1.layer_norm_bias", "pre_mlp_layernorm.bias"),
)


def _spec_aliases(key: str) -> list[str]:
    """The other spec's names of ``key`` (empty when the name is the same in both)."""
    out = []
    for te, local in _TE_TO_LOCAL:
        for src, dst in ((te, local), (local, te)):
            if key.endswith("." + src):
                out.append(key[: -len(src)] + dst)
    return out


def rename_to_model_keys(
    sd: Mapping[str, Any], model_keys: Sequence[str] | set[str]
) -> dict[str, Any]:
    """``sd`` under the key names of the model to load it into (TE <-> local norm names).

    A stored key the model does not have is renamed to its other-spec alias when the model has
    that one. ``*._extra_state`` entries the model does not have are dropped (Transformer
    Engine's FP8 metadata, ``None`` for megatron's local layers); the ones it has but the
    checkpoint lacks stay missing, which :func:`load_megatron_state_dict` tolerates (the modules
    keep their fresh state, as Megatron-LM's non-strict fallback does).
    """
    wanted = set(model_keys)
    out: dict[str, Any] = {}
    for key, value in sd.items():
        if key not in wanted:
            alias = next((a for a in _spec_aliases(key) if a in wanted), None)
            if alias is not None:
                key = alias
            elif key.endswith("_extra_state"):
                continue
        out[key] = value
    return out
