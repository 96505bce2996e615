"""Input file lists from ``--input`` values (files and globs) and the output-directory check;
kept light to import."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence


def expand_inputs(patterns: Sequence[str], flag: str = "--input") -> list[str]:
    """Expand files and globs (each glob sorted), keeping order and dropping repeats.

    Args:
        patterns: File paths or glob patterns.
        flag: The flag named in error messages.

    Returns:
        Existing file paths.

    Raises:
        FileNotFoundError: No patterns, a missing file, or a glob matching no file.
    """
    if not patterns:
        raise FileNotFoundError(f"{flag}: no input files given")
    paths: list[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
            if not matches:
                raise FileNotFoundError(f"{flag} {pattern}: the pattern matches no files")
        elif os.path.isfile(pattern):
            matches = [pattern]
        else:
            raise FileNotFoundError(f"{flag} {pattern}: no such file")
        paths.extend(p for p in matches if p not in paths)
    return paths


def require_output_dir(path: str, flag: str, error: type[Exception] = FileNotFoundError) -> None:
    """Raise ``error('<flag> <path>: directory <dir> not found')`` unless ``path``'s directory
    exists (checked before any work, so nothing is half-written)."""
    out_dir = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(out_dir):
        raise error(f"{flag} {path}: directory {out_dir} not found")
