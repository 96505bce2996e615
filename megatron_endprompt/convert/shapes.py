"""Expected tensor shapes of Hugging Face and Megatron checkpoints, and the TP merge.

Shapes are computed by arithmetic from the ModelConfig, so a 70B checkpoint can be verified
without building the model.
"""

from __future__ import annotations

from megatron_endprompt.config import ModelConfig


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
