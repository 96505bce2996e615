"""Input file lists from ``--input`` values: files and globs, kept light to import."""

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
