"""Tokenizers with Megatron-LM core_v0.16.1's type names and ids, usable as megatron-core's
dataset tokenizer.

``build_tokenizer(tokenizer_type, tokenizer_model, **flags)`` accepts the ``--tokenizer-type``
values in ``TOKENIZER_TYPES`` and gives the ids, EOD, BOS and vocabulary size Megatron-LM gives
for the same files and flags, in its default tokenizer system or, with ``legacy=True``, its
``--legacy-tokenizer`` system (they differ: see ``sp_tokenizers``, ``hf_tokenizers``,
``misc_tokenizers``):

- ``SentencePieceTokenizer``, ``GPTSentencePieceTokenizer``, ``Llama2Tokenizer``: a
  SentencePiece ``.model``.
- ``HuggingFaceTokenizer``: a ``tokenizer.json`` (or its directory) with its
  ``tokenizer_config.json`` / ``special_tokens_map.json``, loaded with ``tokenizers`` alone.
- ``GPT2BPETokenizer``: ``vocab_file`` + ``merge_file``.
- ``TikTokenizer``: a tiktoken JSON vocabulary (needs the ``tiktoken`` package).
- ``NullTokenizer``: ids written as integers in the text; ``vocab_size`` is the EOD.
- ``ByteTokenizer`` (this project's, not Megatron-LM's): ids 0..255 are the UTF-8 bytes, then
  ``</s>`` (EOD), ``<s>`` (BOS) and ``<pad>``. Used by tests and the CPU quickstart.

Every tokenizer subclasses megatron-core's (legacy) tokenizer interface, so it can be passed as
``tokenizer=`` to ``GPTDatasetConfig``: ``tokenize``, ``detokenize``, ``vocab``, ``inv_vocab``,
``vocab_size``, ``eod``, ``bos`` (``None`` when there is none), ``pad`` (eod where Megatron-LM
reports -1 or None) and ``unique_identifiers`` (megatron-core hashes it into its index-cache
names). ``notes`` lists one-line remarks worth printing.
"""

from __future__ import annotations

import os

from megatron_endprompt.data.hf_tokenizers import (  # noqa: F401 (re-exported)
    HF_BOS_TOKENS,
    HF_EOD_TOKENS,
    HF_PAD_TOKENS,
    GPT2BPETokenizer,
    HuggingFaceTokenizer,
)
from megatron_endprompt.data.misc_tokenizers import NullTokenizer, TikTokenizer
from megatron_endprompt.data.sp_tokenizers import (
    GPTSentencePieceTokenizer,
    Llama2Tokenizer,
    SentencePieceTokenizer,
)
from megatron_endprompt.data.tokenizer_base import Tokenizer

TOKENIZER_TYPES = (
    "SentencePieceTokenizer",
    "GPTSentencePieceTokenizer",
    "Llama2Tokenizer",
    "HuggingFaceTokenizer",
    "GPT2BPETokenizer",
    "TikTokenizer",
    "NullTokenizer",
    "ByteTokenizer",
)
SENTENCEPIECE_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer")
MODEL_FILE_TYPES = (*SENTENCEPIECE_TYPES, "HuggingFaceTokenizer", "TikTokenizer")

# The DataConfig fields the tokenizer flags map to: (name, type, default, Megatron-LM flag, help).
DATA_CONFIG_FIELDS = (
    ("tokenizer_type", "str", None, "--tokenizer-type", f"One of {', '.join(TOKENIZER_TYPES)}."),
    ("tokenizer_model", "str | None", None, "--tokenizer-model",
     "SentencePiece .model, tokenizer.json or its directory, or a TikTokenizer .json."),
    ("legacy_tokenizer", "bool", False, "--legacy-tokenizer",
     "Megatron-LM's legacy tokenizer system (its ids, EOD and BOS rules differ)."),
    ("vocab_file", "str | None", None, "--vocab-file", "GPT2BPETokenizer vocab.json."),
    ("merge_file", "str | None", None, "--merge-file", "GPT2BPETokenizer merges.txt."),
    ("vocab_size", "int | None", None, "--vocab-size",
     "NullTokenizer: ids below it, EOD = it; TikTokenizer: vocabulary size (default 2**17)."),
    ("vocab_extra_ids", "int", 0, "--vocab-extra-ids",
     "Legacy SentencePieceTokenizer: <extra_id_0..N-1> appended to the vocabulary."),
    ("tokenizer_special_tokens", "list[str] | None", None, "--tokenizer-special-tokens",
     "HuggingFaceTokenizer / GPT2BPETokenizer (default system), TikTokenizer: special tokens."),
    ("tiktoken_pattern", "str | None", None, "--tiktoken-pattern",
     "TikTokenizer split pattern v1 or v2 (default v2; required with --legacy-tokenizer)."),
    ("tiktoken_num_special_tokens", "int", 1000, "--tiktoken-num-special-tokens",
     "TikTokenizer: ids reserved for special tokens below the BPE ranks."),
)  # fmt: skip


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


def _require_file(flag: str, path: str | None, tokenizer_type: str, directory_ok: bool) -> None:
    if not path:
        raise FileNotFoundError(f"--tokenizer-type {tokenizer_type} needs {flag}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{flag} {path}: no such file or directory")
    if os.path.isdir(path) and not directory_ok:
        raise FileNotFoundError(f"{flag} {path}: is a directory; expected a file")


def _construct(tokenizer_type: str, model: str | None, flags: dict) -> Tokenizer:
    legacy, special = flags["legacy"], flags["special_tokens"]
    if tokenizer_type in SENTENCEPIECE_TYPES:
        if special and not legacy:
            raise ValueError(
                f"--tokenizer-special-tokens: Megatron-LM's {tokenizer_type} accepts special "
                "tokens only with --tokenizer-sentencepiece-legacy (not supported here); give "
                "them to the SentencePiece trainer instead"
            )
        cls = {"SentencePieceTokenizer": SentencePieceTokenizer,
               "GPTSentencePieceTokenizer": GPTSentencePieceTokenizer,
               "Llama2Tokenizer": Llama2Tokenizer}[tokenizer_type]  # fmt: skip
        return cls(model, legacy=legacy, vocab_extra_ids=flags["vocab_extra_ids"])
    if tokenizer_type == "HuggingFaceTokenizer":
        if flags["vocab_file"] or flags["merge_file"]:
            raise ValueError(
                "--vocab-file/--merge-file are not supported with HuggingFaceTokenizer; "
                "give the tokenizer.json directory as --tokenizer-model"
            )
        return HuggingFaceTokenizer(model, legacy=legacy, special_tokens=special)
    if tokenizer_type == "GPT2BPETokenizer":
        return GPT2BPETokenizer(flags["vocab_file"], flags["merge_file"], legacy, special)
    if tokenizer_type == "TikTokenizer":
        return TikTokenizer(model, legacy=legacy, vocab_size=flags["vocab_size"],
                            num_special_tokens=flags["tiktoken_num_special_tokens"],
                            special_tokens=special, pattern=flags["tiktoken_pattern"])  # fmt: skip
    if tokenizer_type == "NullTokenizer":
        return NullTokenizer(flags["vocab_size"])
    return ByteTokenizer()


def _notes(tok: Tokenizer, tokenizer_type: str, flags: dict) -> None:
    """The remarks Megatron-LM users need: flags without effect, EOD ids that differ by system."""
    legacy_sp = tokenizer_type == "SentencePieceTokenizer" and flags["legacy"]
    if flags["vocab_extra_ids"] and not legacy_sp:
        tok.notes.append(
            f"--vocab-extra-ids has no effect with {tokenizer_type}"
            + ("" if flags["legacy"] else " without --legacy-tokenizer")
        )
    if flags["special_tokens"] and tokenizer_type in ("NullTokenizer", "ByteTokenizer"):
        tok.notes.append(f"--tokenizer-special-tokens has no effect with {tokenizer_type}")
    if flags["special_tokens"] and legacy_sp:
        tok.notes.append("--tokenizer-special-tokens has no effect with --legacy-tokenizer "
                         "SentencePieceTokenizer (as in Megatron-LM)")  # fmt: skip
    if tokenizer_type == "SentencePieceTokenizer":
        tok.notes.append(
            f"SentencePieceTokenizer {'with' if legacy_sp else 'without'} --legacy-tokenizer: "
            f"EOD = {tok.eod}, vocabulary {tok.vocab_size}; data made "
            f"{'without' if legacy_sp else 'with'} --legacy-tokenizer has another EOD id "
            "(<EOD> above the pieces vs </s>), so use the same setting for preprocessing "
            "and training"
        )
    if flags["legacy"] and tokenizer_type in ("Llama2Tokenizer", "HuggingFaceTokenizer"):
        tok.notes.append(f"--legacy-tokenizer {tokenizer_type}: every document starts with "
                         "the BOS token (Megatron-LM's default system adds none)")  # fmt: skip


def build_tokenizer(
    tokenizer_type: str,
    tokenizer_model: str | None = None,
    *,
    legacy: bool = False,
    vocab_file: str | None = None,
    merge_file: str | None = None,
    vocab_size: int | None = None,
    vocab_extra_ids: int = 0,
    special_tokens: list[str] | tuple[str, ...] | None = None,
    tiktoken_pattern: str | None = None,
    tiktoken_num_special_tokens: int = 1000,
) -> Tokenizer:
    """Build a tokenizer from Megatron-LM's tokenizer flags (see ``DATA_CONFIG_FIELDS``).

    Args:
        tokenizer_type: One of ``TOKENIZER_TYPES`` (``--tokenizer-type``).
        tokenizer_model: ``--tokenizer-model`` (SentencePiece ``.model``; HF ``tokenizer.json``
            or its directory; TikTokenizer ``.json``).
        legacy: ``--legacy-tokenizer`` (Megatron-LM's legacy system).
        vocab_file, merge_file: ``--vocab-file`` / ``--merge-file`` (GPT2BPETokenizer).
        vocab_size: ``--vocab-size`` (NullTokenizer, TikTokenizer).
        vocab_extra_ids: ``--vocab-extra-ids`` (legacy SentencePieceTokenizer).
        special_tokens: ``--tokenizer-special-tokens``.
        tiktoken_pattern, tiktoken_num_special_tokens: the TikTokenizer flags.

    Returns:
        The tokenizer; its ``notes`` hold remarks worth printing.

    Raises:
        ValueError: Unknown type, bad flag values, or a model without an end-of-document token.
        FileNotFoundError: A model or vocabulary file missing or not found.
    """
    if tokenizer_type not in TOKENIZER_TYPES:
        raise ValueError(
            f"--tokenizer-type {tokenizer_type!r} is not supported; valid: "
            f"{', '.join(TOKENIZER_TYPES)}"
        )
    if vocab_extra_ids < 0:
        raise ValueError(f"--vocab-extra-ids must be >= 0, got {vocab_extra_ids}")
    if tokenizer_type in MODEL_FILE_TYPES:
        _require_file("--tokenizer-model", tokenizer_model, tokenizer_type,
                      directory_ok=tokenizer_type == "HuggingFaceTokenizer")  # fmt: skip
    if tokenizer_type == "GPT2BPETokenizer":
        _require_file("--vocab-file", vocab_file, tokenizer_type, directory_ok=False)
        _require_file("--merge-file", merge_file, tokenizer_type, directory_ok=False)
    flags = dict(legacy=legacy, vocab_file=vocab_file, merge_file=merge_file,
                 vocab_size=vocab_size, vocab_extra_ids=vocab_extra_ids,
                 special_tokens=list(special_tokens) if special_tokens else None,
                 tiktoken_pattern=tiktoken_pattern,
                 tiktoken_num_special_tokens=tiktoken_num_special_tokens)  # fmt: skip
    try:
        tok = _construct(tokenizer_type, tokenizer_model, flags)
    except (ValueError, OSError):
        raise
    except Exception as err:  # the libraries raise RuntimeError / bare Exception on bad files
        flag, source = ("--tokenizer-model", tokenizer_model) if tokenizer_model else (
            "--vocab-file", vocab_file)  # fmt: skip
        raise ValueError(f"{flag} {source}: cannot load as {tokenizer_type}: {err}") from err
    _notes(tok, tokenizer_type, flags)
    return tok
