"""KV-cached decoding equals recomputing the whole sequence (megatron at TP 1 and 2, and HF).

Weights are large and random (N(0, 0.15), norms U(0.5, 1.5)) so attention is far from uniform
and RoPE visibly moves the logits; prompts use an EndPrompt-style layout (a jump in the position
ids), and generated tokens continue after the prompt's last position.
"""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from eval_fixtures import VOCAB, tiny_config
from transformers import LlamaConfig, LlamaForCausalLM

from megatron_endprompt.checkpoint.weights import (
    load_megatron_state_dict,
    shard_for_tensor_parallel,
)
from megatron_endprompt.config import ParallelConfig
from megatron_endprompt.convert.hf_llama import (
    hf_config_from_model_config,
    hf_to_megatron_state_dict,
)
from megatron_endprompt.eval.decoding import HFLogitsFn, MegatronLogitsFn
from megatron_endprompt.eval.scoring import (
    CachedLogitsFn,
    greedy_decode,
    teacher_forced_token_correct,
)
from megatron_endprompt.model.gpt import build_model

pytestmark = pytest.mark.usefixtures("single_process_parallel_state")

CONFIG = tiny_config()
PROMPT = torch.randint(0, VOCAB, (20,), generator=torch.Generator().manual_seed(4)).tolist()
POSITIONS = list(range(12)) + list(range(200, 208))  # context, then a terminal near L = 256
NEW = 8


def _hf_and_state_dict(seed: int = 0):
    """(HF Llama with large random weights, the same weights as a megatron state dict)."""
    torch.manual_seed(seed)
    hf = LlamaForCausalLM(LlamaConfig(**hf_config_from_model_config(CONFIG))).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0.0, 0.15)
    return hf, hf_to_megatron_state_dict(hf.state_dict(), CONFIG)


@pytest.fixture(scope="module")
def models():
    hf, sd = _hf_and_state_dict()
    ours = build_model(CONFIG, seed=None).eval()
    load_megatron_state_dict(ours, sd)
    return {"hf": hf, "ours": ours, "sd": sd}


def _stepwise(fn: CachedLogitsFn, tokens: list[int]) -> list[torch.Tensor]:
    """Cached logits after the prompt and after each of ``tokens``."""
    rows = [fn.prefill(PROMPT, POSITIONS)]
    for k, token in enumerate(tokens):
        rows.append(fn.extend(token, POSITIONS[-1] + 1 + k))
    return rows


def _full_rows(fn, tokens: list[int]) -> torch.Tensor:  # noqa: ANN001
    """The same rows from one uncached pass over prompt + tokens."""
    ids = torch.tensor([PROMPT + tokens])
    pos = torch.tensor([POSITIONS + [POSITIONS[-1] + 1 + k for k in range(len(tokens))]])
    return fn(ids, pos)[0, len(PROMPT) - 1 :]


@pytest.mark.parametrize("kind", ["ours", "hf"])
def test_cached_greedy_and_logits_match_uncached(models, kind):
    fn = MegatronLogitsFn(models["ours"], "cpu", VOCAB) if kind == "ours" else HFLogitsFn(
        models["hf"])  # fmt: skip
    assert isinstance(fn, CachedLogitsFn)
    uncached = greedy_decode(fn, PROMPT, NEW, position_ids=POSITIONS, use_cache=False)
    cached = greedy_decode(fn, PROMPT, NEW, position_ids=POSITIONS)
    assert cached == uncached and len(cached) == NEW
    rows = torch.stack(_stepwise(fn, cached))
    torch.testing.assert_close(rows, _full_rows(fn, cached), rtol=0, atol=1e-5)
    # The layout matters: contiguous positions give other logits, far beyond the tolerance.
    contiguous = fn.prefill(PROMPT, list(range(len(PROMPT))))
    assert (contiguous - rows[0]).abs().max() > 0.1
    # Teacher forcing over the cache (shared prompt pass) picks the same argmaxes.
    answer = cached[:5]
    assert teacher_forced_token_correct(fn, PROMPT, answer) == teacher_forced_token_correct(
        fn, PROMPT, answer, use_cache=False)  # fmt: skip


def test_megatron_and_hf_caches_agree(models):
    ours = MegatronLogitsFn(models["ours"], "cpu", VOCAB)
    hf = HFLogitsFn(models["hf"])
    tokens = greedy_decode(ours, PROMPT, NEW, position_ids=POSITIONS)
    assert greedy_decode(hf, PROMPT, NEW, position_ids=POSITIONS) == tokens
    # Below position ~250 both compute the same float32 maths up to summation order.
    for a, b in zip(_stepwise(ours, tokens), _stepwise(hf, tokens)):
        torch.testing.assert_close(a, b, rtol=0, atol=5e-5)


def test_rewind_and_growing_cache(models):
    fn = MegatronLogitsFn(models["ours"], "cpu", VOCAB)
    first = _stepwise(fn, [1, 2, 3])
    again = _stepwise(fn, [1, 2, 3])  # same prompt: rewinds, no second prompt pass
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    other = fn.prefill(PROMPT[:-1], POSITIONS[:-1])  # a different prompt starts afresh
    expected = fn(torch.tensor([PROMPT[:-1]]), torch.tensor([POSITIONS[:-1]]))[0, -1]
    torch.testing.assert_close(other, expected, rtol=0, atol=1e-5)
    # 80 new tokens outgrow the first allocation (prompt + 64 rows): rows already cached survive.
    short, positions = PROMPT[:5], [0, 1, 2, 100, 101]
    cached = greedy_decode(fn, short, 80, position_ids=positions)
    assert cached == greedy_decode(fn, short, 80, position_ids=positions, use_cache=False)
    last = fn.extend(cached[-1], positions[-1] + 80)  # the 80th token, never fed back yet
    full = fn(torch.tensor([short + cached]),
              torch.tensor([positions + list(range(102, 102 + 80))]))[0, -1]  # fmt: skip
    torch.testing.assert_close(last, full, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="prefill"):
        MegatronLogitsFn(models["ours"], "cpu", VOCAB).extend(1, 0)
    with pytest.raises(ValueError, match="position_ids must hold 20 non-negative ids"):
        greedy_decode(fn, PROMPT, 1, position_ids=POSITIONS[:-1])


TP = 2


def _tp_worker(rank: int, port: int, path: str) -> None:
    from megatron_endprompt import device

    device.init_distributed("gloo", rank=rank, world_size=TP, port=port)
    device.initialize_model_parallel(tensor_model_parallel_size=TP)
    _, sd = _hf_and_state_dict()
    model = build_model(CONFIG, ParallelConfig(tensor_model_parallel_size=TP), seed=None).eval()
    load_megatron_state_dict(model, shard_for_tensor_parallel(sd, CONFIG, TP, rank))
    fn = MegatronLogitsFn(model, "cpu", VOCAB)
    tokens = greedy_decode(fn, PROMPT, NEW, position_ids=POSITIONS)
    rows = torch.stack(_stepwise(fn, tokens))
    kv_heads = fn._layers[0].num_query_groups_per_partition  # noqa: SLF001
    torch.save({"tokens": tokens, "rows": rows, "kv_heads": kv_heads}, f"{path}.{rank}")
    device.destroy_distributed()


@pytest.mark.slow
def test_tp2_cached_decode_matches_tp1(models, tmp_path):
    from megatron_endprompt.device import free_port

    fn = MegatronLogitsFn(models["ours"], "cpu", VOCAB)
    tokens = greedy_decode(fn, PROMPT, NEW, position_ids=POSITIONS)
    rows = torch.stack(_stepwise(fn, tokens))
    path = str(tmp_path / "tp")
    mp.start_processes(_tp_worker, args=(free_port(), path), nprocs=TP, start_method="spawn")
    for rank in range(TP):
        got = torch.load(f"{path}.{rank}")
        assert got["kv_heads"] == 1  # each rank caches its own query group
        assert got["tokens"] == tokens
        torch.testing.assert_close(got["rows"], rows, rtol=0, atol=2e-5)
