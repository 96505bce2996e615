"""Hugging Face ``tokenizer.json`` and GPT-2 BPE tokenizers with Megatron-LM core_v0.16.1's ids.

``HuggingFaceTokenizer``: Megatron-LM loads the directory with ``transformers.AutoTokenizer``
in both systems, so its EOD is the tokenizer's ``eos_token`` (legacy ``_HuggingFaceTokenizer.eod``
= ``eos_token_id``; the default system's ``HuggingFaceTokenizer.eod`` = the id of ``eos_token``).
``transformers`` takes the special tokens from ``tokenizer_config.json``, then lets
``special_tokens_map.json`` override them; we read the same two files beside ``tokenizer.json``
and load the vocabulary with the ``tokenizers`` library alone. Ids: the default system encodes
without the post-processor's specials (no BOS); ``--legacy-tokenizer`` calls the tokenizer
(``tokenizer(text).input_ids``), so the post-processor's BOS comes first.

``GPT2BPETokenizer``: ``--vocab-file`` (``vocab.json``) and ``--merge-file`` (``merges.txt``),
byte-level BPE with GPT-2's pre-tokenizer; EOD is ``<|endoftext|>``. Legacy encodes
``<|endoftext|>`` written in the text as ordinary text; the default system (Hugging Face's GPT-2
tokenizer) turns it into the EOD id.
"""

from __future__ import annotations

import json
import os

from megatron_endprompt.data.tokenizer_base import EodOnlyTokenizer, Tokenizer

# Last resort when neither config file names an eos_token (Megatron-LM's EOD would be None):
# the first of these present (Llama 3, Llama 2 / Mistral, GPT-2 / Qwen, Gemma).
HF_EOD_TOKENS = ("<|end_of_text|>", "</s>", "<|endoftext|>", "<eos>")
HF_BOS_TOKENS = ("<|begin_of_text|>", "<s>", "<bos>")
HF_PAD_TOKENS = ("<pad>", "<|finetune_right_pad_id|>", "<|pad|>")
SPECIAL_ATTRIBUTES = (
    "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"
)  # fmt: skip
"""transformers' ``SPECIAL_TOKENS_ATTRIBUTES`` order (also the order missing ones are added)."""
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")
"""Read in this order; a key in a later file overrides (as ``transformers``)."""


def read_special_tokens(directory: str) -> dict[str, dict]:
    """``{attribute: {"content": ..., ...}}`` named by the config files in ``directory``."""
    found: dict[str, dict] = {}
    for name in CONFIG_FILES:
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError) as err:
            raise ValueError(f"--tokenizer-model: cannot read {path}: {err}") from err
        if not isinstance(config, dict):
            raise ValueError(f"--tokenizer-model: {path} is not a JSON object")
        for attr in SPECIAL_ATTRIBUTES:
            if attr not in config:
                continue
            value = config[attr]
            if isinstance(value, str):
                value = {"content": value}
            if value is None or (isinstance(value, dict) and value.get("content") is None):
                found.pop(attr, None)
            elif isinstance(value, dict) and isinstance(value["content"], str):
                found[attr] = value
            else:
                raise ValueError(f"--tokenizer-model: {path}: {attr} is not a token: {value!r}")
    return found


def _added_token(spec: dict):
    from tokenizers import AddedToken

    keys = ("single_word", "lstrip", "rstrip", "normalized")
    return AddedToken(spec["content"], special=True, **{k: spec[k] for k in keys if k in spec})


class _BackendTokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer`` with Megatron-LM's legacy / default encoding rule."""

    _tok = None
    _with_specials = False

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text``."""
        return self._tok.encode(text, add_special_tokens=self._with_specials).ids

    def detokenize(self, ids) -> str:
        """The text of ``ids`` (special tokens kept)."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def vocab(self) -> dict[str, int]:
        """Dictionary from token to id, added tokens included."""
        if getattr(self, "_vocab", None) is None:
            self._vocab = self._tok.get_vocab(with_added_tokens=True)
        return self._vocab

    @property
    def vocab_size(self) -> int:
        """Vocabulary size, added tokens included (``len(tokenizer)`` in ``transformers``)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def _add_special(self, tokens: list) -> None:
        """Mark tokens special; those not in the vocabulary get the next ids, in order."""
        new = [t for t in tokens if (t if isinstance(t, str) else t.content) not in self._added()]
        if new:
            self._tok.add_special_tokens(new)
            self._vocab = None

    def _added(self) -> set[str]:
        return {t.content for t in self._tok.get_added_tokens_decoder().values()}


class HuggingFaceTokenizer(_BackendTokenizer):
    """A Hugging Face ``tokenizer.json`` (file or directory) plus its config files."""

    def __init__(self, tokenizer_model: str, legacy: bool = False, special_tokens=None):
        from tokenizers import Tokenizer as HFTokenizer

        path, directory = tokenizer_model, tokenizer_model
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"--tokenizer-model {tokenizer_model}: directory has no tokenizer.json"
                )
        else:
            directory = os.path.dirname(os.path.abspath(path))
        extra = [] if legacy else list(special_tokens or [])
        super().__init__(tokenizer_model, legacy=legacy, special_tokens=extra)
        self._tok = HFTokenizer.from_file(path)
        self._with_specials = legacy
        named = read_special_tokens(directory)
        self._add_special([_added_token(named[a]) for a in SPECIAL_ATTRIBUTES if a in named])
        self._add_special(extra)  # --tokenizer-special-tokens (default system only)
        self._ids = {a: self.vocab[spec["content"]] for a, spec in named.items()}
        if legacy and special_tokens:
            self.notes.append(
                "--tokenizer-special-tokens has no effect with --legacy-tokenizer "
                "HuggingFaceTokenizer (as in Megatron-LM)"
            )
        if "eos_token" not in named:
            self._ids["eos_token"] = self._fallback(HF_EOD_TOKENS, directory, named)
            self._ids.setdefault("bos_token", self._first_present(HF_BOS_TOKENS))
            self._ids.setdefault("pad_token", self._first_present(HF_PAD_TOKENS))

    def _fallback(self, names: tuple[str, ...], directory: str, named: dict) -> int:
        eod = self._first_present(names)
        if eod is None:
            raise ValueError(
                f"--tokenizer-model {self.tokenizer_model}: no end-of-document token: neither "
                f"{' nor '.join(CONFIG_FILES)} in {directory} names an eos_token, and the "
                f"vocabulary has none of {', '.join(names)}"
            )
        self.notes.append(
            f"{directory} names no eos_token ({' / '.join(CONFIG_FILES)}), so Megatron-LM's "
            f"EOD would be None; using {self.inv_vocab[eod]} (id {eod})"
        )
        return eod

    def _first_present(self, names: tuple[str, ...]) -> int | None:
        for name in names:
            if name in self.vocab:
                return self.vocab[name]
        return None

    @property
    def eod(self) -> int:
        """The id of ``eos_token`` (Megatron-LM's EOD)."""
        return self._ids["eos_token"]

    @property
    def bos(self) -> int | None:
        """The id of ``bos_token``, or None."""
        return self._ids.get("bos_token")

    @property
    def pad(self) -> int:
        """The id of ``pad_token``, else eod (Megatron-LM: None)."""
        pad = self._ids.get("pad_token")
        return pad if pad is not None else self.eod


class GPT2BPETokenizer(EodOnlyTokenizer, _BackendTokenizer):
    """GPT-2 byte-level BPE from ``vocab.json`` + ``merges.txt``; EOD ``<|endoftext|>``."""

    EOD_TOKEN = "<|endoftext|>"

    def __init__(self, vocab_file: str, merge_file: str, legacy: bool = False,
                 special_tokens=None):  # fmt: skip
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        extra = [] if legacy else list(special_tokens or [])
        super().__init__(vocab_file, legacy=legacy, merge_file=merge_file, special_tokens=extra)
        self.unique_identifiers["tokenizer_path"] = [vocab_file, merge_file]
        self._tok = HFTokenizer(models.BPE.from_file(vocab_file, merge_file))
        self._tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self._tok.decoder = decoders.ByteLevel()
        if self.EOD_TOKEN not in self.vocab:
            raise ValueError(f"--vocab-file {vocab_file}: no {self.EOD_TOKEN} token (the EOD)")
        self._eod = self.vocab[self.EOD_TOKEN]
        if not legacy:
            self._add_special([self.EOD_TOKEN, *extra])
        elif special_tokens:
            self.notes.append(
                "--tokenizer-special-tokens has no effect with --legacy-tokenizer "
                "GPT2BPETokenizer (as in Megatron-LM)"
            )
