"""megatron-to-hf reads Megatron-LM's own legacy checkpoints; hf-to-megatron writes TE names.

The Megatron-LM checkpoint is written by hand (see tests/checkpoint/test_megatron_interop.py for
the facts): ``mp_rank_00`` at PP = 1, ``mp_rank_00_000`` / ``_001`` at PP = 2, ``args`` as the
only model description (no ``model_config``, no ``model_config.json``), TE key names with
``_extra_state`` entries, ``checkpoint_version`` 3.0.
"""

from __future__ import annotations

import argparse
import os

import pytest
import torch
from test_convert_checkpoint import _hf_model, _tensors, _tool_main
from transformers import AutoModelForCausalLM

from megatron_endprompt.convert.checkpoint import convert_hf_to_megatron
from megatron_endprompt.eval.loading import load_megatron_model, megatron_logits_fn

pytestmark = pytest.mark.usefixtures("single_process_parallel_state")
TE_NORMS = ("self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight")


def _args(pp: int) -> argparse.Namespace:
    """Megatron-LM's args of ``_hf_model()`` (no vocab_size: Megatron-LM records the padded)."""
    return argparse.Namespace(
        num_layers=4, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
        num_query_groups=2, group_query_attention=True, kv_channels=16, seq_length=128,
        max_position_embeddings=1024, rotary_base=50000, rotary_percent=1.0,
        rotary_interleaved=False, normalization="RMSNorm", norm_epsilon=1e-6, swiglu=True,
        add_bias_linear=False, untie_embeddings_and_output_weights=True,
        make_vocab_size_divisible_by=128, padded_vocab_size=384, tensor_model_parallel_size=1,
        pipeline_model_parallel_size=pp, transformer_impl="transformer_engine",
        consumed_train_samples=0, consumed_valid_samples=0,
    )  # fmt: skip


def _megatron_lm_checkpoint(hf_dir: str, out: str, pp: int) -> None:
    """Convert with our tool (TE names), then strip everything Megatron-LM would not write."""
    convert_hf_to_megatron(hf_dir, out, 1, pp, transformer_impl="te", progress=False)
    os.remove(os.path.join(out, "model_config.json"))
    it = os.path.join(out, "iter_0000000")
    names = ["mp_rank_00"] if pp == 1 else [f"mp_rank_00_{p:03d}" for p in range(pp)]
    assert sorted(os.listdir(it)) == names
    for name in names:
        path = os.path.join(it, name, "model_optim_rng.pt")
        shard = torch.load(path, weights_only=False)
        model = {k: (torch.zeros(0, dtype=torch.uint8) if k.endswith("_extra_state") else v)
                 for k, v in shard["model"].items()}  # fmt: skip
        os.remove(path + ".sha256")
        torch.save({"args": _args(pp), "checkpoint_version": 3.0, "iteration": 0,
                    "model": model}, path)  # fmt: skip


@pytest.mark.parametrize("pp", [1, 2])
def test_megatron_to_hf_reads_megatron_lm_checkpoints(tmp_path, pp):
    hf = _hf_model()
    hf_dir, mg, back = tmp_path / "hf", str(tmp_path / "mg"), str(tmp_path / "back")
    hf.save_pretrained(hf_dir)
    _megatron_lm_checkpoint(str(hf_dir), mg, pp)
    # Megatron-LM records only the padded vocabulary (384 rows): the tokenizer's size is given.
    assert _tool_main()(["--direction", "megatron-to-hf", "--input", mg, "--output", back,
                         "--no-progress", "--vocab-size", "300"]) == 0  # fmt: skip
    ours, theirs = _tensors(back), _tensors(hf_dir)
    assert set(ours) == set(theirs)
    for key, value in theirs.items():  # padding rows stripped: every tensor as it was
        assert torch.equal(ours[key], value), key
    tokens = torch.randint(0, 300, (1, 24))
    exported = AutoModelForCausalLM.from_pretrained(back).eval()
    assert exported.config.vocab_size == 300
    with torch.no_grad():
        want = hf(tokens).logits
        got = exported(tokens).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_evaluation_loads_megatron_lm_te_checkpoint(tmp_path):
    hf = _hf_model()
    hf.save_pretrained(tmp_path / "hf")
    mg = str(tmp_path / "mg")
    _megatron_lm_checkpoint(str(tmp_path / "hf"), mg, 1)
    model, config, _ = load_megatron_model(mg, device="cpu")
    assert config.transformer_impl == "local" and config.rotary_base == 50000
    tokens = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        got = megatron_logits_fn(model, "cpu", 300)(tokens, torch.arange(16)[None])
        want = hf(tokens).logits
    torch.testing.assert_close(got.float(), want, rtol=1e-4, atol=1e-4)


def test_hf_to_megatron_writes_te_names_by_default(tmp_path):
    hf_dir, mg, local = tmp_path / "hf", str(tmp_path / "mg"), str(tmp_path / "local")
    _hf_model().save_pretrained(hf_dir)
    assert _tool_main()(["--direction", "hf-to-megatron", "--input", str(hf_dir), "--output", mg,
                         "--no-progress"]) == 0  # fmt: skip
    shard = torch.load(f"{mg}/iter_0000000/mp_rank_00/model_optim_rng.pt", weights_only=False)
    keys = set(shard["model"])
    assert {f"decoder.layers.0.{n}" for n in TE_NORMS} <= keys
    assert "decoder.layers.0.input_layernorm.weight" not in keys
    assert "decoder.layers.0.self_attention.linear_qkv._extra_state" in keys
    assert "decoder.layers.0.self_attention.core_attention._extra_state" in keys
    assert shard["checkpoint_version"] == 3.0 and shard["args"].transformer_impl == (
        "transformer_engine"
    )
    assert _tool_main()(["--direction", "hf-to-megatron", "--input", str(hf_dir), "--output",
                         local, "--no-progress", "--transformer-impl", "local"]) == 0  # fmt: skip
    shard = torch.load(f"{local}/iter_0000000/mp_rank_00/model_optim_rng.pt", weights_only=False)
    assert "decoder.layers.0.input_layernorm.weight" in shard["model"]


def test_either_key_set_loads_into_either_spec():
    """TE names into the local spec and local names into a TE-named module (key mapping)."""
    from megatron_endprompt.checkpoint.weights import rename_to_model_keys

    local = {"decoder.layers.0.input_layernorm.weight": 1,
             "decoder.layers.0.pre_mlp_layernorm.weight": 2,
             "decoder.layers.0.self_attention.linear_qkv._extra_state": None}  # fmt: skip
    te_keys = [f"decoder.layers.0.{n}" for n in TE_NORMS]
    assert rename_to_model_keys(local, te_keys) == {te_keys[0]: 1, te_keys[1]: 2}
    te = {
        te_keys[0]: 1,
        te_keys[1]: 2,
        "decoder.layers.0.self_attention.core_attention._extra_state": torch.zeros(0),
    }
    assert rename_to_model_keys(te, list(local)) == {
        "decoder.layers.0.input_layernorm.weight": 1, "decoder.layers.0.pre_mlp_layernorm.weight": 2
    }  # fmt: skip
