"""build_datasets: blends, splits, the index cache and the reading-rank predicate."""

from __future__ import annotations

import os

import numpy as np
import pytest
from dataset_fixtures import EOD, make_config, write_corpus
from megatron.core.datasets.blended_dataset import BlendedDataset

from megatron_endprompt.data.builder import (
    build_datasets,
    is_dataset_built_on_rank,
    parse_blend,
)
from megatron_endprompt.data.dataset import EndPromptDataset


def labelled_docs(num_docs: int, base: int = 0, length: int = 12) -> list[list[int]]:
    """Document i holds ``length - 1`` copies of id base + i, then EOD."""
    return [[base + i] * (length - 1) + [EOD] for i in range(num_docs)]


def text_ids(sample) -> set[int]:
    return {t for t in sample["tokens"].tolist() + sample["labels"].tolist() if t != EOD}


@pytest.mark.parametrize(
    "data_path,expected",
    [
        (["a"], (["a"], None)),
        (["a", "b", "c"], (["a", "b", "c"], None)),
        (["0.3", "a", "0.7", "b"], (["a", "b"], [0.3, 0.7])),
        (["30", " a ", "70", "b"], (["a", "b"], [30.0, 70.0])),
    ],
)
def test_parse_blend(data_path, expected):
    assert parse_blend(data_path) == expected


@pytest.mark.parametrize("bad", [[], "prefix", ["-1", "a", "2", "b"], ["0", "a", "0", "b"]])
def test_parse_blend_rejects(bad):
    with pytest.raises(ValueError, match="data_path"):
        parse_blend(bad)


def test_split_969_30_1_keeps_documents_apart(tmp_path):
    """40 docs: train = docs 0..38, valid = doc 39, test = no docs (an empty dataset)."""
    prefix = write_corpus(str(tmp_path / "c" / "doc"), labelled_docs(40))
    config = make_config(
        prefix, str(tmp_path / "cache"), split="969,30,1", terminal="tail", tail_length=2
    )
    train, valid, test = build_datasets(config, [50, 3, 0])
    assert isinstance(train, EndPromptDataset) and len(train) >= 50
    assert len(valid) >= 3 and len(test) == 0
    assert set().union(*(text_ids(train[i]) for i in range(len(train)))) == set(range(39))
    assert set().union(*(text_ids(valid[i]) for i in range(len(valid)))) == {39}


def test_empty_split_with_requested_samples_fails(tmp_path):
    prefix = write_corpus(str(tmp_path / "c" / "doc"), labelled_docs(40))
    config = make_config(prefix, str(tmp_path / "cache"), split="969,30,1", cues=[[1]])
    with pytest.raises(ValueError, match="test split"):
        build_datasets(config, [50, 3, 4])


def test_weighted_blend_draws_from_the_right_prefix(tmp_path):
    a = write_corpus(str(tmp_path / "a" / "doc"), labelled_docs(30, base=0))
    b = write_corpus(str(tmp_path / "b" / "doc"), labelled_docs(30, base=100))
    blend = parse_blend(["0.3", a, "0.7", b])
    config = make_config(blend, str(tmp_path / "cache"), terminal="tail", tail_length=2)
    train, valid, test = build_datasets(config, [40, None, None])
    assert isinstance(train, BlendedDataset) and len(train) == 40
    assert valid is None and test is None  # split "1,0,0": sizes of empty splits are ignored
    ids = np.array([int(train[i]["dataset_id"]) for i in range(40)])
    assert abs(int((ids == 0).sum()) - 12) <= 1  # 0.3 * 40
    for i in range(40):
        expected = range(0, 30) if ids[i] == 0 else range(100, 130)
        assert text_ids(train[i]) <= set(expected)
        assert train[i]["position_ids"].tolist() == [0, 1, 2, 3, 4, 5, 62, 63]


def test_unweighted_blend_uses_dataset_sizes(tmp_path):
    a = write_corpus(str(tmp_path / "a" / "doc"), labelled_docs(10))
    b = write_corpus(str(tmp_path / "b" / "doc"), labelled_docs(30, base=100))
    config = make_config(parse_blend([a, b]), str(tmp_path / "cache"), cues=[[1]])
    train, _, _ = build_datasets(config, [None, None, None])
    assert isinstance(train, BlendedDataset)
    ids = np.array([int(train[i]["dataset_id"]) for i in range(len(train))])
    # 10 docs * 12 tokens -> 14 samples of 8 (+1); 30 docs -> 44 samples.
    assert (int((ids == 0).sum()), int((ids == 1).sum())) == (14, 44)


def cache_files(cache: str) -> dict[str, float]:
    """megatron's index cache files (the token-id stats JSON files left out) and their mtimes."""
    names = [f for f in sorted(os.listdir(cache)) if not f.endswith("-token_stats.json")]
    return {f: os.path.getmtime(os.path.join(cache, f)) for f in names}


def test_index_cache_is_reused(tmp_path):
    prefix = write_corpus(str(tmp_path / "c" / "doc"), labelled_docs(40))
    cache = str(tmp_path / "cache")
    first, _, _ = build_datasets(make_config(prefix, cache, cues=[[1]]), [20, None, None])
    before = cache_files(cache)
    assert len(before) == 4  # description + document, sample and shuffle indices
    second, _, _ = build_datasets(make_config(prefix, cache, cues=[[1]]), [20, None, None])
    assert cache_files(cache) == before
    assert second.unique_description_hash == first.unique_description_hash
    for i in range(len(first)):
        assert first[i]["tokens"].tolist() == second[i]["tokens"].tolist()


@pytest.mark.parametrize(
    "change",
    [
        dict(cues=[[2]]),
        dict(terminal_loss_weight=0.5),
        dict(placement="random"),
        dict(target_length=128),
        dict(position_mode="endprompt_pose"),
        dict(terminal="tail", tail_length=2),
    ],
)
def test_endprompt_fields_change_the_cache_key(tmp_path, change):
    prefix = write_corpus(str(tmp_path / "c" / "doc"), labelled_docs(40))
    cache = str(tmp_path / "cache")
    base, _, _ = build_datasets(make_config(prefix, cache, cues=[[1]]), [20, None, None])
    other, _, _ = build_datasets(
        make_config(prefix, cache, **{"cues": [[1]], **change}), [20, None, None]
    )
    assert other.unique_description_hash != base.unique_description_hash
    assert len(cache_files(cache)) == 8
    for key in ("cues", "cue_token_ids", "position_mode", "terminal_loss_weight"):
        assert f'"{key}"' in base.unique_description


def test_build_datasets_checks_sizes(tmp_path):
    prefix = write_corpus(str(tmp_path / "c" / "doc"), labelled_docs(40))
    config = make_config(prefix, str(tmp_path / "cache"), cues=[[1]])
    with pytest.raises(ValueError, match="train_valid_test_num_samples"):
        build_datasets(config, [10, None])
    with pytest.raises(ValueError, match="train_valid_test_num_samples"):
        build_datasets(config, [-1, None, None])


def test_weighted_blend_needs_sizes(tmp_path):
    a = write_corpus(str(tmp_path / "a" / "doc"), labelled_docs(30))
    b = write_corpus(str(tmp_path / "b" / "doc"), labelled_docs(30, base=100))
    blend = parse_blend(["1", a, "1", b])
    config = make_config(blend, str(tmp_path / "cache"), split="9,1,0", cues=[[1]])
    with pytest.raises(ValueError, match="valid split of a weighted blend"):
        build_datasets(config, [10, None, None])


def test_missing_prefix_is_named(tmp_path):
    config = make_config(str(tmp_path / "nope" / "doc"), str(tmp_path / "cache"), cues=[[1]])
    with pytest.raises(FileNotFoundError, match="nope/doc"):
        build_datasets(config, [10, None, None])


@pytest.mark.parametrize("tp,expected", [(0, True), (1, False), (3, False)])
def test_is_dataset_built_on_rank(tp, expected):
    # Every pipeline stage reads (each needs position_ids); only TP rank 0 of it.
    assert is_dataset_built_on_rank(tp) is expected


def test_is_dataset_built_on_rank_without_distributed():
    assert is_dataset_built_on_rank() is True
