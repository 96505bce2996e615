"""A tiny byte-level corpus and model flags for end-to-end training tests."""

import json
import os

import numpy as np

from megatron_endprompt.prep.preprocess import preprocess_jsonl

TINY_MODEL = [
    "--num-layers",
    "2",
    "--hidden-size",
    "64",
    "--ffn-hidden-size",
    "128",
    "--num-attention-heads",
    "4",
    "--num-query-groups",
    "2",
    "--seq-length",
    "32",
    "--max-position-embeddings",
    "256",
    "--make-vocab-size-divisible-by",
    "1",
]


def make_corpus(directory: str, num_docs: int = 60, seed: int = 0) -> str:
    """Write random-word documents as JSONL, preprocess with ByteTokenizer; returns the prefix."""
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta", "pass", "key"]
    path = os.path.join(directory, "corpus.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(num_docs):
            n = int(rng.integers(20, 80))
            f.write(json.dumps({"text": " ".join(rng.choice(words, size=n))}) + "\n")
    prefix = os.path.join(directory, "corpus")
    preprocess_jsonl([path], prefix, "ByteTokenizer", append_eod=True, progress=False)
    return prefix + "_text_document"


def train_flags(data_prefix: str, cache: str, *extra: str) -> list[str]:
    """Flags of a tiny CPU run on ``data_prefix`` (contiguous positions unless ``extra`` says)."""
    mode = [] if "--position-mode" in extra else ["--position-mode", "contiguous"]
    return [
        *mode,
        "--device",
        "cpu",
        *TINY_MODEL,
        "--tokenizer-type",
        "ByteTokenizer",
        "--data-path",
        data_prefix,
        "--data-cache-path",
        cache,
        "--split",
        "90,10,0",
        "--micro-batch-size",
        "2",
        "--global-batch-size",
        "4",
        "--lr",
        "1e-3",
        "--lr-warmup-iters",
        "2",
        "--lr-decay-style",
        "cosine",
        "--lr-decay-iters",
        "8",
        "--log-interval",
        "1",
        "--num-workers",
        "0",
        "--seed",
        "7",
        *extra,
    ]
