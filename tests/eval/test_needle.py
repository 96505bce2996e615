"""RULER-style needle tasks, checked with oracle models that parse the haystack."""

from __future__ import annotations

import re

import pytest
import torch

from megatron_endprompt.eval.intervals import bootstrap_mean_interval
from megatron_endprompt.eval.needle import (
    NEEDLE,
    WORDS,
    NeedleResult,
    evaluate_needle,
    make_needle_prompt,
    score_answer,
)

EOD = 256
VOCAB = 257
NEEDLE_RE = re.compile(rb"One of the special magic numbers for (\w+) is: (\d+)\.")
QUESTION_RE = re.compile(
    rb"special magic numbers? for (\w+) mentioned in the provided text (?:is|are)"
)


class Bytes:
    """UTF-8 bytes 0..255 and eod = 256, no BOS."""

    eod = EOD
    vocab_size = VOCAB

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def haystack_oracle(answer_for):
    """After the question, predicts " " + answer_for(needles, word) + eod, where needles are the
    (word, number) pairs in text order and word is the queried word."""

    def logits_fn(input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        b, s = input_ids.shape
        logits = torch.zeros(b, s, VOCAB)
        for r in range(b):
            data = bytes(t if t < 256 else 0 for t in input_ids[r].tolist())
            matches = list(QUESTION_RE.finditer(data))
            q_end = matches[-1].end()
            needles = [(m.group(1), m.group(2)) for m in NEEDLE_RE.finditer(data[:q_end])]
            answer = b" " + answer_for(needles, matches[-1].group(1))
            for t in range(q_end - 1, s):
                k = t - (q_end - 1)
                logits[r, t, answer[k] if k < len(answer) else EOD] = 30.0
        return logits

    return logits_fn


def all_values(needles, word):
    return b", ".join(n for w, n in needles if w == word)


def first_in_text(needles, word):
    return needles[0][1]


@pytest.mark.parametrize("task", ["single", "multikey", "multivalue"])
def test_prompt_structure(task):
    tok = Bytes()
    p = make_needle_prompt(tok, task, 500, seed=1, trial=0, num_distractors=3, num_values=4)
    assert len(p.ids) == 500
    assert p == make_needle_prompt(tok, task, 500, seed=1, trial=0)
    text = tok.detokenize(p.ids)
    needles = NEEDLE_RE.findall(text.encode())
    assert len(needles) == {"single": 1, "multikey": 4, "multivalue": 4}[task]
    assert len(p.needle_starts) == len(needles)
    for start in p.needle_starts:
        assert tok.detokenize(p.ids[start:]).startswith(" One of the special magic numbers")
    words = [w.decode() for w, _ in needles]
    numbers = [n.decode() for _, n in needles]
    assert p.word in words and all(w in WORDS for w in words)
    assert len(set(numbers)) == len(numbers) and all(len(n) == 7 for n in numbers)
    if task == "multikey":
        assert len(set(words)) == 4
    if task == "multivalue":
        assert set(words) == {p.word} and sorted(p.expected) == sorted(numbers)
    else:
        assert p.expected == [numbers[words.index(p.word)]]
    assert text.endswith(
        f"for {p.word} mentioned in the provided text " + ("are" if task == "multivalue" else "is")
    )


def test_prompts_vary_across_trials():
    tok = Bytes()
    prompts = [make_needle_prompt(tok, "single", 300, seed=0, trial=t) for t in range(5)]
    assert len({p.expected[0] for p in prompts}) == 5
    assert NEEDLE.format(word=prompts[0].word, number=prompts[0].expected[0]) in tok.detokenize(
        prompts[0].ids
    )


def test_score_answer():
    assert score_answer(" 1234567, 7654321", ["1234567", "7654321"]) == 1.0
    assert score_answer(" 1234567", ["1234567", "7654321"]) == 0.5
    assert score_answer(" 123456", ["1234567"]) == 0.0
    with pytest.raises(ValueError, match="expected"):
        score_answer("x", [])


@pytest.mark.parametrize("task", ["single", "multikey", "multivalue"])
def test_oracle_is_perfect(task):
    r = evaluate_needle(
        haystack_oracle(all_values), Bytes(), task, [500, 800], trials=2, seed=0, progress=False
    )
    assert r.accuracy == [1.0, 1.0]
    assert r.scores == [[1.0, 1.0], [1.0, 1.0]]


def test_uniform_model_scores_zero():
    def uniform(input_ids, position_ids):
        return torch.zeros(*input_ids.shape, VOCAB)

    r = evaluate_needle(uniform, Bytes(), "single", [300], trials=2, seed=0, progress=False)
    assert r.accuracy == [0.0]


def test_distractors_and_partial_values_are_scored():
    tok = Bytes()
    lengths, trials = [400, 800], 4
    # An oracle answering the first number in the text is right on multikey exactly when the
    # queried needle (the first drawn) is placed first.
    r = evaluate_needle(
        haystack_oracle(first_in_text), tok, "multikey", lengths, trials, 3, progress=False
    )
    for i, n in enumerate(lengths):
        for t in range(trials):
            starts = make_needle_prompt(tok, "multikey", n, 3, t).needle_starts
            assert r.scores[i][t] == float(starts[0] == min(starts))
    assert 0.0 < sum(map(sum, r.scores)) < len(lengths) * trials
    # Intervals per length: the bootstrap over that length's trial scores.
    intervals = r.interval_by_length()
    for i, n in enumerate(lengths):
        assert r.accuracy[i] == pytest.approx(sum(r.scores[i]) / trials)
        assert intervals[n] == bootstrap_mean_interval(r.scores[i])
        assert 0.0 <= intervals[n][0] <= r.accuracy[i] <= intervals[n][1] <= 1.0
    d = r.to_dict()
    assert d["accuracy_interval_by_length"] == {str(n): list(intervals[n]) for n in lengths}
    assert d["interval_level"] == 0.95 and d["bootstrap_resamples"] == 2000
    # On multivalue it recovers one of the m values.
    r = evaluate_needle(
        haystack_oracle(first_in_text),
        tok,
        "multivalue",
        [400],
        2,
        3,
        num_values=4,
        progress=False,
    )
    assert r.scores == [[0.25, 0.25]]


def test_errors():
    def uniform(input_ids, position_ids):
        return torch.zeros(*input_ids.shape, VOCAB)

    with pytest.raises(ValueError, match="task"):
        evaluate_needle(uniform, Bytes(), "nope", [300], 1, 0)
    with pytest.raises(ValueError, match="lengths: 600"):
        evaluate_needle(uniform, Bytes(), "single", [300, 600], 1, 0, max_position=512)
    with pytest.raises(ValueError, match="length: 100"):
        make_needle_prompt(Bytes(), "multikey", 100, 0, 0)


def test_needle_intervals_options_and_progress_lines(capsys):
    r = evaluate_needle(
        haystack_oracle(all_values), Bytes(), "single", [500], trials=5, seed=0, progress=False,
        interval_level=0.8, bootstrap_resamples=0, progress_lines=True,
    )  # fmt: skip
    assert r.to_dict()["accuracy_interval_by_length"] is None  # 0 resamples: no intervals
    assert r.interval_by_length(resamples=50) == {500: (1.0, 1.0)}  # all trials right
    err = capsys.readouterr().err.strip().splitlines()
    # ceil(5 / 4) = 2: lines after trials 2, 4 and the last one.
    assert [line.split(",")[0] for line in err] == [
        f"needle/single@500: {t}/5 trials" for t in (2, 4, 5)
    ]
    with pytest.raises(ValueError, match="interval_level"):
        evaluate_needle(uniform_model, Bytes(), "single", [300], 1, 0, interval_level=0)
    with pytest.raises(ValueError, match="scores"):
        NeedleResult("single", [300], 1, 0, [0.5]).interval_by_length()


def uniform_model(input_ids, position_ids):
    return torch.zeros(*input_ids.shape, VOCAB)
