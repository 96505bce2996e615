"""Write-then-rename file output: a reader sees the old file or the complete new one, never half.

Every tool and the training loop write their outputs (reports, plots, corpora, tracker files)
through these helpers; directory-level publishing (checkpoints, converted models, ``.bin/.idx``
pairs) renames whole directories or file pairs in the same spirit. :func:`file_digest` is the one
chunked file hash (checkpoint checksums, the index-cache key of a corpus).

A write the system refuses (a full disk, a quota, a read-only or foreign directory) becomes one
:class:`WriteError` naming the path and the errno, raised from :func:`writing`: every command line
prints it as one ``error:`` line and exits 2, after the writer removed its partial files.
"""

from __future__ import annotations

import errno as errno_codes
import hashlib
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_OS_ERROR_IN_TEXT = re.compile(r"\(os error (\d+)\)|\[Errno (\d+)\]")
"""An OSError reported in another exception's text: Rust writers (safetensors: ``I/O error: ...
(os error 28)``), torch's distributed checkpoint (``CheckpointException`` lists each rank's
failure as text: ``[Errno 28] No space left on device``)."""


class WriteError(ValueError):
    """A write the system refused: ``cannot write PATH: STRERROR (errno N NAME)``.

    A ValueError, so that every entry point reports it like any other bad input (one line, exit
    status 2). ``errno`` and ``filename`` are kept as on the OSError it replaces.
    """

    def __init__(self, path: str | os.PathLike, code: int) -> None:
        self.errno, self.filename = code, os.fspath(path)
        name = errno_codes.errorcode.get(code, "?")
        super().__init__(f"cannot write {self.filename}: {os.strerror(code)} (errno {code} {name})")


def write_errno(err: BaseException) -> int | None:
    """The errno behind a failed write: an OSError's, or one reported in the text of another
    writer's exception (safetensors), following ``__cause__``/``__context__``; None when none."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno:
            return err.errno
        found = _OS_ERROR_IN_TEXT.search(str(err))
        if found:
            return int(found.group(1) or found.group(2))
        err = err.__cause__ or err.__context__
    return None


@contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn a failed write inside the block into :class:`WriteError` naming ``path``.

    Exceptions without an errno (a bug, a bad value) pass through unchanged.
    """
    try:
        yield
    except (WriteError, KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as err:  # torch's CheckpointException is a BaseException
        code = write_errno(err)
        if code is None:
            raise
        raise WriteError(path, code) from err


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> str:
    """Call ``write(tmp_path)`` for a temporary file beside ``path``, then rename it to ``path``.

    The temporary file is removed if ``write`` raises (or is interrupted), and ``path`` keeps its
    previous content. Returns ``path``.

    Raises:
        WriteError: the system refused the write (full disk, read-only, permission).
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    with writing(path):
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            dir=directory, prefix="." + os.path.basename(path), suffix=".tmp"
        )
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
