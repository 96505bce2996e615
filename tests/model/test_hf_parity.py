"""Logits parity with transformers' LlamaForCausalLM for every RoPE scaling type.

The Hugging Face model is built from the exported ``hf_config_from_model_config`` (so the export
keys are checked too) and its weights are converted with ``hf_to_megatron_state_dict``.

Tolerances. At positions below ~100 both sides compute the same float32 maths up to summation
order: measured <= 5e-6 on logits of magnitude ~4; we allow 2e-5. Near position 65535 Hugging
Face computes ``position * inv_freq`` in float32 with a float32 inv_freq: a float32 near 65536 is
rounded to 2**-8 = 4e-3 rad, and inv_freq's relative rounding (6e-8) times 65535 adds up to another
4e-3 rad, while ours (float64 angles reduced mod 2*pi) are exact to ~2e-7 rad. Measured logit
differences at the EndPrompt layout are 1.4e-3 .. 7e-3 (yarn largest: its temperature scales the
logits); with HF's angles recomputed in float64 they stay 2e-4 .. 1e-3, i.e. dominated by HF's
float32 inv_freq. We allow 2e-2, and each such test asserts that the layout moves the logits by
> 0.5 (measured ~5), so a model ignoring position_ids could not pass.
"""

from __future__ import annotations

import pytest
import torch
from model_fixtures import endprompt_positions_bs, tiny_model_config
from transformers import LlamaConfig, LlamaForCausalLM

from megatron_endprompt.checkpoint.weights import load_megatron_state_dict
from megatron_endprompt.config import RopeScalingConfig
from megatron_endprompt.convert.hf_llama import (
    hf_config_from_model_config,
    hf_to_megatron_state_dict,
    model_config_from_hf,
)
from megatron_endprompt.model.gpt import build_model

L = 65536
SCALINGS = {
    "none": RopeScalingConfig(),
    "linear": RopeScalingConfig("linear", factor=4.0),
    "ntk": RopeScalingConfig("ntk", factor=8.0),
    "llama3": RopeScalingConfig("llama3", factor=8.0, original_max_position_embeddings=8192),
    "yarn": RopeScalingConfig("yarn", factor=16.0, original_max_position_embeddings=4096),
}


def _pair(model_config, seed: int = 0):
    """(HF model, our model) with identical random weights, both float32 eval."""
    hf_config = LlamaConfig(**hf_config_from_model_config(model_config, target_length=L))
    torch.manual_seed(seed)
    hf = LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            # Larger than HF's 0.02 init so attention is far from uniform and RoPE matters;
            # norms random so a swapped norm mapping shows.
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.15)
    ours = build_model(model_config).eval()
    load_megatron_state_dict(ours, hf_to_megatron_state_dict(hf.state_dict(), model_config))
    return hf, ours


def _logits(hf, ours, ids, pos, vocab):
    with torch.no_grad():
        expected = hf(input_ids=ids, position_ids=pos).logits
        got = ours(ids, pos)
    assert got.shape == (*ids.shape, 128)  # padded vocabulary
    assert torch.all(got[..., vocab:] == 0)  # zero pad rows at import -> zero logits
    return expected, got[..., :vocab]


@pytest.mark.usefixtures("single_process_parallel_state")
@pytest.mark.parametrize("kind", list(SCALINGS))
def test_parity_contiguous_and_endprompt(kind):
    config = tiny_model_config(rope_scaling=SCALINGS[kind])
    hf, ours = _pair(config)
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))

    contiguous = torch.arange(16).expand(2, 16)
    expected, got = _logits(hf, ours, ids, contiguous, 100)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)
    # position_ids=None is the contiguous layout
    with torch.no_grad():
        torch.testing.assert_close(ours(ids)[..., :100], got, atol=0, rtol=0)

    endprompt = endprompt_positions_bs(2, a=11, t=5, length=L)  # terminal ends at L - 1
    expected_ep, got_ep = _logits(hf, ours, ids, endprompt, 100)
    torch.testing.assert_close(got_ep, expected_ep, atol=2e-2, rtol=0)
    assert (got_ep - got).abs().max() > 0.5  # the layout matters far beyond the tolerance


@pytest.mark.usefixtures("single_process_parallel_state")
def test_parity_per_row_layouts_mha_tied_head_dim():
    """Rows with different layouts (per-row rotary tensor), MHA, tied embeddings, head_dim 32."""
    config = tiny_model_config(
        num_query_groups=4,
        kv_channels=32,
        untie_embeddings_and_output_weights=False,
        rope_scaling=SCALINGS["llama3"],
    )
    hf, ours = _pair(config, seed=3)
    ids = torch.randint(0, 100, (3, 16), generator=torch.Generator().manual_seed(2))
    pos = torch.stack(
        [
            torch.arange(16),
            endprompt_positions_bs(1, a=10, t=6, length=L)[0],
            torch.tensor(
                [0, 1, 2, 3, 900, 901, 902, 903, 904, 30000, 30001, 30002]
                + [L - 4 + i for i in range(4)]
            ),
        ]
    )
    expected, got = _logits(hf, ours, ids, pos, 100)
    torch.testing.assert_close(got[0], expected[0], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=0)


@pytest.mark.usefixtures("single_process_parallel_state")
def test_parity_loss_matches_hf_cross_entropy():
    # Unpadded vocabulary: megatron's cross entropy runs over the padded vocabulary, where the
    # zero pad rows add exp(0) terms to the softmax (as in Megatron-LM), so HF's loss is matched
    # exactly only without padding.
    config = tiny_model_config(rope_scaling=SCALINGS["yarn"], make_vocab_size_divisible_by=1)
    hf, ours = _pair(config, seed=5)
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(4))
    labels = torch.roll(ids, -1, dims=1)
    pos = endprompt_positions_bs(2, a=8, t=8, length=4096)
    with torch.no_grad():
        logits = hf(input_ids=ids, position_ids=pos).logits
        expected = torch.nn.functional.cross_entropy(
            logits.reshape(-1, 100), labels.reshape(-1), reduction="none"
        ).view(2, 16)
        got = ours(ids, pos, labels=labels)
    assert got.dtype == torch.float32 and got.shape == (2, 16)
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("kind", ["none", "linear", "llama3", "yarn"])
def test_model_config_round_trips_through_hf_config(kind):
    config = tiny_model_config(rope_scaling=SCALINGS[kind], seq_length=4096)
    back = model_config_from_hf(
        LlamaConfig(**hf_config_from_model_config(config, target_length=L)), seq_length=4096
    )
    assert back == config


def _partial_rotary(original):
    """HF's rotation on the first cos.shape[-1] channels, the rest passed through (the
    GPT-NeoX / Phi convention, which megatron's rotary_percent follows)."""

    def apply(q, k, cos, sin, unsqueeze_dim=1):
        rot = cos.shape[-1]
        q_rot, k_rot = original(q[..., :rot], k[..., :rot], cos, sin, unsqueeze_dim)
        return torch.cat([q_rot, q[..., rot:]], -1), torch.cat([k_rot, k[..., rot:]], -1)

    return apply


@pytest.mark.usefixtures("single_process_parallel_state")
def test_parity_partial_rotary(monkeypatch):
    import transformers.models.llama.modeling_llama as llama

    # Llama itself always rotates the whole head; patch in the partial-rotary convention.
    monkeypatch.setattr(llama, "apply_rotary_pos_emb", _partial_rotary(llama.apply_rotary_pos_emb))
    config = tiny_model_config(rotary_percent=0.5, rope_scaling=SCALINGS["linear"])
    exported = hf_config_from_model_config(tiny_model_config(rope_scaling=SCALINGS["linear"]), L)
    hf_config = LlamaConfig(**exported, partial_rotary_factor=0.5)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.15)
    ours = build_model(config).eval()
    load_megatron_state_dict(ours, hf_to_megatron_state_dict(hf.state_dict(), config))
    assert ours.position_rotary_emb.rot_dim == 8
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    expected, got = _logits(hf, ours, ids, torch.arange(16).expand(2, 16), 100)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)
    expected, got = _logits(hf, ours, ids, endprompt_positions_bs(2, 11, 5, L), 100)
    torch.testing.assert_close(got, expected, atol=2e-2, rtol=0)
