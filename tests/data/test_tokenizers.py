"""Tokenizers: ids, special tokens, round trips, errors."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_endprompt.data.tokenizers import (
    TOKENIZER_TYPES,
    HuggingFaceTokenizer,
    SentencePieceTokenizer,
    build_tokenizer,
)

# Text hypothesis may draw: any Unicode except surrogates (not encodable as UTF-8).
_TEXT = st.text(max_size=60)
_SETTINGS = settings(max_examples=40, deadline=None)


def test_byte_tokenizer_ids_and_specials(byte_tokenizer):
    assert byte_tokenizer.tokenize("hé\n") == [104, 0xC3, 0xA9, 10]
    assert byte_tokenizer.detokenize([104, 256, 0xC3, 0xA9, 257, 258]) == "hé"
    assert (byte_tokenizer.eod, byte_tokenizer.bos, byte_tokenizer.pad) == (256, 257, 258)
    assert byte_tokenizer.vocab_size == 259 == len(byte_tokenizer.vocab)
    assert byte_tokenizer.token_to_id("</s>") == 256
    assert byte_tokenizer.token_to_id("<|eot_id|>") is None
    assert byte_tokenizer.inv_vocab[0x41] == "<0x41>"
    assert json.loads(json.dumps(byte_tokenizer.unique_identifiers))["class"] == "ByteTokenizer"


@_SETTINGS
@given(text=_TEXT)
def test_byte_tokenizer_round_trip(text):
    tok = build_tokenizer("ByteTokenizer")
    ids = tok.tokenize(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.detokenize(ids) == text


def test_unknown_type_names_flag_and_choices():
    with pytest.raises(ValueError) as err:
        build_tokenizer("BertWordPieceCase", "x")
    assert "--tokenizer-type" in str(err.value) and "BertWordPieceCase" in str(err.value)
    for name in TOKENIZER_TYPES:
        assert name in str(err.value)


@pytest.mark.parametrize("kind", ["SentencePieceTokenizer", "HuggingFaceTokenizer"])
def test_missing_model_names_flag_and_path(kind, tmp_path):
    missing = str(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match="--tokenizer-model") as err:
        build_tokenizer(kind, missing)
    assert missing in str(err.value)
    with pytest.raises(FileNotFoundError, match="--tokenizer-model"):
        build_tokenizer(kind, None)


def test_corrupt_sentencepiece_model_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="--tokenizer-model .*bad.model"):
        build_tokenizer("SentencePieceTokenizer", str(bad))


def test_sentencepiece_specials(tiny_sp_model):
    tok = build_tokenizer("SentencePieceTokenizer", tiny_sp_model)
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.vocab_size == 400 == len(tok.vocab)
    # Piece layout fixed by train_sentencepiece: <unk>, <s>, </s>, <pad>, <|eot_id|>.
    assert (tok.bos, tok.eod, tok.pad) == (1, 2, 3)
    assert tok.token_to_id("</s>") == tok.eod
    assert tok.token_to_id("<|eot_id|>") == 4
    assert tok.tokenize("<|eot_id|>") == [4]
    assert tok.token_to_id("no such piece") is None
    assert tok.inv_vocab[tok.eod] == "</s>"
    assert tok.tokenize("") == []


@_SETTINGS
@given(text=_TEXT)
def test_sentencepiece_round_trip_any_text(tiny_sp_model, text):
    tok = build_tokenizer("SentencePieceTokenizer", tiny_sp_model)
    ids = tok.tokenize(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.detokenize(ids) == text


def test_sentencepiece_keeps_code_whitespace(tiny_sp_model):
    tok = build_tokenizer("SentencePieceTokenizer", tiny_sp_model)
    code = "def f(x):\n    if x:\n\t\treturn  x  # é\n"
    assert tok.detokenize(tok.tokenize(code)) == code
    # Merges learned on the training text: fewer tokens than bytes.
    assert len(tok.tokenize(code)) < len(code.encode("utf-8"))


def test_huggingface_specials_and_directory(tiny_hf_tokenizer):
    tok = build_tokenizer("HuggingFaceTokenizer", tiny_hf_tokenizer)
    same = build_tokenizer(
        "HuggingFaceTokenizer", os.path.join(tiny_hf_tokenizer, "tokenizer.json")
    )
    assert isinstance(tok, HuggingFaceTokenizer)
    # Special tokens were added first, in this order.
    assert (tok.bos, tok.eod, tok.token_to_id("<|eot_id|>")) == (0, 1, 2)
    assert tok.pad == tok.eod  # no pad token in the vocabulary
    assert tok.vocab_size == len(tok.vocab) == same.vocab_size
    assert tok.tokenize("héllo wörld") == same.tokenize("héllo wörld")
    assert tok.tokenize("<|end_of_text|>") == [tok.eod]


@_SETTINGS
@given(text=_TEXT)
def test_huggingface_round_trip_any_text(tiny_hf_tokenizer, text):
    tok = build_tokenizer("HuggingFaceTokenizer", tiny_hf_tokenizer)
    ids = tok.tokenize(text)
    assert tok.bos not in ids  # no BOS added
    assert tok.detokenize(ids) == text


def test_huggingface_without_eod_is_an_error(tmp_path):
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")).save(
        str(tmp_path / "tokenizer.json")
    )
    with pytest.raises(ValueError, match="no end-of-document token.*<\\|end_of_text\\|>"):
        build_tokenizer("HuggingFaceTokenizer", str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        build_tokenizer("HuggingFaceTokenizer", str(empty))
