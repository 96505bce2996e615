#!/usr/bin/env python3
"""Train a byte-fallback SentencePiece BPE tokenizer (PREFIX.model, PREFIX.vocab).

    python tools/train_tokenizer.py --input corpus.jsonl --vocab-size 4096 --output-prefix tok

Use the model with --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model.
Exit status: 0 on success, 2 on bad flags or input (one ``error:`` line on stderr).
"""

from __future__ import annotations

import argparse
import sys

from megatron_endprompt.cli_utils import run_tool
from megatron_endprompt.prep.tokenizer_training import train_sentencepiece


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--input",
        nargs="+",
        action="extend",
        required=True,
        help="JSONL (.jsonl/.json) or plain-text files or globs (repeatable).",
    )
    p.add_argument("--output-prefix", required=True, help="Writes PREFIX.model and PREFIX.vocab.")
    p.add_argument("--vocab-size", type=int, required=True, help="Number of pieces.")
    p.add_argument("--json-keys", nargs="+", default=["text"], help="JSONL keys holding text.")
    p.add_argument(
        "--max-sentences",
        type=int,
        default=200_000,
        help="Lines read for training at most (keeps training fast).",
    )
    p.add_argument(
        "--max-sentence-length",
        type=int,
        default=1 << 16,
        help="Longest line in bytes; longer lines are dropped.",
    )
    p.add_argument("--num-threads", type=int, default=1, help="Trainer threads.")
    return p


def main(argv: list[str] | None = None) -> int:
    """Train the tokenizer; returns the exit status."""
    args = build_parser().parse_args(argv)
    return run_tool(lambda: _train(args))


def _train(args: argparse.Namespace) -> str:
    result = train_sentencepiece(
        args.input,
        args.output_prefix,
        args.vocab_size,
        json_keys=args.json_keys,
        max_sentences=args.max_sentences,
        max_sentence_length=args.max_sentence_length,
        num_threads=args.num_threads,
    )
    return (
        f"wrote {result.model_path} and {result.vocab_path} ({args.vocab_size} pieces) from "
        f"{result.sentences} lines; skipped {result.skipped_lines} bad JSONL lines"
    )


if __name__ == "__main__":
    sys.exit(main())
