"""Hugging Face <-> megatron state dicts and configs: exact round trips, hand-worked layouts."""

from __future__ import annotations

import pytest
import torch
from model_fixtures import tiny_model_config
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig

from megatron_endprompt.config import RopeScalingConfig
from megatron_endprompt.convert.hf_llama import (
    fuse_qkv,
    hf_config_from_model_config,
    hf_to_megatron_state_dict,
    megatron_to_hf_state_dict,
    model_config_from_hf,
    rope_from_hf,
    split_qkv,
)
from megatron_endprompt.model.gpt import build_model


def _hf_state_dict(model_config, seed=0):
    hf_config = LlamaConfig(**hf_config_from_model_config(model_config))
    torch.manual_seed(seed)
    model = LlamaForCausalLM(hf_config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model.state_dict()


def test_fuse_qkv_hand_worked_gqa_order():
    # 4 query heads in 2 groups, head dim 1, hidden 1: per group its q heads, then k, then v.
    q = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    k = torch.tensor([[10.0], [11.0]])
    v = torch.tensor([[20.0], [21.0]])
    fused = fuse_qkv(q, k, v, num_query_groups=2)
    assert fused.flatten().tolist() == [0, 1, 10, 20, 2, 3, 11, 21]
    back = split_qkv(fused, num_attention_heads=4, num_query_groups=2)
    for a, b in zip(back, (q, k, v)):
        assert torch.equal(a, b)


def test_fuse_qkv_head_dim_two():
    q = torch.arange(8.0).view(8, 1)  # heads (0,1) (2,3) (4,5) (6,7) with hn = 2
    k = torch.tensor([[10.0], [11.0], [12.0], [13.0]])
    v = torch.tensor([[20.0], [21.0], [22.0], [23.0]])
    fused = fuse_qkv(q, k, v, num_query_groups=2)
    expected = [0, 1, 2, 3, 10, 11, 20, 21, 4, 5, 6, 7, 12, 13, 22, 23]
    assert fused.flatten().tolist() == expected


@pytest.mark.parametrize("impl", ["local", "te"])
@pytest.mark.parametrize("untied", [True, False])
def test_hf_megatron_hf_round_trip_is_exact(impl, untied):
    config = tiny_model_config(untie_embeddings_and_output_weights=untied, transformer_impl=impl)
    hf_sd = _hf_state_dict(config)
    mg = hf_to_megatron_state_dict(hf_sd, config)
    assert mg["embedding.word_embeddings.weight"].shape == (128, 64)
    assert torch.all(mg["embedding.word_embeddings.weight"][100:] == 0)
    norm = (
        "self_attention.linear_qkv.layer_norm_weight" if impl == "te" else "input_layernorm.weight"
    )
    assert f"decoder.layers.1.{norm}" in mg
    assert ("output_layer.weight" in mg) == untied
    back = megatron_to_hf_state_dict(mg, config)
    assert set(back) == set(hf_sd)
    for key, value in hf_sd.items():
        assert torch.equal(back[key], value), key


@pytest.mark.usefixtures("single_process_parallel_state")
@pytest.mark.parametrize("untied", [True, False])
def test_converted_keys_match_the_local_model(untied):
    config = tiny_model_config(untie_embeddings_and_output_weights=untied)
    model = build_model(config)
    expected = {k for k in model.state_dict() if not k.endswith("_extra_state")}
    assert set(hf_to_megatron_state_dict(_hf_state_dict(config), config)) == expected


@pytest.mark.usefixtures("single_process_parallel_state")
def test_megatron_hf_megatron_round_trip_keeps_every_real_row():
    config = tiny_model_config()
    sd = {k: v for k, v in build_model(config, seed=3).state_dict().items() if v is not None}
    back = hf_to_megatron_state_dict(megatron_to_hf_state_dict(sd, config), config)
    for key, value in back.items():
        if key in ("embedding.word_embeddings.weight", "output_layer.weight"):
            assert torch.equal(value[:100], sd[key][:100])
            assert torch.all(value[100:] == 0)  # padding rows are not part of the model
        else:
            assert torch.equal(value, sd[key]), key


def test_rope_from_hf_legacy_and_v5_keys():
    legacy = {"rope_theta": 500000.0, "rope_scaling": {"type": "linear", "factor": 2.5}}
    assert rope_from_hf(legacy) == (500000.0, RopeScalingConfig("linear", factor=2.5))
    v5 = {
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
    }
    expected = RopeScalingConfig("llama3", factor=8.0, original_max_position_embeddings=8192)
    assert rope_from_hf(v5) == (500000.0, expected)
    assert rope_from_hf({"rope_theta": 1e6}) == (1e6, RopeScalingConfig())
    with pytest.raises(ValueError, match="rope_type='dynamic'"):
        rope_from_hf({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}})
    with pytest.raises(ValueError, match="mscale"):
        rope_from_hf({"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "mscale": 0.7,
                                       "original_max_position_embeddings": 4096}})  # fmt: skip


def test_hf_config_export_keys():
    scaling = RopeScalingConfig("yarn", factor=16.0, original_max_position_embeddings=4096)
    exported = hf_config_from_model_config(tiny_model_config(rope_scaling=scaling), 65536)
    assert exported["max_position_embeddings"] == 65536
    assert exported["rope_theta"] == 10000.0
    assert exported["rope_scaling"] == {
        "rope_type": "yarn",
        "type": "yarn",
        "factor": 16.0,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
    }
    assert exported["vocab_size"] == 100 and exported["num_key_value_heads"] == 2


def test_ntk_exports_as_closed_form_base():
    config = tiny_model_config(rope_scaling=RopeScalingConfig("ntk", factor=8.0))
    exported = hf_config_from_model_config(config, 65536)
    assert exported["rope_scaling"] is None
    assert exported["rope_theta"] == pytest.approx(10000.0 * 8.0 ** (16 / 14))


def test_mistral_config_imports_and_sliding_window_is_rejected():
    mistral = MistralConfig(
        vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768,
        rope_theta=1e6, sliding_window=None,
    )  # fmt: skip
    config = model_config_from_hf(mistral, seq_length=1024, transformer_impl="local")
    assert (config.rotary_base, config.num_query_groups, config.seq_length) == (1e6, 2, 1024)
    mistral.sliding_window = 4096
    with pytest.raises(ValueError, match="sliding_window=4096"):
        model_config_from_hf(mistral)


def test_non_llama_models_are_rejected():
    with pytest.raises(ValueError, match="--normalization=LayerNorm"):
        hf_config_from_model_config(tiny_model_config(normalization="LayerNorm"))
    with pytest.raises(ValueError, match="RMSNorm models without linear biases"):
        hf_to_megatron_state_dict({}, tiny_model_config(add_bias_linear=True))
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        model_config_from_hf({"hidden_act": "gelu"})
