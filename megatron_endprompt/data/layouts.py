"""Per-sample layout draws and text placement for EndPromptDataset (pure numpy).

Everything here is shared by :class:`~megatron_endprompt.data.dataset.EndPromptDataset` and the
distance-coverage report (:mod:`megatron_endprompt.coverage`), so both see the same draws:

- :func:`sample_rng`: the Philox generator of sample ``idx``, keyed by ``(seed, idx)`` only.
- :class:`LayoutSpec` / :func:`draw_layout`: everything that decides a sample's positions, and
  the draw itself. Draw order: the terminal (cue) choice when there are several, then the
  position layout. Text skips (``pose_skip_text``) are drawn after the layout, so the positions
  never depend on the text.
- Text placement in GPTDataset's token stream (the documents of ``document_index`` laid end to
  end, sample ``i`` starting at stream token ``i * S``): :func:`chunk_text_index` (PoSE text
  skips), :func:`locate`, :func:`document_end_tail` and :func:`count_document_end_fallbacks`
  (``terminal_source="document_end"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from megatron_endprompt.positions import (
    contiguous_positions,
    endprompt_pose_chunks,
    endprompt_positions,
    pose_chunks,
)

RNG_STREAM = 0x454E4450  # "ENDP": third Philox counter word, separates this stream from others
POSE_MODES = ("pose", "endprompt_pose")
TERMINAL_MODES = ("endprompt", "endprompt_pose")


def sample_rng(seed: int, idx: int) -> np.random.Generator:
    """A fresh generator for sample ``idx`` of a dataset seeded with ``seed``.

    Philox is counter-based: distinct keys give independent streams, with no seed hashing.
    """
    key = np.array([seed, idx], dtype=np.uint64)
    return np.random.Generator(np.random.Philox(key=key, counter=[0, 0, RNG_STREAM, 0]))


def sample_rng_state(seed: int, idx: int) -> dict:
    """The Philox state of a fresh :func:`sample_rng` (to re-key a generator without setup)."""
    return {
        "bit_generator": "Philox",
        "state": {
            "counter": np.array([0, 0, RNG_STREAM, 0], dtype=np.uint64),
            "key": np.array([seed, idx], dtype=np.uint64),
        },
        "buffer": np.zeros(4, dtype=np.uint64),
        "buffer_pos": 4,
        "has_uint32": 0,
        "uinteger": 0,
    }


@dataclass(frozen=True)
class LayoutSpec:
    """What decides the position layout of a sample (everything but the text)."""

    position_mode: str
    """contiguous | endprompt | pose | endprompt_pose."""
    sequence_length: int
    """S, the number of input tokens."""
    target_length: int | None
    """L, the target window (None for contiguous)."""
    placement: str = "fixed"
    """fixed | random terminal start."""
    terminal_lengths: tuple[int, ...] = ()
    """Terminal length per cue, or ``(t,)`` for tail; one is drawn per sample when several."""
    pose_num_chunks: int = 2
    """PoSE chunks."""
    pose_chunk_sampler: str = "paper"
    """PoSE chunk-length rule: paper | reference."""

    @property
    def uses_terminal(self) -> bool:
        """Whether samples carry a terminal segment."""
        return self.position_mode in TERMINAL_MODES

    @property
    def needs_rng(self) -> bool:
        """Whether :func:`draw_layout` draws anything."""
        return self.position_mode in POSE_MODES or (
            self.uses_terminal and (self.placement == "random" or len(self.terminal_lengths) > 1)
        )


@dataclass(frozen=True)
class SampleLayout:
    """One sample's layout."""

    positions: np.ndarray
    """Position ids of the S inputs, int64."""
    terminal: int
    """Index of the drawn terminal in ``LayoutSpec.terminal_lengths`` (0 without terminal)."""
    context_length: int
    """a: inputs before the terminal (S without one)."""
    chunk_lengths: np.ndarray
    """PoSE chunk lengths of the context (one chunk of a inputs outside PoSE modes)."""


@lru_cache(maxsize=64)
def _fixed_endprompt(a: int, t: int, L: int) -> np.ndarray:
    """Fixed EndPrompt layouts depend on (a, t, L) only: build once, hand out copies."""
    out = endprompt_positions(a, t, L, "fixed")
    out.flags.writeable = False
    return out


def draw_layout(spec: LayoutSpec, rng: np.random.Generator | None) -> SampleLayout:
    """Draw one sample's layout from ``rng`` (the sample's :func:`sample_rng`).

    Args:
        spec: the layout configuration.
        rng: generator; may be None when ``spec.needs_rng`` is False.

    Returns:
        The :class:`SampleLayout`.
    """
    S, L, mode = spec.sequence_length, spec.target_length, spec.position_mode
    if mode == "contiguous":
        return SampleLayout(contiguous_positions(S), 0, S, np.array([S], dtype=np.int64))
    n, sampler = spec.pose_num_chunks, spec.pose_chunk_sampler
    if mode == "pose":
        positions, lengths = pose_chunks(S, L, n, rng, sampler)
        return SampleLayout(positions, 0, S, lengths)
    lengths_set = spec.terminal_lengths
    choice = int(rng.integers(len(lengths_set))) if len(lengths_set) > 1 else 0
    t = lengths_set[choice]
    a = S - t
    if mode == "endprompt_pose":
        positions, lengths = endprompt_pose_chunks(a, t, L, n, spec.placement, rng, sampler)
    elif spec.placement == "random":
        positions = endprompt_positions(a, t, L, "random", rng)
        lengths = np.array([a], dtype=np.int64)
    else:
        positions = _fixed_endprompt(a, t, L).copy()
        lengths = np.array([a], dtype=np.int64)
    return SampleLayout(positions, choice, a, lengths)


def chunk_text_index(chunk_lengths: np.ndarray, offsets: np.ndarray, total: int) -> np.ndarray:
    """Indices into a longer text read that place each chunk's text after its skip.

    Chunk i (``chunk_lengths[i]`` tokens) is read ``offsets[i]`` tokens later than contiguous
    text would be; whatever follows the chunks (the terminal, the last label) shares the last
    chunk's offset. Example: lengths [3, 5], offsets [0, 4], total 9 -> [0 1 2 7 8 9 10 11 12].

    Args:
        chunk_lengths: lengths of the chunks (sum <= total).
        offsets: non-decreasing text skips, one per chunk.
        total: number of tokens of the sample (S + 1).

    Returns:
        int64 indices of shape ``[total]`` into a read of ``total + offsets[-1]`` tokens.
    """
    lengths = np.asarray(chunk_lengths, dtype=np.int64).copy()
    lengths[-1] += total - int(lengths.sum())
    return np.arange(total, dtype=np.int64) + np.repeat(np.asarray(offsets, np.int64), lengths)


def locate(
    sizes: np.ndarray, document_index: np.ndarray, pos: int, offset: int, k: int
) -> tuple[int, int] | None:
    """Where the stream token ``k`` places after ``(pos, offset)`` lies.

    Args:
        sizes: document lengths (IndexedDataset.sequence_lengths).
        document_index: GPTDataset's document order.
        pos: index into ``document_index`` of the starting document.
        offset: token offset inside that document.
        k: tokens to move forward (>= 0).

    Returns:
        ``(index into document_index, offset)``, or None past the end of the stream.
    """
    rest = int(offset) + int(k)
    while pos < len(document_index):
        n = int(sizes[document_index[pos]])
        if rest < n:
            return pos, rest
        rest -= n
        pos += 1
    return None


def document_end_tail(
    sizes: np.ndarray, document_index: np.ndarray, pos: int, offset: int, a: int, t: int
) -> tuple[int, int] | None:
    """The document-end terminal of a sample that starts at ``(pos, offset)``.

    The sample belongs to the document D holding its last context input (stream token
    ``a - 1`` of the sample). When D holds at least ``t + 1`` tokens after that input, the
    terminal is D's last ``t + 1`` tokens (t inputs and the last label); otherwise D ends inside
    the sample (the reference's "document no longer than the physical length") and the caller
    keeps the contiguous tail.

    Returns:
        ``(document id, offset of the kept tail)``, or None for the contiguous fallback.
    """
    where = locate(sizes, document_index, pos, offset, a - 1)
    if where is None:  # the context ends in padding (a partial validation sample)
        return None
    doc = int(document_index[where[0]])
    n = int(sizes[doc])
    if n - 1 - where[1] < t + 1:
        return None
    return doc, n - t - 1


def count_document_end_fallbacks(
    sizes: np.ndarray, document_index: np.ndarray, sample_starts: np.ndarray, a: int, t: int
) -> int:
    """How many samples keep the contiguous tail under ``terminal_source="document_end"``.

    Vectorised :func:`document_end_tail` over many samples (the same rule, by cumulative
    document lengths).

    Args:
        sizes: document lengths.
        document_index: GPTDataset's document order.
        sample_starts: ``[n, 2]`` rows of GPTDataset's sample_index (document index, offset).
        a: context inputs.
        t: terminal inputs.

    Returns:
        The number of fallback samples.
    """
    lengths = np.asarray(sizes, dtype=np.int64)[np.asarray(document_index)]
    cum = np.concatenate(([0], np.cumsum(lengths)))
    rows = np.asarray(sample_starts, dtype=np.int64).reshape(-1, 2)
    end = cum[rows[:, 0]] + rows[:, 1] + (a - 1)  # stream offset of the last context input
    doc = np.searchsorted(cum, end, side="right") - 1
    inside = doc < len(lengths)
    rest = np.where(inside, cum[np.minimum(doc + 1, len(lengths))] - 1 - end, -1)
    return int(np.count_nonzero(rest < t + 1))
