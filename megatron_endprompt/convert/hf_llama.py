"""Hugging Face Llama/Mistral <-> megatron-core (this package's GPT) configs and state dicts.

State-dict layout (TP = PP = 1; shard afterwards for model parallelism):

============================================  =====================================================
Hugging Face                                  megatron-core
============================================  =====================================================
model.embed_tokens.weight [V, h]              embedding.word_embeddings.weight [V_pad, h]
layers.i.self_attn.{q,k,v}_proj.weight        decoder.layers.i.self_attention.linear_qkv.weight:
                                              per query group g: its q heads, then k_g, then v_g
layers.i.self_attn.o_proj.weight              ...self_attention.linear_proj.weight
layers.i.mlp.{gate,up}_proj.weight            ...mlp.linear_fc1.weight = cat(gate, up)
layers.i.mlp.down_proj.weight                 ...mlp.linear_fc2.weight
layers.i.input_layernorm.weight               local: ...input_layernorm.weight
                                              te:    ...self_attention.linear_qkv.layer_norm_weight
layers.i.post_attention_layernorm.weight      local: ...pre_mlp_layernorm.weight
                                              te:    ...mlp.linear_fc1.layer_norm_weight
model.norm.weight                             decoder.final_layernorm.weight
lm_head.weight [V, h]                         output_layer.weight [V_pad, h] (absent when tied)
============================================  =====================================================

Both use the rotate-half RoPE channel layout, so no q/k permutation is needed. Padded vocabulary
rows are zero at import and stripped at export.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from megatron_endprompt.checkpoint.weights import (
    _pad_vocab,
    norm_keys,
)
from megatron_endprompt.config import ModelConfig, RopeScalingConfig

HF_ROPE_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": (
        "factor",
        "original_max_position_embeddings",
        "beta_fast",
        "beta_slow",
        "attention_factor",
    ),
}


def _get(hf_config: Any, key: str, default: Any = None) -> Any:
    if isinstance(hf_config, Mapping):
        return hf_config.get(key, default)
    return getattr(hf_config, key, default)


def rope_from_hf(hf_config: Any) -> tuple[float, RopeScalingConfig]:
    """(rope_theta, scaling) from transformers 5 ``rope_parameters`` or legacy keys.

    Legacy configs carry ``rope_theta`` and ``rope_scaling`` (``type`` or ``rope_type``);
    transformers 5 carries both in ``rope_parameters``.

    Raises:
        ValueError: For rope types or keys this package cannot reproduce (e.g. dynamic NTK).
    """
    params = dict(_get(hf_config, "rope_parameters") or {})
    legacy = _get(hf_config, "rope_scaling")
    if isinstance(legacy, Mapping):
        params = {**dict(legacy), **params}
    theta = params.get("rope_theta", _get(hf_config, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in ("default", None):
        return float(theta), RopeScalingConfig()
    if rope_type not in HF_ROPE_KEYS:
        raise ValueError(
            f"rope_scaling.rope_type={rope_type!r}: unsupported (supported: default, "
            f"{', '.join(HF_ROPE_KEYS)})"
        )
    for unsupported in ("mscale", "mscale_all_dim"):
        if params.get(unsupported):
            raise ValueError(f"rope_scaling.{unsupported}={params[unsupported]!r}: unsupported")
    if params.get("truncate", True) is False:
        raise ValueError("rope_scaling.truncate=False: unsupported (yarn with truncated bounds)")
    kwargs = {k: params[k] for k in HF_ROPE_KEYS[rope_type] if params.get(k) is not None}
    if rope_type == "yarn" and "factor" not in kwargs:
        # transformers: factor defaults to max_position_embeddings / original
        original = kwargs["original_max_position_embeddings"]
        kwargs["factor"] = _get(hf_config, "max_position_embeddings") / original
    return float(theta), RopeScalingConfig(rope_type=rope_type, **kwargs)


def model_config_from_hf(
    hf_config: Any, seq_length: int | None = None, **overrides: Any
) -> ModelConfig:
    """ModelConfig of a Hugging Face LlamaConfig / MistralConfig (object or config.json dict).

    Args:
        hf_config: The Hugging Face config.
        seq_length: Training sequence length; None means max_position_embeddings (capped at
            the RoPE scaling's original context when scaling is set).
        **overrides: Further ModelConfig fields (transformer_impl, params_dtype, ...).

    Raises:
        ValueError: For architectures this converter does not map (biases, non-SiLU MLPs,
            sliding-window attention, unsupported RoPE scaling).
    """
    if _get(hf_config, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={_get(hf_config, 'hidden_act')!r}: only silu is supported")
    for flag in ("attention_bias", "mlp_bias"):
        if _get(hf_config, flag, False):
            raise ValueError(f"{flag}=True: biases are not supported by this converter")
    if _get(hf_config, "sliding_window") is not None:
        raise ValueError(
            f"sliding_window={_get(hf_config, 'sliding_window')}: sliding-window attention is "
            "not supported (Mistral v0.2+ sets it to null)"
        )
    theta, scaling = rope_from_hf(hf_config)
    heads = _get(hf_config, "num_attention_heads")
    max_pos = _get(hf_config, "max_position_embeddings")
    if seq_length is None:
        seq_length = scaling.original_max_position_embeddings or max_pos
    head_dim = _get(hf_config, "head_dim") or _get(hf_config, "hidden_size") // heads
    fields: dict[str, Any] = dict(
        num_layers=_get(hf_config, "num_hidden_layers"),
        hidden_size=_get(hf_config, "hidden_size"),
        ffn_hidden_size=_get(hf_config, "intermediate_size"),
        num_attention_heads=heads,
        num_query_groups=_get(hf_config, "num_key_value_heads") or heads,
        kv_channels=head_dim,
        seq_length=min(seq_length, max_pos),
        max_position_embeddings=max_pos,
        vocab_size=_get(hf_config, "vocab_size"),
        rotary_base=theta,
        rope_scaling=scaling,
        normalization="RMSNorm",
        norm_epsilon=_get(hf_config, "rms_norm_eps", 1e-6),
        swiglu=True,
        untie_embeddings_and_output_weights=not _get(hf_config, "tie_word_embeddings", False),
        add_bias_linear=False,
        attention_dropout=float(_get(hf_config, "attention_dropout", 0.0) or 0.0),
        hidden_dropout=0.0,
        init_method_std=_get(hf_config, "initializer_range", 0.02),
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def _hf_rope_keys(model_config: ModelConfig) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, legacy rope_scaling dict or None) for export."""
    s = model_config.rope_scaling
    theta = float(model_config.rotary_base)
    if s.rope_type == "none":
        return theta, None
    if s.rope_type == "ntk":
        # Hugging Face has no static NTK type; its closed form is a larger base.
        rot_dim = int(model_config.kv_channels * model_config.rotary_percent)
        return theta * s.factor ** (rot_dim / (rot_dim - 2)), None
    scaling = {"rope_type": s.rope_type, "type": s.rope_type}
    for key in HF_ROPE_KEYS[s.rope_type]:
        value = getattr(s, key)
        if value is not None:
            scaling[key] = value
    return theta, scaling


def hf_config_from_model_config(
    model_config: ModelConfig, target_length: int | None = None
) -> dict[str, Any]:
    """A Llama ``config.json`` dict for a model trained to ``target_length`` tokens.

    Uses the legacy ``rope_theta`` + ``rope_scaling`` keys (with both ``type`` and ``rope_type``),
    which vLLM, RULER and transformers 4.x and 5.x all read. ``ntk`` is exported in its closed
    form (``rope_theta`` = base * s^(d/(d-2)), no rope_scaling), exact for inference.

    Args:
        model_config: The model.
        target_length: Context window L written as max_position_embeddings; None keeps the
            model's max_position_embeddings.

    Raises:
        ValueError: If the model is not Llama-shaped (LayerNorm, GeLU MLP, biases).
    """
    m = model_config
    if m.normalization != "RMSNorm" or not m.swiglu or m.add_bias_linear:
        raise ValueError(
            f"--normalization={m.normalization}, --swiglu={m.swiglu}, "
            f"add_bias_linear={m.add_bias_linear}: only RMSNorm + SwiGLU without biases exports "
            "as a Llama checkpoint"
        )
    if m.rotary_percent != 1.0:
        raise ValueError(f"--rotary-percent={m.rotary_percent}: Llama rotates the full head")
    theta, scaling = _hf_rope_keys(m)
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_query_groups,
        "head_dim": m.kv_channels,
        "max_position_embeddings": target_length or m.max_position_embeddings,
        "vocab_size": m.vocab_size,
        "rms_norm_eps": m.norm_epsilon,
        "rope_theta": theta,
        "rope_scaling": scaling,
        "tie_word_embeddings": not m.untie_embeddings_and_output_weights,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": m.attention_dropout,
        "initializer_range": m.init_method_std,
        "torch_dtype": m.params_dtype,
    }
    return config


def _check_llama_shape(model_config: ModelConfig) -> None:
    if model_config.add_bias_linear or model_config.normalization != "RMSNorm":
        raise ValueError("state-dict conversion supports RMSNorm models without linear biases")
    if not model_config.swiglu:
        raise ValueError("--swiglu=False: state-dict conversion supports SwiGLU MLPs only")
    if model_config.layernorm_zero_centered_gamma:
        raise ValueError(
            "--apply-layernorm-1p: norm weights are stored as gamma - 1; Llama checkpoints store "
            "gamma, and this conversion does not shift them"
        )


def fuse_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_query_groups: int
) -> torch.Tensor:
    """megatron ``linear_qkv`` weight from HF q/k/v: per group, its q heads, k, then v.

    Args:
        q: [np * hn, h]; k, v: [ng * hn, h].
        num_query_groups: ng.
    """
    ng, h = num_query_groups, q.shape[-1]
    hn = k.shape[0] // ng
    q_g = q.reshape(ng, -1, h)
    return torch.cat([q_g, k.reshape(ng, hn, h), v.reshape(ng, hn, h)], dim=1).reshape(-1, h)


def split_qkv(
    qkv: torch.Tensor, num_attention_heads: int, num_query_groups: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fuse_qkv`: (q [np*hn, h], k [ng*hn, h], v [ng*hn, h])."""
    ng, h = num_query_groups, qkv.shape[-1]
    per_group = num_attention_heads // ng
    hn = qkv.shape[0] // (ng * (per_group + 2))
    qkv_g = qkv.reshape(ng, (per_group + 2) * hn, h)
    q, k, v = torch.split(qkv_g, [per_group * hn, hn, hn], dim=1)
    return q.reshape(-1, h), k.reshape(-1, h), v.reshape(-1, h)


def hf_to_megatron_state_dict(
    hf_sd: Mapping[str, torch.Tensor], model_config: ModelConfig
) -> dict[str, torch.Tensor]:
    """Megatron (TP = PP = 1) state dict from a Hugging Face Llama state dict.

    Args:
        hf_sd: ``LlamaForCausalLM.state_dict()`` names (``model.layers.0...``, ``lm_head``).
        model_config: The target model (spec decides the norm key names; vocab is padded to
            ``padded_vocab_size(1)`` with zero rows).

    Raises:
        ValueError: On a non-Llama model config; KeyError on a missing tensor.
    """
    m = model_config
    _check_llama_shape(m)
    padded = m.padded_vocab_size(1)
    sd = {
        "embedding.word_embeddings.weight": _pad_vocab(hf_sd["model.embed_tokens.weight"], padded)
    }
    for i in range(m.num_layers):
        hf, mg = f"model.layers.{i}.", f"decoder.layers.{i}."
        sd[f"{mg}self_attention.linear_qkv.weight"] = fuse_qkv(
            hf_sd[f"{hf}self_attn.q_proj.weight"],
            hf_sd[f"{hf}self_attn.k_proj.weight"],
            hf_sd[f"{hf}self_attn.v_proj.weight"],
            m.num_query_groups,
        )
        sd[f"{mg}self_attention.linear_proj.weight"] = hf_sd[f"{hf}self_attn.o_proj.weight"]
        sd[f"{mg}mlp.linear_fc1.weight"] = torch.cat(
            [hf_sd[f"{hf}mlp.gate_proj.weight"], hf_sd[f"{hf}mlp.up_proj.weight"]], dim=0
        )
        sd[f"{mg}mlp.linear_fc2.weight"] = hf_sd[f"{hf}mlp.down_proj.weight"]
        attn_norm, mlp_norm = norm_keys(m, mg)
        sd[attn_norm] = hf_sd[f"{hf}input_layernorm.weight"]
        sd[mlp_norm] = hf_sd[f"{hf}post_attention_layernorm.weight"]
    sd["decoder.final_layernorm.weight"] = hf_sd["model.norm.weight"]
    if m.untie_embeddings_and_output_weights:
        sd["output_layer.weight"] = _pad_vocab(hf_sd["lm_head.weight"], padded)
    return {k: v.clone() for k, v in sd.items()}


def megatron_to_hf_state_dict(
    sd: Mapping[str, Any], model_config: ModelConfig
) -> dict[str, torch.Tensor]:
    """Hugging Face Llama state dict from a megatron (TP = PP = 1) state dict.

    ``_extra_state`` entries (TE/FP8 metadata) are ignored; padded vocabulary rows are dropped.
    A tied model gets ``lm_head.weight`` = the embedding, as ``LlamaForCausalLM`` expects.

    Raises:
        ValueError: On a non-Llama model config; KeyError on a missing tensor.
    """
    m = model_config
    _check_llama_shape(m)
    vocab = m.vocab_size
    embed = sd["embedding.word_embeddings.weight"][:vocab]
    hf = {"model.embed_tokens.weight": embed}
    for i in range(m.num_layers):
        h, mg = f"model.layers.{i}.", f"decoder.layers.{i}."
        q, k, v = split_qkv(
            sd[f"{mg}self_attention.linear_qkv.weight"], m.num_attention_heads, m.num_query_groups
        )
        hf[f"{h}self_attn.q_proj.weight"] = q
        hf[f"{h}self_attn.k_proj.weight"] = k
        hf[f"{h}self_attn.v_proj.weight"] = v
        hf[f"{h}self_attn.o_proj.weight"] = sd[f"{mg}self_attention.linear_proj.weight"]
        gate, up = torch.chunk(sd[f"{mg}mlp.linear_fc1.weight"], 2, dim=0)
        hf[f"{h}mlp.gate_proj.weight"] = gate
        hf[f"{h}mlp.up_proj.weight"] = up
        hf[f"{h}mlp.down_proj.weight"] = sd[f"{mg}mlp.linear_fc2.weight"]
        attn_norm, mlp_norm = norm_keys(m, mg)
        hf[f"{h}input_layernorm.weight"] = sd[attn_norm]
        hf[f"{h}post_attention_layernorm.weight"] = sd[mlp_norm]
    hf["model.norm.weight"] = sd["decoder.final_layernorm.weight"]
    if m.untie_embeddings_and_output_weights:
        hf["lm_head.weight"] = sd["output_layer.weight"][:vocab]
    else:
        hf["lm_head.weight"] = embed
    return {k: v.clone().contiguous() for k, v in hf.items()}
