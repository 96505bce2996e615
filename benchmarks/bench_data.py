"""Data-path throughput, measured side by side in one run.

(a) EndPromptDataset samples/s (cue terminal, fixed and random placement) against plain
    megatron-core GPTDataset on the same synthetic corpus and sequence length; interleaved
    repetitions, median of each. Target: ratio >= 0.9.
(b) JSONL preprocessing tokens/s with 2 workers against 1 worker.

Each headline figure ends in one machine-readable line ``RESULT <name> <value>``.

    python benchmarks/bench_data.py                 # S = 8192
    python benchmarks/bench_data.py --quick         # smoke test, a few seconds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path

from megatron_endprompt.data.builder import build_datasets
from megatron_endprompt.data.dataset import EndPromptDatasetConfig
from megatron_endprompt.data.tokenizers import ByteTokenizer
from megatron_endprompt.prep.preprocess import preprocess_jsonl


def write_synthetic_corpus(prefix: str, num_tokens: int, seed: int = 0) -> None:
    """Random byte ids in documents of 256..16384 tokens, each ending with EOD."""
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(get_bin_path(prefix), dtype=np.uint16)
    written = 0
    while written < num_tokens:
        n = int(rng.integers(256, 16385))
        doc = rng.integers(0, 256, size=n, dtype=np.uint16)
        doc[-1] = ByteTokenizer.EOD
        builder.add_document(doc, [n])
        written += n
    builder.finalize(get_idx_path(prefix))


def _common(prefix: str, cache: str, seq_length: int) -> dict:
    return dict(
        random_seed=1234,
        sequence_length=seq_length,
        blend=([prefix], None),
        split="1,0,0",
        path_to_cache=cache,
        tokenizer=ByteTokenizer(),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )


def build_contenders(prefix: str, cache: str, seq_length: int, num_samples: int) -> dict:
    """name -> dataset: plain GPTDataset and EndPromptDataset (fixed / random placement)."""
    common = _common(prefix, cache, seq_length)
    sizes = [num_samples, None, None]
    gpt_config = GPTDatasetConfig(**common)
    contenders = {
        "gpt": BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, gpt_config).build()[0]
    }
    for placement in ("fixed", "random"):
        config = EndPromptDatasetConfig(
            **common,
            position_mode="endprompt",
            terminal="cue",
            placement=placement,
            target_length=8 * seq_length,
        )
        contenders[f"endprompt_{placement}"] = build_datasets(config, sizes)[0]
    return contenders


def _samples_per_s(dataset, num_samples: int) -> float:
    t0 = time.perf_counter()
    for i in range(num_samples):
        dataset[i]
    return num_samples / (time.perf_counter() - t0)


def bench_dataset(args: argparse.Namespace, workdir: str) -> None:
    """Interleaved passes over the same indices; median samples/s per contender."""
    prefix = os.path.join(workdir, "corpus", "synthetic")
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    write_synthetic_corpus(prefix, int(args.num_samples * args.seq_length * 1.05) + 16384)
    contenders = build_contenders(
        prefix, os.path.join(workdir, "cache"), args.seq_length, args.num_samples
    )
    rates = {name: [] for name in contenders}
    for dataset in contenders.values():  # warm the page cache and the per-dataset caches
        _samples_per_s(dataset, min(args.num_samples, 16))
    for _ in range(args.repeats):
        for name, dataset in contenders.items():
            rates[name].append(_samples_per_s(dataset, args.num_samples))
    medians = {name: statistics.median(r) for name, r in rates.items()}
    for name, value in medians.items():
        print(f"{name:20s} {value:10.1f} samples/s (median of {args.repeats})")
    print(f"RESULT dataset_samples_per_s_ratio {medians['endprompt_fixed'] / medians['gpt']:.3f}")
    ratio_random = medians["endprompt_random"] / medians["gpt"]
    print(f"RESULT dataset_samples_per_s_ratio_random_placement {ratio_random:.3f}")


def write_jsonl(path: str, num_docs: int, seed: int = 0) -> None:
    """Documents of 100..800 words drawn from 500 random lowercase words."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, size=int(rng.integers(2, 9)))) for _ in range(500)]
    with open(path, "w") as f:
        for _ in range(num_docs):
            n = int(rng.integers(100, 801))
            f.write(json.dumps({"text": " ".join(rng.choice(words, size=n))}) + "\n")


def train_sentencepiece(jsonl: str, prefix: str) -> str:
    """A small BPE model (vocab 1000, </s> = EOD) trained on the first documents of ``jsonl``."""
    import sentencepiece as spm

    text = prefix + ".txt"
    with open(jsonl) as src, open(text, "w") as dst:
        for _, line in zip(range(200), src):
            dst.write(json.loads(line)["text"] + "\n")
    spm.SentencePieceTrainer.train(
        input=text,
        model_prefix=prefix,
        vocab_size=1000,
        model_type="bpe",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        minloglevel=2,
    )
    return prefix + ".model"


def bench_preprocess(args: argparse.Namespace, workdir: str) -> None:
    """tokens/s of preprocess_jsonl with 1 and 2 workers, interleaved, median."""
    jsonl = os.path.join(workdir, "docs.jsonl")
    write_jsonl(jsonl, args.num_docs)
    if args.tokenizer == "sentencepiece":
        tokenizer = ("SentencePieceTokenizer", train_sentencepiece(jsonl, f"{workdir}/sp"))
    else:
        tokenizer = ("ByteTokenizer", None)
    rates: dict[int, list[float]] = {1: [], 2: []}
    for rep in range(args.repeats):
        for workers in (1, 2):
            out_dir = os.path.join(workdir, f"pre_{workers}_{rep}")
            os.makedirs(out_dir)
            stats = preprocess_jsonl(
                [jsonl],
                os.path.join(out_dir, "corpus"),
                *tokenizer,
                workers=workers,
                append_eod=False,
                progress=False,
            )
            rates[workers].append(stats.tokens / stats.elapsed_s)
    med = {w: statistics.median(r) for w, r in rates.items()}
    for w, value in med.items():
        print(f"preprocess {tokenizer[0]} workers={w} {value:12.0f} tokens/s")
    print(f"RESULT preprocess_tokens_per_s_ratio_2v1 {med[2] / med[1]:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-length", type=int, default=8192)
    parser.add_argument("--num-samples", type=int, default=200, help="samples per timed pass")
    parser.add_argument("--num-docs", type=int, default=2000, help="JSONL documents (b)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--tokenizer", choices=("sentencepiece", "byte"), default="sentencepiece", help="for (b)"
    )
    parser.add_argument("--quick", action="store_true", help="small sizes for a smoke test")
    args = parser.parse_args()
    if args.quick:
        args.seq_length, args.num_samples, args.num_docs, args.repeats = 1024, 50, 300, 3
    with tempfile.TemporaryDirectory() as workdir:
        bench_dataset(args, workdir)
        bench_preprocess(args, workdir)


if __name__ == "__main__":
    main()
