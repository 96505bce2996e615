"""Preprocessing with Megatron-LM's flags: byte-identical files, partitions, sentences, CLI."""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from megatron_endprompt.prep.preprocess import PreprocessError, preprocess_jsonl

TEXTS = ["hello world", "x</s>y <EOD> z", "def f(x):\n    return x  # café", "é\n\n q"]
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))


def _run(inputs, prefix, tokenizer_type="ByteTokenizer", **kw):
    kw.setdefault("progress", False)
    return preprocess_jsonl(inputs, str(prefix), tokenizer_type, **kw)


def _expected_pair(docs: list[list[list[int]]], dtype) -> tuple[bytes, bytes]:
    """.bin and .idx written by hand from the documented format (indexed_dataset._IndexWriter):
    header, version 1, dtype code, sequence and document counts, int32 lengths, int64 byte
    pointers, int64 document indices; one sequence per sentence."""
    code = {np.uint16: 8, np.int32: 4}[dtype]
    seqs = [s for doc in docs for s in doc]
    lengths = np.array([len(s) for s in seqs], dtype=np.int32)
    pointers = np.concatenate([[0], np.cumsum(lengths[:-1])]).astype(np.int64)
    pointers *= np.dtype(dtype).itemsize
    doc_idx = np.concatenate([[0], np.cumsum([len(d) for d in docs])]).astype(np.int64)
    idx = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code)
    idx += struct.pack("<Q", len(seqs)) + struct.pack("<Q", len(doc_idx))
    idx += lengths.tobytes() + pointers.tobytes() + doc_idx.tobytes()
    data = b"".join(np.array(s, dtype=dtype).tobytes() for s in seqs)
    return data, idx


def _assert_pair(prefix: str, docs, dtype=np.uint16) -> None:
    data, idx = _expected_pair(docs, dtype)
    assert Path(prefix + ".bin").read_bytes() == data
    assert Path(prefix + ".idx").read_bytes() == idx


def _sp_cases(model: str):
    sp = spm.SentencePieceProcessor(model_file=model)
    v = sp.get_piece_size()

    def legacy_sp(t):  # <EOD> = V + 2 and special names split out, as Megatron-LM's legacy
        a, rest = t.split("</s>")
        b, c = rest.split("<EOD>")
        return [*sp.encode(a), 2, *sp.encode(b), v + 2, *sp.encode(c)]

    return {
        ("SentencePieceTokenizer", False): (lambda t: sp.encode(t) + [2]),
        ("SentencePieceTokenizer", True): (
            lambda t: (legacy_sp(t) if "<EOD>" in t else sp.encode(t)) + [v + 2]
        ),
        ("GPTSentencePieceTokenizer", False): (lambda t: sp.encode(t) + [2]),
        ("GPTSentencePieceTokenizer", True): (lambda t: sp.encode(t) + [2]),
        ("Llama2Tokenizer", False): (lambda t: sp.encode(t) + [2]),
        ("Llama2Tokenizer", True): (lambda t: [1, *sp.encode(t), 2]),
    }


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize(
    "kind", ["SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer"]
)
def test_sentencepiece_types_byte_identical(kind, legacy, make_jsonl, tmp_path, tiny_sp_model):
    expected = _sp_cases(tiny_sp_model)[(kind, legacy)]
    path = make_jsonl([{"text": t} for t in TEXTS])
    stats = _run([path], tmp_path / "o", kind, tokenizer_model=tiny_sp_model, append_eod=True,
                 tokenizer_options={"legacy": legacy})  # fmt: skip
    _assert_pair(stats.outputs["text"], [[expected(t)] for t in TEXTS])


@pytest.mark.parametrize("legacy", [False, True])
def test_huggingface_byte_identical(legacy, make_jsonl, tmp_path, tiny_hf_tokenizer):
    from tokenizers import Tokenizer

    d = tmp_path / "tok"
    d.mkdir()
    (d / "tokenizer.json").write_bytes(Path(tiny_hf_tokenizer, "tokenizer.json").read_bytes())
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|eot_id|>"}))
    ref = Tokenizer.from_file(str(d / "tokenizer.json"))
    eot = ref.token_to_id("<|eot_id|>")
    path = make_jsonl([{"text": t} for t in TEXTS])
    stats = _run([path], tmp_path / "o", "HuggingFaceTokenizer", tokenizer_model=str(d),
                 append_eod=True, tokenizer_options={"legacy": legacy})  # fmt: skip
    docs = [[ref.encode(t, add_special_tokens=legacy).ids + [eot]] for t in TEXTS]
    _assert_pair(stats.outputs["text"], docs)


def test_vocab_extra_ids_ignored_with_a_note(make_jsonl, tmp_path, tiny_sp_model, capsys):
    path = make_jsonl([{"text": t} for t in TEXTS])
    opts = {"legacy": True, "vocab_extra_ids": 70000}  # would force int32 if it counted
    stats = _run([path], tmp_path / "o", "SentencePieceTokenizer", tokenizer_model=tiny_sp_model,
                 tokenizer_options=opts)  # fmt: skip
    assert Path(stats.outputs["text"] + ".idx").read_bytes()[17] == 8  # uint16
    assert "--vocab-extra-ids is ignored" in capsys.readouterr().err


LINES = [{"text": f"doc {i} " * (i % 3 + 1)} for i in range(11)]


@pytest.mark.parametrize("partitions", [2, 3, 4])
def test_partitions_sequential_same_bytes_as_one(partitions, make_jsonl, tmp_path):
    path = make_jsonl([*LINES[:5], "bad", *LINES[5:]])
    _run([path], tmp_path / "one", append_eod=True)
    _run([path], tmp_path / "many", append_eod=True, partitions=partitions, workers=partitions,
         keep_sequential_samples=True)  # fmt: skip
    for ext in ("bin", "idx"):
        one = (tmp_path / f"one_text_document.{ext}").read_bytes()
        assert one == (tmp_path / f"many_text_document.{ext}").read_bytes()
    assert sorted(os.listdir(tmp_path)) == [
        "in.jsonl",
        *(f"{p}_text_document.{e}" for p in ("many", "one") for e in ("bin", "idx")),
    ]  # no partition files left behind


def test_partitions_round_robin_is_megatrons_order(make_jsonl, tmp_path):
    # Megatron-LM: line g goes to partition g % N; partitions are merged in order.
    path = make_jsonl(LINES)
    stats = _run([path], tmp_path / "rr", partitions=3, workers=3)
    order = [g for p in range(3) for g in range(len(LINES)) if g % 3 == p]
    _assert_pair(stats.outputs["text"], [[list(LINES[g]["text"].encode())] for g in order])


def test_workers_must_be_a_multiple_of_partitions(make_jsonl, tmp_path):
    with pytest.raises(PreprocessError, match="--workers .*multiple of --partitions"):
        _run([make_jsonl(LINES)], tmp_path / "o", partitions=2, workers=3)


def test_null_tokenizer_ids_and_bad_lines(make_jsonl, tmp_path):
    path = make_jsonl([{"text": "5 17 3"}, {"text": "not ids"}, {"text": "999"}])
    stats = _run([path], tmp_path / "o", "NullTokenizer", append_eod=True,
                 tokenizer_options={"vocab_size": 1000})  # fmt: skip
    assert stats.skipped["invalid_ids"] == 1
    _assert_pair(stats.outputs["text"], [[[5, 17, 3, 1000]], [[999, 1000]]])


def test_split_sentences_refused_without_punkt_data(make_jsonl, tmp_path, monkeypatch):
    pytest.importorskip("nltk")
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "empty")])
    with pytest.raises(ValueError, match="--split-sentences needs nltk punkt data at"):
        _run([make_jsonl(LINES)], tmp_path / "o", split_sentences=True)
    assert os.listdir(tmp_path) == ["in.jsonl"]


def test_split_sentences_refused_without_nltk(make_jsonl, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "nltk", None)
    with pytest.raises(ValueError, match="--split-sentences needs the nltk package"):
        _run([make_jsonl(LINES)], tmp_path / "o", split_sentences=True)


@pytest.fixture
def punkt_data(tmp_path, monkeypatch):
    """punkt parameters (abbreviation "dr"), saved where nltk looks (punkt_tab/english)."""
    pytest.importorskip("nltk")
    import nltk
    from nltk.tokenize.punkt import PunktParameters, save_punkt_params

    params = PunktParameters()
    params.abbrev_types = {"dr"}
    target = tmp_path / "nltk" / "tokenizers" / "punkt_tab" / "english"
    target.mkdir(parents=True)
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "nltk")])
    save_punkt_params(params, dir=str(target))


@pytest.mark.parametrize("keep_newlines", [False, True])
def test_split_sentences_one_sequence_each(punkt_data, make_jsonl, tmp_path, keep_newlines):
    from nltk.tokenize.punkt import PunktTokenizer

    text = "First one here, Dr. Who.\nSecond one?  Third!"
    stats = _run([make_jsonl([{"text": text}])], tmp_path / "s", append_eod=True,
                 split_sentences=True, keep_newlines=keep_newlines)  # fmt: skip
    assert stats.outputs["text"] == str(tmp_path / "s_text_sentence")
    if keep_newlines:
        sentences = ["First one here, Dr. Who.\n", "Second one?  ", "Third!"]
    else:
        sentences = PunktTokenizer("english").tokenize(text)
        assert sentences == ["First one here, Dr. Who.", "Second one?", "Third!"]
    seqs = [list(s.encode()) for s in sentences]
    seqs[-1].append(256)  # EOD closes the last sentence
    _assert_pair(stats.outputs["text"], [seqs])


def test_cli_accepts_megatron_flags(make_jsonl, tmp_path, tiny_sp_model, capsys):
    import preprocess_data

    path = make_jsonl(LINES)
    argv = ["--input", path, "--output-prefix", str(tmp_path / "c"), "--tokenizer-type",
            "SentencePieceTokenizer", "--tokenizer-model", tiny_sp_model, "--legacy-tokenizer",
            "--vocab-extra-ids", "2", "--partitions", "2", "--workers", "2",
            "--keep-sequential-samples", "--keep-newlines", "--append-eod", "--no-progress",
            "--tokenizer-special-tokens", "<A>"]  # fmt: skip
    assert preprocess_data.main(argv) == 0
    err = capsys.readouterr().err
    assert "--keep-newlines has no effect" in err and "EOD = 402" in err
    sp = spm.SentencePieceProcessor(model_file=tiny_sp_model)
    _assert_pair(str(tmp_path / "c_text_document"), [[sp.encode(x["text"]) + [402]] for x in LINES])
    bad = ["--input", path, "--output-prefix", str(tmp_path / "d"), "--tokenizer-type",
           "NullTokenizer", "--no-progress"]  # fmt: skip
    assert preprocess_data.main(bad) == 2
    assert "--vocab-size" in capsys.readouterr().err
