"""Passkey trial cost with and without the KV cache, measured side by side in one run.

The two model calls of one passkey trial (as ``eval.passkey.score_passkey_trial`` makes them:
greedy answer of len(key) + 1 tokens, then the teacher-forced digit accuracy) on a small randomly
initialised EndPromptGPTModel (local spec, torch SDPA), through the same ``MegatronLogitsFn``:
  (a) cached: one forward pass of the prompt (shared by greedy decoding and teacher forcing),
      then one short KV-cache step per token;
  (b) uncached (``use_cache=False``): one full forward pass per generated token, plus one for
      teacher forcing.
Repetitions alternate the two arms; the median of each is reported. The generated answers and the
teacher-forced hits of both arms are checked to be identical.

    python benchmarks/bench_kv_cache.py              # 4 layers, hidden 256, prompt 2048
    python benchmarks/bench_kv_cache.py --quick      # prompt 512, a few seconds

Prints ``RESULT kv_cache_passkey_speedup <uncached / cached>``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from megatron_endprompt import device
from megatron_endprompt.config import ModelConfig, ParallelConfig
from megatron_endprompt.data.tokenizers import ByteTokenizer
from megatron_endprompt.eval import passkey, scoring
from megatron_endprompt.eval.decoding import MegatronLogitsFn
from megatron_endprompt.model.gpt import build_model


def _model(length: int, layers: int, hidden: int) -> torch.nn.Module:
    config = ModelConfig(
        num_layers=layers, hidden_size=hidden, ffn_hidden_size=4 * hidden,
        num_attention_heads=hidden // 32, num_query_groups=hidden // 64, seq_length=length,
        max_position_embeddings=2 * length, vocab_size=259, make_vocab_size_divisible_by=64,
    )  # fmt: skip
    device.ensure_model_parallel(ParallelConfig())
    return build_model(config, seed=0).eval()


def _trial(fn, prompt, use_cache: bool) -> tuple[float, tuple]:  # noqa: ANN001
    """Seconds and (greedy answer, teacher-forced hits) of one trial, as the passkey scores it."""
    start = time.perf_counter()
    answer = scoring.greedy_decode(
        fn, prompt.ids, len(prompt.answer_ids) + 1, stop_ids=(ByteTokenizer().eod,),
        use_cache=use_cache,
    )  # fmt: skip
    hits = scoring.teacher_forced_token_correct(
        fn, prompt.ids, prompt.answer_ids, use_cache=use_cache
    )
    return time.perf_counter() - start, (answer, hits)


def main() -> None:
    """Run the benchmark and print the ratio."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--length", type=int, default=2048, help="Prompt length (tokens).")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="Prompt 512, 2 repeats.")
    args = p.parse_args()
    if args.quick:
        args.length, args.repeats = 512, 2
    torch.manual_seed(0)
    fn = MegatronLogitsFn(_model(args.length, args.layers, args.hidden), "cpu", 259)
    prompt = passkey.make_passkey_prompt(ByteTokenizer(), args.length, 0.5, 0, 0)
    times: dict[bool, list[float]] = {True: [], False: []}
    results = {}
    _trial(fn, prompt, True)  # warm-up
    for r in range(args.repeats):
        for use_cache in (True, False) if r % 2 == 0 else (False, True):
            fn.reset()  # each repetition runs the prompt again
            seconds, results[use_cache] = _trial(fn, prompt, use_cache)
            times[use_cache].append(seconds)
    if results[True] != results[False]:
        raise SystemExit(f"cached {results[True]} != uncached {results[False]}")
    cached, uncached = statistics.median(times[True]), statistics.median(times[False])
    answer = len(prompt.answer_ids)
    print(f"prompt {args.length} tokens, answer {answer} tokens, {args.layers} layers x "
          f"{args.hidden}: uncached {uncached:.3f} s, cached {cached:.3f} s per trial")  # fmt: skip
    print(f"RESULT kv_cache_passkey_speedup {uncached / cached:.2f}")


if __name__ == "__main__":
    main()
