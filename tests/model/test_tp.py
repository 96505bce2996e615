"""Tensor parallelism on gloo: TP=2 (two processes) reproduces TP=1 logits and losses.

Both sides load the same full weights (converted from a random Hugging Face Llama); the TP=2
ranks get shards by megatron's rules (``shard_for_tensor_parallel``). Covers column/row-parallel
linears, grouped-query QKV split per group, vocab-parallel embedding, output layer and cross
entropy, and the weighted loss sum(w * CE) / sum(w).
"""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from model_fixtures import endprompt_positions_bs, tiny_model_config
from transformers import LlamaConfig, LlamaForCausalLM

from megatron_endprompt.checkpoint.weights import (
    load_megatron_state_dict,
    shard_for_tensor_parallel,
)
from megatron_endprompt.config import ParallelConfig, RopeScalingConfig
from megatron_endprompt.convert.hf_llama import (
    hf_config_from_model_config,
    hf_to_megatron_state_dict,
)
from megatron_endprompt.model.gpt import build_model
from megatron_endprompt.training.loss import masked_loss_sum

TP = 2


def _config():
    # Vocabulary 100 is a multiple of 2 x 2: TP=1 and TP=2 pad to the same size, so the
    # cross entropy (which runs over the padded vocabulary, as in Megatron) is comparable.
    return tiny_model_config(
        make_vocab_size_divisible_by=2,
        rope_scaling=RopeScalingConfig("llama3", factor=8.0, original_max_position_embeddings=8192),
    )


def _full_state_dict(config):
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**hf_config_from_model_config(config)))
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.15)
    return hf_to_megatron_state_dict(hf.state_dict(), config)


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (2, 16), generator=g)
    labels = torch.randint(0, 100, (2, 16), generator=g)
    pos = torch.cat([torch.arange(16)[None], endprompt_positions_bs(1, 11, 5, 65536)])
    weights = torch.ones(2, 16)
    weights[1, 11:] = 0.1
    weights[1, -1] = 0.0
    return ids, labels, pos, weights


def _outputs(model):
    ids, labels, pos, weights = _batch()
    with torch.no_grad():
        logits = model(ids, pos)
        per_token = model(ids, pos, labels=labels)
    num, den = masked_loss_sum(per_token, weights)
    return {"logits": logits, "per_token": per_token, "loss": num / den}


def _tp_worker(rank: int, port: int, result_path: str) -> None:
    from megatron_endprompt import device

    device.init_distributed("gloo", rank=rank, world_size=TP, port=port)
    device.initialize_model_parallel(tensor_model_parallel_size=TP)
    config = _config()
    model = build_model(config, ParallelConfig(tensor_model_parallel_size=TP)).eval()
    shard = shard_for_tensor_parallel(_full_state_dict(config), config, TP, rank)
    load_megatron_state_dict(model, shard)
    out = _outputs(model)
    out["qkv_rows"] = model.decoder.layers[0].self_attention.linear_qkv.weight.shape[0]
    torch.save(out, f"{result_path}.{rank}")
    device.destroy_distributed()


@pytest.mark.slow
@pytest.mark.usefixtures("single_process_parallel_state")
def test_tp2_matches_tp1(tmp_path):
    from megatron_endprompt.device import free_port

    config = _config()
    reference = build_model(config).eval()
    load_megatron_state_dict(reference, _full_state_dict(config))
    expected = _outputs(reference)

    path = str(tmp_path / "tp")
    mp.start_processes(_tp_worker, args=(free_port(), path), nprocs=TP, start_method="spawn")
    for rank in range(TP):
        got = torch.load(f"{path}.{rank}")
        assert got["qkv_rows"] == (4 + 2 * 2) * 16 // TP  # really sharded: half the groups
        assert got["logits"].shape == (2, 16, 100)  # gathered over the vocab-parallel ranks
        torch.testing.assert_close(got["logits"], expected["logits"], atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(got["per_token"], expected["per_token"], atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(got["loss"], expected["loss"], atol=1e-5, rtol=1e-5)
