"""--apply-layernorm-1p on the local spec: gamma stored as gamma - 1, the same function."""

import dataclasses

import pytest
import torch

from megatron_endprompt.config import ModelConfig
from megatron_endprompt.model.gpt import build_model


@pytest.mark.parametrize("norm", ["RMSNorm", "LayerNorm"])
def test_zero_centered_gamma_is_the_same_model_shifted_by_one(single_process_parallel_state, norm):
    m = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                    num_query_groups=2, seq_length=16, max_position_embeddings=16, vocab_size=64,
                    normalization=norm)  # fmt: skip
    plain = build_model(m, seed=1)
    one_p = build_model(dataclasses.replace(m, layernorm_zero_centered_gamma=True), seed=1)
    a, b = plain.state_dict(), one_p.state_dict()
    assert a.keys() == b.keys()  # same parameter names: checkpoints keep their layout
    norms = [k for k in a if "layernorm" in k and k.endswith("weight")]
    assert len(norms) == 2 * 2 + 1  # two per layer and the final one, all zero-centred
    assert all(float(b[k].abs().sum()) == 0.0 for k in norms)  # gamma = 1 at initialisation
    one_p.load_state_dict({k: v - 1 if k in norms else v for k, v in a.items()})
    tokens = torch.randint(0, 64, (2, 16))
    positions = torch.arange(16).expand(2, 16)
    torch.testing.assert_close(one_p(tokens, positions), plain(tokens, positions))
