"""SentencePiece tokenizers with Megatron-LM core_v0.16.1's ids, in both tokenizer systems.

Megatron-LM's default (no ``--legacy-tokenizer``) builds ``SentencePieceTokenizer``,
``GPTSentencePieceTokenizer`` and ``Llama2Tokenizer`` alike
(``megatron/core/tokenizers/text/utils/build_tokenizer.py``): ids are the model's plain
``encode``, EOD is ``</s>``, no BOS is added, the vocabulary is the model's pieces.

With ``--legacy-tokenizer`` (``megatron/training/tokenizer/tokenizer.py``) the three differ:

- ``SentencePieceTokenizer`` appends ``<CLS> <SEP> <EOD> <MASK>`` above the pieces (a name the
  model already has keeps its id), then ``<PAD>``/``<BOS>``/``<EOS>`` where the model has no
  pad/bos/eos piece, then ``<extra_id_0..N-1>`` for ``--vocab-extra-ids N``. EOD is ``<EOD>``
  (vocabulary + 2 for a model without those names); every special name in the text becomes its
  id (the text between is encoded piece by piece).
- ``GPTSentencePieceTokenizer``: plain ``encode``, EOD ``</s>``, nothing appended.
- ``Llama2Tokenizer``: plain ``encode`` with BOS in front of every text, EOD ``</s>``.
"""

from __future__ import annotations

from megatron_endprompt.data.tokenizer_base import Tokenizer, split_on_specials

LEGACY_SPECIALS = ("<CLS>", "<SEP>", "<EOD>", "<MASK>")
"""Appended first, in this order, by the legacy ``SentencePieceTokenizer``."""


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``.model``: eod = ``</s>`` (or ``<EOD>`` with ``legacy``), bos = ``<s>``.

    ``pad`` is the ``<pad>`` piece, else eod (Megatron-LM's default system reports -1 there,
    which would index out of the embedding wherever a sample is padded).
    """

    def __init__(self, tokenizer_model: str, legacy: bool = False, vocab_extra_ids: int = 0):
        import sentencepiece as spm

        extra = vocab_extra_ids if legacy and type(self) is SentencePieceTokenizer else 0
        super().__init__(tokenizer_model, legacy=legacy, vocab_extra_ids=extra)
        self.legacy = legacy
        self._sp = spm.SentencePieceProcessor(model_file=tokenizer_model)
        self._vocab = {self._sp.id_to_piece(i): i for i in range(self._sp.get_piece_size())}
        self._specials: dict[str, int] = {}
        self._pad = self._sp.pad_id() if self._sp.pad_id() >= 0 else None
        self._bos = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
        self._eod = self._eos = self._sp.eos_id()
        if legacy and type(self) is SentencePieceTokenizer:
            self._add_legacy_specials(extra)
        elif self._eod < 0:
            raise ValueError(
                f"--tokenizer-model {tokenizer_model}: the model has no </s> (eos) piece, so "
                "Megatron-LM's EOD would be -1; --legacy-tokenizer with SentencePieceTokenizer "
                "gives an <EOD> id above the vocabulary"
            )

    def _special(self, piece: str) -> int:
        if piece not in self._vocab:
            self._vocab[piece] = len(self._vocab)
        self._specials[piece] = self._vocab[piece]
        return self._vocab[piece]

    def _add_legacy_specials(self, vocab_extra_ids: int) -> None:
        ids = {name: self._special(name) for name in LEGACY_SPECIALS}
        self._eod = ids["<EOD>"]
        sp = self._sp
        for attr, fallback in (("_pad", "<PAD>"), ("_bos", "<BOS>"), ("_eos", "<EOS>")):
            own = {"_pad": sp.pad_id(), "_bos": sp.bos_id(), "_eos": sp.eos_id()}[attr]
            setattr(self, attr, self._special(sp.id_to_piece(own) if own >= 0 else fallback))
        self.extra_ids = [self._special(f"<extra_id_{i}>") for i in range(vocab_extra_ids)]

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS, no EOS; legacy: special names become their ids)."""
        if not self._specials:
            return self._sp.encode(text, out_type=int)
        ids: list[int] = []
        for part in split_on_specials(text, self._specials):
            if isinstance(part, int):
                ids.append(part)
            elif part:
                ids.extend(self._sp.encode(part, out_type=int))
        return ids

    def detokenize(self, ids) -> str:
        """The text of ``ids`` (legacy: special ids are written as their names)."""
        ids = [int(i) for i in ids]
        if not self._specials:
            return self._sp.decode(ids)
        names = {i: t for t, i in self._specials.items()}
        out, run = [], []
        for i in ids:
            if i in names:
                out.append(self._sp.decode(run))
                out.append(names[i])
                run = []
            else:
                run.append(i)
        out.append(self._sp.decode(run))
        return " ".join(s for s in out if s)

    @property
    def vocab(self) -> dict[str, int]:
        """Dictionary from piece to id (legacy: the appended specials included)."""
        return self._vocab

    @property
    def vocab_size(self) -> int:
        """Number of pieces (legacy: plus the appended specials)."""
        return len(self._vocab)

    @property
    def eod(self) -> int:
        """The ``</s>`` id; legacy ``SentencePieceTokenizer``: the ``<EOD>`` id."""
        return self._eod

    @property
    def eos(self) -> int:
        """The ``</s>`` id (legacy ``SentencePieceTokenizer``: ``<EOS>`` if the model has none)."""
        return self._eos

    @property
    def bos(self) -> int | None:
        """The ``<s>`` id (legacy: ``<BOS>`` when the model has none), or None."""
        return self._bos

    @property
    def pad(self) -> int:
        """The ``<pad>`` id (legacy: ``<PAD>`` when the model has none), else eod."""
        return self._pad if self._pad is not None else self.eod


class GPTSentencePieceTokenizer(SentencePieceTokenizer):
    """Plain SentencePiece ids, EOD ``</s>``, in both systems (no appended specials)."""


class Llama2Tokenizer(SentencePieceTokenizer):
    """Plain SentencePiece ids, EOD ``</s>``; ``legacy`` puts BOS in front of every text."""

    def __init__(self, tokenizer_model: str, legacy: bool = False, vocab_extra_ids: int = 0):
        super().__init__(tokenizer_model, legacy=legacy)
        if legacy and self._bos is None:
            raise ValueError(
                f"--tokenizer-model {tokenizer_model}: the model has no <s> (bos) piece, which "
                "the legacy Llama2Tokenizer puts in front of every document"
            )

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text``; legacy: BOS first (also for text without tokens)."""
        ids = super().tokenize(text)
        return [self._bos, *ids] if self.legacy else ids
