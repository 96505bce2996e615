"""A tiny byte-level corpus and model flags for end-to-end training tests."""

import json
import os

import numpy as np

from megatron_endprompt.prep.preprocess import preprocess_jsonl

TINY_MODEL = [
    "--model-preset",
    "tiny",
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
    path = make_jsonl(directory, num_docs, seed)
    prefix = os.path.join(directory, "corpus")
    preprocess_jsonl([path], prefix, "ByteTokenizer", append_eod=True, progress=False)
    return prefix + "_text_document"


def make_jsonl(directory: str, num_docs: int = 60, seed: int = 0) -> str:
    """Random-word documents as ``directory/corpus.jsonl``; returns its path."""
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta", "pass", "key"]
    path = os.path.join(directory, "corpus.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(num_docs):
            n = int(rng.integers(20, 80))
            f.write(json.dumps({"text": " ".join(rng.choice(words, size=n))}) + "\n")
    return path


def _groups(flags: list[str]) -> list[list[str]]:
    """``[--a, 1, --b, x, y]`` -> ``[[--a, 1], [--b, x, y]]``."""
    groups: list[list[str]] = []
    for item in flags:
        if item.startswith("--") or not groups:
            groups.append([item])
        else:
            groups[-1].append(item)
    return groups


def override_flags(base: list[str], extra: list[str]) -> list[str]:
    """``base`` with each flag of ``extra`` replacing the same flag's value (the parser refuses
    a flag given twice), flags new to ``base`` appended."""
    new = _groups(list(extra))
    given = {g[0] for g in new}
    kept = [g for g in _groups(list(base)) if g[0] not in given]
    return [item for g in kept + new for item in g]


def train_flags(data_prefix: str, cache: str, *extra: str) -> list[str]:
    """Flags of a tiny CPU run on ``data_prefix`` (contiguous positions unless ``extra`` says).

    A flag of ``extra`` replaces the default one (each flag is given once).
    """
    return override_flags(_base_flags(data_prefix, cache), list(extra))


def _base_flags(data_prefix: str, cache: str) -> list[str]:
    mode = ["--position-mode", "contiguous"]
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
    ]
