"""Tokenizers with Megatron-LM's type names, usable as megatron-core's dataset tokenizer.

``build_tokenizer(tokenizer_type, tokenizer_model)`` accepts the ``--tokenizer-type`` values
Megatron-LM uses for the same files:

- ``SentencePieceTokenizer``: a SentencePiece ``.model`` file (Llama 2 style; or one trained by
  ``tools/train_tokenizer.py``).
- ``HuggingFaceTokenizer``: a ``tokenizer.json`` file, or a directory holding one (Llama 3 style),
  loaded with the ``tokenizers`` library alone.
- ``ByteTokenizer``: no model file; ids 0..255 are the UTF-8 bytes, then ``</s>`` (EOD), ``<s>``
  (BOS) and ``<pad>``. Used by tests and the CPU quickstart.

Every tokenizer subclasses megatron-core's (legacy) tokenizer interface, so it can be passed as
``tokenizer=`` to ``GPTDatasetConfig``: ``tokenize`` (never adds BOS), ``detokenize``,
``vocab``, ``inv_vocab``, ``vocab_size``, ``eod``, ``bos`` (``None`` when the vocabulary has
none), ``pad`` and ``unique_identifiers`` (megatron-core hashes it into its index-cache names).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any

from megatron.core.datasets.megatron_tokenizer import MegatronLegacyTokenizer

TOKENIZER_TYPES = ("SentencePieceTokenizer", "HuggingFaceTokenizer", "ByteTokenizer")

# The end-of-document token of a Hugging Face tokenizer: first of these present in its vocab
# (Llama 3, Llama 2 / Mistral, GPT-2 / Qwen, Gemma).
HF_EOD_TOKENS = ("<|end_of_text|>", "</s>", "<|endoftext|>", "<eos>")
HF_BOS_TOKENS = ("<|begin_of_text|>", "<s>", "<bos>")
HF_PAD_TOKENS = ("<pad>", "<|finetune_right_pad_id|>", "<|pad|>")


class Tokenizer(MegatronLegacyTokenizer):
    """Common base: identity for megatron-core's cache hashing and special-token lookup."""

    def __init__(self, tokenizer_model: str | None) -> None:
        # Set the identifiers directly rather than calling the legacy __init__, which only adds a
        # deprecation log line aimed at Megatron-LM's own tokenizer zoo.
        self.unique_identifiers: OrderedDict[str, Any] = OrderedDict()
        self.unique_identifiers["class"] = type(self).__name__
        self.unique_identifiers["tokenizer_path"] = [tokenizer_model] if tokenizer_model else []
        self.tokenizer_model = tokenizer_model

    @property
    def inv_vocab(self) -> dict[int, str]:
        """Dictionary from token id to token text (built once: vocabularies reach 128k+)."""
        if getattr(self, "_inv_vocab", None) is None:
            self._inv_vocab = {i: t for t, i in self.vocab.items()}
        return self._inv_vocab

    @property
    def eos(self) -> int:
        """The end-of-sequence id (the same token as ``eod``)."""
        return self.eod

    def token_to_id(self, token: str) -> int | None:
        """The id of one token (e.g. a special token such as ``<|eot_id|>``), or None."""
        return self.vocab.get(token)

    def require_bos(self) -> int:
        """The BOS id, or a ValueError when this vocabulary has no BOS token."""
        if self.bos is None:
            raise ValueError(f"{type(self).__name__} ({self.tokenizer_model}) has no BOS token")
        return self.bos


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, then ``</s>`` = 256 (EOD), ``<s>`` = 257, ``<pad>`` = 258."""

    EOD, BOS, PAD = 256, 257, 258

    def __init__(self) -> None:
        super().__init__(None)
        self._vocab = {f"<0x{b:02X}>": b for b in range(256)}
        self._vocab.update({"</s>": self.EOD, "<s>": self.BOS, "<pad>": self.PAD})

    def tokenize(self, text: str) -> list[int]:
        """The UTF-8 bytes of ``text``."""
        return list(text.encode("utf-8"))

    def detokenize(self, ids) -> str:
        """Decode byte ids; special ids are dropped, invalid UTF-8 becomes U+FFFD."""
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")

    @property
    def vocab(self) -> dict[str, int]:
        """Dictionary from token text to id (bytes are spelled ``<0xNN>``)."""
        return self._vocab

    @property
    def vocab_size(self) -> int:
        """259: 256 bytes and three special tokens."""
        return 259

    @property
    def eod(self) -> int:
        """The end-of-document id."""
        return self.EOD

    @property
    def bos(self) -> int:
        """The beginning-of-sequence id."""
        return self.BOS

    @property
    def pad(self) -> int:
        """The padding id."""
        return self.PAD


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``.model``: eod = the ``</s>`` id, bos = ``<s>``, pad = ``<pad>`` or eod."""

    def __init__(self, tokenizer_model: str) -> None:
        import sentencepiece as spm

        super().__init__(tokenizer_model)
        self._sp = spm.SentencePieceProcessor(model_file=tokenizer_model)
        if self._sp.eos_id() < 0:
            raise ValueError(f"--tokenizer-model {tokenizer_model}: the model has no </s> piece")
        self._vocab = {self._sp.id_to_piece(i): i for i in range(self._sp.get_piece_size())}

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS, no EOS)."""
        return self._sp.encode(text, out_type=int)

    def detokenize(self, ids) -> str:
        """The text of ``ids``."""
        return self._sp.decode([int(i) for i in ids])

    @property
    def vocab(self) -> dict[str, int]:
        """Dictionary from piece to id."""
        return self._vocab

    @property
    def vocab_size(self) -> int:
        """Number of pieces."""
        return self._sp.get_piece_size()

    @property
    def eod(self) -> int:
        """The ``</s>`` id."""
        return self._sp.eos_id()

    @property
    def bos(self) -> int | None:
        """The ``<s>`` id, or None when the model has no BOS piece."""
        return self._sp.bos_id() if self._sp.bos_id() >= 0 else None

    @property
    def pad(self) -> int:
        """The ``<pad>`` id, or eod when the model has no pad piece (as Megatron-LM)."""
        return self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eod


class HuggingFaceTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json`` (file or directory), via the ``tokenizers`` library."""

    def __init__(self, tokenizer_model: str) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        path = tokenizer_model
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"--tokenizer-model {tokenizer_model}: directory has no tokenizer.json"
                )
        super().__init__(tokenizer_model)
        self._tok = HFTokenizer.from_file(path)
        self._vocab = self._tok.get_vocab(with_added_tokens=True)
        self._eod = self._first_present(HF_EOD_TOKENS)
        if self._eod is None:
            raise ValueError(
                f"--tokenizer-model {tokenizer_model}: no end-of-document token; expected one "
                f"of {', '.join(HF_EOD_TOKENS)}"
            )
        self._bos = self._first_present(HF_BOS_TOKENS)
        self._pad = self._first_present(HF_PAD_TOKENS)

    def _first_present(self, names: tuple[str, ...]) -> int | None:
        for name in names:
            if name in self._vocab:
                return self._vocab[name]
        return None

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` without the tokenizer's post-processor specials (no BOS)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids) -> str:
        """The text of ``ids`` (special tokens kept)."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def vocab(self) -> dict[str, int]:
        """Dictionary from token to id, added tokens included."""
        return self._vocab

    @property
    def vocab_size(self) -> int:
        """Vocabulary size, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eod(self) -> int:
        """The end-of-document id (first of ``HF_EOD_TOKENS`` present)."""
        return self._eod

    @property
    def bos(self) -> int | None:
        """The BOS id (first of ``HF_BOS_TOKENS`` present), or None."""
        return self._bos

    @property
    def pad(self) -> int:
        """The pad id (first of ``HF_PAD_TOKENS`` present), else eod."""
        return self._pad if self._pad is not None else self._eod


def build_tokenizer(tokenizer_type: str, tokenizer_model: str | None = None) -> Tokenizer:
    """Build a tokenizer from Megatron-LM's ``--tokenizer-type`` / ``--tokenizer-model``.

    Args:
        tokenizer_type: One of ``TOKENIZER_TYPES``.
        tokenizer_model: Model file (SentencePiece ``.model``; HF ``tokenizer.json`` or its
            directory). Ignored by ``ByteTokenizer``.

    Returns:
        The tokenizer.

    Raises:
        ValueError: Unknown ``tokenizer_type``, or a model without an end-of-document token.
        FileNotFoundError: ``tokenizer_model`` missing or not found.
    """
    if tokenizer_type not in TOKENIZER_TYPES:
        raise ValueError(
            f"--tokenizer-type {tokenizer_type!r} is not supported; valid: "
            f"{', '.join(TOKENIZER_TYPES)}"
        )
    if tokenizer_type == "ByteTokenizer":
        return ByteTokenizer()
    if not tokenizer_model:
        raise FileNotFoundError(f"--tokenizer-type {tokenizer_type} needs --tokenizer-model")
    if not os.path.exists(tokenizer_model):
        raise FileNotFoundError(f"--tokenizer-model {tokenizer_model}: no such file or directory")
    if tokenizer_type == "SentencePieceTokenizer" and os.path.isdir(tokenizer_model):
        raise FileNotFoundError(
            f"--tokenizer-model {tokenizer_model}: is a directory; expected a .model file"
        )
    cls = (
        SentencePieceTokenizer
        if tokenizer_type == "SentencePieceTokenizer"
        else HuggingFaceTokenizer
    )
    try:
        return cls(tokenizer_model)
    except (ValueError, OSError):
        raise
    except Exception as err:  # the libraries raise RuntimeError / bare Exception on bad files
        raise ValueError(
            f"--tokenizer-model {tokenizer_model}: cannot load as {tokenizer_type}: {err}"
        ) from err
