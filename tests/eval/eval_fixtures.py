"""A tiny byte-vocabulary model config shared by the evaluation tests."""

from megatron_endprompt.config import ModelConfig

VOCAB = 259  # ByteTokenizer


def tiny_config(**overrides) -> ModelConfig:
    """2 layers, hidden 64, byte vocabulary; vocabulary padded to a multiple of 64."""
    fields = dict(
        num_layers=2,
        hidden_size=64,
        ffn_hidden_size=128,
        num_attention_heads=4,
        num_query_groups=2,
        seq_length=32,
        max_position_embeddings=256,
        vocab_size=VOCAB,
        make_vocab_size_divisible_by=64,
    )
    fields.update(overrides)
    return ModelConfig(**fields)
