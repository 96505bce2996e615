"""Passkey training documents: exact lengths, evaluation format, determinism, the written
indexed dataset, and how megatron-core's GPTDataset cuts samples from it."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
from dataset_fixtures import make_config, write_corpus
from hypothesis import given, settings
from hypothesis import strategies as st
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.utils import Split
from tool_main import tool_main

from megatron_endprompt.data.builder import build_datasets
from megatron_endprompt.data.tokenizers import ByteTokenizer, SentencePieceTokenizer
from megatron_endprompt.eval.passkey import make_passkey_prompt
from megatron_endprompt.prep.passkey_corpus import (
    _build,
    decode_check,
    document_episodes,
    make_passkey_document,
    make_passkey_window,
    tail_tokens,
    write_passkey_corpus,
)

BYTES = ByteTokenizer()
# The evaluation's prompt pieces, spelled out here (not imported) so a change on either side fails.
FILLERS = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
           "There and back again.")  # fmt: skip
QUESTION_BYTES = list(b" What is the pass key? The pass key is")


def _needle_bytes(key: str) -> list[int]:
    return list(f" The pass key is {key}. Remember it. {key} is the pass key.".encode())


@settings(max_examples=40, deadline=None)
@given(
    extra=st.integers(0, 300),
    digits=st.integers(1, 5),
    append_eod=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
    depths=st.tuples(st.floats(0, 1), st.floats(0, 1)).map(sorted),
)
def test_byte_documents_exact_layout(extra, digits, append_eod, seed, depths):
    key_len = 1 + digits
    doc_tokens = 1 + len(_needle_bytes("0" * digits)) + len(QUESTION_BYTES) + key_len
    doc_tokens += int(append_eod) + extra
    rng = np.random.default_rng(seed)
    doc = make_passkey_document(BYTES, doc_tokens, rng, digits, *depths, append_eod=append_eod)
    ids = doc.ids
    assert len(ids) == doc_tokens and ids[0] == ByteTokenizer.BOS
    assert len(doc.key) == digits and doc.key[0] != "0" and doc.key.isdigit()
    answer = list(f" {doc.key}".encode()) + ([ByteTokenizer.EOD] if append_eod else [])
    assert ids[doc.answer_start :] == answer
    assert ids[doc.answer_start - len(QUESTION_BYTES) : doc.answer_start] == QUESTION_BYTES
    needle = _needle_bytes(doc.key)
    assert ids[doc.needle_start : doc.needle_start + len(needle)] == needle
    assert doc.needle_start + len(needle) <= doc.answer_start - len(QUESTION_BYTES)
    assert depths[0] <= doc.depth <= depths[1]
    text = decode_check(BYTES, doc)
    assert text.endswith(f"What is the pass key? The pass key is {doc.key}")


def test_filler_is_the_evaluation_filler():
    doc = make_passkey_document(BYTES, 700, np.random.default_rng(3), min_depth=0.5)
    text = BYTES.detokenize(doc.ids)
    before, after = text.split(
        f" The pass key is {doc.key}. Remember it. {doc.key} is the pass key."
    )
    after = after.removesuffix(f" What is the pass key? The pass key is {doc.key}")
    sentences = re.findall(r"[^.]+\.", before + after)
    assert len(sentences) > 20
    # The first sentence may be cut at the front; every other one is a whole filler sentence.
    assert any(f.endswith(sentences[0].strip()) for f in FILLERS)
    assert all(s.strip() in FILLERS for s in sentences[1:])


def test_prompt_part_is_an_evaluation_prompt():
    """Same key and depth: the document before its answer is the evaluation's prompt."""
    prompt = make_passkey_prompt(BYTES, 200, depth=0.4, seed=1, trial=2)
    doc = _build(BYTES, prompt.key, 200 + len(prompt.answer_ids), 0.4, append_eod=False)
    assert doc.ids[: doc.answer_start] == prompt.ids
    assert doc.ids[doc.answer_start :] == prompt.answer_ids
    assert doc.needle_start == prompt.needle_start


def _realized_depth(doc, digits=5):
    fixed = 1 + len(_needle_bytes("0" * digits)) + len(QUESTION_BYTES) + 1 + digits
    return (doc.needle_start - 1) / (len(doc.ids) - fixed)


def test_needle_depth_spans_the_requested_range():
    depths = [
        _realized_depth(
            make_passkey_document(BYTES, 600, np.random.default_rng([7, i]), 5, 0.2, 0.7)
        )
        for i in range(300)
    ]
    tol = max(len(f) + 1 for f in FILLERS) / (600 - 109)  # one filler sentence
    assert 0.2 - tol <= min(depths) < 0.2 + 0.05
    assert 0.7 - 0.05 < max(depths) <= 0.7 + tol
    # The needle sits at filler sentence boundaries: about 0.5 * 491 / 17 of them in range.
    assert len({round(d, 3) for d in depths}) >= 12
    full = [
        _realized_depth(make_passkey_document(BYTES, 600, np.random.default_rng(i)))
        for i in range(300)
    ]
    assert min(full) == 0.0 and max(full) == 1.0


def test_determinism_and_distinct_keys():
    kw = dict(digits=5, min_depth=0.0, max_depth=1.0, append_eod=True)
    docs = [document_episodes(BYTES, i, 11, 300, **kw)[0] for i in range(60)]
    again = [document_episodes(BYTES, i, 11, 300, **kw)[0] for i in range(60)]
    other = [document_episodes(BYTES, i, 12, 300, **kw)[0] for i in range(60)]
    assert docs == again
    assert [d.key for d in docs] != [d.key for d in other]
    assert len({d.key for d in docs}) >= 58
    assert len({d.needle_start for d in docs}) >= 10


def test_window_packs_complete_episodes():
    for seed in range(20):
        eps = make_passkey_window(BYTES, 1000, np.random.default_rng(seed), 120, append_eod=True)
        assert sum(len(e.ids) for e in eps) == 1000
        assert all(len(e.ids) >= 120 and e.ids[-1] == ByteTokenizer.EOD for e in eps)
        for e in eps:
            decode_check(BYTES, e)
    counts = [
        len(make_passkey_window(BYTES, 1000, np.random.default_rng(s), 120)) for s in range(20)
    ]
    assert min(counts) >= 1 and max(counts) <= 1000 // 120 and len(set(counts)) > 1
    with pytest.raises(ValueError, match="--min-episode-tokens"):
        make_passkey_window(BYTES, 1000, np.random.default_rng(0), 1001)


def test_window_questions_land_at_many_positions_the_end_included():
    # 300-token documents, episodes >= 120: one episode (question at the end) or two.
    windows = [make_passkey_window(BYTES, 300, np.random.default_rng(s), 120) for s in range(60)]
    assert {len(w) for w in windows} == {1, 2}
    ends = {sum(len(e.ids) for e in w[:1]) for w in windows if len(w) == 2}
    assert len(ends) > 10 and min(ends) >= 120 and max(ends) <= 180


def test_tail_tokens_is_the_question_and_answer_suffix():
    for digits, eod in ((5, True), (3, False), (1, True)):
        t = tail_tokens(BYTES, digits, eod)
        assert t == 38 + 1 + digits + int(eod)
        doc = make_passkey_document(
            BYTES, 400, np.random.default_rng(digits), digits, append_eod=eod
        )
        assert BYTES.detokenize(doc.ids[-t:]) == f" What is the pass key? The pass key is {doc.key}"
        assert doc.ids[-t - 1] == ord(".")  # the token before the tail ends a sentence
    with pytest.raises(ValueError, match="--digits"):
        tail_tokens(BYTES, 6)


def test_sentencepiece_documents(tiny_sp_model):
    sp = SentencePieceTokenizer(tiny_sp_model)
    t = tail_tokens(sp, digits=2, append_eod=True)
    question = sp.tokenize(" What is the pass key? The pass key is")
    suffixes = []
    for seed in range(30):
        doc = make_passkey_document(sp, 150 + seed, np.random.default_rng(seed), 2, append_eod=True)
        assert len(doc.ids) == 150 + seed and doc.ids[0] == sp.bos and doc.ids[-1] == sp.eod
        assert doc.ids[doc.answer_start - len(question) : doc.answer_start] == question
        decode_check(sp, doc)
        suffixes.append(len(doc.ids) - doc.answer_start + len(question))
    assert max(suffixes) <= t
    keys = [sp.tokenize(f" {k}") for k in range(10, 100)]
    assert t == len(question) + max(len(k) for k in keys) + 1


def test_decode_check_rejects_a_wrong_key():
    doc = make_passkey_document(BYTES, 200, np.random.default_rng(0))
    bad = type(doc)(doc.ids, "1" + doc.key[1:] if doc.key[0] != "1" else "2" + doc.key[1:],
                    doc.needle_start, doc.answer_start, doc.depth)  # fmt: skip
    with pytest.raises(ValueError, match="needle"):
        decode_check(BYTES, bad)


def test_written_dataset_reads_back(tmp_path):
    kw = dict(digits=4, min_depth=0.1, max_depth=0.9, append_eod=True)
    stats = write_passkey_corpus(str(tmp_path / "pk"), BYTES, 25, 180, 5, **kw)
    ds = IndexedDataset(str(tmp_path / "pk_text_document"))
    assert len(ds) == 25 and ds[0].dtype == np.uint16
    for i in range(25):
        assert ds[i].tolist() == document_episodes(BYTES, i, 5, 180, **kw)[0].ids
    assert (stats.documents, stats.tokens, stats.tail_tokens) == (25, 25 * 180, 38 + 5 + 1)
    assert "wrote 25 documents" in stats.summary() and "= 44" in stats.summary()
    assert sorted(os.listdir(tmp_path)) == ["pk_text_document.bin", "pk_text_document.idx"]


def _gpt_dataset(prefix: str, seq_length: int, cache: str) -> GPTDataset:
    config = GPTDatasetConfig(
        random_seed=1234,
        sequence_length=seq_length,
        blend=([prefix], None),
        split="1,0,0",
        path_to_cache=cache,
        tokenizer=BYTES,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        add_extra_token_to_sequence=True,
    )
    low = GPTDataset.build_low_level_dataset(prefix, config)
    indices = np.arange(len(low.sequence_lengths), dtype=np.int32)
    return GPTDataset(low, prefix, indices, None, Split.train, config)


def test_gpt_samples_are_whole_documents_when_documents_are_seq_length(tmp_path):
    """Documents of exactly S tokens: each (shuffled) sample's S inputs are one whole document."""
    S, n = 160, 12
    write_passkey_corpus(str(tmp_path / "pk"), BYTES, n, S, 0, append_eod=True)
    docs = {tuple(document_episodes(BYTES, i, 0, S, append_eod=True)[0].ids) for i in range(n)}
    ds = _gpt_dataset(str(tmp_path / "pk_text_document"), S, str(tmp_path / "cache"))
    assert len(ds) == n - 1  # the last document in the order only lends the extra label token
    t = tail_tokens(BYTES, 5, True)
    for k in range(len(ds)):
        sample = ds[k]
        tokens = sample["tokens"].tolist()
        assert tuple(tokens) in docs and tokens[0] == ByteTokenizer.BOS
        assert BYTES.detokenize(tokens[-t:]).startswith(" What is the pass key? The pass key is ")
        assert tokens[-1] == ByteTokenizer.EOD and re.fullmatch(
            r"\d{5}", BYTES.detokenize(tokens[-6:-1]).strip()
        )
        assert sample["labels"].tolist()[-1] == ByteTokenizer.BOS  # next document's first token


def test_gpt_samples_drift_when_documents_are_seq_length_plus_one(tmp_path):
    """Documents of S + 1 tokens: samples overlap by one token, so they drift off the starts."""
    S, n = 160, 12
    write_passkey_corpus(str(tmp_path / "pk"), BYTES, n, S + 1, 0, append_eod=True)
    ds = _gpt_dataset(str(tmp_path / "pk_text_document"), S, str(tmp_path / "cache"))
    starts = [ds[k]["tokens"][0].item() == ByteTokenizer.BOS for k in range(len(ds))]
    assert len(ds) == (n * (S + 1) - 1) // S  # stride S windows of S + 1 tokens
    assert sum(starts) == 1  # only the very first window of the order starts a document


def test_tail_endprompt_over_a_blend_puts_question_and_key_in_the_terminal(tmp_path):
    """The replication's setting: passkey documents of S tokens blended with another corpus,
    tail-mode EndPrompt with tail_tokens: every passkey sample is one whole document, its
    terminal segment is the question + key + EOD and its needle lies in the head."""
    S, L, n = 160, 640, 10
    write_passkey_corpus(str(tmp_path / "pk"), BYTES, n, S, 0, append_eod=True)
    episodes = [document_episodes(BYTES, i, 0, S, append_eod=True)[0] for i in range(n)]
    by_ids = {tuple(e.ids): e for e in episodes}
    rng = np.random.default_rng(0)
    other = [[*rng.integers(0, 250, int(rng.integers(30, 300))).tolist(), 256] for _ in range(20)]
    write_corpus(str(tmp_path / "other_text_document"), other)
    t = tail_tokens(BYTES, 5, True)
    blend = ([str(tmp_path / "other_text_document"), str(tmp_path / "pk_text_document")], [1, 1])
    config = make_config(blend, str(tmp_path / "cache"), sequence_length=S, tokenizer=BYTES,
                         target_length=L, terminal="tail", tail_length=t)  # fmt: skip
    train, _, _ = build_datasets(config, [40, None, None])
    passkey_samples = 0
    for k in range(len(train)):
        sample = train[k]
        tokens = sample["tokens"].tolist()
        if ByteTokenizer.BOS not in tokens:
            continue  # a sample of the other corpus: no passkey fragment can reach it
        doc = by_ids[tuple(tokens)]  # KeyError: a passkey sample that is not a whole document
        passkey_samples += 1
        terminal = BYTES.detokenize(tokens[-t:])
        assert terminal == f" What is the pass key? The pass key is {doc.key}"
        assert sample["position_ids"][-t:].tolist() == list(range(L - t, L))
        assert doc.needle_start + len(_needle_bytes(doc.key)) <= S - t
    assert passkey_samples >= 10


def _main():
    return tool_main("make_passkey_corpus.py")


def test_cli_success_and_errors(tmp_path, capsys):
    main = _main()
    base = ["--output-prefix", str(tmp_path / "pk"), "--tokenizer-type", "ByteTokenizer"]
    ok = [*base, "--num-docs", "4", "--doc-tokens", "300", "--min-episode-tokens", "120"]
    assert main([*ok, "--seed", "3", "--append-eod", "--digits", "3"]) == 0
    out = capsys.readouterr().out
    assert "wrote 4 documents" in out and "tail tokens (--endprompt-tail-length) = 43" in out
    ds = IndexedDataset(str(tmp_path / "pk_text_document"))
    assert [len(ds[i]) for i in range(4)] == [300] * 4
    bad = {
        "--num-docs": ["--num-docs", "0", "--doc-tokens", "300"],
        "--doc-tokens": ["--num-docs", "2", "--doc-tokens", "50"],
        "--min-depth/--max-depth": [
            "--num-docs",
            "2",
            "--doc-tokens",
            "300",
            "--min-depth",
            "0.8",
            "--max-depth",
            "0.2",
        ],
        "--digits": ["--num-docs", "2", "--doc-tokens", "300", "--digits", "6"],
        "--tokenizer-model": ["--num-docs", "2", "--doc-tokens", "300", "--tokenizer-model", "x"],
    }
    for flag, args in bad.items():
        argv = [*base, *args]
        if flag == "--tokenizer-model":
            argv[3] = "SentencePieceTokenizer"
        assert main(argv) == 2, flag
        err = capsys.readouterr().err
        assert err.startswith(f"error: {flag}") and "\n" not in err.rstrip(), err
    assert main(["--output-prefix", str(tmp_path / "no" / "pk"), *base[2:], "--num-docs", "1",
                 "--doc-tokens", "300"]) == 2  # fmt: skip
    assert sorted(os.listdir(tmp_path)) == ["pk_text_document.bin", "pk_text_document.idx"]


def test_window_episode_starts_spread_over_the_document():
    # The last episode's own text starts uniformly in [0, 300 - 120]: no start (0 included, the
    # whole-document episode) takes much more than its 1/181 share, so a model cannot rely on
    # the question's episode starting at the document start. Lead-ins are needle-free filler.
    starts, leads = [], 0
    for s in range(600):
        eps = make_passkey_window(BYTES, 300, np.random.default_rng(s), 120)
        assert sum(len(e.ids) for e in eps) == 300
        assert all(e.lead_in == 0 for e in eps[1:])
        first = eps[0]
        lead = BYTES.detokenize(first.ids[: first.lead_in])
        assert "pass key" not in lead and first.needle_start >= first.lead_in
        leads += first.lead_in > 0
        last = eps[-1]
        starts.append(300 - (len(last.ids) - last.lead_in))
        assert BYTES.detokenize(last.ids[last.answer_start :]) == f" {last.key}"
    counts = np.bincount(starts, minlength=181)
    assert min(starts) <= 3 and max(starts) >= 177 and len(set(starts)) >= 150
    assert counts.max() <= 12  # 600 draws over 181 values: ~3.3 each
    assert leads >= 500  # a lead-in unless the episodes fill the document exactly
