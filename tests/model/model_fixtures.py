"""Tiny model configs and position layouts shared by the model tests."""

from __future__ import annotations

import torch

from megatron_endprompt.config import ModelConfig, RopeScalingConfig


def tiny_model_config(**overrides) -> ModelConfig:
    """2 layers, hidden 64, 4 heads in 2 query groups, vocab 100 (padded to 128)."""
    fields = dict(
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=96,
        num_attention_heads=4,
        num_query_groups=2,
        seq_length=16,
        max_position_embeddings=65536,
        vocab_size=100,
        rope_scaling=RopeScalingConfig(),
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def endprompt_positions_bs(batch: int, a: int, t: int, length: int) -> torch.Tensor:
    """[b, a + t] EndPrompt layout: 0..a-1 then L-t..L-1 in every row."""
    row = list(range(a)) + list(range(length - t, length))
    return torch.tensor([row] * batch)
