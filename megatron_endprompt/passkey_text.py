"""Passkey prompt text, shared by the passkey training corpus (prep/) and its evaluation (eval/).

The filler sentences, needle and question, the token-level haystack builder that joins them into
a prompt of an exact length, and the small tokenizer protocol both sides need. Pure numpy: no
torch, no megatron-core.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

FILLER_SENTENCES = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"


@runtime_checkable
class Tokenizer(Protocol):
    """What the prompts and evaluations need from a tokenizer (``data.tokenizers`` ones satisfy it).

    ``tokenize`` must not add special tokens. A ``bos`` attribute is optional: when present and
    not None, prompts start with it.
    """

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens)."""
        ...

    def detokenize(self, ids: list[int]) -> str:
        """Text of ``ids``."""
        ...

    @property
    def eod(self) -> int:
        """End-of-document id."""
        ...

    @property
    def vocab_size(self) -> int:
        """Number of ids."""
        ...


def bos_ids(tokenizer: Tokenizer) -> list[int]:
    """``[tokenizer.bos]`` when the tokenizer has a BOS token, else ``[]``."""
    bos = getattr(tokenizer, "bos", None)
    return [] if bos is None else [int(bos)]


def filler_units(tokenizer: Tokenizer) -> list[list[int]]:
    """Token ids of each filler sentence (leading space, no special tokens)."""
    return [tokenizer.tokenize(" " + s) for s in FILLER_SENTENCES]


def build_haystack(
    tokenizer: Tokenizer,
    length: int,
    needles: Sequence[tuple[float, list[int]]],
    question_ids: list[int],
) -> tuple[list[int], list[int]]:
    """Filler with needles inserted at depths, then the question: exactly ``length`` tokens.

    The filler is the sentence cycle cut to the token budget left after BOS, needles and question
    (its first sentence may be cut short, at the front). Each needle goes at the sentence boundary
    nearest to ``depth * filler_tokens``, so it lands within one filler sentence of the requested
    depth.

    Args:
        tokenizer: tokenizer of the model.
        length: total prompt length in tokens.
        needles: ``(depth in [0, 1], token ids)`` pairs; equal depths keep their order.
        question_ids: token ids of the question, placed last.

    Returns:
        ``(prompt ids, start index of each needle in the prompt, in the order given)``.
    """
    prefix = bos_ids(tokenizer)
    fixed = len(prefix) + sum(len(ids) for _, ids in needles) + len(question_ids)
    n_filler = length - fixed
    if n_filler < 0:
        raise ValueError(
            f"length: {length} tokens cannot hold the needles and question ({fixed} tokens)"
        )
    units = filler_units(tokenizer)
    stream: list[int] = []
    ends = []
    while len(stream) < n_filler:
        stream.extend(units[len(ends) % len(units)])
        ends.append(len(stream))
    # Drop the surplus from the front: the filler opens mid-sentence (like an excerpt) and the
    # text before every needle and before the question ends with a whole sentence.
    offset = len(stream) - n_filler
    filler = stream[offset:]
    bounds = np.asarray([0] + [e - offset for e in ends if e > offset])
    cuts = [int(bounds[np.argmin(np.abs(bounds - d * n_filler))]) for d, _ in needles]
    order = sorted(range(len(needles)), key=lambda i: (cuts[i], i))
    ids, starts, prev = list(prefix), [0] * len(needles), 0
    for i in order:
        ids.extend(filler[prev : cuts[i]])
        starts[i] = len(ids)
        ids.extend(needles[i][1])
        prev = cuts[i]
    ids.extend(filler[prev:])
    ids.extend(question_ids)
    return ids, starts
