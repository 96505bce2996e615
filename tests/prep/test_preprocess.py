"""JSONL -> .bin/.idx: round trips through megatron-core's reader, skips, strictness, atomicity."""

from __future__ import annotations

import json
import multiprocessing
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from megatron_endprompt.data.tokenizers import ByteTokenizer, build_tokenizer
from megatron_endprompt.prep import indexed_output
from megatron_endprompt.prep.files import expand_inputs
from megatron_endprompt.prep.preprocess import (
    MAX_WARNINGS,
    PreprocessError,
    preprocess_jsonl,
)

TEXTS = ["hello", "wörld\n  indented", "x", "end."]


def _run(inputs, prefix, **kw):
    kw.setdefault("progress", False)
    return preprocess_jsonl(inputs, str(prefix), kw.pop("tokenizer_type", "ByteTokenizer"), **kw)


def _docs(prefix: str) -> list[list[int]]:
    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


@pytest.mark.parametrize("append_eod", [False, True])
def test_round_trip_bytes(make_jsonl, tmp_path, append_eod):
    path = make_jsonl([{"text": t} for t in TEXTS])
    stats = _run([path], tmp_path / "out", append_eod=append_eod)
    eod = [256] if append_eod else []
    expected = [list(t.encode("utf-8")) + eod for t in TEXTS]
    prefix = str(tmp_path / "out_text_document")
    assert stats.outputs == {"text": prefix}
    assert _docs(prefix) == expected
    ds = IndexedDataset(prefix)
    # One sequence per document, as Megatron-LM without --split-sentences.
    assert ds.document_indices.tolist() == [0, 1, 2, 3, 4]
    assert ds.sequence_lengths.tolist() == [len(e) for e in expected]
    assert ds.index.dtype == np.uint16  # DType.optimal_dtype(259)
    assert stats.documents == 4 and stats.tokens == sum(map(len, expected))
    assert stats.total_skipped == 0


def test_round_trip_sentencepiece_with_eod(make_jsonl, tmp_path, tiny_sp_model):
    tok = build_tokenizer("SentencePieceTokenizer", tiny_sp_model)
    path = make_jsonl([{"text": t} for t in TEXTS])
    _run(
        [path],
        tmp_path / "sp",
        tokenizer_type="SentencePieceTokenizer",
        tokenizer_model=tiny_sp_model,
        append_eod=True,
    )
    docs = _docs(str(tmp_path / "sp_text_document"))
    assert docs == [tok.tokenize(t) + [tok.eod] for t in TEXTS]
    assert [tok.detokenize(d[:-1]) for d in docs] == TEXTS


def test_multiple_keys_one_pair_each(make_jsonl, tmp_path):
    path = make_jsonl([{"text": "ab", "title": "T1"}, {"text": "c", "title": "T2", "x": 1}])
    stats = _run([path], tmp_path / "o", json_keys=("text", "title"))
    assert _docs(stats.outputs["text"]) == [[97, 98], [99]]
    assert _docs(stats.outputs["title"]) == [[84, 49], [84, 50]]
    assert stats.tokens_per_key == {"text": 3, "title": 4} and stats.tokens == 7


def test_line_with_one_bad_key_is_skipped_for_all_keys(make_jsonl, tmp_path):
    path = make_jsonl([{"text": "ab", "title": "T"}, {"text": "c"}, {"text": "d", "title": "U"}])
    stats = _run([path], tmp_path / "o", json_keys=("text", "title"))
    assert stats.skipped["missing_key"] == 1
    assert _docs(stats.outputs["text"]) == [[97, 98], [100]]
    assert _docs(stats.outputs["title"]) == [[84], [85]]


def test_two_workers_byte_identical(make_jsonl, tmp_path):
    lines = [{"text": f"document {i} " * (i % 5 + 1)} for i in range(40)] + ["bad"]
    path = make_jsonl(lines)
    one = _run([path], tmp_path / "one", append_eod=True, chunk_size=3)
    two = _run([path], tmp_path / "two", append_eod=True, chunk_size=3, workers=2)
    for ext in ("bin", "idx"):
        a = (tmp_path / f"one_text_document.{ext}").read_bytes()
        assert a == (tmp_path / f"two_text_document.{ext}").read_bytes()
    assert (one.documents, one.tokens, one.skipped) == (two.documents, two.tokens, two.skipped)
    assert one.skipped["malformed_json"] == 1


def test_globs_sorted_and_files_concatenated(make_jsonl, tmp_path):
    make_jsonl([{"text": "b"}], "b.jsonl")
    make_jsonl([{"text": "a"}, {"text": "aa"}], "a.jsonl")
    stats = _run([str(tmp_path / "*.jsonl")], tmp_path / "o")
    assert _docs(stats.outputs["text"]) == [[97], [97, 97], [98]]
    assert expand_inputs([str(tmp_path / "b.jsonl"), str(tmp_path / "*.jsonl")]) == [
        str(tmp_path / "b.jsonl"),
        str(tmp_path / "a.jsonl"),
    ]


def _bad_corpus(make_jsonl, monkeypatch):
    # ByteTokenizer yields tokens for any non-empty text; make "DROP" tokenize to nothing, as a
    # normalizing tokenizer may do with whitespace.
    real = ByteTokenizer.tokenize
    monkeypatch.setattr(ByteTokenizer, "tokenize", lambda s, t: [] if t == "DROP" else real(s, t))
    lines = [
        {"text": "ok1"},
        '{"text": "unterminated',  # 2 malformed_json
        {"body": "x"},  # 3 missing_key
        {"text": 7},  # 4 not_string
        {"text": ""},  # 5 empty_text
        b'{"text": "\xff\xfe"}',  # 6 invalid_utf8 (raw bytes)
        '{"text": "\\ud800"}',  # 7 invalid_utf8 (lone surrogate escape)
        {"text": "DROP"},  # 8 empty_after_tokenize
        "[1, 2]",  # 9 malformed_json (not an object)
        {"text": "ok2"},
    ]
    return make_jsonl(lines, "bad.jsonl")


def test_bad_lines_counted_with_file_line(make_jsonl, tmp_path, monkeypatch, capsys):
    path = _bad_corpus(make_jsonl, monkeypatch)
    stats = _run([path], tmp_path / "o")
    assert stats.skipped == {
        "malformed_json": 2,
        "missing_key": 1,
        "not_string": 1,
        "empty_text": 1,
        "invalid_utf8": 2,
        "empty_after_tokenize": 1,
        "invalid_ids": 0,
    }
    assert _docs(stats.outputs["text"]) == [list(b"ok1"), list(b"ok2")]
    where = [w.split(": ")[0] for w in stats.warnings]
    assert where == [f"{path}:{n}" for n in range(2, 10)]
    err = capsys.readouterr().err
    assert f"{path}:4: not_string" in err and f"{path}:8: empty_after_tokenize" in err
    assert "skipped 8" in stats.summary() and "not_string=1" in stats.summary()


def test_warnings_capped(make_jsonl, tmp_path, capsys):
    path = make_jsonl(["nope"] * (MAX_WARNINGS + 5) + [{"text": "a"}])
    stats = _run([path], tmp_path / "o")
    assert stats.skipped["malformed_json"] == MAX_WARNINGS + 5
    assert len(stats.warnings) == MAX_WARNINGS
    err = capsys.readouterr().err
    assert err.count("warning: skipped") == MAX_WARNINGS
    assert "... 5 more skipped lines" in err


def test_strict_fails_on_first_bad_line_without_output(make_jsonl, tmp_path, monkeypatch):
    path = _bad_corpus(make_jsonl, monkeypatch)
    with pytest.raises(PreprocessError, match=f"{path}:2: malformed_json"):
        _run([path], tmp_path / "o", strict=True)
    assert os.listdir(tmp_path) == ["bad.jsonl"]


def test_all_skipped_is_an_error_without_output(make_jsonl, tmp_path):
    path = make_jsonl([{"text": ""}, "junk"])
    with pytest.raises(PreprocessError, match="no documents written"):
        _run([path], tmp_path / "o")
    assert os.listdir(tmp_path) == ["in.jsonl"]


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_interruption_leaves_no_partial_pair(make_jsonl, tmp_path, monkeypatch, exc):
    class Failing(IndexedDatasetBuilder):
        calls = 0

        def add_item(self, tensor, mode=0):
            Failing.calls += 1
            if Failing.calls == 3:
                raise exc("stop")
            super().add_item(tensor, mode)

    path = make_jsonl([{"text": t} for t in TEXTS])
    # A previous complete run must survive a failed rerun untouched.
    _run([path], tmp_path / "o")
    before = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}
    monkeypatch.setattr(indexed_output, "IndexedDatasetBuilder", Failing)
    with pytest.raises(exc):
        _run([path], tmp_path / "o", append_eod=True)
    assert {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)} == before
    Failing.calls = 0
    with pytest.raises(exc):
        _run([path], tmp_path / "fresh")
    assert not [n for n in os.listdir(tmp_path) if n.startswith("fresh")]


@pytest.mark.skipif(
    multiprocessing.get_start_method() != "fork", reason="workers inherit the patch by fork"
)
def test_worker_failure_leaves_no_output(make_jsonl, tmp_path, monkeypatch):
    real = ByteTokenizer.tokenize

    def tokenize(self, text):
        if text == "boom":
            raise RuntimeError("tokenizer bug")
        return real(self, text)

    monkeypatch.setattr(ByteTokenizer, "tokenize", tokenize)
    path = make_jsonl([{"text": f"doc {i}"} for i in range(20)] + [{"text": "boom"}])
    with pytest.raises(RuntimeError, match="tokenizer bug"):
        _run([path], tmp_path / "o", workers=2, chunk_size=2)
    assert os.listdir(tmp_path) == ["in.jsonl"]


def test_utf8_bom_and_crlf_are_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\r\n{"text": "b"}')  # no final newline
    stats = _run([str(path)], tmp_path / "o")
    assert _docs(stats.outputs["text"]) == [[97], [98]] and stats.total_skipped == 0


def test_missing_inputs_name_the_flag(tmp_path):
    with pytest.raises(FileNotFoundError, match="--input .*missing.jsonl: no such file"):
        _run([str(tmp_path / "missing.jsonl")], tmp_path / "o")
    with pytest.raises(FileNotFoundError, match="--input .*matches no files"):
        _run([str(tmp_path / "*.jsonl")], tmp_path / "o")
    with pytest.raises(FileNotFoundError, match="--input: no input files"):
        _run([], tmp_path / "o")


def test_bad_settings_name_the_flag(make_jsonl, tmp_path):
    path = make_jsonl([{"text": "a"}])
    with pytest.raises(PreprocessError, match="--workers must be >= 1, got 0"):
        _run([path], tmp_path / "o", workers=0)
    with pytest.raises(PreprocessError, match="--chunk-size must be >= 1, got -1"):
        _run([path], tmp_path / "o", chunk_size=-1)
    with pytest.raises(PreprocessError, match="--json-keys"):
        _run([path], tmp_path / "o", json_keys=("text", "text"))
    with pytest.raises(PreprocessError, match="--output-prefix"):
        _run([path], tmp_path / "no" / "dir" / "o")
    with pytest.raises(ValueError, match="--tokenizer-type"):
        _run([path], tmp_path / "o", tokenizer_type="Nope")
    assert os.listdir(tmp_path) == ["in.jsonl"]


@settings(max_examples=15, deadline=None)
@given(texts=st.lists(st.text(min_size=1, max_size=30), min_size=1, max_size=8))
def test_round_trip_any_texts(tmp_path_factory, texts):
    d = tmp_path_factory.mktemp("rt")
    path = d / "in.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    stats = _run([str(path)], d / "o", append_eod=True)
    docs = _docs(stats.outputs["text"])
    assert [ByteTokenizer().detokenize(doc[:-1]) for doc in docs] == texts
    assert all(doc[-1] == 256 for doc in docs)


def test_megatron_gpt_dataset_reads_output(make_jsonl, tmp_path, tiny_sp_model):
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.utils import Split

    tok = build_tokenizer("SentencePieceTokenizer", tiny_sp_model)
    text = "def f(x):\n    return x + 1  # café\n" * 6
    stats = _run(
        [make_jsonl([{"text": text}])],
        tmp_path / "o",
        tokenizer_type="SentencePieceTokenizer",
        tokenizer_model=tiny_sp_model,
        append_eod=True,
    )
    config = GPTDatasetConfig(
        random_seed=1,
        sequence_length=8,
        blend=([stats.outputs["text"]], None),
        split="1,0,0",
        path_to_cache=str(tmp_path / "cache"),
        tokenizer=tok,  # our tokenizer object is what megatron-core hashes and queries
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
    )
    low = GPTDataset.build_low_level_dataset(stats.outputs["text"], config)
    ds = GPTDataset(low, stats.outputs["text"], np.arange(1, dtype=np.int32), None, Split.train,
                    config)  # fmt: skip
    doc = tok.tokenize(text) + [tok.eod]
    # One document, one epoch: the samples are its consecutive (S + 1)-token windows, shuffled.
    windows = sorted(doc[k * 8 : k * 8 + 9] for k in range((len(doc) - 1) // 8))
    samples = sorted(
        ds[i]["tokens"].tolist() + ds[i]["labels"][-1:].tolist() for i in range(len(ds))
    )
    assert samples == windows
    assert tiny_sp_model in ds.unique_description
