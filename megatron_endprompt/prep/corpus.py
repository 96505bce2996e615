"""The built-in default corpus: the Python standard library's own ``.py`` files as JSONL.

Every Python installation carries a few tens of MB of real, long, structured text, so the CPU
quickstart and the tests need no download. One document per file, ``{"text": ..., "path": ...}``
with the path relative to the library root; files are visited in a sorted walk, so the output is
the same on every run of the same Python. ``site-packages`` and ``__pycache__`` are never
visited; ``test``/``tests`` directories only with ``include_tests``.
"""

from __future__ import annotations

import json
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field

from megatron_endprompt.atomic_io import atomic_write
from megatron_endprompt.prep.files import require_output_dir

CORPUS_SKIP_REASONS = ("too_large", "empty", "unreadable", "undecodable")
ALWAYS_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
TEST_DIRS = frozenset({"test", "tests"})


@dataclass
class CorpusStats:
    """What ``prepare_corpus`` wrote and skipped."""

    output: str
    """The JSONL file written."""
    documents: int = 0
    """Documents written."""
    bytes: int = 0
    """UTF-8 bytes of text written."""
    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CORPUS_SKIP_REASONS, 0))
    """Files skipped per reason."""

    @property
    def total_skipped(self) -> int:
        """Files skipped, all reasons."""
        return sum(self.skipped.values())

    def summary(self) -> str:
        """One line: documents, bytes, skips by reason."""
        reasons = ", ".join(f"{k}={v}" for k, v in self.skipped.items())
        return (
            f"wrote {self.documents} documents ({self.bytes} bytes) to {self.output}; "
            f"skipped {self.total_skipped} ({reasons})"
        )


def stdlib_root() -> str:
    """The directory of the running Python's standard library."""
    return sysconfig.get_paths()["stdlib"]


def iter_source_files(root: str, include_tests: bool = False) -> Iterator[tuple[str, str]]:
    """``(absolute path, relative path with "/")`` of every ``.py`` file, in a sorted walk.

    Top-down: a directory's files (sorted) come before its subdirectories (sorted).
    """
    excluded = ALWAYS_EXCLUDED_DIRS if include_tests else ALWAYS_EXCLUDED_DIRS | TEST_DIRS
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning and sorting in place fixes os.walk's visiting order.
        dirnames[:] = sorted(d for d in dirnames if d not in excluded)
        for name in sorted(filenames):
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                yield path, os.path.relpath(path, root).replace(os.sep, "/")


def _read_text(path: str, max_bytes: int | None) -> tuple[str | None, str | None]:
    """``(text, None)`` or ``(None, skip reason)``."""
    try:
        if max_bytes is not None and os.path.getsize(path) > max_bytes:
            return None, "too_large"
        with open(path, "rb") as f:
            raw = f.read()
    except OSError:
        return None, "unreadable"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "undecodable"
    return (text, None) if text.strip() else (None, "empty")


def _validate(output: str, max_docs: int | None, max_bytes_per_doc: int | None, root: str) -> None:
    if max_docs is not None and max_docs < 1:
        raise ValueError(f"--max-docs must be >= 1, got {max_docs}")
    if max_bytes_per_doc is not None and max_bytes_per_doc < 1:
        raise ValueError(f"--max-bytes-per-doc must be >= 1, got {max_bytes_per_doc}")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--source-dir {root}: no such directory")
    require_output_dir(output, "--output")


def prepare_corpus(
    output: str,
    root: str | None = None,
    max_docs: int | None = None,
    max_bytes_per_doc: int | None = 1_000_000,
    include_tests: bool = False,
) -> CorpusStats:
    """Write the ``.py`` files under ``root`` (default: the stdlib) as a JSONL corpus.

    The file is written under a temporary name and renamed when complete.

    Args:
        output: JSONL path to write (``--output``).
        root: Directory to walk (``--source-dir``); default ``stdlib_root()``.
        max_docs: Stop after this many documents (``--max-docs``); None = all.
        max_bytes_per_doc: Skip (and count) larger files (``--max-bytes-per-doc``); None = any.
        include_tests: Also walk ``test``/``tests`` directories (``--include-tests``).

    Returns:
        Counts of documents, bytes and skips.

    Raises:
        ValueError: A non-positive limit, or no documents written.
        FileNotFoundError: ``root`` or the output directory is missing.
    """
    root = root if root is not None else stdlib_root()
    _validate(output, max_docs, max_bytes_per_doc, root)
    stats = CorpusStats(output=output)

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for path, rel in iter_source_files(root, include_tests):
                if max_docs is not None and stats.documents >= max_docs:
                    break
                text, reason = _read_text(path, max_bytes_per_doc)
                if reason is not None:
                    stats.skipped[reason] += 1
                    continue
                f.write(json.dumps({"text": text, "path": rel}, ensure_ascii=False) + "\n")
                stats.documents += 1
                stats.bytes += len(text.encode("utf-8"))
        if stats.documents == 0:
            raise ValueError(f"--source-dir {root}: no documents written ({stats.summary()})")

    atomic_write(output, write)
    return stats
