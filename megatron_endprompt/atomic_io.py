"""Write-then-rename file output: a reader sees the old file or the complete new one, never half.

Every tool and the training loop write their outputs (reports, plots, corpora, tracker files)
through these helpers; directory-level publishing (checkpoints, converted models, ``.bin/.idx``
pairs) renames whole directories or file pairs in the same spirit. :func:`file_digest` is the one
chunked file hash (checkpoint checksums, the index-cache key of a corpus).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> str:
    """Call ``write(tmp_path)`` for a temporary file beside ``path``, then rename it to ``path``.

    The temporary file is removed if ``write`` raises (or is interrupted). Returns ``path``.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path), suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str, fsync: bool = False) -> str:
    """Write ``text`` (UTF-8) atomically; ``fsync`` makes it durable before the rename."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            if fsync:
                f.flush()
                os.fsync(f.fileno())

    return atomic_write(path, write)


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read 16 MiB at a time (shards and corpora can be GiBs)."""
    digest = hashlib.new(algorithm, usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def check_writable_dir(path: str, flag: str, prebuilt: Callable[[str], bool] | None = None) -> None:
    """Refuse an output directory that cannot be written, before any work is done.

    ``path`` may not exist yet: then its nearest existing ancestor must be a writable directory.
    ``prebuilt(path)`` (optional) says whether a read-only ``path`` already holds everything
    that would be written (a complete prebuilt cache), which is then accepted.

    Raises:
        ValueError: ``"{flag}={path}: <reason>"`` (a file, under a file, not writable).
    """
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise ValueError(f"{flag}={path}: is a file, not a directory")
        if not os.access(path, os.W_OK | os.X_OK) and not (prebuilt and prebuilt(path)):
            raise ValueError(f"{flag}={path}: directory is not writable")
        return
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"{flag}={path}: cannot be created, {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag}={path}: cannot be created, {parent} is not writable")
