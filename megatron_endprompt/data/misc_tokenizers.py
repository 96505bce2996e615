"""``NullTokenizer`` and ``TikTokenizer`` with Megatron-LM core_v0.16.1's ids.

``NullTokenizer`` (both systems alike): the text is integers separated by single spaces, the ids
are those integers, EOD is ``--vocab-size`` and the vocabulary has ``--vocab-size + 1`` ids.

``TikTokenizer``: a JSON list of ``{"rank", "token_bytes", "token_str"}``; the first
``--tiktoken-num-special-tokens`` ids are special tokens (the named ones, then
``<SPECIAL_{i}>`` fillers), the ranks follow, cut so that the vocabulary has ``--vocab-size``
ids (default 2**17). EOD is ``</s>``. The default system requires the seven names
``<unk> <s> </s> <mask> <pad> <cls> <sep>``, splits with pattern ``v2`` unless
``--tiktoken-pattern`` says otherwise and turns special names written in the text into their ids;
``--legacy-tokenizer`` requires ``<unk> <s> </s>`` and an explicit ``--tiktoken-pattern`` and
encodes special names as ordinary text.
"""

from __future__ import annotations

import base64
import json
import os

from megatron_endprompt.data.tokenizer_base import EodOnlyTokenizer, Tokenizer

TIKTOKEN_PATTERNS = {
    "v1": r"[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",
    "v2": (
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
        r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
        r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
}
TIKTOKEN_DEFAULT_VOCAB = 2**17
TIKTOKEN_SPECIALS = ("<unk>", "<s>", "</s>", "<mask>", "<pad>", "<cls>", "<sep>")
TIKTOKEN_LEGACY_SPECIALS = ("<unk>", "<s>", "</s>")


class NullTokenizer(EodOnlyTokenizer):
    """Ids written as text: ``"5 17 3"`` -> ``[5, 17, 3]``; EOD = ``vocab_size`` argument."""

    def __init__(self, vocab_size: int) -> None:
        if vocab_size is None or int(vocab_size) < 1:
            raise ValueError(
                f"--tokenizer-type NullTokenizer needs --vocab-size >= 1, got {vocab_size}"
            )
        super().__init__(None, vocab_size=int(vocab_size))
        self._eod = int(vocab_size)

    def tokenize(self, text: str) -> list[int]:
        """The integers of ``text`` (split on single spaces); ValueError if one is not an id."""
        ids = []
        for field in text.split(" "):
            try:
                value = int(field)
            except ValueError:
                raise ValueError(f"NullTokenizer: {field[:40]!r} is not an integer") from None
            if not 0 <= value <= self._eod:
                raise ValueError(f"NullTokenizer: id {value} is outside 0..{self._eod}")
            ids.append(value)
        return ids

    def detokenize(self, ids) -> str:
        """The ids joined by spaces."""
        return " ".join(str(int(i)) for i in ids)

    @property
    def vocab(self) -> dict[str, int]:
        """Each id spelled as its decimal text."""
        if getattr(self, "_vocab", None) is None:
            self._vocab = {str(i): i for i in range(self._eod + 1)}
        return self._vocab

    @property
    def vocab_size(self) -> int:
        """``--vocab-size`` + 1 (the EOD)."""
        return self._eod + 1


def _load_ranks(path: str, keep: int, shift: int) -> dict[bytes, int]:
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)
        if not isinstance(entries, list):
            raise ValueError("expected a JSON list")
        ranks = {}
        for i, entry in enumerate(entries[:keep]):
            if set(entry) != {"rank", "token_bytes", "token_str"} or entry["rank"] != i:
                raise ValueError(f"entry {i} is not {{rank: {i}, token_bytes, token_str}}")
            ranks[base64.b64decode(entry["token_bytes"])] = i + shift
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"--tokenizer-model {path}: not a TikTokenizer vocabulary: {err}") from err
    if len(ranks) != keep:
        raise ValueError(
            f"--tokenizer-model {path}: {len(ranks)} distinct ranks, but --vocab-size minus "
            f"--tiktoken-num-special-tokens needs {keep}"
        )
    return ranks


class TikTokenizer(Tokenizer):
    """A tiktoken BPE vocabulary below Megatron-LM's block of special tokens."""

    def __init__(
        self,
        tokenizer_model: str,
        legacy: bool = False,
        vocab_size: int | None = None,
        num_special_tokens: int = 1000,
        special_tokens=None,
        pattern: str | None = None,
    ):
        try:
            import tiktoken
        except ImportError as err:
            raise ValueError(
                "--tokenizer-type TikTokenizer needs the tiktoken package (pip install tiktoken)"
            ) from err
        vocab_size = vocab_size or TIKTOKEN_DEFAULT_VOCAB
        if pattern is None and not legacy:
            pattern = "v2"
        if pattern not in TIKTOKEN_PATTERNS:
            raise ValueError(f"--tiktoken-pattern must be v1 or v2, got {pattern}")
        required = TIKTOKEN_LEGACY_SPECIALS if legacy else TIKTOKEN_SPECIALS
        names = list(special_tokens) if special_tokens else list(required)
        if len(set(names)) != len(names) or not set(required) <= set(names):
            raise ValueError(
                f"--tokenizer-special-tokens must be distinct and include {' '.join(required)}"
            )
        if not len(names) <= num_special_tokens < vocab_size:
            raise ValueError(
                f"--tiktoken-num-special-tokens {num_special_tokens} must be at least the "
                f"{len(names)} special tokens and below --vocab-size {vocab_size}"
            )
        super().__init__(tokenizer_model, legacy=legacy, vocab_size=vocab_size,
                         num_special_tokens=num_special_tokens, special_tokens=names,
                         pattern=pattern)  # fmt: skip
        names += [f"<SPECIAL_{i}>" for i in range(len(names), num_special_tokens)]
        self._specials = {t: i for i, t in enumerate(names)}
        ranks = _load_ranks(tokenizer_model, vocab_size - num_special_tokens, num_special_tokens)
        name = os.path.basename(os.path.dirname(os.path.abspath(tokenizer_model))) or "tiktoken"
        self._enc = tiktoken.Encoding(
            name=name, pat_str=TIKTOKEN_PATTERNS[pattern], mergeable_ranks=ranks,
            special_tokens=self._specials,
        )  # fmt: skip
        self.legacy, self._size = legacy, vocab_size
        self._vocab = {t.decode("utf-8", errors="replace"): i for t, i in ranks.items()}
        self._vocab.update(self._specials)

    def tokenize(self, text: str) -> list[int]:
        """Token ids (default system: special names in the text become their ids)."""
        if self.legacy:
            return self._enc.encode_ordinary(text)
        return self._enc.encode(text, allowed_special="all")

    def detokenize(self, ids) -> str:
        """The text of ``ids``."""
        return self._enc.decode([int(i) for i in ids])

    @property
    def vocab(self) -> dict[str, int]:
        """Token text (bytes decoded with replacement) to id, special tokens included."""
        return self._vocab

    @property
    def vocab_size(self) -> int:
        """``--vocab-size`` (default 2**17)."""
        return self._size

    @property
    def eod(self) -> int:
        """The ``</s>`` id."""
        return self._specials["</s>"]

    @property
    def bos(self) -> int:
        """The ``<s>`` id."""
        return self._specials["<s>"]

    @property
    def pad(self) -> int:
        """The ``<pad>`` id where named (Megatron-LM's legacy class has none), else eod."""
        return self._specials.get("<pad>", self.eod)
