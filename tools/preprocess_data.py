#!/usr/bin/env python3
"""Tokenize JSONL into Megatron indexed binary files (PREFIX_<key>_<level>.{bin,idx}).

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model --append-eod \
        --workers 2

Flags and outputs follow Megatron-LM core_v0.16.1's tools/preprocess_data.py (level ``document``,
or ``sentence`` with --split-sentences; --legacy-tokenizer selects its legacy tokenizer system).
Additions: several --input files/globs, --strict, --chunk-size, --no-progress. Exit status: 0 on
success, 2 on bad flags or input (one ``error:`` line on stderr), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import sys
import warnings

# megatron-core warns on import that its optional fused kernels are missing; preprocessing uses
# none of them.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

from megatron_endprompt.cli_utils import run_tool  # noqa: E402
from megatron_endprompt.data.tokenizers import TOKENIZER_TYPES  # noqa: E402
from megatron_endprompt.prep.preprocess import preprocess_jsonl  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--input",
        nargs="+",
        action="extend",
        required=True,
        help="JSONL files or globs (repeatable).",
    )
    p.add_argument(
        "--output-prefix", required=True, help="Outputs are PREFIX_<key>_<level>.{bin,idx}."
    )
    p.add_argument(
        "--json-keys",
        nargs="+",
        default=["text"],
        help="JSON keys to tokenize; one output pair per key.",
    )
    _add_tokenizer_flags(p)
    p.add_argument(
        "--split-sentences",
        action="store_true",
        help="One sequence per sentence (NLTK punkt; its data must be installed); outputs "
        "PREFIX_<key>_sentence.",
    )
    p.add_argument(
        "--keep-newlines",
        action="store_true",
        help="Sentences keep the newlines after them (with --split-sentences).",
    )
    p.add_argument("--lang", default="english", help="punkt language for --split-sentences.")
    p.add_argument(
        "--partitions",
        type=int,
        default=1,
        help="Megatron-LM's input partitions: lines round robin (document order as Megatron-LM).",
    )
    p.add_argument(
        "--keep-sequential-samples",
        action="store_true",
        help="With --partitions: consecutive blocks, so the input order is kept.",
    )
    p.add_argument("--append-eod", action="store_true", help="End each document with EOD.")
    p.add_argument("--workers", type=int, default=1, help="Tokenizer processes.")
    p.add_argument("--chunk-size", type=int, default=64, help="Lines per worker task.")
    p.add_argument(
        "--log-interval",
        type=int,
        default=1000,
        help="Documents between tokens/s updates of the progress bar.",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="Fail on the first bad line (nothing written) instead of skipping it.",
    )
    p.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")
    return p


def _add_tokenizer_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer-type", required=True, help=f"One of {', '.join(TOKENIZER_TYPES)}.")
    p.add_argument(
        "--tokenizer-model",
        default=None,
        help="SentencePiece .model, tokenizer.json / its directory, or a TikTokenizer .json.",
    )
    p.add_argument(
        "--legacy-tokenizer",
        action="store_true",
        help="Megatron-LM's legacy tokenizer system (other EOD/BOS ids: see README).",
    )
    p.add_argument("--vocab-file", default=None, help="GPT2BPETokenizer vocab.json.")
    p.add_argument("--merge-file", default=None, help="GPT2BPETokenizer merges.txt.")
    p.add_argument(
        "--vocab-size", type=int, default=None, help="NullTokenizer EOD / TikTokenizer size."
    )
    p.add_argument(
        "--vocab-extra-ids",
        type=int,
        default=0,
        help="Accepted; ignored, as Megatron-LM's preprocess_data.py sets it to 0.",
    )
    p.add_argument(
        "--tokenizer-special-tokens", nargs="+", default=None, help="Special tokens to add."
    )
    p.add_argument("--tiktoken-pattern", default=None, help="TikTokenizer pattern v1 or v2.")
    p.add_argument(
        "--tiktoken-num-special-tokens", type=int, default=1000, help="TikTokenizer specials."
    )


def tokenizer_options(args: argparse.Namespace) -> dict:
    """``build_tokenizer`` keyword arguments from the parsed flags."""
    return dict(
        legacy=args.legacy_tokenizer,
        vocab_file=args.vocab_file,
        merge_file=args.merge_file,
        vocab_size=args.vocab_size,
        vocab_extra_ids=args.vocab_extra_ids,
        special_tokens=args.tokenizer_special_tokens,
        tiktoken_pattern=args.tiktoken_pattern,
        tiktoken_num_special_tokens=args.tiktoken_num_special_tokens,
    )


def main(argv: list[str] | None = None) -> int:
    """Run preprocessing; returns the exit status."""
    args = build_parser().parse_args(argv)
    return run_tool(
        lambda: preprocess_jsonl(
            args.input,
            args.output_prefix,
            args.tokenizer_type,
            args.tokenizer_model,
            json_keys=args.json_keys,
            append_eod=args.append_eod,
            workers=args.workers,
            log_interval=args.log_interval,
            strict=args.strict,
            chunk_size=args.chunk_size,
            progress=not args.no_progress,
            tokenizer_options=tokenizer_options(args),
            split_sentences=args.split_sentences,
            keep_newlines=args.keep_newlines,
            lang=args.lang,
            partitions=args.partitions,
            keep_sequential_samples=args.keep_sequential_samples,
        )
    )


if __name__ == "__main__":
    sys.exit(main())
