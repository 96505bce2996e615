"""SentencePiece tokenizer training: JSONL keys, skipped lines, caps, errors that leave no files."""

from __future__ import annotations

import os

import pytest

from megatron_endprompt.data.tokenizers import build_tokenizer
from megatron_endprompt.prep.tokenizer_training import MIN_VOCAB_SIZE, train_sentencepiece


def test_train_from_jsonl_skips_bad_lines(make_jsonl, tmp_path):
    text = "alpha beta gamma delta 1234\n  indented line\n" * 40
    path = make_jsonl([{"body": text}, "not json", {"other": "x"}, {"body": 5}], "t.jsonl")
    result = train_sentencepiece([path], str(tmp_path / "m"), MIN_VOCAB_SIZE + 40, ["body"])
    assert result.skipped_lines == 3
    assert result.sentences == 80  # two non-blank lines per copy
    assert sorted(os.listdir(tmp_path)) == ["m.model", "m.vocab", "t.jsonl"]
    tok = build_tokenizer("SentencePieceTokenizer", result.model_path)
    assert tok.vocab_size == MIN_VOCAB_SIZE + 40
    assert tok.detokenize(tok.tokenize("gamma  delta")) == "gamma  delta"


def test_train_max_sentences_caps_input(tmp_path):
    (tmp_path / "a.txt").write_text("".join(f"line {i}\n" for i in range(500)))
    result = train_sentencepiece(
        [str(tmp_path / "*.txt")], str(tmp_path / "m"), MIN_VOCAB_SIZE + 15, max_sentences=50
    )
    assert result.sentences == 50


def test_train_errors_leave_no_files(tmp_path):
    (tmp_path / "a.txt").write_text("ab ab ab\n")
    prefix = str(tmp_path / "m")
    with pytest.raises(ValueError, match="--vocab-size must be >= .*got 100"):
        train_sentencepiece([str(tmp_path / "a.txt")], prefix, 100)
    with pytest.raises(FileNotFoundError, match="--input .*missing.txt"):
        train_sentencepiece([str(tmp_path / "missing.txt")], prefix, 400)
    # Far more pieces than a tiny text can yield: SentencePiece refuses.
    with pytest.raises(ValueError, match="--vocab-size"):
        train_sentencepiece([str(tmp_path / "a.txt")], prefix, 5000)
    assert os.listdir(tmp_path) == ["a.txt"]
