"""EndPromptDataset against plain megatron-core GPTDataset, DESIGN.md's worked examples and an
independent per-token reference implementation."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from dataset_fixtures import (
    BOS,
    EOD,
    TinyTokenizer,
    distinct_docs,
    make_config,
    plain_gpt_dataset,
    write_corpus,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from megatron.core.datasets.utils import Split

from megatron_endprompt.data.builder import build_datasets
from megatron_endprompt.data.dataset import EP1_CUE, EndPromptDataset, resolve_cues
from megatron_endprompt.positions import (
    endprompt_pose_positions,
    endprompt_positions,
    pose_positions,
)

W = np.float32(0.1)  # default terminal_loss_weight for cues, as stored in a float32 loss mask


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("corpus")
    return write_corpus(os.path.join(root, "docs", "text_document"), distinct_docs(40))


def build(corpus: str, cache: str, num_samples: int = 30, **overrides) -> EndPromptDataset:
    config = make_config(corpus, cache, **overrides)
    train, _, _ = build_datasets(config, [num_samples, None, None])
    assert isinstance(train, EndPromptDataset)
    return train


def gpt_text(gpt, idx: int) -> list[int]:
    """The S + 1 tokens x0 .. xS of plain GPTDataset's sample idx."""
    s = gpt[idx]
    return s["tokens"].tolist() + [int(s["labels"][-1])]


def as_lists(sample: dict) -> dict:
    return {k: v.tolist() for k, v in sample.items()}


def test_worked_example_cue_mode(corpus, tmp_path):
    """DESIGN.md: S = 8, L = 64, fixed, cue c0 c1 c2."""
    cue = [201, 202, 203]
    ds = build(corpus, str(tmp_path), cues=[cue])
    gpt = plain_gpt_dataset(ds.config, corpus, 30)
    for idx in range(len(ds)):
        x = gpt_text(gpt, idx)
        got = as_lists(ds[idx])
        assert got["tokens"] == [x[0], x[1], x[2], x[3], x[4], 201, 202, 203]
        assert got["labels"] == [x[1], x[2], x[3], x[4], 201, 202, 203, EOD]
        assert got["loss_mask"] == [1, 1, 1, 1, W, W, W, 0]
        assert got["position_ids"] == [0, 1, 2, 3, 4, 61, 62, 63]
        assert ds[idx]["loss_mask"].dtype == torch.float32
        assert ds[idx]["position_ids"].dtype == torch.int64


def test_worked_example_tail_mode(corpus, tmp_path):
    """DESIGN.md: S = 8, L = 64, fixed, tail_length 3, default weight 1.0 (here 0.5 to see it)."""
    ds = build(corpus, str(tmp_path), terminal="tail", tail_length=3, terminal_loss_weight=0.5)
    gpt = plain_gpt_dataset(ds.config, corpus, 30)
    for idx in range(len(ds)):
        x = gpt_text(gpt, idx)
        got = as_lists(ds[idx])
        assert got["tokens"] == x[:8]
        assert got["labels"] == x[1:9]
        assert got["loss_mask"] == [1, 1, 1, 1, 0.5, 0.5, 0.5, 0.5]
        assert got["position_ids"] == [0, 1, 2, 3, 4, 61, 62, 63]


def test_tail_default_weight_is_one(corpus, tmp_path):
    ds = build(corpus, str(tmp_path), terminal="tail", tail_length=3)
    assert ds.config.terminal_loss_weight == 1.0
    assert ds[0]["loss_mask"].tolist() == [1.0] * 8


@pytest.mark.parametrize("eod_mask_loss", [False, True])
@pytest.mark.parametrize("create_attention_mask", [False, True])
def test_contiguous_equals_gpt_dataset(corpus, tmp_path, eod_mask_loss, create_attention_mask):
    ds = build(
        corpus,
        str(tmp_path),
        position_mode="contiguous",
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=create_attention_mask,
    )
    gpt = plain_gpt_dataset(ds.config, corpus, 30)
    assert len(ds) == len(gpt)
    for idx in range(len(ds)):
        ours, theirs = ds[idx], gpt[idx]
        assert ours.keys() == theirs.keys()
        for key in theirs:
            assert torch.equal(ours[key], theirs[key]), key
        assert ours["loss_mask"].dtype == torch.float32


def reference_sample(x: list[int], config, rng: np.random.Generator) -> dict:
    """Per-token reference of DESIGN.md's rules, from GPTDataset's text x0 .. xS."""
    S, L, w = config.sequence_length, config.target_length, np.float32(config.terminal_loss_weight)
    mode = config.position_mode
    if mode == "pose":
        y, weights = list(x), [1.0] * S
        positions = pose_positions(S, L, config.pose_num_chunks, rng, config.pose_chunk_sampler)
        return _finish(y, weights, positions, config)
    if config.terminal == "cue":
        cues = config.cue_token_ids
        cue = list(cues[int(rng.integers(len(cues)))] if len(cues) > 1 else cues[0])
        t = len(cue)
        y = list(x[: S - t]) + cue + [EOD]
    else:
        t = config.tail_length
        y = list(x)
    a = S - t
    weights = []
    for i in range(S):
        if i < a - 1:
            weights.append(1.0)
        elif config.terminal == "cue" and i == S - 1:
            weights.append(0.0)
        else:
            weights.append(w)
    if mode == "endprompt":
        positions = endprompt_positions(a, t, L, config.placement, rng)
    else:
        positions = endprompt_pose_positions(
            a, t, L, config.pose_num_chunks, config.placement, rng, config.pose_chunk_sampler
        )
    return _finish(y, weights, positions, config)


def _finish(y, weights, positions, config) -> dict:
    if config.eod_mask_loss:
        weights = [0.0 if y[i] == EOD else wi for i, wi in enumerate(weights)]
    return {
        "tokens": y[:-1],
        "labels": y[1:],
        "loss_mask": [float(np.float32(v)) for v in weights],
        "position_ids": positions.tolist(),
    }


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    mode=st.sampled_from(["endprompt", "pose", "endprompt_pose"]),
    terminal=st.sampled_from(["cue", "tail"]),
    placement=st.sampled_from(["fixed", "random"]),
    eod_mask_loss=st.booleans(),
    S=st.sampled_from([8, 16, 24]),
    cues=st.sampled_from([[[7]], [[9, 8], [EOD], [1, 2, 3, 4]], ["ab", [EOD]]]),
    weight=st.sampled_from([0.0, 0.1, 0.25, 2.0]),
)
def test_matches_reference(
    corpus, tmp_path, mode, terminal, placement, eod_mask_loss, S, cues, weight
):
    ds = build(
        corpus,
        str(tmp_path),
        num_samples=10,
        sequence_length=S,
        target_length=4 * S,
        position_mode=mode,
        terminal=terminal,
        placement=placement,
        eod_mask_loss=eod_mask_loss,
        tail_length=3,
        cues=cues,
        terminal_loss_weight=weight,
    )
    gpt = plain_gpt_dataset(ds.config, corpus, 10)
    for idx in range(min(len(ds), 10)):
        expected = reference_sample(gpt_text(gpt, idx), ds.config, ds.sample_rng(idx))
        assert as_lists(ds[idx]) == expected, idx


def test_context_is_prefix_of_gpt_sample(corpus, tmp_path):
    ds = build(corpus, str(tmp_path), cues=[[5, 6], [7, 8, 9]])  # fixed: a gap before the cue
    gpt = plain_gpt_dataset(ds.config, corpus, 30)
    for idx in range(len(ds)):
        ours, theirs = ds[idx], gpt[idx]
        b = 8 - int((ours["position_ids"].diff() > 1).nonzero()[0]) - 1  # cue length
        a = 8 - b
        assert ours["tokens"][:a].tolist() == theirs["tokens"][:a].tolist()
        assert ours["labels"][: a - 1].tolist() == theirs["labels"][: a - 1].tolist()


def test_deterministic_across_builds_and_access_order(corpus, tmp_path):
    kw = dict(position_mode="endprompt_pose", placement="random", cues=[[1], [2, 3]])
    first = build(corpus, str(tmp_path / "a"), **kw)
    second = build(corpus, str(tmp_path / "b"), **kw)
    forward = [as_lists(first[i]) for i in range(len(first))]
    backward = [as_lists(second[i]) for i in reversed(range(len(second)))][::-1]
    assert forward == backward
    assert as_lists(first[3]) == forward[3]  # stable on re-access


def test_random_placement_varies_but_is_stable(corpus, tmp_path):
    ds = build(corpus, str(tmp_path), sequence_length=16, placement="random", cues=[[4, 5]])
    starts = {int(ds[i]["position_ids"][14]) for i in range(len(ds))}
    assert len(starts) > 3  # start ~ U{14 .. 62}
    assert all(14 <= s <= 62 for s in starts)
    assert [ds[5]["position_ids"].tolist()] * 2 == [ds[5]["position_ids"].tolist() for _ in "ab"]
    fixed = build(corpus, str(tmp_path / "f"), sequence_length=16, cues=[[4, 5]])
    assert {int(fixed[i]["position_ids"][14]) for i in range(len(fixed))} == {62}


def test_cue_drawn_per_sample_from_the_set(corpus, tmp_path):
    cues = [[251], [252, 252], [253, 253, 253]]  # ids the corpus never holds
    ds = build(corpus, str(tmp_path), num_samples=60, cues=cues)
    seen = set()
    for i in range(len(ds)):
        labels = ds[i]["labels"].tolist()
        seen.add(tuple(t for t in labels[-4:-1] if t in (251, 252, 253)))
    assert seen == {(251,), (252, 252), (253, 253, 253)}


def test_seed_changes_random_choices(corpus, tmp_path):
    a = build(corpus, str(tmp_path / "a"), position_mode="pose")
    b = build(corpus, str(tmp_path / "b"), position_mode="pose", random_seed=99)
    rng_a, rng_b = a.sample_rng(0).integers(1 << 62), b.sample_rng(0).integers(1 << 62)
    assert rng_a != rng_b


def test_default_cues_and_bos_stripping():
    tok = TinyTokenizer(add_bos=True)
    assert tok.tokenize("End.")[0] == BOS
    got = resolve_cues(None, tok)
    assert got == (tuple(EP1_CUE.encode()), tuple(b"End."), (EOD,))
    assert resolve_cues(["hi", [3, 4]], tok) == ((104, 105), (3, 4))


def test_default_cue_set_in_a_dataset(corpus, tmp_path):
    ds = build(corpus, str(tmp_path), sequence_length=64, target_length=128)
    assert ds.config.cue_token_ids == (tuple(EP1_CUE.encode()), tuple(b"End."), (EOD,))
    assert ds.config.terminal_loss_weight == pytest.approx(0.1)
    assert ds[0]["labels"][-1] == EOD


def test_padding_sample_has_zero_loss_and_valid_layout(corpus, tmp_path):
    ds = build(corpus, str(tmp_path), cues=[[1, 2]], placement="random")
    pad = ds[None]
    assert pad["loss_mask"].sum() == 0
    pos = pad["position_ids"]
    assert pos[0] == 0 and bool((pos.diff() > 0).all()) and pos[-1] < 64
    assert pad["tokens"].shape == (8,)


def test_attention_mask_is_gpt_causal_mask(corpus, tmp_path):
    ds = build(corpus, str(tmp_path), create_attention_mask=True, cues=[[1]])
    expected = ~torch.tril(torch.ones(8, 8, dtype=torch.bool)).unsqueeze(0)
    assert torch.equal(ds[0]["attention_mask"], expected)


def test_without_extra_token(corpus, tmp_path):
    """add_extra_token_to_sequence=False: GPTDataset predicts a pad (weight 0) last."""
    ds = build(
        corpus,
        str(tmp_path),
        add_extra_token_to_sequence=False,
        terminal="tail",
        tail_length=2,
        terminal_loss_weight=0.5,
    )
    gpt = plain_gpt_dataset(ds.config, corpus, 30)
    for idx in range(len(ds)):
        ours, theirs = as_lists(ds[idx]), as_lists(gpt[idx])
        assert ours["tokens"] == theirs["tokens"]
        assert ours["labels"] == theirs["labels"]
        assert ours["loss_mask"] == [1, 1, 1, 1, 1, 0.5, 0.5, 0.0]


def test_partial_validation_sample_is_padded_like_gpt(corpus, tmp_path):
    """drop_last_partial_validation_sequence=False: the last sample ends in pads (weight 0)."""
    config = make_config(
        corpus,
        str(tmp_path),
        split="0,1,0",
        drop_last_partial_validation_sequence=False,
        terminal="tail",
        tail_length=3,
        terminal_loss_weight=0.5,
    )
    _, valid, _ = build_datasets(config, [0, None, 0])
    gpt = plain_gpt_dataset(config, corpus, None, split=Split.valid)
    assert len(valid) == len(gpt)
    template = torch.tensor([1, 1, 1, 1, 0.5, 0.5, 0.5, 0.5])
    padded = 0
    for idx in range(len(valid)):
        ours, theirs = valid[idx], gpt[idx]
        assert torch.equal(ours["tokens"], theirs["tokens"])
        assert torch.equal(ours["labels"], theirs["labels"])
        assert torch.equal(ours["loss_mask"], theirs["loss_mask"] * template)
        padded += int((theirs["loss_mask"] == 0).any())
    assert padded == 1


BAD_CONFIGS = [
    (dict(position_mode="rope"), "position_mode"),
    (dict(terminal="middle"), "terminal"),
    (dict(placement="anywhere"), "placement"),
    (dict(target_length=4), "target_length"),
    (dict(target_length=None), "target_length"),
    (dict(terminal="tail", tail_length=0), "tail_length"),
    (dict(terminal="tail", tail_length=8), "tail_length"),
    (dict(terminal="tail"), "tail_length"),
    (dict(cues=[[1] * 8]), "cues"),
    (dict(cues=["abcdefgh"]), "cues"),
    (dict(cues=[[]]), "cues"),
    (dict(cues=[[1, 999]]), "cues"),
    (dict(cues="End."), "cues"),
    (dict(cues=[1.5]), "cues"),
    (dict(cues=None), "default cue set"),
    (dict(position_mode="pose", pose_num_chunks=0), "pose_num_chunks"),
    (dict(position_mode="pose", pose_num_chunks=9), "pose_num_chunks"),
    (dict(position_mode="endprompt_pose", cues=[[1] * 6], pose_num_chunks=3), "pose_num_chunks"),
    (dict(terminal_loss_weight=-0.1), "terminal_loss_weight"),
    (dict(terminal_loss_weight=float("nan")), "terminal_loss_weight"),
    (dict(position_mode="pose", reset_position_ids=True), "reset_position_ids"),
    (dict(reset_attention_mask=True, cues=[[1]]), "reset_attention_mask"),
]


@pytest.mark.parametrize("overrides,needle", BAD_CONFIGS)
def test_config_validation(tmp_path, overrides, needle):
    with pytest.raises(ValueError, match=needle):
        make_config("/nonexistent/prefix", str(tmp_path), **{"cues": [[1]], **overrides})


def test_empty_documents_fail_with_the_prefix(tmp_path):
    prefix = write_corpus(str(tmp_path / "empty" / "text_document"), [[]] * 5)
    config = make_config(prefix, str(tmp_path / "cache"), cues=[[1]])
    with pytest.raises(ValueError, match="empty/text_document.*0 tokens"):
        build_datasets(config, [10, None, None])


def test_too_small_corpus_fails(tmp_path):
    prefix = write_corpus(str(tmp_path / "small" / "text_document"), [[1, 2, 3], [4, EOD]])
    config = make_config(prefix, str(tmp_path / "cache"), cues=[[1]])
    with pytest.raises(ValueError, match="small/text_document.*5 tokens"):
        build_datasets(config, [10, None, None])
