"""Expected tensor shapes of Hugging Face and Megatron checkpoints, and the TP merge.

Shapes are computed by arithmetic from the ModelConfig, so a 70B checkpoint can be verified
without building the model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from megatron_endprompt.config import ModelConfig
from megatron_endprompt.convert.hf_llama import norm_keys


def hf_shapes(m: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of the Hugging Face Llama checkpoint of ``m``."""
    h, f = m.hidden_size, m.ffn_hidden_size
    q, kv = m.num_attention_heads * m.kv_channels, m.num_query_groups * m.kv_channels
    shapes = {"model.embed_tokens.weight": (m.vocab_size, h), "model.norm.weight": (h,)}
    for i in range(m.num_layers):
        p = f"model.layers.{i}."
        for name, shape in (
            ("self_attn.q_proj", (q, h)), ("self_attn.k_proj", (kv, h)),
            ("self_attn.v_proj", (kv, h)), ("self_attn.o_proj", (h, q)),
            ("mlp.gate_proj", (f, h)), ("mlp.up_proj", (f, h)), ("mlp.down_proj", (h, f)),
            ("input_layernorm", (h,)), ("post_attention_layernorm", (h,)),
        ):  # fmt: skip
            shapes[f"{p}{name}.weight"] = shape
    if m.untie_embeddings_and_output_weights:
        shapes["lm_head.weight"] = (m.vocab_size, h)
    return shapes


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
