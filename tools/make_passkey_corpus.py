#!/usr/bin/env python3
"""Write passkey training documents as a Megatron indexed dataset (PREFIX_text_document).

    python tools/make_passkey_corpus.py --output-prefix data/passkey \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model \
        --num-docs 20000 --doc-tokens 256 --append-eod

Every document is exactly --doc-tokens tokens: the evaluation's passkey prompt (filler, needle at
a random depth in [--min-depth, --max-depth], question) then the key (then EOD). Use
--doc-tokens = --seq-length: megatron-core's GPTDataset then cuts every sample as one whole
document (documents of seq_length + 1 tokens would drift by one token per sample). With
--min-episode-tokens a document holds several complete episodes of random lengths instead.
Blend with another corpus: --data-path 0.5 corpus_text_document 0.5 PREFIX_text_document.
Exit status: 0 on success, 2 on bad flags (one ``error:`` line on stderr), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import sys
import warnings

# megatron-core warns on import that its optional fused kernels are missing; none are used here.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

from megatron_endprompt.cli_utils import run_tool  # noqa: E402
from megatron_endprompt.data.tokenizers import TOKENIZER_TYPES, build_tokenizer  # noqa: E402
from megatron_endprompt.prep.passkey_corpus import write_passkey_corpus  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output-prefix", required=True, help="Writes PREFIX_text_document.{bin,idx}.")
    p.add_argument("--tokenizer-type", required=True, help=f"One of {', '.join(TOKENIZER_TYPES)}.")
    p.add_argument(
        "--tokenizer-model", default=None, help="SentencePiece .model or tokenizer.json."
    )
    p.add_argument("--num-docs", type=int, required=True, help="Documents to write.")
    p.add_argument("--doc-tokens", type=int, required=True, help="Exact tokens per document.")
    p.add_argument("--digits", type=int, default=5, help="Digits of each pass key (1-5).")
    p.add_argument("--seed", type=int, default=0, help="Corpus seed (>= 0).")
    p.add_argument("--min-depth", type=float, default=0.0, help="Smallest needle depth in [0, 1].")
    p.add_argument("--max-depth", type=float, default=1.0, help="Largest needle depth in [0, 1].")
    p.add_argument("--append-eod", action="store_true", help="End each episode with EOD.")
    p.add_argument(
        "--min-episode-tokens",
        type=int,
        default=None,
        help="Pack complete episodes of at least this many tokens per document (default: one).",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Write the corpus; returns the exit status."""
    args = build_parser().parse_args(argv)
    return run_tool(lambda: _write(args))


def _write(args):
    if not 1 <= args.digits <= 5:
        raise ValueError(f"--digits must be in [1, 5], got {args.digits}")
    tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model)
    return write_passkey_corpus(
        args.output_prefix,
        tokenizer,
        args.num_docs,
        args.doc_tokens,
        args.seed,
        digits=args.digits,
        min_depth=args.min_depth,
        max_depth=args.max_depth,
        append_eod=args.append_eod,
        min_episode_tokens=args.min_episode_tokens,
    )


if __name__ == "__main__":
    sys.exit(main())
