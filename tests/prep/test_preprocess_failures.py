"""Bad lines that used to crash a run, and multi-key outputs published all or nothing."""

from __future__ import annotations

import errno
import os

import pytest
from megatron.core.datasets import indexed_dataset
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from megatron_endprompt.atomic_io import WriteError
from megatron_endprompt.prep import indexed_output
from megatron_endprompt.prep.preprocess import preprocess_jsonl

DEEP = "[" * 100_000 + "]" * 100_000


def _run(inputs, prefix, **kw):
    kw.setdefault("progress", False)
    return preprocess_jsonl(inputs, str(prefix), "ByteTokenizer", **kw)


@pytest.mark.parametrize("workers", [1, 2])
def test_crashing_lines_are_counted_skips(make_jsonl, tmp_path, workers):
    path = make_jsonl(
        [
            {"text": "ok1"},
            '{"text": "x", "deep": ' + DEEP + "}",  # 2 RecursionError in json.loads
            '{"text": "\\ud800"}',  # 3 lone surrogate escape
            '{"text": "x", "n": ' + "7" * 5000 + "}",  # 4 over the int conversion limit
            {"text": "ok2"},
        ]
    )
    stats = _run([path], tmp_path / "o", workers=workers, chunk_size=2)
    assert stats.skipped["malformed_json"] == 2 and stats.skipped["invalid_utf8"] == 1
    assert [w.split(": ")[0] for w in stats.warnings] == [f"{path}:{n}" for n in (2, 3, 4)]
    ds = IndexedDataset(stats.outputs["text"])
    assert [ds[i].tolist() for i in range(len(ds))] == [list(b"ok1"), list(b"ok2")]


def _snapshot(directory) -> dict[str, bytes]:
    return {n: (directory / n).read_bytes() for n in sorted(os.listdir(directory))}


def _fail_second(monkeypatch, owner, name):
    """Make the second call of ``owner.name`` raise ENOSPC (the second key's write)."""
    real = getattr(owner, name)
    calls = []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(owner, name, failing)


@pytest.mark.parametrize(
    ("owner", "name"),
    [(indexed_dataset._IndexWriter, "write"), (IndexedDatasetBuilder, "add_item")],
    ids=["index_write", "data_write"],
)
def test_two_keys_disk_full_publishes_nothing(make_jsonl, tmp_path, monkeypatch, owner, name):
    path = make_jsonl([{"text": f"doc {i}", "path": f"p{i}"} for i in range(3)])
    _run([path], tmp_path / "o", json_keys=["text", "path"])
    before = _snapshot(tmp_path)
    _fail_second(monkeypatch, owner, name)
    with pytest.raises(WriteError) as info:
        _run([path], tmp_path / "o", json_keys=["text", "path"], append_eod=True)
    assert info.value.errno == errno.ENOSPC
    assert "errno 28" in str(info.value) and "ENOSPC" in str(info.value)
    assert str(tmp_path / "o_") in str(info.value) and ".tmp-" in str(info.value)
    assert _snapshot(tmp_path) == before  # old pairs byte-identical, no staged files left


def test_publish_all_renames_only_after_every_finalize(tmp_path, monkeypatch):
    import numpy as np

    staged = [indexed_output.StagedIndexedDataset(str(tmp_path / k), np.uint16) for k in ("a", "b")]
    for s in staged:
        s.add_document(np.arange(3, dtype=np.uint16))
    _fail_second(monkeypatch, indexed_dataset._IndexWriter, "write")
    with pytest.raises(WriteError, match="ENOSPC"):
        indexed_output.publish_all(staged)
    for s in staged:
        s.abort()
    assert os.listdir(tmp_path) == []
