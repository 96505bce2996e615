"""Shared fixtures: tokenizers (byte, tiny SentencePiece, tiny Hugging Face) and a JSONL writer."""

from __future__ import annotations

import json
import os
import sysconfig

import pytest

from megatron_endprompt.data.tokenizers import ByteTokenizer

# A few KB of real text with indentation, digits and non-ASCII, for training tiny tokenizers.
_EXTRA_TEXT = "héllo wörld, naïve café 世界 — ünïcödé\n\tindented\n" * 20


def _training_text() -> str:
    with open(os.path.join(sysconfig.get_paths()["stdlib"], "json", "encoder.py")) as f:
        return f.read()[:6000] + _EXTRA_TEXT


@pytest.fixture
def byte_tokenizer() -> ByteTokenizer:
    """The byte-level tokenizer (eod=256, bos=257, pad=258)."""
    return ByteTokenizer()


@pytest.fixture
def make_jsonl(tmp_path):
    """``make_jsonl(lines, name="in.jsonl") -> path``: dicts are JSON-encoded, str/bytes raw."""

    def make(lines, name: str = "in.jsonl") -> str:
        path = tmp_path / name
        with open(path, "wb") as f:
            for line in lines:
                if isinstance(line, dict):
                    line = json.dumps(line)
                if isinstance(line, str):
                    line = line.encode("utf-8")
                f.write(line + b"\n")
        return str(path)

    return make


@pytest.fixture(scope="session")
def tiny_sp_model(tmp_path_factory) -> str:
    """Path of a 400-piece byte-fallback SentencePiece BPE model trained on a few KB."""
    from megatron_endprompt.prep.tokenizer_training import train_sentencepiece

    d = tmp_path_factory.mktemp("spm")
    (d / "train.txt").write_text(_training_text(), encoding="utf-8")
    return train_sentencepiece([str(d / "train.txt")], str(d / "tiny"), vocab_size=400).model_path


@pytest.fixture(scope="session")
def tiny_hf_tokenizer(tmp_path_factory) -> str:
    """Directory holding a tiny byte-level BPE ``tokenizer.json`` with Llama 3 special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_text().split("\n"), trainer=trainer)
    d = tmp_path_factory.mktemp("hf")
    tok.save(str(d / "tokenizer.json"))
    return str(d)


@pytest.fixture(scope="session")
def single_process_parallel_state():
    """A 1-rank gloo group with megatron's parallel state (TP = PP = CP = 1).

    Model builders never start distributed state themselves; tests that build a model in this
    process ask for it. Left in place for the session (other modules use the same state).
    """
    from megatron_endprompt import device

    device.init_distributed("gloo", rank=0, world_size=1)
    device.initialize_model_parallel()
