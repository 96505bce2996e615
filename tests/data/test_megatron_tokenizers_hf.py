"""HuggingFaceTokenizer (eos_token from the config files, checked against transformers),
GPT2BPETokenizer (Megatron-LM's legacy GPT-2 BPE ids) and TikTokenizer."""

from __future__ import annotations

import base64
import json
import shutil

import pytest

from megatron_endprompt.data.tokenizers import build_tokenizer

TEXTS = ["hello world", "a  b\n\tc", "<|eot_id|> done<X>", " lead", "hé <|end_of_text|>!"]


@pytest.fixture
def llama3_dir(tmp_path, tiny_hf_tokenizer):
    """The tiny tokenizer.json with a Llama-3-Instruct style config: eos_token <|eot_id|>."""
    from tokenizers import Tokenizer, processors

    tok = Tokenizer.from_file(f"{tiny_hf_tokenizer}/tokenizer.json")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)]
    )
    tok.save(str(tmp_path / "tokenizer.json"))
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
              "tokenizer_class": "PreTrainedTokenizerFast"}  # fmt: skip
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return str(tmp_path)


def _auto(path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(path)


def test_eod_is_the_configs_eos_token_as_transformers(llama3_dir):
    ref = _auto(llama3_dir)
    tok = build_tokenizer("HuggingFaceTokenizer", llama3_dir)
    assert tok.eod == ref.eos_token_id == 2  # <|eot_id|>, not <|end_of_text|> (1)
    assert tok.bos == ref.bos_token_id == 0
    assert tok.vocab_size == len(ref)
    assert tok.notes == []
    for text in TEXTS:
        # Megatron-LM's default system: tokenize + convert_tokens_to_ids (no BOS).
        assert tok.tokenize(text) == ref.convert_tokens_to_ids(ref.tokenize(text))
    legacy = build_tokenizer("HuggingFaceTokenizer", llama3_dir, legacy=True)
    for text in TEXTS:
        assert legacy.tokenize(text) == ref(text).input_ids  # legacy: tokenizer(text), BOS first
    assert legacy.tokenize("")[0] == 0


def test_special_tokens_map_overrides_config(llama3_dir):
    with open(f"{llama3_dir}/special_tokens_map.json", "w") as f:
        json.dump({"eos_token": {"content": "<|end_of_text|>", "lstrip": False},
                   "pad_token": "<|eot_id|>"}, f)  # fmt: skip
    ref = _auto(llama3_dir)
    tok = build_tokenizer("HuggingFaceTokenizer", llama3_dir)
    assert (tok.eod, tok.pad) == (ref.eos_token_id, ref.pad_token_id) == (1, 2)


def test_eos_token_missing_from_vocab_is_added_as_transformers(llama3_dir):
    with open(f"{llama3_dir}/tokenizer_config.json", "w") as f:
        json.dump({"eos_token": "<new_eos>", "tokenizer_class": "PreTrainedTokenizerFast"}, f)
    ref = _auto(llama3_dir)
    tok = build_tokenizer("HuggingFaceTokenizer", llama3_dir)
    assert tok.eod == ref.eos_token_id and tok.vocab_size == len(ref)
    assert tok.tokenize("a<new_eos>b") == ref.convert_tokens_to_ids(ref.tokenize("a<new_eos>b"))


def test_special_tokens_flag_adds_in_order(llama3_dir):
    ref = _auto(llama3_dir)
    n = len(ref)
    tok = build_tokenizer("HuggingFaceTokenizer", llama3_dir,
                          special_tokens=["<X>", "<|eot_id|>", "<Y>"])  # fmt: skip
    # Megatron-LM (default system): new names get the next ids, known ones keep theirs.
    assert (tok.token_to_id("<X>"), tok.token_to_id("<Y>"), tok.vocab_size) == (n, n + 1, n + 2)
    assert tok.tokenize("done<X>")[-1] == n
    legacy = build_tokenizer("HuggingFaceTokenizer", llama3_dir, legacy=True,
                             special_tokens=["<X>"])  # fmt: skip
    assert legacy.vocab_size == n and any("no effect" in x for x in legacy.notes)


def test_no_config_falls_back_with_a_note(tiny_hf_tokenizer):
    tok = build_tokenizer("HuggingFaceTokenizer", tiny_hf_tokenizer)
    assert tok.eod == 1 and any("EOD would be None" in n for n in tok.notes)


def test_bad_config_names_the_file(llama3_dir):
    with open(f"{llama3_dir}/tokenizer_config.json", "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        build_tokenizer("HuggingFaceTokenizer", llama3_dir)


def _bytes_to_unicode() -> list[str]:
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


MERGES = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("Ġ", "w"), ("o", "r"),
          ("Ġw", "or"), ("l", "d"), ("Ġwor", "ld"), ("'", "s"), ("Ġ", "Ġ"), ("Ġ", "1"),
          ("2", "3")]  # fmt: skip


@pytest.fixture
def gpt2_files(tmp_path):
    """A GPT-2 vocab.json (byte b has id b, then the merges, then <|endoftext|>) + merges.txt."""
    vocab = {c: i for i, c in enumerate(_bytes_to_unicode())}
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES)
    )
    return str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")


# Megatron-LM's legacy _GPT2BPETokenizer (gpt2_tokenization.GPT2Tokenizer) on gpt2_files.
GPT2_LEGACY_IDS = {
    "hello world": [259, 264],
    "he's  world's 123\n": [256, 265, 32, 264, 265, 267, 268, 10],
    "x<|endoftext|>y": [120, 60, 124, 101, 110, 100, 111, 102, 116, 101, 120, 116, 124, 62, 121],
    "héllo  wörld\t!": [104, 195, 169, 257, 111, 32, 260, 195, 182, 114, 263, 9, 33],
    "": [],
}


def test_gpt2_bpe_legacy_ids(gpt2_files):
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=gpt2_files[0],
                          merge_file=gpt2_files[1], legacy=True)  # fmt: skip
    assert (tok.eod, tok.vocab_size, tok.bos) == (269, 270, None)
    for text, ids in GPT2_LEGACY_IDS.items():
        assert tok.tokenize(text) == ids
        assert tok.detokenize(ids) == text


def test_gpt2_bpe_default_system_as_transformers(gpt2_files):
    transformers = pytest.importorskip("transformers")
    ref = transformers.GPT2Tokenizer(*gpt2_files)
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=gpt2_files[0], merge_file=gpt2_files[1])
    for text in GPT2_LEGACY_IDS:
        assert tok.tokenize(text) == ref.convert_tokens_to_ids(ref.tokenize(text))
    assert tok.tokenize("x<|endoftext|>y") == [120, 269, 121]  # the EOD, as HF's GPT-2


def test_gpt2_bpe_needs_both_files(gpt2_files, tmp_path):
    with pytest.raises(FileNotFoundError, match="--merge-file"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=gpt2_files[0])
    vocab = json.loads(open(gpt2_files[0]).read())
    del vocab["<|endoftext|>"]
    (tmp_path / "v2.json").write_text(json.dumps(vocab))
    with pytest.raises(ValueError, match="--vocab-file .*<\\|endoftext\\|>"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=str(tmp_path / "v2.json"),
                        merge_file=gpt2_files[1])  # fmt: skip


@pytest.fixture
def tiktoken_json(tmp_path):
    pieces = [bytes([i]) for i in range(256)] + [b"he", b"ll", b"hell", b"hello", b" w", b"or",
                                                  b" wor", b"ld", b" world", b"  "]  # fmt: skip
    entries = [{"rank": i, "token_bytes": base64.b64encode(p).decode(), "token_str": ""}
               for i, p in enumerate(pieces)]  # fmt: skip
    (tmp_path / "tt.json").write_text(json.dumps(entries))
    return str(tmp_path / "tt.json")


def test_tiktokenizer_ids(tiktoken_json):
    pytest.importorskip("tiktoken")
    kw = dict(vocab_size=276, tiktoken_num_special_tokens=10)
    tok = build_tokenizer("TikTokenizer", tiktoken_json, **kw)
    legacy = build_tokenizer(
        "TikTokenizer", tiktoken_json, legacy=True, tiktoken_pattern="v2", **kw
    )
    # Megatron-LM's ids: 10 special ids first, then the ranks (byte b -> b + 10).
    for t in (tok, legacy):
        assert (t.eod, t.bos, t.vocab_size) == (2, 1, 276)
        assert t.tokenize("hello world") == [269, 274]
        assert t.tokenize("hello  world!\n") == [269, 42, 274, 43, 20]
    assert tok.pad == 4
    assert tok.tokenize("x</s>y") == [130, 2, 131]  # default system: special names are ids
    assert legacy.tokenize("x</s>y") == [130, 70, 57, 125, 72, 131]
    with pytest.raises(ValueError, match="--tiktoken-pattern"):
        build_tokenizer("TikTokenizer", tiktoken_json, legacy=True, **kw)
    with pytest.raises(ValueError, match="--vocab-size"):
        build_tokenizer("TikTokenizer", tiktoken_json, vocab_size=300,
                        tiktoken_num_special_tokens=10)  # fmt: skip


def test_tiktokenizer_without_package_is_refused(tiktoken_json, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_tiktoken(name, *args, **kwargs):
        if name == "tiktoken":
            raise ImportError("no tiktoken")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tiktoken)
    with pytest.raises(ValueError, match="needs the tiktoken package"):
        build_tokenizer("TikTokenizer", tiktoken_json)


def test_copy_of_directory_keeps_ids(llama3_dir, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("copy")
    (tmp_path / "copy").mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{llama3_dir}/{name}", tmp_path / "copy" / name)
    a = build_tokenizer("HuggingFaceTokenizer", llama3_dir)
    b = build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "copy" / "tokenizer.json"))
    assert (a.eod, a.tokenize("hello")) == (b.eod, b.tokenize("hello"))
