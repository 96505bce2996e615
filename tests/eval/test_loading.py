"""Loading models for evaluation: checkpoint round trip, RoPE override, Hugging Face, corpora."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from eval_fixtures import VOCAB, tiny_config
from megatron.core.datasets.indexed_dataset import (
    IndexedDatasetBuilder,
    get_bin_path,
    get_idx_path,
)

from megatron_endprompt.checkpoint import ShardRank, save_checkpoint
from megatron_endprompt.config import ModelConfig, RopeScalingConfig
from megatron_endprompt.data.tokenizers import ByteTokenizer
from megatron_endprompt.eval.loading import (
    hf_logits_fn,
    load_hf_model,
    load_megatron_model,
    load_ppl_documents,
    max_position,
    megatron_logits_fn,
)
from megatron_endprompt.model.gpt import build_model

pytestmark = pytest.mark.usefixtures("single_process_parallel_state")

PI8 = RopeScalingConfig(rope_type="linear", factor=8.0)


def run_config(config: ModelConfig, seed: int = 11) -> dict:
    """What training's state_to_save stores under "run_config" (the parts evaluation reads)."""
    return {"model": config.to_dict(), "training": {"seed": seed}, "device": "cpu"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(load dir, model config, state dict) of a tiny model with large random weights.

    Weights ~N(0, 0.15) (norms ~U(0.5, 1.5)) instead of the 0.02 init, so attention is far from
    uniform and RoPE visibly moves the logits.
    """
    config = tiny_config()
    model = build_model(config, seed=3)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.15)
    sd = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    load_dir = str(tmp_path_factory.mktemp("ckpt"))
    state = {"model": sd, "run_config": run_config(config), "format": "megatron_endprompt/v1"}
    save_checkpoint(load_dir, 3, state, ShardRank())
    return load_dir, config, sd


def _ids(batch: int = 2, seq: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(5))


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}


def _same_weights(loaded: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> bool:
    """Equal tensors, the vocabulary's padding rows as saved (the same padded size)."""
    return all(torch.equal(value, saved[key]) for key, value in loaded.items())


def test_round_trip_weights_meta_and_logits(saved):
    load_dir, config, sd = saved
    model, loaded_config, meta = load_megatron_model(load_dir)
    assert not model.training
    assert loaded_config == config
    assert max_position(loaded_config) == 256
    weights = _weights(model)
    assert weights.keys() == sd.keys()
    assert _same_weights(weights, sd)
    assert meta["checkpoint"] == os.path.abspath(os.path.join(load_dir, "iter_0000003"))
    assert meta["format"] == "torch" and meta["saved_layout"] == {"tp": 1, "pp": 1}
    assert meta["tensor_model_parallel_size"] == 1
    assert meta["iteration"] == 3
    assert meta["seeds"] == {"training": 11}
    assert meta["rope_scaling"] == RopeScalingConfig().to_dict()
    assert meta["rope_scaling_overridden"] is False

    ids = _ids()
    pos = torch.tensor([list(range(8)) + [200, 201, 202, 203]] * 2)  # an EndPrompt layout
    logits = megatron_logits_fn(model, "cpu", config.vocab_size)(ids, pos)
    assert logits.dtype == torch.float32 and logits.shape == (2, 12, VOCAB)
    with torch.no_grad():
        full = model(ids, pos)
    assert full.shape == (2, 12, 320)  # Megatron's padded vocabulary, dropped by the logits fn
    assert torch.equal(logits, full[..., :VOCAB])


def test_rope_override_changes_rotary_not_weights(saved):
    load_dir, config, sd = saved
    base, _, _ = load_megatron_model(load_dir)
    pi, pi_config, meta = load_megatron_model(
        load_dir, rope_scaling_override=PI8, max_position_override=2048
    )
    assert pi_config.rope_scaling == PI8 and pi_config.max_position_embeddings == 2048
    assert meta["rope_scaling"]["rope_type"] == "linear" and meta["rope_scaling"]["factor"] == 8.0
    assert meta["rope_scaling_overridden"] is True and meta["max_position_embeddings"] == 2048
    assert _same_weights(_weights(pi), sd)

    ids = _ids()
    far = torch.arange(1000, 1012).expand(2, 12)
    base_fn = megatron_logits_fn(base, "cpu", VOCAB)
    pi_fn = megatron_logits_fn(pi, "cpu", VOCAB)
    assert (pi_fn(ids, far) - base_fn(ids, far)).abs().max() > 0.1
    # At position 0 every rotation is the identity, whatever the scaling.
    zeros = torch.zeros(2, 12, dtype=torch.long)
    torch.testing.assert_close(pi_fn(ids, zeros), base_fn(ids, zeros), rtol=0, atol=1e-6)
    # The override is the same model as one built with that scaling in the first place.
    direct = build_model(dataclasses.replace(config, rope_scaling=PI8), seed=0).eval()
    direct.load_state_dict(sd)
    with torch.no_grad():
        expected = direct(ids, far)[..., :VOCAB]
    torch.testing.assert_close(pi_fn(ids, far), expected, rtol=0, atol=1e-6)


def test_converted_layouts_and_config_json(tmp_path, saved):
    _, config, sd = saved
    converted = str(tmp_path / "converted")
    save_checkpoint(converted, 0, {"model": sd, "model_config": config.to_dict()}, ShardRank())
    assert load_megatron_model(converted)[1] == config

    bare = str(tmp_path / "bare")
    save_checkpoint(bare, 7, {"model": sd}, ShardRank())
    with pytest.raises(ValueError, match="carries no model config"):
        load_megatron_model(bare)
    with open(os.path.join(bare, "model_config.json"), "w") as f:
        json.dump(config.to_dict(), f)
    model, loaded, meta = load_megatron_model(bare)
    assert loaded == config and meta["iteration"] == 7 and meta["seeds"] == {}


def test_load_errors(tmp_path, saved):
    _, config, sd = saved
    with pytest.raises(FileNotFoundError, match="--load .*no such directory"):
        load_megatron_model(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="latest_checkpointed_iteration.txt is missing"):
        load_megatron_model(str(tmp_path))
    sharded = str(tmp_path / "tp2")
    save_checkpoint(sharded, 1, {"model": sd, "run_config": run_config(config)}, ShardRank())
    os.makedirs(os.path.join(sharded, "iter_0000001", "mp_rank_01_000"))
    with pytest.raises(FileNotFoundError, match=r"shard \(1, 0\) of TP=2 x PP=1 is missing"):
        load_megatron_model(sharded)
    wrong = str(tmp_path / "wrong")
    other = run_config(tiny_config(hidden_size=32))
    save_checkpoint(wrong, 1, {"model": sd, "run_config": other}, ShardRank())
    with pytest.raises(ValueError, match="--load .*tensor embedding.* has shape .*, expected"):
        load_megatron_model(wrong)


def test_hf_model_logits_follow_position_ids(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.15,
    )
    torch.manual_seed(0)
    original = LlamaForCausalLM(hf_config).eval()
    original.save_pretrained(str(tmp_path))
    model, meta = load_hf_model(str(tmp_path))
    assert meta["model_type"] == "llama" and meta["max_position_embeddings"] == 256
    assert meta["checkpoint"] == os.path.abspath(str(tmp_path)) and meta["vocab_size"] == VOCAB
    ids = _ids()
    pos = torch.tensor([list(range(8)) + [200, 201, 202, 203]] * 2)
    logits = hf_logits_fn(model)(ids, pos)
    with torch.no_grad():
        # With a cache (the default) transformers keeps plain causal attention across the jump.
        expected = original(input_ids=ids, position_ids=pos).logits
        contiguous = original(input_ids=ids).logits
    assert logits.dtype == torch.float32 and logits.shape == (2, 12, VOCAB)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)
    assert (logits[:, 8:] - contiguous[:, 8:]).abs().max() > 1e-3  # positions were used
    with pytest.raises(FileNotFoundError, match="--hf-dir .*config.json"):
        load_hf_model(str(tmp_path / "missing"))


def _write_indexed(prefix: str, docs: list[list[int]]) -> None:
    builder = IndexedDatasetBuilder(get_bin_path(prefix), dtype=np.int32)
    for doc in docs:
        builder.add_document(np.asarray(doc, dtype=np.int32), [len(doc)])
    builder.finalize(get_idx_path(prefix))


def test_ppl_documents_from_indexed_and_jsonl(tmp_path):
    docs = [list(range(10)), list(range(50)), list(range(100, 150))]
    prefix = str(tmp_path / "corpus")
    _write_indexed(prefix, docs)
    tok = ByteTokenizer()
    # 16-token windows: the 10-token document gives none, the 50-token one ceil(34/16) = 3.
    got = load_ppl_documents(prefix, None, tok, 16, max_windows=3)
    assert [d.tolist() for d in got] == docs[:2]
    got = load_ppl_documents(prefix, None, tok, 16)
    assert [d.tolist() for d in got] == docs
    got = load_ppl_documents(prefix, None, tok, 16, max_windows=2, from_end=True)
    assert [d.tolist() for d in got] == [docs[2]]
    with pytest.raises(ValueError, match="--ppl-data .*no document has 51 tokens"):
        load_ppl_documents(prefix, None, tok, 50)
    with pytest.raises(FileNotFoundError, match="--ppl-data .*missing"):
        load_ppl_documents(str(tmp_path / "none"), None, tok, 16)

    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text(json.dumps({"text": "héllo"}) + "\n\n" + json.dumps({"text": "ab"}) + "\n")
    got = load_ppl_documents(None, str(jsonl), tok, 3)
    assert got == [list("héllo".encode()), [97, 98]]
    with pytest.raises(ValueError, match="--ppl-jsonl .*no document has 7 tokens"):
        load_ppl_documents(None, str(jsonl), tok, 6)
    jsonl.write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match="c.jsonl:1: no JSON key 'text'"):
        load_ppl_documents(None, str(jsonl), tok, 1)
