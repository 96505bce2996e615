"""Training throughput: EndPrompt at physical S = 256 vs full-length training at S = L = 2048.

Both arms train the same ``tiny`` model with PI x8 on the same corpus (the embedded standard-
library corpus, byte tokenizer) and the same tokens per iteration (8 x 256 = 1 x 2048), so the
ratio is what the method saves per token on this machine. Arms alternate, repeated, median.

    python benchmarks/bench_train.py            # ~2 minutes on 2 CPU cores
    python benchmarks/bench_train.py --quick    # seconds (smoke)

Ends with ``RESULT endprompt_vs_full_tokens_per_s_ratio <x>``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

from megatron_endprompt.cli import parse_run_config
from megatron_endprompt.prep.corpus import prepare_corpus
from megatron_endprompt.prep.preprocess import preprocess_jsonl
from megatron_endprompt.training.loop import train

L = 2048


def _flags(prefix: str, cache: str, iters: int, endprompt: bool) -> list[str]:
    common = [
        "--device",
        "cpu",
        "--model-preset",
        "tiny",
        "--tokenizer-type",
        "ByteTokenizer",
        "--data-path",
        prefix,
        "--data-cache-path",
        cache,
        "--split",
        "100,0,0",
        "--max-position-embeddings",
        str(L),
        "--target-length",
        str(L),
        "--rope-scaling-type",
        "linear",
        "--rope-scaling-factor",
        "8",
        "--lr",
        "1e-4",
        "--lr-decay-style",
        "constant",
        "--adam-beta2",  # the optimizer this benchmark was measured with (Megatron-LM's is 0.999)
        "0.95",
        "--log-interval",
        "1000000",
        "--num-workers",
        "0",
        "--train-iters",
        str(iters),
        "--no-exit-signal-handler",
    ]
    if endprompt:
        return common + [
            "--seq-length",
            "256",
            "--micro-batch-size",
            "8",
            "--global-batch-size",
            "8",
            "--position-mode",
            "endprompt",
            "--endprompt-terminal",
            "cue",
        ]
    return common + [
        "--seq-length",
        str(L),
        "--micro-batch-size",
        "1",
        "--global-batch-size",
        "1",
        "--position-mode",
        "contiguous",
    ]


def _corpus(workdir: str, max_docs: int) -> str:
    jsonl = os.path.join(workdir, "corpus.jsonl")
    prepare_corpus(jsonl, max_docs=max_docs)
    prefix = os.path.join(workdir, "stdlib")
    preprocess_jsonl([jsonl], prefix, "ByteTokenizer", append_eod=True, progress=False)
    return prefix + "_text_document"


def main(argv: list[str] | None = None) -> int:
    """Run both arms ``--repeats`` times, alternating; print medians and the ratio."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=12, help="iterations per arm and repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny run for smoke tests")
    args = ap.parse_args(argv)
    if args.quick:
        args.iters, args.repeats = 3, 1
    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    rates: dict[str, list[float]] = {"endprompt": [], "full": []}
    with tempfile.TemporaryDirectory() as workdir:
        prefix = _corpus(workdir, max_docs=60 if args.quick else 300)
        cache = os.path.join(workdir, "cache")
        for rep in range(args.repeats):
            for arm in ("endprompt", "full"):
                t0 = time.perf_counter()
                result = train(
                    parse_run_config(_flags(prefix, cache, args.iters, arm == "endprompt"))
                )
                rates[arm].append(result.tokens_per_s)
                print(
                    f"repeat {rep} {arm:9s}: {result.tokens_per_s:10.0f} tokens/s "
                    f"(loss {result.final_loss:.3f}, {time.perf_counter() - t0:.1f}s)",
                    flush=True,
                )
    ep, full = statistics.median(rates["endprompt"]), statistics.median(rates["full"])
    print(f"median tokens/s: EndPrompt S=256 {ep:.0f}, full-length S={L} {full:.0f}")
    print(f"RESULT endprompt_vs_full_tokens_per_s_ratio {ep / full:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
