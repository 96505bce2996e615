"""The default corpus: sorted walk, exclusions, counted skips, atomic JSONL."""

from __future__ import annotations

import json
import os

import pytest

from megatron_endprompt.prep import corpus
from megatron_endprompt.prep.corpus import iter_source_files, prepare_corpus


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "lib"
    files = {
        "b.py": "b = 2\n",
        "a.py": "a = 'é'\n",
        "pkg/__init__.py": "",  # empty: skipped
        "pkg/z.py": "z = 26\n",
        "pkg/tests/t2.py": "t2\n",
        "test/t.py": "t\n",
        "site-packages/x.py": "x\n",
        "__pycache__/c.py": "c\n",
        "big.py": "#" * 100 + "\n",  # too_large under max_bytes_per_doc=50
        "notes.txt": "not python\n",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
    (root / "latin.py").write_bytes(b"s = '\xe9'\n")  # undecodable
    os.symlink(root / "gone.py", root / "dangling.py")  # unreadable
    return root


def _read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_sorted_walk_and_exclusions(tree):
    rels = [rel for _, rel in iter_source_files(str(tree))]
    assert rels == ["a.py", "b.py", "big.py", "dangling.py", "latin.py", "pkg/__init__.py",
                    "pkg/z.py"]  # fmt: skip
    with_tests = [rel for _, rel in iter_source_files(str(tree), include_tests=True)]
    # Top-down walk: a directory's own files precede its subdirectories.
    assert with_tests == rels + ["pkg/tests/t2.py", "test/t.py"]


def test_prepare_corpus_default_root_is_patchable(tree, tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "stdlib_root", lambda: str(tree))
    out = tmp_path / "c.jsonl"
    stats = prepare_corpus(str(out), max_bytes_per_doc=50)
    docs = _read(out)
    assert docs == [
        {"text": "a = 'é'\n", "path": "a.py"},
        {"text": "b = 2\n", "path": "b.py"},
        {"text": "z = 26\n", "path": "pkg/z.py"},
    ]
    assert stats.documents == 3
    assert stats.bytes == len("a = 'é'\nb = 2\nz = 26\n".encode())
    assert stats.skipped == {"too_large": 1, "empty": 1, "unreadable": 1, "undecodable": 1}
    assert "wrote 3 documents" in stats.summary() and "too_large=1" in stats.summary()
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]


def test_max_docs_and_include_tests(tree, tmp_path):
    out = str(tmp_path / "c.jsonl")
    assert prepare_corpus(out, root=str(tree), max_docs=2).documents == 2
    assert [d["path"] for d in _read(out)] == ["a.py", "b.py"]
    stats = prepare_corpus(out, root=str(tree), include_tests=True, max_bytes_per_doc=None)
    assert [d["path"] for d in _read(out)] == [
        "a.py", "b.py", "big.py", "pkg/z.py", "pkg/tests/t2.py", "test/t.py"
    ]  # fmt: skip
    assert stats.skipped["too_large"] == 0


def test_errors_name_flags_and_leave_no_file(tree, tmp_path):
    out = str(tmp_path / "c.jsonl")
    with pytest.raises(ValueError, match="--max-docs must be >= 1, got 0"):
        prepare_corpus(out, root=str(tree), max_docs=0)
    with pytest.raises(ValueError, match="--max-bytes-per-doc must be >= 1, got -5"):
        prepare_corpus(out, root=str(tree), max_bytes_per_doc=-5)
    with pytest.raises(FileNotFoundError, match="--source-dir"):
        prepare_corpus(out, root=str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="--output"):
        prepare_corpus(str(tmp_path / "no" / "c.jsonl"), root=str(tree))
    with pytest.raises(ValueError, match="no documents written"):
        prepare_corpus(out, root=str(tree / "site-packages"), max_bytes_per_doc=1)
    assert sorted(os.listdir(tmp_path)) == ["lib"]


def test_real_stdlib_run(tmp_path):
    out = str(tmp_path / "std.jsonl")
    stats = prepare_corpus(out, max_docs=5)
    docs = _read(out)
    assert stats.documents == len(docs) == 5
    # Independently: the first five files of the walk that are small, UTF-8 and non-blank.
    expected = []
    for path, rel in iter_source_files(corpus.stdlib_root()):
        with open(path, "rb") as f:
            raw = f.read()
        try:
            ok = len(raw) <= 1_000_000 and raw.decode("utf-8").strip() != ""
        except UnicodeDecodeError:
            ok = False
        if ok:
            expected.append(rel)
        if len(expected) == 5:
            break
    assert [d["path"] for d in docs] == expected
    assert not any(p.startswith(("test/", "site-packages/")) for p in expected)
    for d in docs:
        with open(os.path.join(corpus.stdlib_root(), d["path"]), encoding="utf-8") as f:
            assert f.read() == d["text"]
