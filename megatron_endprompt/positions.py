"""Position-id layouts for one training sample: the core of the method.

Every function returns an ``int64`` numpy array holding the position ids of the ``S`` INPUT
tokens of one sample (Megatron convention: a sample is ``S + 1`` tokens, ``tokens = y[:-1]``,
``labels = y[1:]``). Every layout is strictly increasing, starts at 0 and stays below the target
window ``L``. All randomness comes from the ``numpy.random.Generator`` passed in, which callers seed
from ``(seed, sample index)`` so a sample is identical on every rank and after a resume.

Layouts:
    contiguous      0 .. S-1 (ordinary training; the full-length baseline when S = L).
    endprompt       a context inputs at 0 .. a-1, then t terminal inputs anchored at the end of
                    the window (fixed: L-t .. L-1) or at a uniformly drawn start (random).
    pose            PoSE (Zhu et al. 2024): S split into chunks, chunk i shifted by a skip bias
                    u_i with 0 = u_0 <= u_1 <= ... <= L - S.
    endprompt_pose  PoSE context inside [0, L - t), terminal anchored as in endprompt.

PoSE chunk lengths follow one of two rules (``sampler``): ``paper`` (a uniform composition; for
two chunks l0 ~ U{1 .. S-1}, the PoSE paper's appendix) or ``reference`` (l0 ~ U{1 .. (S+1)//2},
the reference training code: the near chunk is the short one). :func:`pose_text_offsets` draws the
optional text skip before each chunk (the reference code's ``v``).

Worked example (S = 8, a = 5, t = 3, L = 64, fixed): ``[0 1 2 3 4 61 62 63]``.

No torch, no megatron: these functions are cheap enough to run in every ``__getitem__``.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np

# The method's choice sets, defined once: the run config (flags) and the dataset config use these.
PositionMode = Literal["contiguous", "endprompt", "pose", "endprompt_pose"]
Terminal = Literal["cue", "tail"]
TerminalSource = Literal["contiguous", "document_end"]
Placement = Literal["fixed", "random"]
PoseChunkSampler = Literal["paper", "reference"]
# Each choice set once, as a type; the tuples are its values (for checks and messages).
POSITION_MODES: tuple[str, ...] = get_args(PositionMode)
TERMINALS: tuple[str, ...] = get_args(Terminal)
TERMINAL_SOURCES: tuple[str, ...] = get_args(TerminalSource)
PLACEMENTS: tuple[str, ...] = get_args(Placement)
POSE_CHUNK_SAMPLERS: tuple[str, ...] = get_args(PoseChunkSampler)


def default_pose_chunk_sampler(position_mode: str, num_chunks: int) -> str:
    """The PoSE chunk sampler when none is named: ``reference`` wherever it applies (a PoSE mode
    with at most two chunks), else ``paper``. Chosen from the small-scale replication, where the
    reference sampler retrieved better than the paper's at 2x-8x in each of 3 extension seeds
    (README, "Fidelity options")."""
    if position_mode in ("pose", "endprompt_pose") and num_chunks <= 2:
        return "reference"
    return "paper"


def _check_int(name: str, value: object, minimum: int) -> int:
    """``value`` as int; ValueError naming ``name`` unless it is an int >= minimum."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_rng(rng: np.random.Generator | None, what: str) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng: {what} needs a numpy.random.Generator, got {type(rng).__name__}")
    return rng


def _check_placement(placement: str) -> str:
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    return placement


def contiguous_positions(S: int) -> np.ndarray:
    """Positions ``0 .. S-1``.

    Args:
        S: number of input tokens (>= 1).

    Returns:
        int64 array of shape ``[S]``.
    """
    S = _check_int("S", S, 1)
    return np.arange(S, dtype=np.int64)


def _terminal_start(
    first_free: int, t: int, L: int, placement: str, rng: np.random.Generator | None
) -> int:
    """Start position of a t-token terminal segment that must begin at or after ``first_free``."""
    if placement == "fixed":
        return L - t
    rng = _check_rng(rng, "placement='random'")
    # Uniform over every start that keeps the layout increasing and inside the window.
    return int(rng.integers(first_free, L - t, endpoint=True))


def endprompt_positions(
    a: int,
    t: int,
    L: int,
    placement: str = "fixed",
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """EndPrompt layout: context ``0 .. a-1``, terminal ``start .. start+t-1``.

    Args:
        a: number of context inputs (>= 1).
        t: number of terminal inputs (>= 1).
        L: target context window; requires ``a + t <= L``.
        placement: ``"fixed"`` puts the last input at ``L - 1`` (start = L - t, as in the
            reference code); ``"random"`` draws start uniformly from ``{a, ..., L - t}``.
        rng: generator for ``placement="random"`` (ignored for fixed).

    Returns:
        int64 array of shape ``[a + t]``.
    """
    a = _check_int("a", a, 1)
    t = _check_int("t", t, 1)
    L = _check_int("L", L, 2)
    _check_placement(placement)
    if a + t > L:
        raise ValueError(f"a + t must be <= L (the target length), got a={a}, t={t}, L={L}")
    start = _terminal_start(a, t, L, placement, rng)
    out = np.empty(a + t, dtype=np.int64)
    out[:a] = np.arange(a)
    out[a:] = np.arange(start, start + t)
    return out


def _random_composition(S: int, num_chunks: int, rng: np.random.Generator) -> np.ndarray:
    """Chunk lengths (each >= 1) summing to S, with uniformly drawn distinct cut points."""
    if num_chunks == 1:
        return np.array([S], dtype=np.int64)
    cuts = np.sort(rng.choice(np.arange(1, S), size=num_chunks - 1, replace=False))
    return np.diff(np.concatenate(([0], cuts, [S]))).astype(np.int64)


def _check_sampler(sampler: str, num_chunks: int) -> str:
    if sampler not in POSE_CHUNK_SAMPLERS:
        raise ValueError(f"sampler must be one of {POSE_CHUNK_SAMPLERS}, got {sampler!r}")
    if sampler == "reference" and num_chunks > 2:
        raise ValueError(
            f"sampler='reference' draws the two chunks of the reference code: num_chunks must be "
            f"<= 2, got num_chunks={num_chunks}"
        )
    return sampler


def pose_chunk_lengths(
    S: int, num_chunks: int, rng: np.random.Generator, sampler: str = "paper"
) -> np.ndarray:
    """PoSE chunk lengths (each >= 1) summing to S.

    Args:
        S: number of inputs to split (>= num_chunks).
        num_chunks: number of chunks N.
        rng: generator.
        sampler: ``"paper"``: a uniformly drawn composition (the PoSE paper's appendix rule; for
            N = 2, ``l0 ~ U{1 .. S-1}``) | ``"reference"``: ``l0 ~ U{1 .. (S+1)//2}``, the rest in
            chunk 2 (the reference training code: the near chunk is the short one; N <= 2).

    Returns:
        int64 array of shape ``[num_chunks]``.
    """
    _check_sampler(sampler, num_chunks)
    if sampler == "paper" or num_chunks == 1:
        return _random_composition(S, num_chunks, rng)
    first = int(rng.integers(1, (S + 1) // 2, endpoint=True))
    return np.array([first, S - first], dtype=np.int64)


def pose_chunks(
    S: int,
    L: int,
    num_chunks: int = 2,
    rng: np.random.Generator | None = None,
    sampler: str = "paper",
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`pose_positions` together with the chunk lengths it drew.

    The lengths are needed to place each chunk's text (:func:`pose_text_offsets`): two chunks
    whose biases are equal are not visible in the positions.

    Returns:
        ``(positions [S], chunk lengths [num_chunks])``, both int64.
    """
    S = _check_int("S", S, 1)
    L = _check_int("L", L, 1)
    num_chunks = _check_int("num_chunks", num_chunks, 1)
    if num_chunks > S:
        raise ValueError(f"num_chunks must be <= S, got num_chunks={num_chunks}, S={S}")
    if S > L:
        raise ValueError(f"S must be <= L (the target length), got S={S}, L={L}")
    _check_sampler(sampler, num_chunks)
    rng = _check_rng(rng, "pose_positions")
    lengths = pose_chunk_lengths(S, num_chunks, rng, sampler)
    biases = np.zeros(num_chunks, dtype=np.int64)
    for i in range(1, num_chunks):
        biases[i] = rng.integers(biases[i - 1], L - S, endpoint=True)
    return np.arange(S, dtype=np.int64) + np.repeat(biases, lengths), lengths


def pose_positions(
    S: int,
    L: int,
    num_chunks: int = 2,
    rng: np.random.Generator | None = None,
    sampler: str = "paper",
) -> np.ndarray:
    """PoSE layout: S inputs in ``num_chunks`` chunks, each shifted by a skip bias.

    Chunk lengths come from :func:`pose_chunk_lengths` (every chunk >= 1 token). Biases are
    drawn in sequence as in the PoSE reference code: ``u_0 = 0`` and
    ``u_i ~ U{u_{i-1}, ..., L - S}``, so they are non-decreasing and the last position is at most
    ``L - 1``. Within a chunk the order is kept.

    Args:
        S: number of input tokens (>= num_chunks).
        L: target context window (>= S).
        num_chunks: number of chunks N (>= 1; the paper uses 2).
        rng: generator (required: the layout is random per sample).
        sampler: chunk-length rule, ``"paper"`` or ``"reference"`` (see :func:`pose_chunk_lengths`).

    Returns:
        int64 array of shape ``[S]``.
    """
    return pose_chunks(S, L, num_chunks, rng, sampler)[0]


def endprompt_pose_chunks(
    a: int,
    t: int,
    L: int,
    num_chunks: int = 2,
    placement: str = "fixed",
    rng: np.random.Generator | None = None,
    sampler: str = "paper",
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`endprompt_pose_positions` together with the context's chunk lengths.

    Returns:
        ``(positions [a + t], context chunk lengths [num_chunks])``, both int64.
    """
    a = _check_int("a", a, 1)
    t = _check_int("t", t, 1)
    L = _check_int("L", L, 2)
    _check_placement(placement)
    if a + t > L:
        raise ValueError(f"a + t must be <= L (the target length), got a={a}, t={t}, L={L}")
    rng = _check_rng(rng, "endprompt_pose_positions")
    context, lengths = pose_chunks(a, L - t, num_chunks, rng, sampler)
    start = _terminal_start(int(context[-1]) + 1, t, L, placement, rng)
    return np.concatenate((context, np.arange(start, start + t, dtype=np.int64))), lengths


def endprompt_pose_positions(
    a: int,
    t: int,
    L: int,
    num_chunks: int = 2,
    placement: str = "fixed",
    rng: np.random.Generator | None = None,
    sampler: str = "paper",
) -> np.ndarray:
    """EndPrompt on top of PoSE (the paper's best variant, ET(PoSE)).

    The a context inputs are laid out by :func:`pose_positions` inside ``[0, L - t)``; the t
    terminal inputs are anchored as in :func:`endprompt_positions` (fixed: ending at ``L - 1``;
    random: start drawn uniformly after the last context position).

    Args:
        a: number of context inputs (>= num_chunks).
        t: number of terminal inputs (>= 1).
        L: target context window; requires ``a + t <= L``.
        num_chunks: PoSE chunks of the context.
        placement: ``"fixed"`` or ``"random"``.
        rng: generator (required: the PoSE context is random per sample).
        sampler: chunk-length rule of the context (see :func:`pose_chunk_lengths`).

    Returns:
        int64 array of shape ``[a + t]``.
    """
    return endprompt_pose_chunks(a, t, L, num_chunks, placement, rng, sampler)[0]


def pose_text_offsets(
    num_chunks: int, available: int, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Text skips of the PoSE chunks (the reference code's ``v``), drawn like the position biases.

    Chunk i reads its text ``w_i`` tokens later than contiguous text would:
    ``w_0 = 0`` and ``w_i ~ U{w_{i-1} .. available}``, so the skips are non-decreasing and the
    text read spans at most ``available`` extra tokens. For two chunks this is the reference's
    ``v ~ U{0 .. len_input - len_chunk}`` with ``available = len_input - len_chunk``.

    Args:
        num_chunks: number of chunks N (>= 1).
        available: extra text tokens that may be skipped (>= 0).
        rng: generator (required when N >= 2).

    Returns:
        int64 array of shape ``[num_chunks]``.
    """
    num_chunks = _check_int("num_chunks", num_chunks, 1)
    available = _check_int("available", available, 0)
    offsets = np.zeros(num_chunks, dtype=np.int64)
    if num_chunks > 1:
        rng = _check_rng(rng, "pose_text_offsets")
    for i in range(1, num_chunks):
        offsets[i] = rng.integers(offsets[i - 1], available, endpoint=True)
    return offsets
