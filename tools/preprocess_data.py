#!/usr/bin/env python3
"""Tokenize JSONL into Megatron indexed binary files (PREFIX_<key>_document.{bin,idx}).

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model --append-eod \
        --workers 2

Flags follow Megatron-LM's tools/preprocess_data.py (without --split-sentences). Exit status:
0 on success, 2 on bad flags or input (one ``error:`` line on stderr), 130 when interrupted.
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
        "--output-prefix", required=True, help="Outputs are PREFIX_<key>_document.{bin,idx}."
    )
    p.add_argument(
        "--json-keys",
        nargs="+",
        default=["text"],
        help="JSON keys to tokenize; one output pair per key.",
    )
    p.add_argument("--tokenizer-type", required=True, help=f"One of {', '.join(TOKENIZER_TYPES)}.")
    p.add_argument(
        "--tokenizer-model",
        default=None,
        help="SentencePiece .model, or tokenizer.json / its directory.",
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
        )
    )


if __name__ == "__main__":
    sys.exit(main())
