"""Megatron-LM core_v0.16.1's tokenizer types: ids, EOD/BOS/pad and vocabulary sizes.

The facts below were read from Megatron-LM core_v0.16.1 (megatron/training/tokenizer/
tokenizer.py for --legacy-tokenizer, megatron/core/tokenizers/ for the default system) and
checked by running it on the same files; the expected ids come from the sentencepiece /
tokenizers / transformers libraries directly, never from our classes.
"""

from __future__ import annotations

import pytest
import sentencepiece as spm

from megatron_endprompt.data.tokenizers import (
    DATA_CONFIG_FIELDS,
    TOKENIZER_TYPES,
    build_tokenizer,
)

SP_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer")
TEXTS = ["hello world", "a  b\n\tc", "x</s>y<EOD>z <s> q", "<|eot_id|> done", " lead"]


@pytest.fixture(scope="module")
def nopad_sp_model(tmp_path_factory):
    """A SentencePiece model with sentencepiece's default ids: unk 0, bos 1, eos 2, no pad."""
    d = tmp_path_factory.mktemp("nopad")
    text = "the quick brown fox jumps over the lazy dog; hello world, x y z q!\n" * 40
    (d / "t.txt").write_text(text, encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(d / "t.txt"), model_prefix=str(d / "m"),
                                   vocab_size=300, model_type="bpe", byte_fallback=True,
                                   minloglevel=2)  # fmt: skip
    return str(d / "m.model")


def test_type_names_are_megatrons():
    # Megatron-LM's --tokenizer-type choices that are text tokenizers, plus our ByteTokenizer.
    assert set(TOKENIZER_TYPES) == {*SP_TYPES, "HuggingFaceTokenizer", "GPT2BPETokenizer",
                                    "TikTokenizer", "NullTokenizer", "ByteTokenizer"}  # fmt: skip
    flags = {f[3]: f for f in DATA_CONFIG_FIELDS}
    assert flags["--legacy-tokenizer"][2] is False  # Megatron-LM's default: the new system
    assert flags["--vocab-extra-ids"][2] == 0
    assert flags["--tiktoken-num-special-tokens"][2] == 1000


@pytest.mark.parametrize("kind", SP_TYPES)
def test_default_system_sentencepiece_is_plain(kind, tiny_sp_model):
    sp = spm.SentencePieceProcessor(model_file=tiny_sp_model)
    tok = build_tokenizer(kind, tiny_sp_model)
    assert (tok.vocab_size, tok.eod, tok.bos, tok.pad) == (400, 2, 1, 3)
    for text in TEXTS:
        assert tok.tokenize(text) == sp.encode(text)


def test_legacy_sentencepiece_appends_specials(tiny_sp_model):
    sp = spm.SentencePieceProcessor(model_file=tiny_sp_model)
    tok = build_tokenizer("SentencePieceTokenizer", tiny_sp_model, legacy=True)
    # <CLS> <SEP> <EOD> <MASK> above the 400 pieces; the model's <pad> <s> </s> keep their ids.
    assert [tok.token_to_id(t) for t in ("<CLS>", "<SEP>", "<EOD>", "<MASK>")] == [
        400, 401, 402, 403]  # fmt: skip
    assert (tok.vocab_size, tok.eod, tok.eos, tok.bos, tok.pad) == (404, 402, 2, 1, 3)
    # Special names in the text become their ids; the text between is encoded piece by piece.
    expected = [*sp.encode("x"), 2, *sp.encode("y"), 402, *sp.encode("z "), 1, *sp.encode(" q")]
    assert tok.tokenize("x</s>y<EOD>z <s> q") == expected
    assert tok.tokenize("hello world") == sp.encode("hello world")
    assert tok.detokenize(tok.tokenize("ab<EOD>")) == "ab <EOD>"


def test_legacy_sentencepiece_without_pad_and_extra_ids(nopad_sp_model):
    tok = build_tokenizer("SentencePieceTokenizer", nopad_sp_model, legacy=True,
                          vocab_extra_ids=3)  # fmt: skip
    order = ["<CLS>", "<SEP>", "<EOD>", "<MASK>", "<PAD>", "<extra_id_0>", "<extra_id_1>",
             "<extra_id_2>"]  # fmt: skip
    assert [tok.token_to_id(t) for t in order] == list(range(300, 308))
    assert (tok.vocab_size, tok.eod, tok.pad, tok.bos, tok.eos) == (308, 302, 304, 1, 2)
    assert tok.extra_ids == [305, 306, 307]
    # The other types ignore --vocab-extra-ids (as Megatron-LM) and say so.
    plain = build_tokenizer("SentencePieceTokenizer", nopad_sp_model, vocab_extra_ids=3)
    assert plain.vocab_size == 300 and plain.eod == 2
    assert plain.pad == 2  # Megatron-LM reports -1 (no pad piece); we pad with EOD
    assert any("--vocab-extra-ids has no effect" in n for n in plain.notes)


def test_legacy_gpt_sentencepiece_and_llama2(nopad_sp_model):
    sp = spm.SentencePieceProcessor(model_file=nopad_sp_model)
    gpt = build_tokenizer("GPTSentencePieceTokenizer", nopad_sp_model, legacy=True)
    llama = build_tokenizer("Llama2Tokenizer", nopad_sp_model, legacy=True)
    for tok in (gpt, llama):
        assert (tok.vocab_size, tok.eod) == (300, 2)
    for text in TEXTS:
        assert gpt.tokenize(text) == sp.encode(text)
        assert llama.tokenize(text) == [1, *sp.encode(text)]  # legacy Llama2: BOS first
    assert llama.tokenize("") == [1]
    assert any("starts with the BOS" in n for n in llama.notes)


def test_sentencepiece_notes_name_the_other_eod(tiny_sp_model):
    default = build_tokenizer("SentencePieceTokenizer", tiny_sp_model)
    legacy = build_tokenizer("SentencePieceTokenizer", tiny_sp_model, legacy=True)
    assert any("without --legacy-tokenizer: EOD = 2" in n for n in default.notes)
    assert any("with --legacy-tokenizer: EOD = 402" in n for n in legacy.notes)


def test_sentencepiece_special_tokens_need_sentencepiece_legacy(tiny_sp_model):
    with pytest.raises(ValueError, match="--tokenizer-special-tokens.*sentencepiece-legacy"):
        build_tokenizer("SentencePieceTokenizer", tiny_sp_model, special_tokens=["<A>"])
    tok = build_tokenizer("SentencePieceTokenizer", tiny_sp_model, legacy=True,
                          special_tokens=["<A>"])  # fmt: skip
    assert tok.vocab_size == 404  # ignored by the legacy system
    assert any("--tokenizer-special-tokens has no effect" in n for n in tok.notes)


def test_unique_identifiers_tell_systems_apart(tiny_sp_model):
    a = build_tokenizer("SentencePieceTokenizer", tiny_sp_model).unique_identifiers
    b = build_tokenizer("SentencePieceTokenizer", tiny_sp_model, legacy=True).unique_identifiers
    assert "legacy" not in a and b["legacy"] is True  # default cache names unchanged


def test_null_tokenizer():
    tok = build_tokenizer("NullTokenizer", vocab_size=1000)
    assert tok.tokenize("5 17 3") == [5, 17, 3]
    assert (tok.eod, tok.vocab_size, tok.bos) == (1000, 1001, None)
    assert tok.detokenize([5, 17]) == "5 17"
    for bad in ("hello", " 5", "5  6", "1001", "-1"):
        with pytest.raises(ValueError, match="NullTokenizer"):
            tok.tokenize(bad)
    with pytest.raises(ValueError, match="--vocab-size"):
        build_tokenizer("NullTokenizer")
