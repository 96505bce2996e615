"""Tests for megatron_endprompt.model.rotary (position-aware RoPE).

References are independent of the code under test: Hugging Face transformers' own rope init and
apply functions, closed-form numpy formulas, a complex-number rotation, and float64 angles.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.transformer_config import TransformerConfig
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as hf_apply

from megatron_endprompt.config import RopeScalingConfig
from megatron_endprompt.model.rotary import (
    PositionRotaryEmbedding,
    attention_scaling,
    compute_inv_freq,
    is_batch_shared,
    rotary_dim,
)

HEAD_DIM = 32
BASE = 10000.0
L = 65536
SCALINGS = {
    "none": {},
    "linear": {"factor": 2.5},  # fractional on purpose
    "llama3": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 128,
    },
    "yarn": {"factor": 4.0, "original_max_position_embeddings": 16384, "beta_fast": 32.0},
}


def _scaling(rope_type: str) -> RopeScalingConfig:
    return RopeScalingConfig(rope_type=rope_type, **SCALINGS[rope_type])


def _hf_config(rope_type: str, partial: float = 1.0) -> LlamaConfig:
    params = {"rope_theta": BASE, "rope_type": "default" if rope_type == "none" else rope_type}
    params.update(SCALINGS[rope_type])
    if partial != 1.0:
        params["partial_rotary_factor"] = partial
    return LlamaConfig(
        hidden_size=2 * HEAD_DIM,
        num_attention_heads=2,
        head_dim=HEAD_DIM,
        max_position_embeddings=L,
        rope_parameters=params,
    )


def _endprompt_positions(a: int, t: int, target: int = L) -> torch.Tensor:
    return torch.cat([torch.arange(a), torch.arange(target - t, target)])


def _wrapped(diff: torch.Tensor) -> torch.Tensor:
    """Angle difference mapped to [-pi, pi]."""
    return torch.remainder(diff + math.pi, 2 * math.pi) - math.pi


@pytest.fixture(scope="module")
def cp_group():
    """World-size-1 gloo group: megatron's apply_rotary_pos_emb asks for a CP group."""
    created = not dist.is_initialized()
    if created:
        store = dist.HashStore()
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield dist.group.WORLD
    if created:
        dist.destroy_process_group()


# (1) frequencies vs Hugging Face ------------------------------------------------------------


@pytest.mark.parametrize("rope_type", ["linear", "llama3", "yarn"])
@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_inv_freq_matches_hugging_face(rope_type: str, partial: float) -> None:
    hf_inv_freq, hf_scale = ROPE_INIT_FUNCTIONS[rope_type](_hf_config(rope_type, partial))
    ours = compute_inv_freq(rotary_dim(HEAD_DIM, partial), BASE, _scaling(rope_type))
    # HF computes in float32: relative rounding of a few 1e-8 is all the difference allowed.
    np.testing.assert_allclose(ours, hf_inv_freq.double().numpy(), rtol=3e-7, atol=0)
    assert attention_scaling(_scaling(rope_type)) == pytest.approx(hf_scale, rel=1e-12)


def test_default_inv_freq_matches_hugging_face() -> None:
    hf_inv_freq, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(_hf_config("none"))
    ours = compute_inv_freq(HEAD_DIM, BASE, None)
    np.testing.assert_allclose(ours, hf_inv_freq.double().numpy(), rtol=3e-7, atol=0)


def test_yarn_attention_scaling_values() -> None:
    assert attention_scaling(_scaling("yarn")) == pytest.approx(0.1 * math.log(4.0) + 1.0)
    explicit = RopeScalingConfig("yarn", 4.0, 128, attention_factor=1.3)
    assert attention_scaling(explicit) == 1.3
    # HF's get_mscale returns 1 for factor <= 1.
    assert attention_scaling(RopeScalingConfig("yarn", 0.5, 128)) == 1.0
    assert attention_scaling(_scaling("llama3")) == 1.0


def test_ntk_closed_form() -> None:
    d, s = HEAD_DIM, 3.0
    ours = compute_inv_freq(d, BASE, RopeScalingConfig("ntk", s))
    expected = (BASE * s ** (d / (d - 2))) ** (-np.arange(0, d, 2) / d)
    np.testing.assert_allclose(ours, expected, rtol=1e-13)
    plain = compute_inv_freq(d, BASE, None)
    # NTK-aware: highest frequency untouched, lowest one interpolated by exactly s.
    assert ours[0] == plain[0] == 1.0
    assert ours[-1] == pytest.approx(plain[-1] / s, rel=1e-12)


@pytest.mark.parametrize("rope_type", ["none", "linear", "llama3", "yarn"])
def test_cos_sin_match_hugging_face_formula(rope_type: str) -> None:
    positions = _endprompt_positions(5, 3)
    emb = PositionRotaryEmbedding(HEAD_DIM, scaling=_scaling(rope_type))(positions[None])
    inv_freq = torch.from_numpy(compute_inv_freq(HEAD_DIM, BASE, _scaling(rope_type)))
    config = _hf_config(rope_type)
    hf_rope = LlamaRotaryEmbedding(config)
    hf_cos, hf_sin = hf_rope(torch.zeros(1, dtype=torch.float32), positions[None])
    # HF's float32 angles at position ~65535 are off by up to ~65535 * 2 * 2**-24 = 8e-3 rad
    # (float32 inv_freq and product rounding), which bounds |cos/sin difference| likewise.
    m = attention_scaling(_scaling(rope_type))
    np.testing.assert_allclose(m * torch.cos(emb[:, 0, 0]), hf_cos[0], atol=1e-2)
    np.testing.assert_allclose(m * torch.sin(emb[:, 0, 0]), hf_sin[0], atol=1e-2)
    # HF's formula evaluated in float64 (cat(freqs, freqs)) agrees to float32 angle precision.
    freqs64 = positions.double()[:, None] * inv_freq
    exact = torch.cat((freqs64, freqs64), dim=-1)
    assert _wrapped(emb[:, 0, 0].double() - exact).abs().max() < 1e-6


# (2) applied through megatron-core vs Hugging Face ------------------------------------------


def _megatron_apply(t_sbhd, emb, interleaved, group):
    config = TransformerConfig(
        num_layers=1,
        hidden_size=2 * HEAD_DIM,
        num_attention_heads=2,
        kv_channels=HEAD_DIM,
        rotary_interleaved=interleaved,
    )
    return apply_rotary_pos_emb(t_sbhd, emb, config, cp_group=group)


@pytest.mark.parametrize("rope_type", ["none", "yarn", "llama3"])
def test_megatron_apply_matches_hugging_face_apply(rope_type: str, cp_group) -> None:
    gen = torch.Generator().manual_seed(0)
    b, h = 2, 2
    rows = [_endprompt_positions(6, 2), _endprompt_positions(3, 5)]  # per-row layouts
    pos_bs = torch.stack(rows)
    q_bhsd = torch.randn(b, h, 8, HEAD_DIM, generator=gen, dtype=torch.float64)
    k_bhsd = torch.randn(b, h, 8, HEAD_DIM, generator=gen, dtype=torch.float64)
    module = PositionRotaryEmbedding(HEAD_DIM, scaling=_scaling(rope_type))
    emb = module(pos_bs)
    assert emb.shape == (8, b, 1, HEAD_DIM)
    ours_q = _megatron_apply(q_bhsd.permute(2, 0, 1, 3), emb, False, cp_group)
    ours_k = _megatron_apply(k_bhsd.permute(2, 0, 1, 3), emb, False, cp_group)
    # HF's apply with cos/sin from HF's formula in float64 (cat(freqs, freqs) times the yarn
    # factor), so the comparison isolates layout and convention, not float32 angle rounding.
    inv_freq = torch.from_numpy(compute_inv_freq(HEAD_DIM, BASE, _scaling(rope_type)))
    freqs = pos_bs.double()[..., None] * inv_freq
    emb_hf = torch.cat((freqs, freqs), dim=-1)
    m = module.attention_scaling
    hf_q, hf_k = hf_apply(q_bhsd, k_bhsd, emb_hf.cos() * m, emb_hf.sin() * m)
    np.testing.assert_allclose(m * ours_q.permute(1, 2, 0, 3), hf_q, atol=2e-6)
    np.testing.assert_allclose(m * ours_k.permute(1, 2, 0, 3), hf_k, atol=2e-6)
    # HF's logits q.k / sqrt(d) equal ours with the folded softmax scale.
    hf_logits = hf_q @ hf_k.transpose(-1, -2) / math.sqrt(HEAD_DIM)
    ours_logits = (ours_q.permute(1, 2, 0, 3) @ ours_k.permute(1, 2, 3, 0)) * module.softmax_scale()
    np.testing.assert_allclose(ours_logits, hf_logits, atol=2e-5)


def test_interleaved_matches_complex_rotation(cp_group) -> None:
    positions = _endprompt_positions(4, 4)
    emb = PositionRotaryEmbedding(HEAD_DIM, rotary_interleaved=True)(positions[None])
    x_sbhd = torch.randn(8, 1, 2, HEAD_DIM, generator=torch.Generator().manual_seed(1)).double()
    ours = _megatron_apply(x_sbhd, emb, True, cp_group)
    # GPT-J / Meta Llama convention: channel pairs (2i, 2i+1) rotated by angle p * inv_freq[i].
    angles = positions.double()[:, None] * torch.from_numpy(compute_inv_freq(HEAD_DIM, BASE))
    pairs = torch.view_as_complex(x_sbhd.reshape(8, 1, 2, HEAD_DIM // 2, 2).contiguous())
    expected = torch.view_as_real(
        pairs * torch.polar(torch.ones_like(angles), angles)[:, None, None]
    )
    np.testing.assert_allclose(ours, expected.reshape(8, 1, 2, HEAD_DIM), atol=2e-6)


def test_partial_rotary_passes_remaining_channels(cp_group) -> None:
    positions = _endprompt_positions(5, 3)
    module = PositionRotaryEmbedding(HEAD_DIM, rotary_percent=0.5)
    emb = module(positions[None])
    assert emb.shape == (8, 1, 1, HEAD_DIM // 2)
    x_sbhd = torch.randn(8, 1, 2, HEAD_DIM, generator=torch.Generator().manual_seed(2)).double()
    ours = _megatron_apply(x_sbhd, emb, False, cp_group)
    torch.testing.assert_close(ours[..., HEAD_DIM // 2 :], x_sbhd[..., HEAD_DIM // 2 :])
    inv_freq = torch.from_numpy(compute_inv_freq(HEAD_DIM // 2, BASE))
    freqs = positions.double()[:, None] * inv_freq
    emb_hf = torch.cat((freqs, freqs), dim=-1)[None]  # [1, s, d_rot]
    rot = x_sbhd[..., : HEAD_DIM // 2].permute(1, 2, 0, 3)
    hf_rot, _ = hf_apply(rot, rot, emb_hf.cos(), emb_hf.sin())
    np.testing.assert_allclose(ours[..., : HEAD_DIM // 2].permute(1, 2, 0, 3), hf_rot, atol=2e-6)


def test_contiguous_matches_megatron_rotary_embedding() -> None:
    reference = RotaryEmbedding(HEAD_DIM, 1.0, use_cpu_initialization=True)
    freqs = reference.get_freqs_non_repeated(64)  # float32 [s, d/2], megatron's own formula
    ours = PositionRotaryEmbedding(HEAD_DIM)(torch.arange(64)[None])
    expected = torch.cat((freqs, freqs), dim=-1)[:, None, None, :]
    assert ours.shape == expected.shape and ours.dtype == expected.dtype
    torch.testing.assert_close(torch.cos(ours), torch.cos(expected), atol=2e-5, rtol=0)
    torch.testing.assert_close(torch.sin(ours), torch.sin(expected), atol=2e-5, rtol=0)


# (3) precision --------------------------------------------------------------------------------


def test_reduced_angles_are_exact_at_two_to_the_twenty() -> None:
    positions = torch.arange(2**20 - 256, 2**20 + 1)
    emb = PositionRotaryEmbedding(HEAD_DIM)(positions[None])[:, 0, 0, : HEAD_DIM // 2]
    inv_freq = compute_inv_freq(HEAD_DIM, BASE)
    reference = torch.from_numpy(positions.numpy()[:, None].astype(np.float64) * inv_freq)
    ours_err = _wrapped(emb.double() - reference).abs().max().item()
    naive = positions.float()[:, None] * torch.from_numpy(inv_freq).float()
    naive_err = _wrapped(naive.double() - reference).abs().max().item()
    assert ours_err < 1e-6
    assert naive_err > 1e-3  # float32 keeps ~7 digits of a ~6e5 rad angle
    two_pi_f32 = float(torch.tensor(2 * math.pi, dtype=torch.float32))  # rounds up
    assert float(emb.min()) >= 0.0 and float(emb.max()) <= two_pi_f32


def test_linear_fractional_factor_scales_positions() -> None:
    positions = torch.tensor([[0, 1, 7, 1000, 65535]])
    ours = PositionRotaryEmbedding(HEAD_DIM, scaling=RopeScalingConfig("linear", 2.5))(positions)
    inv_freq = torch.from_numpy(compute_inv_freq(HEAD_DIM, BASE))
    reference = (positions[0].double() / 2.5)[:, None] * inv_freq
    assert _wrapped(ours[:, 0, 0, : HEAD_DIM // 2].double() - reference).abs().max() < 1e-6


# (4) shapes and module behaviour ------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 3),
    seq=st.integers(1, 12),
    shared=st.booleans(),
    interleaved=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_shape_rules_and_rowwise_consistency(batch, seq, shared, interleaved, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    if shared:
        pos_bs = torch.randint(0, L, (1, seq), generator=gen).expand(batch, seq)
    else:
        pos_bs = torch.randint(0, L, (batch, seq), generator=gen)
    module = PositionRotaryEmbedding(HEAD_DIM, rotary_interleaved=interleaved)
    emb = module(pos_bs)
    expect_shared = bool((pos_bs == pos_bs[:1]).all())
    assert is_batch_shared(pos_bs) == expect_shared
    assert emb.shape == (seq, 1 if expect_shared else batch, 1, HEAD_DIM)
    assert emb.dtype == torch.float32
    for row in range(batch):
        single = module(pos_bs[row : row + 1])[:, 0, 0]
        torch.testing.assert_close(emb[:, 0 if expect_shared else row, 0], single)
        half = module.rot_dim // 2
        angles = single[:, 0::2] if interleaved else single[:, :half]
        other = single[:, 1::2] if interleaved else single[:, half:]
        torch.testing.assert_close(angles, other)  # both halves of each pair share an angle


def test_inv_freq_stays_float64_and_out_of_state_dict() -> None:
    module = PositionRotaryEmbedding(HEAD_DIM, scaling=_scaling("yarn"))
    before = module.inv_freq.clone()
    module.bfloat16()  # what megatron's Float16Module does to every floating buffer
    assert module.inv_freq.dtype == torch.float64
    torch.testing.assert_close(module.inv_freq, before, rtol=0, atol=0)
    assert "inv_freq" not in module.state_dict()
    module.load_state_dict({"inv_freq": torch.zeros(HEAD_DIM // 2)})  # ignored, like megatron
    torch.testing.assert_close(module.inv_freq, before, rtol=0, atol=0)


def test_softmax_scale() -> None:
    plain = PositionRotaryEmbedding(HEAD_DIM)
    assert plain.softmax_scale() == pytest.approx(1 / math.sqrt(HEAD_DIM))
    yarn = PositionRotaryEmbedding(HEAD_DIM, scaling=_scaling("yarn"))
    m = 0.1 * math.log(4.0) + 1.0
    assert yarn.attention_scaling == pytest.approx(m)
    assert yarn.softmax_scale() == pytest.approx(m * m / math.sqrt(HEAD_DIM))


# (5) invalid inputs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("position_ids", "match"),
    [
        (torch.arange(4), "2-D"),
        (torch.zeros(1, 2, 3, dtype=torch.long), "2-D"),
        (torch.tensor([[0, 1, -1]]), ">= 0"),
        (torch.tensor([[0.0, 1.0]]), "integer"),
        (torch.zeros(1, 0, dtype=torch.long), "non-empty"),
    ],
)
def test_invalid_position_ids(position_ids: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PositionRotaryEmbedding(HEAD_DIM)(position_ids)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kv_channels": 0}, "kv_channels"),
        ({"kv_channels": 31}, "even"),
        ({"kv_channels": 32, "rotary_percent": 0.0}, "rotary_percent"),
        ({"kv_channels": 32, "rotary_percent": 1.5}, "rotary_percent"),
        ({"kv_channels": 32, "rotary_percent": 0.3}, "even"),
        ({"kv_channels": 32, "rotary_base": 1.0}, "base"),
        ({"kv_channels": 32, "rotary_percent": 0.5, "scaling": _scaling("yarn")}, "yarn"),
    ],
)
def test_invalid_constructor_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PositionRotaryEmbedding(**kwargs)
