"""File-system fault helpers shared by the write-failure tests: a small real tmpfs, a snapshot."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator

import pytest


def tree(directory) -> dict[str, bytes]:
    """Every file under ``directory`` with its bytes, by relative name (a byte-exact snapshot)."""
    out = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = f.read()
    return out


@contextlib.contextmanager
def small_tmpfs(path, size: str) -> Iterator[str]:
    """Mount a tmpfs of ``size`` (e.g. ``"64k"``) at ``path``: a disk that really fills up.

    Skips the calling test where this machine does not allow mounting (not root, no
    CAP_SYS_ADMIN); the injected-``OSError`` tests cover the same code everywhere.
    """
    os.makedirs(path)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield str(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@contextlib.contextmanager
def read_only_view(source, path) -> Iterator[str]:
    """``source`` seen read-only at ``path`` (a read-only bind mount: EROFS, even for root).

    Skips the calling test where mounting is not allowed.
    """
    os.makedirs(path)
    for cmd in (["mount", "--bind", str(source), str(path)],
                ["mount", "-o", "remount,ro,bind", str(path)]):  # fmt: skip
        done = subprocess.run(cmd, capture_output=True)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)
            pytest.skip(f"cannot bind-mount here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield str(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)
