"""Data files checked before training reads them: stale index caches, token ids beyond the
vocabulary, truncated or foreign .bin/.idx pairs."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest
from dataset_fixtures import EOD, VOCAB, distinct_docs, make_config, write_corpus

from megatron_endprompt.data import corpus_checks
from megatron_endprompt.data.builder import build_datasets, parse_blend
from megatron_endprompt.data.corpus_checks import CorpusError


def _tokens(dataset) -> list[list[int]]:
    return [dataset[i]["tokens"].tolist() for i in range(len(dataset))]


def _rewrite(prefix: str, docs: list) -> None:
    """Re-preprocess into the same prefix; bump mtimes so even a coarse clock sees a change."""
    old = os.stat(prefix + ".idx").st_mtime_ns
    write_corpus(prefix, docs)
    for suffix in (".bin", ".idx"):
        os.utime(prefix + suffix, ns=(old + 10**9, old + 10**9))


@pytest.mark.parametrize("cache_beside_data", [False, True])
def test_rewritten_corpus_gets_a_fresh_index_cache(tmp_path, cache_beside_data):
    prefix = write_corpus(str(tmp_path / "c" / "doc"), distinct_docs(60))
    cache = None if cache_beside_data else str(tmp_path / "cache")
    build_datasets(make_config(prefix, cache, cues=[[1]]), [40, None, None])
    shorter = distinct_docs(12, rng_seed=7, low=100, high=200)
    _rewrite(prefix, shorter)
    again, _, _ = build_datasets(make_config(prefix, cache, cues=[[1]]), [40, None, None])
    fresh_prefix = write_corpus(str(tmp_path / "fresh" / "doc"), shorter)
    fresh, _, _ = build_datasets(
        make_config(fresh_prefix, str(tmp_path / "fresh_cache"), cues=[[1]]), [40, None, None]
    )
    assert _tokens(again) == _tokens(fresh)  # no IndexError, no sample of the old corpus


def test_unchanged_corpus_still_reuses_the_cache(tmp_path):
    prefix = write_corpus(str(tmp_path / "c" / "doc"), distinct_docs(40))
    cache = str(tmp_path / "cache")
    first, _, _ = build_datasets(make_config(prefix, cache, cues=[[1]]), [20, None, None])
    second, _, _ = build_datasets(make_config(prefix, cache, cues=[[1]]), [20, None, None])
    assert second.unique_description_hash == first.unique_description_hash
    assert '"data_files"' in first.unique_description
    # A copy or a touch (new mtimes, same index): the indices still fit, the key stays.
    for suffix in (".bin", ".idx"):
        os.utime(prefix + suffix, ns=(10**18, 10**18))
    third, _, _ = build_datasets(make_config(prefix, cache, cues=[[1]]), [20, None, None])
    assert third.unique_description_hash == first.unique_description_hash


def test_rewritten_blend_member_gets_a_fresh_blend_cache(tmp_path):
    docs_a, shorter = distinct_docs(60), distinct_docs(12, rng_seed=7, low=100, high=200)
    a = write_corpus(str(tmp_path / "a" / "doc"), docs_a)
    b = write_corpus(str(tmp_path / "b" / "doc"), distinct_docs(60, rng_seed=1))
    cache = str(tmp_path / "cache")
    build_datasets(make_config(parse_blend([a, b]), cache, cues=[[1]]), [40, None, None])
    _rewrite(b, shorter)
    again, _, _ = build_datasets(
        make_config(parse_blend([a, b]), cache, cues=[[1]]), [40, None, None]
    )
    fresh_a = write_corpus(str(tmp_path / "fa" / "doc"), docs_a)
    fresh_b = write_corpus(str(tmp_path / "fb" / "doc"), shorter)
    fresh, _, _ = build_datasets(
        make_config(parse_blend([fresh_a, fresh_b]), str(tmp_path / "fc"), cues=[[1]]),
        [40, None, None],
    )
    assert _tokens(again) == _tokens(fresh)


def test_token_id_beyond_vocab_names_path_max_and_vocab(tmp_path):
    prefix = write_corpus(str(tmp_path / "c" / "doc"), [[1, 2, VOCAB + 41, EOD]] * 10)
    with pytest.raises(CorpusError) as info:
        build_datasets(make_config(prefix, str(tmp_path / "cache"), cues=[[1]]), [5, None, None])
    message = str(info.value)
    assert prefix in message and str(VOCAB + 41) in message and str(VOCAB) in message
    assert "--tokenizer-type" in message


def test_max_token_id_is_scanned_once(tmp_path, monkeypatch):
    prefix = write_corpus(str(tmp_path / "c" / "doc"), distinct_docs(40))
    cache = str(tmp_path / "cache")
    build_datasets(make_config(prefix, cache, cues=[[1]]), [20, None, None])
    assert [f for f in os.listdir(cache) if f.endswith("-token_stats.json")]

    def no_scan(*args):
        raise AssertionError("scanned again")

    monkeypatch.setattr(corpus_checks, "scan_max_token_id", no_scan)
    build_datasets(make_config(prefix, cache, cues=[[1]]), [20, None, None])
    _rewrite(prefix, distinct_docs(40, rng_seed=3))
    with pytest.raises(AssertionError, match="scanned again"):  # a new corpus is scanned anew
        build_datasets(make_config(prefix, cache, cues=[[1]]), [20, None, None])


def test_scan_max_token_id_reads_in_chunks(tmp_path, monkeypatch):
    path = tmp_path / "x.bin"
    values = np.arange(1000, dtype=np.uint16)[::-1].copy()
    values[777] = 4000
    values.tofile(path)
    monkeypatch.setattr(corpus_checks, "_SCAN_CHUNK", 64)
    assert corpus_checks.scan_max_token_id(str(tmp_path / "x"), np.dtype(np.uint16)) == 4000


def _corrupt(prefix: str, how: str) -> str:
    """Damage the pair at ``prefix``; return the path the error must name."""
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    if how == "truncated_bin":
        with open(bin_, "r+b") as f:
            f.truncate(os.path.getsize(bin_) - 6)
        return bin_
    data = bytearray(open(idx, "rb").read())
    if how == "garbage_idx":
        data = bytearray(b"<html>not an index</html>" * 4)
    elif how == "bad_version":
        data[9:17] = struct.pack("<Q", 7)
    elif how == "truncated_idx":
        data = data[:-5]
    elif how == "bad_counts":
        data[18:26] = struct.pack("<Q", 10**6)
    open(idx, "wb").write(bytes(data))
    return idx


@pytest.mark.parametrize(
    "how", ["truncated_bin", "garbage_idx", "bad_version", "truncated_idx", "bad_counts"]
)
def test_damaged_pair_is_named(tmp_path, how):
    prefix = write_corpus(str(tmp_path / "c" / "doc"), distinct_docs(40))
    bad = _corrupt(prefix, how)
    with pytest.raises(CorpusError, match=bad.replace(".", r"\.")):
        build_datasets(make_config(prefix, str(tmp_path / "cache"), cues=[[1]]), [5, None, None])


def test_pairs_written_by_megatron_pass(tmp_path):
    prefix = write_corpus(str(tmp_path / "c" / "doc"), distinct_docs(40))
    assert corpus_checks.check_indexed_pair(prefix) == np.dtype(np.int32)


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: harmless, but it leaves a file behind."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("cache_beside_data", [False, True])
@pytest.mark.parametrize("index", ["document", "sample", "shuffle"])
def test_planted_pickle_in_the_index_cache_never_runs(tmp_path, index, cache_beside_data):
    prefix = write_corpus(str(tmp_path / "c" / "doc"), distinct_docs(60))
    cache = None if cache_beside_data else str(tmp_path / "cache")
    build_datasets(make_config(prefix, cache, cues=[[1]]), [20, None, None])
    (path,) = [
        os.path.join(root, name)
        for root, _, names in os.walk(cache or prefix)
        for name in names
        if name.endswith(f"-train-{index}_index.npy")
    ]
    marker = str(tmp_path / "pwned")
    np.save(path, np.array([_Payload(marker)], dtype=object))
    with pytest.raises(ValueError, match=f"index cache file {path} holds Python objects"):
        build_datasets(make_config(prefix, cache, cues=[[1]]), [20, None, None])
    assert not os.path.exists(marker)
    with pytest.raises(ValueError):  # numpy's own refusal without allow_pickle: it was a pickle
        np.load(path)


def test_index_cache_file_header_checks(tmp_path):
    good = str(tmp_path / "good.npy")
    np.save(good, np.arange(5, dtype=np.int64))
    corpus_checks.check_index_cache_file(good)
    v2 = str(tmp_path / "v2.npy")  # format 2.0 (numpy's choice for headers over 64 KiB)
    with open(v2, "wb") as f:
        np.lib.format.write_array(f, np.arange(3, dtype=np.uint32), version=(2, 0))
    corpus_checks.check_index_cache_file(v2)
    garbage = str(tmp_path / "garbage.npy")
    open(garbage, "wb").write(b"not an npy file")
    with pytest.raises(ValueError, match=f"index cache file {garbage} is unreadable"):
        corpus_checks.check_index_cache_file(garbage)
    nested = str(tmp_path / "nested.npy")  # an object inside a structured dtype is unpickled too
    np.save(nested, np.zeros(2, dtype=[("a", "<i4"), ("b", "O")]), allow_pickle=True)
    with pytest.raises(ValueError, match="holds Python objects"):
        corpus_checks.check_index_cache_file(nested)
