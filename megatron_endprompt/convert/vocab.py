"""The vocabulary size of a Hugging Face export: Megatron pads it, Hugging Face does not.

Megatron pads the embedding and output layer to a multiple of ``--make-vocab-size-divisible-by``
x TP rows (Megatron-LM's ``_vocab_size_with_padding``); the exported model must have the
tokenizer's (or its original ``config.json``'s) size. Where it comes from, first found:

1. ``--vocab-size`` (given explicitly);
2. the checkpoint's own record when it is exact: our runs record the tokenizer's size
   (``run_config``), conversions the Hugging Face config's (``model_config``), a Megatron-LM
   ``args`` its ``vocab_size`` when set (``--vocab-size`` runs);
3. ``--tokenizer-dir``: its ``config.json``'s ``vocab_size``, else its tokenizer's size
   (``tokenizer.json``: the highest id + 1; a SentencePiece ``*.model``: its piece count).

Megatron-LM otherwise records only ``padded_vocab_size``: without 1 or 3 the export is refused
rather than written with padding rows the tokenizer never produces.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
from collections.abc import Mapping
from typing import Any

import sentencepiece


def tokenizer_dir_vocab_size(tokenizer_dir: str) -> tuple[int, str] | None:
    """(size, the file it came from) of a tokenizer directory, or None when it tells none."""
    config = os.path.join(tokenizer_dir, "config.json")
    if os.path.isfile(config):
        with open(config, encoding="utf-8") as f:
            size = json.load(f).get("vocab_size")
        if isinstance(size, int) and size > 0:
            return size, config
    fast = os.path.join(tokenizer_dir, "tokenizer.json")
    if os.path.isfile(fast):
        with open(fast, encoding="utf-8") as f:
            spec = json.load(f)
        vocab = spec.get("model", {}).get("vocab", {})
        ids = list(vocab.values()) if isinstance(vocab, Mapping) else list(range(len(vocab)))
        ids += [t["id"] for t in spec.get("added_tokens", [])]
        if ids:
            return max(ids) + 1, fast
    for model in sorted(glob.glob(os.path.join(tokenizer_dir, "*.model"))):
        try:
            return sentencepiece.SentencePieceProcessor(model_file=model).get_piece_size(), model
        except (OSError, RuntimeError):  # not a SentencePiece model (e.g. tiktoken's)
            continue
    return None


def recorded_vocab_is_exact(record: Mapping[str, Any]) -> bool:
    """Whether a checkpoint's recorded vocabulary size is the tokenizer's, not Megatron-LM's
    ``padded_vocab_size`` (its ``args`` are the only model description and lack ``vocab_size``).
    """
    if isinstance(record.get("run_config"), Mapping) or isinstance(
        record.get("model_config"), Mapping
    ):
        return True
    args = record.get("args")
    return not isinstance(args, argparse.Namespace) or getattr(args, "vocab_size", None) is not None


def export_vocab_size(
    recorded: int,
    record: Mapping[str, Any],
    vocab_size: int | None,
    tokenizer_dir: str | None,
    stored_rows: int,
) -> int:
    """The export's vocabulary size (see the module docstring for where it comes from).

    Args:
        recorded: the recorded model config's ``vocab_size``.
        record: the checkpoint's common state / first shard (what recorded it).
        vocab_size: ``--vocab-size``, or None.
        tokenizer_dir: ``--tokenizer-dir``, or None.
        stored_rows: rows of the stored (padded) embedding.

    Raises:
        ValueError: naming the flag or file, when the size is unknown, not positive, or exceeds
            the stored rows.
    """
    if vocab_size is not None:
        size, source = vocab_size, f"--vocab-size={vocab_size}"
        if vocab_size < 1:
            raise ValueError(f"{source}: must be a positive integer")
    elif recorded_vocab_is_exact(record):
        size, source = recorded, "the checkpoint's recorded vocabulary size"
    else:
        found = tokenizer_dir_vocab_size(tokenizer_dir) if tokenizer_dir else None
        if found is None:
            raise ValueError(
                f"--vocab-size: the checkpoint (Megatron-LM's args) records only its padded "
                f"vocabulary ({stored_rows} rows, a multiple of --make-vocab-size-divisible-by "
                "x TP): pass --vocab-size (the tokenizer's size) or a --tokenizer-dir with a "
                "config.json or tokenizer to strip the padding rows"
            )
        size, path = found
        source = f"--tokenizer-dir: {path}"
    if size > stored_rows:
        raise ValueError(
            f"{source}: vocabulary size {size} exceeds the checkpoint's {stored_rows} embedding "
            "rows (another tokenizer than the model was trained with?)"
        )
    return size
