#!/usr/bin/env python3
"""Write the default corpus (this Python's standard-library .py files) as JSONL.

    python tools/prepare_corpus.py --output data/stdlib.jsonl --max-docs 500

One document per file: {"text": ..., "path": relative path}. Exit status: 0 on success, 2 on
bad flags (one ``error:`` line on stderr).
"""

from __future__ import annotations

import argparse
import sys

from megatron_endprompt.cli_utils import run_tool
from megatron_endprompt.prep.corpus import prepare_corpus


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, help="JSONL file to write.")
    p.add_argument("--max-docs", type=int, default=None, help="Stop after this many documents.")
    p.add_argument(
        "--max-bytes-per-doc", type=int, default=1_000_000, help="Skip (and count) larger files."
    )
    p.add_argument("--include-tests", action="store_true", help="Include test/tests directories.")
    p.add_argument(
        "--source-dir", default=None, help="Directory to walk instead of the standard library."
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Write the corpus; returns the exit status."""
    args = build_parser().parse_args(argv)
    return run_tool(
        lambda: prepare_corpus(
            args.output,
            root=args.source_dir,
            max_docs=args.max_docs,
            max_bytes_per_doc=args.max_bytes_per_doc,
            include_tests=args.include_tests,
        )
    )


if __name__ == "__main__":
    sys.exit(main())
