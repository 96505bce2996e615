"""The tokenizer interface shared by every ``--tokenizer-type`` (megatron-core's legacy one)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from megatron.core.datasets.megatron_tokenizer import MegatronLegacyTokenizer


class Tokenizer(MegatronLegacyTokenizer):
    """Common base: identity for megatron-core's cache hashing and special-token lookup.

    ``notes`` holds one-line remarks for the user (where Megatron-LM reads the same files another
    way, or a flag has no effect); preprocessing prints them.
    """

    def __init__(self, tokenizer_model: str | None, **identity: Any) -> None:
        # Set the identifiers directly rather than calling the legacy __init__, which only adds a
        # deprecation log line aimed at Megatron-LM's own tokenizer zoo.
        self.unique_identifiers: OrderedDict[str, Any] = OrderedDict()
        self.unique_identifiers["class"] = type(self).__name__
        self.unique_identifiers["tokenizer_path"] = [tokenizer_model] if tokenizer_model else []
        # Only non-default settings: the cache names of default runs stay what they were.
        for key, value in identity.items():
            if value:
                self.unique_identifiers[key] = value
        self.tokenizer_model = tokenizer_model
        self.notes: list[str] = []

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


def split_on_specials(text: str, specials: dict[str, int]) -> list[str | int]:
    """``text`` cut at every occurrence of a special string: text pieces and special ids.

    At each step the earliest occurrence wins; at equal positions the special listed first in
    ``specials`` (Megatron-LM's legacy SentencePiece rule). Empty text pieces are kept, so the
    caller encodes exactly the stretches between specials.
    """
    parts: list[str | int] = []
    start = 0
    while True:
        best, best_at = None, -1
        for token in specials:
            at = text.find(token, start)
            if at >= 0 and (best_at < 0 or at < best_at):
                best, best_at = token, at
        if best is None:
            parts.append(text[start:])
            return parts
        parts.append(text[start:best_at])
        parts.append(specials[best])
        start = best_at + len(best)


class EodOnlyTokenizer(Tokenizer):
    """A vocabulary whose only special token is the EOD (``self._eod``): no BOS, pad = EOD."""

    _eod: int

    @property
    def eod(self) -> int:
        """The end-of-document id."""
        return self._eod

    @property
    def bos(self) -> None:
        """No BOS token."""
        return None

    @property
    def pad(self) -> int:
        """No pad token: eod."""
        return self._eod
