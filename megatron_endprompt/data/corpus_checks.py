"""Checks of a ``.bin/.idx`` pair before training reads it, and the pair's file identity.

- :func:`check_indexed_pair`: the ``.idx`` header and sizes and the ``.bin`` size agree (a
  truncated or foreign file fails here, naming it, instead of deep inside mmap).
- :func:`check_token_ids`: no token id reaches the tokenizer's vocabulary (the wrong tokenizer
  would otherwise fail as an IndexError in the embedding). The maximum id is scanned once and
  cached in a small JSON file keyed on :func:`file_identity`.
- :func:`index_fingerprint`: the ``.idx`` content hash and ``.bin`` size; joins the index cache
  key (see ``data/builder.py``) so a re-preprocessed corpus never reuses stale sample indices.
- :func:`check_index_cache_file`: a cached sample-index ``.npy`` holds plain numbers, read from
  its header alone before megatron-core loads it with ``allow_pickle=True`` (a crafted file in a
  shared ``--data-cache-path`` would otherwise run code).

Scanned values live in ``<cache>/<hash>-<name>-token_stats.json``, valid while the
:func:`file_identity` (size and mtime_ns of both files) recorded there still holds.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct

import numpy as np
from megatron.core.datasets.indexed_dataset import DType, get_bin_path, get_idx_path

from megatron_endprompt.atomic_io import atomic_write_text, file_digest

_INDEX_HEADER = b"MMIDIDX\x00\x00"
_HEADER_BYTES = 34  # magic 9, version 8, dtype code 1, sequence count 8, document count 8
_SCAN_CHUNK = 1 << 24  # tokens per chunk of the max-id scan


class CorpusError(ValueError):
    """A data file that cannot be read as a Megatron indexed dataset, or does not fit the run."""


def file_identity(prefix: str) -> dict[str, list[int]]:
    """``{".bin": [size, mtime_ns], ".idx": [size, mtime_ns]}`` of the pair at ``prefix``."""
    identity = {}
    for suffix, path in ((".bin", get_bin_path(prefix)), (".idx", get_idx_path(prefix))):
        st = os.stat(path)
        identity[suffix] = [int(st.st_size), int(st.st_mtime_ns)]
    return identity


def check_indexed_pair(prefix: str) -> np.dtype:
    """Validate the ``.idx`` layout and the ``.bin`` size; return the token dtype.

    Raises:
        CorpusError: naming the file and what is wrong with it.
    """
    idx_path, bin_path = get_idx_path(prefix), get_bin_path(prefix)
    idx_size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        head = f.read(_HEADER_BYTES)
        if len(head) < _HEADER_BYTES or head[:9] != _INDEX_HEADER:
            raise CorpusError(f"{idx_path}: not a Megatron index (bad header); re-preprocess")
        version, code, n_seq, n_doc = struct.unpack("<QBQQ", head[9:])
        if version != 1:
            raise CorpusError(f"{idx_path}: index version {version}, expected 1")
        try:
            dtype = np.dtype(DType.dtype_from_code(code))
        except (KeyError, ValueError):
            raise CorpusError(f"{idx_path}: unknown token dtype code {code}") from None
        expected = _HEADER_BYTES + 12 * n_seq + 8 * n_doc
        if n_doc < 1 or idx_size not in (expected, expected + n_seq):  # + modes if multimodal
            raise CorpusError(
                f"{idx_path}: {idx_size} bytes, but its header's {n_seq} sequences and {n_doc} "
                f"document boundaries need {expected}; the index is truncated or corrupt"
            )
        lengths = np.frombuffer(f.read(4 * n_seq), dtype=np.int32)
    if np.any(lengths < 0):
        raise CorpusError(f"{idx_path}: negative sequence lengths; the index is corrupt")
    need = int(np.sum(lengths, dtype=np.int64)) * dtype.itemsize
    bin_size = os.path.getsize(bin_path)
    if bin_size != need:
        raise CorpusError(
            f"{bin_path}: {bin_size} bytes, but {idx_path} indexes "
            f"{need // dtype.itemsize} {dtype.name} tokens ({need} bytes); the pair is "
            "truncated or from different runs; re-preprocess"
        )
    return dtype


def check_token_ids(prefix: str, dtype: np.dtype, vocab_size: int, cache_dir: str) -> int:
    """Fail when a token id of the pair is >= ``vocab_size``; return the maximum id.

    Args:
        prefix: the ``.bin/.idx`` path prefix.
        dtype: the token dtype (from :func:`check_indexed_pair`).
        vocab_size: the tokenizer's vocabulary size.
        cache_dir: where the scanned maximum is cached (the index cache directory).
    """
    max_id = _cached(prefix, cache_dir, "max_token_id", lambda: scan_max_token_id(prefix, dtype))
    if max_id >= vocab_size:
        raise CorpusError(
            f"data path {prefix!r}: max token id {max_id} >= the tokenizer's vocab size "
            f"{vocab_size}; the corpus was tokenized with another tokenizer (check "
            "--tokenizer-type/--tokenizer-model against the preprocessing run)"
        )
    return max_id


def index_fingerprint(prefix: str, cache_dir: str) -> dict[str, object]:
    """What megatron's sample/shuffle indices depend on: the ``.idx`` content and ``.bin`` size.

    The MD5 of the ``.idx`` is computed once per file identity and cached. Unlike mtimes it is
    the same for copies of the corpus (per-node local disks), so ranks agree on the cache key.
    """
    md5 = _cached(prefix, cache_dir, "idx_md5", lambda: file_digest(get_idx_path(prefix), "md5"))
    return {"idx_md5": md5, "bin_size": os.path.getsize(get_bin_path(prefix))}


def _cached(prefix: str, cache_dir: str, name: str, compute) -> object:
    """``compute()``, cached under ``name`` in the pair's stats JSON while its identity holds."""
    identity = file_identity(prefix)
    digest = hashlib.md5(os.path.abspath(prefix).encode(), usedforsecurity=False).hexdigest()
    path = os.path.join(cache_dir, f"{digest}-{os.path.basename(prefix)}-token_stats.json")
    record: dict = {}
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        pass
    if not isinstance(record, dict) or record.get("identity") != identity:
        record = {"prefix": os.path.abspath(prefix), "identity": identity}
    if name in record:
        return record[name]
    record[name] = compute()
    try:
        atomic_write_text(path, json.dumps(record, indent=1))
    except OSError:  # a read-only cache only costs the next build another scan
        pass
    return record[name]


def check_index_cache_file(path: str) -> None:
    """Refuse a cached index ``.npy`` that numpy would unpickle; read from its header only.

    numpy unpickles exactly the arrays whose dtype holds Python objects, so a file whose header
    declares a plain dtype is safe to load with ``allow_pickle=True``.

    Raises:
        ValueError: naming the file and ``--data-cache-path``, when the header is unreadable or
            declares Python objects (the file is rebuilt once deleted).
    """
    fix = "delete it (megatron-core rebuilds it) or point --data-cache-path elsewhere"
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                _, _, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                _, _, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f".npy format version {version}")
    except (OSError, ValueError, SyntaxError) as err:
        msg = f"--data-cache-path: index cache file {path} is unreadable ({err}); {fix}"
        raise ValueError(msg) from err
    if dtype.hasobject:
        raise ValueError(
            f"--data-cache-path: index cache file {path} holds Python objects (dtype {dtype}), "
            f"which loading would unpickle (run code); megatron-core writes integers only: {fix}"
        )


def scan_max_token_id(prefix: str, dtype: np.dtype) -> int:
    """Maximum token of the pair's ``.bin``, memory-mapped and read in chunks (-1 when empty)."""
    bin_path = get_bin_path(prefix)
    if os.path.getsize(bin_path) == 0:
        return -1
    tokens = np.memmap(bin_path, dtype=dtype, mode="r")
    best = -1
    for start in range(0, len(tokens), _SCAN_CHUNK):
        best = max(best, int(tokens[start : start + _SCAN_CHUNK].max()))
    del tokens
    return best
