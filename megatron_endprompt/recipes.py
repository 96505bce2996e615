"""Named model shapes (``--model-preset``): a tiny test model and the Llama/Mistral families.

Each recipe is a :class:`ModelConfig` with the published architecture: RMSNorm, SwiGLU, untied
embeddings, no linear biases, rotate-half RoPE. ``seq_length`` and ``max_position_embeddings`` are
the pre-training context window; an extension run overrides them (e.g. ``--seq-length 8192
--max-position-embeddings 65536``) and picks a ``--rope-scaling-type``. Numerics that depend on
the machine (``transformer_impl``, ``params_dtype``) keep the ModelConfig defaults and are set by
the run.

Mistral: ``mistral-7b`` is v0.2 (rope_theta 1e6, 32k context, no sliding window). v0.1 used a
4096-token sliding window that megatron-core's attention does not implement here, and v0.3 only
adds vocabulary (32768): use ``--vocab-size`` or import the checkpoint's config.
"""

from __future__ import annotations

import copy

from megatron_endprompt.config import ModelConfig

_LLAMA = dict(
    normalization="RMSNorm",
    swiglu=True,
    untie_embeddings_and_output_weights=True,
    add_bias_linear=False,
    norm_epsilon=1e-5,
    attention_dropout=0.0,
    hidden_dropout=0.0,
)

RECIPES: dict[str, ModelConfig] = {
    # Tests and the CPU quickstart; the vocabulary is replaced by the tokenizer's.
    "tiny": ModelConfig(
        num_layers=4,
        hidden_size=128,
        ffn_hidden_size=352,
        num_attention_heads=4,
        num_query_groups=2,
        seq_length=256,
        max_position_embeddings=2048,
        vocab_size=512,
        rotary_base=10000.0,
        **_LLAMA,
    ),
    "llama2-7b": ModelConfig(
        num_layers=32,
        hidden_size=4096,
        ffn_hidden_size=11008,
        num_attention_heads=32,
        num_query_groups=32,
        seq_length=4096,
        max_position_embeddings=4096,
        vocab_size=32000,
        rotary_base=10000.0,
        **_LLAMA,
    ),
    "llama3-8b": ModelConfig(
        num_layers=32,
        hidden_size=4096,
        ffn_hidden_size=14336,
        num_attention_heads=32,
        num_query_groups=8,
        seq_length=8192,
        max_position_embeddings=8192,
        vocab_size=128256,
        rotary_base=500000.0,
        **_LLAMA,
    ),
    "llama3-70b": ModelConfig(
        num_layers=80,
        hidden_size=8192,
        ffn_hidden_size=28672,
        num_attention_heads=64,
        num_query_groups=8,
        seq_length=8192,
        max_position_embeddings=8192,
        vocab_size=128256,
        rotary_base=500000.0,
        **_LLAMA,
    ),
    "mistral-7b": ModelConfig(
        num_layers=32,
        hidden_size=4096,
        ffn_hidden_size=14336,
        num_attention_heads=32,
        num_query_groups=8,
        seq_length=32768,
        max_position_embeddings=32768,
        vocab_size=32000,
        rotary_base=1000000.0,
        **_LLAMA,
    ),
}


def recipe_names() -> list[str]:
    """Names accepted by :func:`get_recipe`."""
    return list(RECIPES)


def get_recipe(name: str) -> ModelConfig:
    """A fresh copy of a named model shape.

    Args:
        name: One of :func:`recipe_names` (tiny, llama2-7b, llama3-8b, llama3-70b, mistral-7b).

    Raises:
        ValueError: For an unknown name, listing the known ones.
    """
    if name not in RECIPES:
        raise ValueError(f"--model-preset={name!r}: unknown; choose one of {', '.join(RECIPES)}")
    return copy.deepcopy(RECIPES[name])
