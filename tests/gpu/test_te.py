"""Transformer Engine backend on a GPU: bf16 / FP8 training steps, fused RoPE, local-vs-TE parity.

Skipped without CUDA or Transformer Engine. Weights are moved between the local and TE specs with
the converter (the two specs name the norms differently), so the comparison also checks that.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(
        importlib.util.find_spec("transformer_engine") is None, reason="needs Transformer Engine"
    ),
]

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from model_fixtures import endprompt_positions_bs, tiny_model_config  # noqa: E402

from megatron_endprompt.checkpoint.weights import load_megatron_state_dict  # noqa: E402
from megatron_endprompt.convert.hf_llama import (  # noqa: E402
    hf_to_megatron_state_dict,
    megatron_to_hf_state_dict,
)
from megatron_endprompt.model.gpt import build_model  # noqa: E402

S, B, L = 32, 2, 65536


def _config(impl: str, dtype: str = "bfloat16"):
    # FP8 GEMMs need dimensions divisible by 16 and at least 16 tokens per GEMM.
    return tiny_model_config(
        transformer_impl=impl, params_dtype=dtype, seq_length=S, ffn_hidden_size=128,
        init_method_std=0.1,
    )  # fmt: skip


def _pair(dtype: str, **te_overrides):
    """(local model, TE model) with the same weights, on the GPU."""
    local = build_model(_config("local", dtype), seed=11).cuda()
    hf_sd = megatron_to_hf_state_dict(local.state_dict(), _config("local", dtype))
    te_config = _config("te", dtype)
    te = build_model(te_config, seed=12, **te_overrides).cuda()
    load_megatron_state_dict(te, hf_to_megatron_state_dict(hf_sd, te_config))
    return local, te


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (B, S), generator=g).cuda()
    return ids, endprompt_positions_bs(B, S - 8, 8, L).cuda()


@pytest.fixture(scope="module", autouse=True)
def _single_gpu_state():
    from megatron_endprompt import device

    device.init_distributed("nccl", rank=0, world_size=1)
    device.initialize_model_parallel()
    yield
    device.destroy_distributed()


def test_local_and_te_logits_agree():
    local, te = _pair("float32")
    ids, pos = _batch()
    with torch.no_grad():
        a, b = local.eval()(ids, pos), te.eval()(ids, pos)
    scale = a.abs().max()
    assert (a - b).abs().max() <= 2e-2 * scale


def test_te_bf16_forward_backward():
    _, te = _pair("bfloat16")
    ids, pos = _batch()
    loss = te.train()(ids, pos, labels=torch.roll(ids, -1, 1))
    assert loss.shape == (B, S) and loss.dtype == torch.float32
    loss.mean().backward()
    grads = [p.grad for p in te.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9),
    reason="FP8 needs compute capability >= 8.9",
)
def test_te_fp8_forward_backward_close_to_bf16():
    import transformer_engine.pytorch as te_pt
    from transformer_engine.common.recipe import DelayedScaling, Format

    _, te = _pair("bfloat16")
    ids, pos = _batch()
    labels = torch.roll(ids, -1, 1)
    with torch.no_grad():
        reference = te.eval()(ids, pos, labels=labels).mean()
    te.train()
    with te_pt.fp8_autocast(enabled=True, fp8_recipe=DelayedScaling(fp8_format=Format.HYBRID)):
        loss = te(ids, pos, labels=labels).mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert abs(loss.item() - reference.item()) < 0.1 * reference.item()
    assert all(torch.isfinite(p.grad).all() for p in te.parameters() if p.grad is not None)


def test_fused_rope_equals_unfused_for_batch_shared_endprompt_layout():
    _, unfused = _pair("float32")
    _, fused = _pair("float32", apply_rope_fusion=True)
    ids, pos = _batch()
    with torch.no_grad():
        a = unfused.eval()(ids, pos)
        b = fused.eval()(ids, pos)
        assert fused.config.apply_rope_fusion  # batch-shared layout: the fused kernel ran
        mixed = torch.stack([pos[0], torch.arange(S, device=pos.device)])
        c = fused(ids, mixed)  # per-row layout falls back to the unfused path
        assert not fused.config.apply_rope_fusion
        d = unfused(ids, mixed)
    torch.testing.assert_close(b, a, atol=1e-4 * a.abs().max().item(), rtol=1e-4)
    torch.testing.assert_close(c, d, atol=1e-4 * d.abs().max().item(), rtol=1e-4)
