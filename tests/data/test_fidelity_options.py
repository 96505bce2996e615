"""EndPromptDataset's reference-code fidelity options: terminal_source="document_end",
pose_chunk_sampler and pose_skip_text. Hand-worked examples (S = 8, t = 3, L = 64) and an
independent reference built on GPTDataset's flat token stream."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
from dataset_fixtures import EOD, distinct_docs, make_config, write_corpus
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megatron_endprompt.data.builder import build_datasets
from megatron_endprompt.data.dataset import EndPromptDataset
from megatron_endprompt.data.layouts import (
    chunk_text_index,
    count_document_end_fallbacks,
    document_end_tail,
)
from megatron_endprompt.positions import (
    endprompt_pose_chunks,
    endprompt_positions,
    pose_chunks,
    pose_text_offsets,
)

# Four documents laid out in this order by random_seed=5 (checked below): stream offsets
# A [0, 11), B [11, 41), C [41, 45), E [45, 65); eight samples start at 0, 8, ..., 56.
A = [*range(10, 20), EOD]
B = [*range(100, 129), EOD]
C = [50, 51, 52, EOD]
E = [*range(200, 219), EOD]
END_B, END_E = [126, 127, 128], [216, 217, 218]

# first token -> (tokens, labels) under document_end, t = 3 (a = 5).
DOCUMENT_END = {
    10: ([10, 11, 12, 13, 14, 17, 18, 19], [11, 12, 13, 14, 17, 18, 19, EOD]),  # gap 15 16
    18: ([18, 19, EOD, 100, 101, *END_B], [19, EOD, 100, 101, *END_B, EOD]),  # context ends in B
    105: ([105, 106, 107, 108, 109, *END_B], [106, 107, 108, 109, *END_B, EOD]),
    113: ([113, 114, 115, 116, 117, *END_B], [114, 115, 116, 117, *END_B, EOD]),
    121: ([121, 122, 123, 124, 125, *END_B], [122, 123, 124, 125, *END_B, EOD]),  # gap 0
    # C ends at the context's end (no t + 1 tokens after it): the contiguous tail is kept.
    EOD: ([EOD, 50, 51, 52, EOD, 200, 201, 202], [50, 51, 52, EOD, 200, 201, 202, 203]),
    203: ([203, 204, 205, 206, 207, *END_E], [204, 205, 206, 207, *END_E, EOD]),
    211: ([211, 212, 213, 214, 215, *END_E], [212, 213, 214, 215, *END_E, EOD]),  # gap 0
}


@pytest.fixture(scope="module")
def four_docs(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("four_docs")
    return write_corpus(os.path.join(root, "docs", "text_document"), [A, B, C, E])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("corpus")
    return write_corpus(os.path.join(root, "docs", "text_document"), distinct_docs(40))


def build(prefix: str, cache: str, num_samples: int = 30, **overrides) -> EndPromptDataset:
    train, _, _ = build_datasets(make_config(prefix, cache, **overrides), [num_samples, None, None])
    return train


DOC_END = dict(terminal="tail", tail_length=3, terminal_source="document_end")


@pytest.mark.parametrize("placement", ["fixed", "random"])
def test_document_end_worked_example(four_docs, tmp_path, placement):
    ds = build(
        four_docs,
        str(tmp_path),
        8,
        random_seed=5,
        placement=placement,
        terminal_loss_weight=0.5,
        **DOC_END,
    )
    assert ds.document_index.tolist() == [0, 1, 2, 3] and len(ds) == 8
    seen = set()
    for idx in range(len(ds)):
        s = {k: v.tolist() for k, v in ds[idx].items()}
        tokens, labels = DOCUMENT_END[s["tokens"][0]]
        seen.add(s["tokens"][0])
        assert (s["tokens"], s["labels"]) == (tokens, labels), idx
        assert s["loss_mask"] == [1, 1, 1, 1, 0.5, 0.5, 0.5, 0.5]
        # Positions never depend on the text: the same layout as contiguous tail mode.
        rng = ds.sample_rng(idx) if placement == "random" else None
        assert s["position_ids"] == endprompt_positions(5, 3, 64, placement, rng).tolist()
    assert seen == set(DOCUMENT_END)
    assert ds.document_end_fallbacks() == 1


def test_document_end_fallback_is_logged(four_docs, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="megatron_endprompt.data.dataset"):
        build(four_docs, str(tmp_path), 8, random_seed=5, **DOC_END)
    assert "1 of 8 samples end their document inside the sample" in caplog.text


def test_document_end_tail_rule_by_hand():
    sizes = np.array([11, 30, 4, 20])
    order = np.arange(4)
    assert document_end_tail(sizes, order, 0, 0, 5, 3) == (0, 7)  # A's last 4: offsets 7..10
    assert document_end_tail(sizes, order, 0, 8, 5, 3) == (1, 26)  # context ends in B
    assert document_end_tail(sizes, order, 1, 29, 5, 3) is None  # C ends at the context's end
    assert document_end_tail(sizes, order, 3, 11, 5, 3) == (3, 16)  # gap 0
    assert document_end_tail(sizes, order, 3, 17, 5, 3) is None  # past the stream's end
    starts = np.array([[0, 0], [0, 8], [1, 5], [1, 13], [1, 21], [1, 29], [3, 3], [3, 11]])
    assert count_document_end_fallbacks(sizes, order, starts, 5, 3) == 1


def test_chunk_text_index_hand_example():
    got = chunk_text_index(np.array([3, 5]), np.array([0, 4]), 9)
    assert got.tolist() == [0, 1, 2, 7, 8, 9, 10, 11, 12]
    # endprompt_pose: context chunks [2, 3] of a = 5; the terminal and last label follow chunk 2.
    got = chunk_text_index(np.array([2, 3]), np.array([0, 1]), 9)
    assert got.tolist() == [0, 1, 3, 4, 5, 6, 7, 8, 9]


def test_pose_skip_text_jumps_at_the_chunk_boundary(tmp_path):
    """One document whose token ids equal their stream offsets: the text skip is visible."""
    prefix = write_corpus(str(tmp_path / "one" / "text_document"), [list(range(241))])
    ds = build(prefix, str(tmp_path / "c"), 20, position_mode="pose", pose_skip_text=True)
    skipped = 0
    for idx in range(len(ds)):
        s = ds[idx]
        y = s["tokens"].tolist() + [int(s["labels"][-1])]
        rng = ds.sample_rng(idx)
        positions, lengths = pose_chunks(8, 64, 2, rng, ds.config.pose_chunk_sampler)
        assert s["position_ids"].tolist() == positions.tolist()
        start = y[0]
        text_jump = np.array(y) - start - np.arange(9)
        l0 = int(lengths[0])
        assert np.all(text_jump[:l0] == 0) and np.all(text_jump[l0:] == text_jump[l0])
        available = min(64 - 8, 240 - (start + 8))  # tokens after xS, at most L - S
        assert 0 <= text_jump[l0] <= available
        skipped += int(text_jump[l0] > 0)
    assert skipped > len(ds) // 2


def flat_stream(ds: EndPromptDataset) -> tuple[np.ndarray, np.ndarray]:
    """GPTDataset's documents end to end, and each document's end offset in that stream."""
    docs = [ds.dataset.get(int(d)) for d in ds.document_index]
    return np.concatenate(docs).astype(np.int64), np.cumsum([len(d) for d in docs])


def reference_text(ds: EndPromptDataset, idx: int, stream, ends) -> tuple[list[int], object]:
    """The sample's y (S + 1 tokens) by the written contract, and its layout draw."""
    c = ds.config
    S, L, n = c.sequence_length, c.target_length, c.pose_num_chunks
    rng = ds.sample_rng(idx)
    s0 = int(ds.shuffle_index[idx]) * S
    t = len(c.cue_token_ids[0]) if c.uses_cue else c.tail_length
    if c.uses_cue and len(c.cue_token_ids) > 1:
        t = len(c.cue_token_ids[int(rng.integers(len(c.cue_token_ids)))])
    if c.position_mode == "pose":
        positions, lengths = pose_chunks(S, L, n, rng, c.pose_chunk_sampler)
    elif c.position_mode == "endprompt_pose":
        positions, lengths = endprompt_pose_chunks(
            S - t, t, L, n, c.placement, rng, c.pose_chunk_sampler
        )
    else:
        positions = endprompt_positions(S - t, t, L, c.placement, rng)
        lengths = np.array([S - t])
    skips = np.zeros(len(lengths), dtype=np.int64)
    if c.pose_skip_text:
        doc_end = ends[np.searchsorted(ends, s0 + S, side="right")]
        skips = pose_text_offsets(len(lengths), int(min(L - S, doc_end - (s0 + S) - 1)), rng)
    last = len(lengths) - 1
    chunk_of = np.minimum(np.searchsorted(np.cumsum(lengths), np.arange(S + 1), "right"), last)
    y = [int(stream[s0 + k + skips[chunk_of[k]]]) for k in range(S + 1)]
    if c.terminal_source == "document_end":
        a = S - t
        doc_end = int(ends[np.searchsorted(ends, s0 + a - 1, side="right")])
        if doc_end - (s0 + a - 1) - 1 >= t + 1:
            y[a:] = stream[doc_end - t - 1 : doc_end].tolist()
    if c.uses_cue:
        cue = list(c.cue_token_ids[[len(ids) for ids in c.cue_token_ids].index(t)])
        y[S - t :] = [*cue, EOD]
    return y, positions


OPTIONS = [
    dict(position_mode="endprompt", **DOC_END),
    dict(position_mode="endprompt_pose", **DOC_END),
    dict(position_mode="pose", pose_skip_text=True),
    dict(position_mode="pose", pose_chunk_sampler="reference"),
    dict(position_mode="pose", pose_skip_text=True, pose_chunk_sampler="reference"),
    dict(position_mode="endprompt_pose", terminal="tail", tail_length=3, pose_skip_text=True),
    dict(position_mode="endprompt_pose", cues=[[7], [8, 9]], pose_skip_text=True),
    dict(position_mode="pose", pose_skip_text=True, pose_num_chunks=3),
]


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    options=st.sampled_from(OPTIONS),
    placement=st.sampled_from(["fixed", "random"]),
    S=st.sampled_from([8, 16]),
    L_factor=st.sampled_from([1, 2, 8]),
)
def test_matches_stream_reference(corpus, tmp_path, options, placement, S, L_factor):
    ds = build(
        corpus,
        str(tmp_path),
        20,
        sequence_length=S,
        target_length=L_factor * S,
        placement=placement,
        **options,
    )
    stream, ends = flat_stream(ds)
    for idx in range(len(ds)):
        y, positions = reference_text(ds, idx, stream, ends)
        s = ds[idx]
        assert s["tokens"].tolist() == y[:-1], idx
        assert s["labels"].tolist() == y[1:], idx
        assert s["position_ids"].tolist() == positions.tolist(), idx


def test_reference_sampler_keeps_the_near_chunk_short(tmp_path, corpus):
    ds = build(
        corpus,
        str(tmp_path),
        200,
        sequence_length=16,
        position_mode="pose",
        target_length=1 << 20,
        pose_chunk_sampler="reference",
    )
    firsts = set()
    for idx in range(len(ds)):
        pos = ds[idx]["position_ids"].numpy()
        jump = np.flatnonzero(np.diff(pos) > 1)
        firsts.update((jump + 1).tolist())
    assert firsts and max(firsts) <= (16 + 1) // 2 and min(firsts) >= 1


def test_new_fields_join_the_cache_key(corpus, tmp_path):
    keys = EndPromptDataset._key_config_attributes()
    assert {"terminal_source", "pose_chunk_sampler", "pose_skip_text"} <= set(keys)
    base = build(corpus, str(tmp_path), position_mode="pose")
    other = build(corpus, str(tmp_path), position_mode="pose", pose_skip_text=True)
    assert base.unique_description_hash != other.unique_description_hash


BAD_CONFIGS = [
    (dict(terminal_source="middle"), "terminal_source"),
    (dict(terminal_source="document_end"), "terminal_source"),  # cue terminal
    (
        dict(position_mode="pose", terminal="tail", tail_length=3, terminal_source="document_end"),
        "terminal_source",
    ),
    (dict(**DOC_END, add_extra_token_to_sequence=False), "add_extra_token_to_sequence"),
    (dict(position_mode="endprompt_pose", pose_skip_text=True, **DOC_END), "two text sources"),
    (dict(pose_chunk_sampler="appendix", position_mode="pose"), "pose_chunk_sampler"),
    (dict(pose_chunk_sampler="reference"), "pose_chunk_sampler"),  # not a PoSE mode
    (
        dict(position_mode="pose", pose_chunk_sampler="reference", pose_num_chunks=3),
        "pose_num_chunks",
    ),
    (dict(pose_skip_text=True), "pose_skip_text"),  # not a PoSE mode
    (dict(position_mode="pose", pose_skip_text="yes"), "pose_skip_text"),
    (
        dict(position_mode="pose", pose_skip_text=True, add_extra_token_to_sequence=False),
        "add_extra_token_to_sequence",
    ),
]


@pytest.mark.parametrize("overrides,needle", BAD_CONFIGS)
def test_config_validation(tmp_path, overrides, needle):
    with pytest.raises(ValueError, match=needle):
        make_config("/nonexistent/prefix", str(tmp_path), **{"cues": [[1]], **overrides})
