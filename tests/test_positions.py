"""Invariants of every position layout (property-based) plus hand-worked examples."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_endprompt.positions import (
    contiguous_positions,
    endprompt_pose_chunks,
    endprompt_pose_positions,
    endprompt_positions,
    pose_chunk_lengths,
    pose_chunks,
    pose_positions,
    pose_text_offsets,
)

SETTINGS = settings(max_examples=200, deadline=None)


def assert_valid_layout(pos: np.ndarray, S: int, L: int) -> None:
    """Length S, int64, starts at 0, strictly increasing, below L."""
    assert pos.dtype == np.int64
    assert pos.shape == (S,)
    assert pos[0] == 0
    assert np.all(np.diff(pos) > 0)
    assert pos[-1] < L


@st.composite
def endprompt_args(draw, min_a=1):
    a = draw(st.integers(min_a, 300))
    t = draw(st.integers(1, 40))
    L = draw(st.integers(a + t, 1 << 20))
    seed = draw(st.integers(0, 2**32 - 1))
    return a, t, L, seed


def test_worked_example_from_design():
    assert endprompt_positions(5, 3, 64).tolist() == [0, 1, 2, 3, 4, 61, 62, 63]


def test_contiguous():
    assert contiguous_positions(4).tolist() == [0, 1, 2, 3]
    assert contiguous_positions(1).dtype == np.int64


@SETTINGS
@given(endprompt_args())
def test_endprompt_fixed_invariants(args):
    a, t, L, _ = args
    pos = endprompt_positions(a, t, L, "fixed")
    assert_valid_layout(pos, a + t, L)
    assert pos[-1] == L - 1  # fixed terminal: last input token at L-1
    np.testing.assert_array_equal(pos[:a], np.arange(a))
    np.testing.assert_array_equal(np.diff(pos[a:]), 1)


@SETTINGS
@given(endprompt_args())
def test_endprompt_random_invariants(args):
    a, t, L, seed = args
    pos = endprompt_positions(a, t, L, "random", np.random.default_rng(seed))
    assert_valid_layout(pos, a + t, L)
    np.testing.assert_array_equal(pos[:a], np.arange(a))
    assert a <= pos[a] <= L - t
    np.testing.assert_array_equal(np.diff(pos[a:]), 1)
    again = endprompt_positions(a, t, L, "random", np.random.default_rng(seed))
    np.testing.assert_array_equal(pos, again)


def test_endprompt_random_covers_range_uniformly():
    # start ~ U{a .. L-t}: with a=2, t=2, L=8 the starts are {2,...,6}, each ~1/5.
    rng = np.random.default_rng(0)
    starts = np.array([endprompt_positions(2, 2, 8, "random", rng)[2] for _ in range(5000)])
    counts = np.bincount(starts, minlength=7)[2:]
    assert set(np.unique(starts)) == {2, 3, 4, 5, 6}
    assert np.all(np.abs(counts / 5000 - 0.2) < 0.03)


@st.composite
def pose_args(draw):
    S = draw(st.integers(1, 400))
    n = draw(st.integers(1, min(S, 5)))
    L = draw(st.integers(S, 1 << 20))
    seed = draw(st.integers(0, 2**32 - 1))
    return S, L, n, seed


def _chunks(pos: np.ndarray) -> list[np.ndarray]:
    """Split a layout at its jumps (maximal runs of consecutive positions)."""
    cut = np.flatnonzero(np.diff(pos) != 1) + 1
    return np.split(pos, cut)


@SETTINGS
@given(pose_args())
def test_pose_invariants(args):
    S, L, n, seed = args
    pos = pose_positions(S, L, n, np.random.default_rng(seed))
    assert_valid_layout(pos, S, L)
    biases = pos - np.arange(S)  # per-token skip bias u_i of its chunk
    assert biases[0] == 0  # u_0 = 0
    assert np.all(np.diff(biases) >= 0)  # non-decreasing
    assert biases[-1] <= L - S  # bounded
    assert len(np.unique(biases)) <= n  # at most n distinct chunks
    np.testing.assert_array_equal(pos, pose_positions(S, L, n, np.random.default_rng(seed)))


def test_pose_chunk_count_and_lengths():
    # With L >> S the biases are almost surely distinct, so every chunk is visible as a run.
    rng = np.random.default_rng(1)
    for _ in range(200):
        pos = pose_positions(16, 1 << 30, 3, rng)
        chunks = _chunks(pos)
        assert len(chunks) == 3
        assert sum(len(c) for c in chunks) == 16
        assert min(len(c) for c in chunks) >= 1


def test_pose_equal_length_is_contiguous():
    # L == S leaves no room for skips: the layout must be 0..S-1.
    pos = pose_positions(10, 10, 2, np.random.default_rng(3))
    np.testing.assert_array_equal(pos, np.arange(10))


@SETTINGS
@given(endprompt_args(min_a=5), st.integers(1, 5), st.sampled_from(["fixed", "random"]))
def test_endprompt_pose_invariants(args, n, placement):
    a, t, L, seed = args
    pos = endprompt_pose_positions(a, t, L, n, placement, np.random.default_rng(seed))
    assert_valid_layout(pos, a + t, L)
    np.testing.assert_array_equal(np.diff(pos[a:]), 1)
    assert pos[a - 1] < L - t  # context stays inside [0, L - t)
    if placement == "fixed":
        assert pos[-1] == L - 1
    ctx_biases = pos[:a] - np.arange(a)
    assert ctx_biases[0] == 0 and np.all(np.diff(ctx_biases) >= 0)
    again = endprompt_pose_positions(a, t, L, n, placement, np.random.default_rng(seed))
    np.testing.assert_array_equal(pos, again)


def test_endprompt_pose_hand_example():
    # One chunk: the PoSE context degenerates to 0..a-1, so the layout equals plain EndPrompt.
    pos = endprompt_pose_positions(5, 3, 64, 1, "fixed", np.random.default_rng(0))
    assert pos.tolist() == [0, 1, 2, 3, 4, 61, 62, 63]


def test_different_seeds_give_different_layouts():
    layouts = {
        tuple(pose_positions(64, 4096, 2, np.random.default_rng(s)).tolist()) for s in range(20)
    }
    assert len(layouts) > 15


def test_paper_sampler_is_the_default_and_unchanged():
    # Pinned before the sampler option existed: the default draws must never change.
    assert pose_positions(16, 4096, 2, np.random.default_rng(0)).tolist() == [
        *range(13),
        2612,
        2613,
        2614,
    ]
    assert pose_positions(12, 100, 3, np.random.default_rng(1)).tolist() == [
        *range(5),
        *range(89, 96),
    ]
    got = endprompt_pose_positions(9, 3, 200, 2, "random", np.random.default_rng(2))
    assert got.tolist() == [*range(7), 56, 57, 73, 74, 75]
    explicit = pose_positions(16, 4096, 2, np.random.default_rng(0), sampler="paper")
    np.testing.assert_array_equal(explicit, pose_positions(16, 4096, 2, np.random.default_rng(0)))


@SETTINGS
@given(pose_args(), st.sampled_from(["paper", "reference"]))
def test_pose_chunks_match_positions(args, sampler):
    S, L, n, seed = args
    if sampler == "reference":
        n = min(n, 2)
    pos, lengths = pose_chunks(S, L, n, np.random.default_rng(seed), sampler)
    assert_valid_layout(pos, S, L)
    assert lengths.sum() == S and lengths.min() >= 1 and len(lengths) == n
    biases = pos - np.arange(S)
    for chunk in np.split(biases, np.cumsum(lengths)[:-1]):
        assert len(set(chunk.tolist())) == 1  # one skip bias per chunk
    again = pose_positions(S, L, n, np.random.default_rng(seed), sampler)
    np.testing.assert_array_equal(pos, again)


@SETTINGS
@given(st.integers(2, 5000), st.integers(0, 2**32 - 1))
def test_reference_sampler_first_chunk_is_the_short_one(S, seed):
    lengths = pose_chunk_lengths(S, 2, np.random.default_rng(seed), "reference")
    assert 1 <= lengths[0] <= (S + 1) // 2 and lengths.sum() == S


def test_reference_sampler_is_uniform_over_its_range():
    # S = 9: l0 ~ U{1 .. 5}; the paper's rule would reach 8.
    rng = np.random.default_rng(0)
    firsts = np.array([pose_chunk_lengths(9, 2, rng, "reference")[0] for _ in range(5000)])
    assert set(np.unique(firsts)) == {1, 2, 3, 4, 5}
    assert np.all(np.abs(np.bincount(firsts)[1:] / 5000 - 0.2) < 0.03)
    paper = np.array([pose_chunk_lengths(9, 2, rng, "paper")[0] for _ in range(4000)])
    assert set(np.unique(paper)) == set(range(1, 9))


def test_endprompt_pose_reference_sampler_applies_to_the_context():
    rng = np.random.default_rng(3)
    for _ in range(200):
        pos, lengths = endprompt_pose_chunks(20, 4, 10_000, 2, "fixed", rng, "reference")
        assert lengths.sum() == 20 and 1 <= lengths[0] <= 10
        assert pos[-1] == 9999


@SETTINGS
@given(st.integers(1, 6), st.integers(0, 10_000), st.integers(0, 2**32 - 1))
def test_pose_text_offsets_invariants(n, available, seed):
    w = pose_text_offsets(n, available, np.random.default_rng(seed))
    assert w.dtype == np.int64 and w.shape == (n,)
    assert w[0] == 0 and np.all(np.diff(w) >= 0) and w[-1] <= available


def test_pose_text_offsets_hand_cases():
    assert pose_text_offsets(1, 50).tolist() == [0]  # one chunk: nothing to skip, no rng needed
    assert pose_text_offsets(3, 0, np.random.default_rng(0)).tolist() == [0, 0, 0]
    rng = np.random.default_rng(0)
    v = np.array([pose_text_offsets(2, 4, rng)[1] for _ in range(5000)])  # v ~ U{0 .. 4}
    assert np.all(np.abs(np.bincount(v, minlength=5) / 5000 - 0.2) < 0.03)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: contiguous_positions(0), "S must be >= 1"),
        (lambda: endprompt_positions(0, 3, 64), "a must be >= 1"),
        (lambda: endprompt_positions(5, 0, 64), "t must be >= 1"),
        (lambda: endprompt_positions(60, 5, 64), "a \\+ t must be <= L"),
        (lambda: endprompt_positions(5, 3, 64, "middle"), "placement must be one of"),
        (lambda: endprompt_positions(5, 3, 64, "random"), "rng"),
        (lambda: endprompt_positions(5.0, 3, 64), "a must be an integer"),
        (lambda: pose_positions(8, 4), "S must be <= L"),
        (lambda: pose_positions(3, 64, 4, np.random.default_rng(0)), "num_chunks must be <= S"),
        (lambda: pose_positions(8, 64, 2), "rng"),
        (lambda: endprompt_pose_positions(5, 3, 64, 2, "fixed"), "rng"),
        (lambda: pose_positions(8, 64, 2, np.random.default_rng(0), "appendix"), "sampler"),
        (lambda: pose_positions(8, 64, 3, np.random.default_rng(0), "reference"), "num_chunks"),
        (lambda: pose_text_offsets(2, -1, np.random.default_rng(0)), "available must be >= 0"),
        (lambda: pose_text_offsets(2, 5), "rng"),
        (lambda: pose_text_offsets(0, 5), "num_chunks must be >= 1"),
    ],
)
def test_invalid_arguments_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
