"""Passkey prompts and scoring, checked with oracle models instead of a trained network."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from megatron_endprompt.eval.intervals import bootstrap_mean_interval
from megatron_endprompt.eval.passkey import (
    PasskeyResult,
    evaluate_passkey,
    leading_digits,
    make_passkey_prompt,
)
from megatron_endprompt.eval.scoring import greedy_decode, teacher_forced_token_accuracy
from megatron_endprompt.passkey_text import FILLER_SENTENCES, NEEDLE, QUESTION

EOD = 256
VOCAB = 257
NEEDLE_HEAD = b"The pass key is "
QUESTION_BYTES = QUESTION.encode()


class Bytes:
    """UTF-8 bytes 0..255 and eod = 256; ``bos`` optional (257, vocabulary grows by one)."""

    def __init__(self, bos: int | None = None) -> None:
        self.bos = bos
        self.eod = EOD
        self.vocab_size = VOCAB if bos is None else VOCAB + 1

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def copying_oracle(visible: int | None = None):
    """Reads the key from the needle (only within the first ``visible`` tokens) and, after the
    question, predicts " " + key + eod. Without a visible needle it predicts "x" (never a digit)."""

    def logits_fn(input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        b, s = input_ids.shape
        logits = torch.zeros(b, s, VOCAB + 1)
        for r in range(b):
            data = bytes(t if t < 256 else 0 for t in input_ids[r].tolist())
            match = re.search(re.escape(NEEDLE_HEAD) + rb"(\d+)\.", data[:visible])
            answer = b" " + match.group(1) if match else b"xxxxxxxx"
            q_end = data.rfind(QUESTION_BYTES) + len(QUESTION_BYTES)
            if q_end < len(QUESTION_BYTES):
                continue
            for t in range(q_end - 1, s):
                k = t - (q_end - 1)
                logits[r, t, answer[k] if k < len(answer) else EOD] = 30.0
        return logits

    return logits_fn


def uniform(input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    return torch.zeros(*input_ids.shape, VOCAB)


def successor(input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Predicts (last input + 1) mod 10 at every position."""
    return torch.nn.functional.one_hot((input_ids + 1) % 10, 10).float()


def test_greedy_decode_successor_and_stop():
    assert greedy_decode(successor, [3], 4) == [4, 5, 6, 7]
    assert greedy_decode(successor, [8], 5) == [9, 0, 1, 2, 3]
    assert greedy_decode(successor, [3], 4, stop_ids=(6,)) == [4, 5]
    assert greedy_decode(successor, [3], 0) == []


def test_greedy_decode_positions_contiguous_from_offset():
    seen = []

    def recording(input_ids, position_ids):
        seen.append(position_ids[0].tolist())
        return successor(input_ids, position_ids)

    greedy_decode(recording, [1, 2, 3], 2, position_offset=10)
    assert seen == [[10, 11, 12], [10, 11, 12, 13]]


def test_teacher_forced_accuracy_one_forward_pass():
    calls = []

    def counted(input_ids, position_ids):
        calls.append(input_ids.shape[1])
        return successor(input_ids, position_ids)

    # Inputs [1, 2, 3, 4, 9]; the answer is predicted after 3, 4, 9 as 4, 5, 0: 2 of [4, 9, 0].
    exact, acc = teacher_forced_token_accuracy(counted, [1, 2, 3], [4, 9, 0])
    assert calls == [5]
    assert (exact, acc) == (False, pytest.approx(2 / 3))
    assert teacher_forced_token_accuracy(successor, [1, 2, 3], [4, 5, 6]) == (True, 1.0)


def test_leading_digits():
    assert leading_digits(" 12 345.") == "12345"
    assert leading_digits("\n123456 is") == "123456"
    assert leading_digits("x123") == ""


@pytest.mark.parametrize("length", [120, 257, 600])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_prompt_exact_length_and_depth(length, depth):
    tok = Bytes()
    p = make_passkey_prompt(tok, length, depth, seed=3, trial=1)
    needle = tok.tokenize(" " + NEEDLE.format(key=p.key))
    question = tok.tokenize(" " + QUESTION)
    assert len(p.ids) == length
    assert p.ids[p.needle_start : p.needle_start + len(needle)] == needle
    assert p.ids[-len(question) :] == question
    assert tok.detokenize(p.ids[: -len(question)]).endswith(".")  # whole sentence before it
    assert len(p.key) == 5 and p.key[0] != "0"
    assert p.answer_ids == tok.tokenize(" " + p.key)
    n_filler = length - len(needle) - len(question)
    longest_sentence = max(len(s) + 1 for s in FILLER_SENTENCES)
    assert abs(p.needle_start - depth * n_filler) <= longest_sentence
    # Only filler outside the needle and question.
    filler = tok.detokenize(p.ids[: p.needle_start] + p.ids[p.needle_start + len(needle) :])
    assert "pass key" not in filler[: -len(question)]


def test_prompt_depth_extremes_and_bos():
    tok = Bytes(bos=257)
    start = make_passkey_prompt(tok, 300, 0.0, seed=0, trial=0)
    assert start.ids[0] == 257 and start.needle_start == 1
    end = make_passkey_prompt(tok, 300, 1.0, seed=0, trial=0)
    question = tok.tokenize(" " + QUESTION)
    needle_len = len(tok.tokenize(" " + NEEDLE.format(key=end.key)))
    assert end.needle_start + needle_len == 300 - len(question)
    # No room for filler at all: BOS, needle, question.
    tight = make_passkey_prompt(tok, 1 + needle_len + len(question), 0.5, seed=0, trial=0)
    assert tight.needle_start == 1 and tight.ids[-len(question) :] == question


def test_prompt_deterministic_and_keys_vary():
    tok = Bytes()
    a = make_passkey_prompt(tok, 200, 0.5, seed=7, trial=2)
    assert a == make_passkey_prompt(tok, 200, 0.5, seed=7, trial=2)
    keys = {make_passkey_prompt(tok, 200, 0.5, seed=7, trial=t).key for t in range(6)}
    assert len(keys) == 6
    assert make_passkey_prompt(tok, 200, 0.5, seed=8, trial=2).key != a.key
    assert len(make_passkey_prompt(tok, 200, 0.5, seed=7, trial=0, digits=8).key) == 8


def test_copying_oracle_is_perfect_everywhere():
    r = evaluate_passkey(
        copying_oracle(), Bytes(), [128, 300], [0.0, 0.5, 1.0], trials=2, seed=0, progress=False
    )
    assert r.exact_match == [[1.0] * 3] * 2
    assert r.token_accuracy == [[1.0] * 3] * 2
    assert r.mean_by_length() == {128: 1.0, 300: 1.0}


def test_uniform_model_scores_exactly_zero():
    # Ties go to id 0 (torch.argmax picks the first maximum): the greedy answer is NUL bytes
    # and no key token (a space or a digit) is ever the argmax.
    r = evaluate_passkey(uniform, Bytes(), [150], [0.0, 1.0], trials=2, seed=1, progress=False)
    assert r.exact_match == [[0.0, 0.0]]
    assert r.token_accuracy == [[0.0, 0.0]]


def test_limited_window_oracle_grid():
    # Needle bytes before the key: 17 (" The pass key is "), key 5, "." 1 -> visible iff
    # needle_start + 23 <= 120. Filler: length - 59 (needle) - 38 (question) tokens.
    # length 200: starts ~ 0, 26, 52, 77, 103 -> visible, visible, visible, visible, hidden.
    # length 400: starts ~ 0, 76, 151, 227, 303 -> visible, visible, hidden x3.
    depths = [0.0, 0.25, 0.5, 0.75, 1.0]
    r = evaluate_passkey(
        copying_oracle(visible=120), Bytes(), [200, 400], depths, 2, seed=5, progress=False
    )
    assert r.exact_match == [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]]
    assert r.token_accuracy == [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]]
    assert r.mean_by_length("token_accuracy") == {200: 0.8, 400: 0.4}
    # Per-trial scores: both trials of a cell agree, so resampling trials within each depth never
    # changes a length's mean: the intervals collapse onto it.
    assert r.exact_match_trials == [[[v, v] for v in row] for row in r.exact_match]
    assert r.interval_by_length("token_accuracy") == {
        200: pytest.approx((0.8, 0.8)),
        400: pytest.approx((0.4, 0.4)),
    }


def test_errors_name_the_argument():
    tok = Bytes()
    with pytest.raises(ValueError, match="lengths: 4096 .*max_position=2048"):
        evaluate_passkey(uniform, tok, [1024, 4096], [0.5], 1, 0, max_position=2048)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="depths"):
            evaluate_passkey(uniform, tok, [200], [bad], 1, 0)
    with pytest.raises(ValueError, match="trials"):
        evaluate_passkey(uniform, tok, [200], [0.5], 0, 0)
    with pytest.raises(ValueError, match="length: 50"):
        make_passkey_prompt(tok, 50, 0.5, seed=0, trial=0)
    with pytest.raises(ValueError, match="metric"):
        evaluate_passkey(uniform, tok, [120], [0.5], 1, 0, progress=False).mean_by_length("x")


def test_digit_accuracy_scores_only_the_key_digits():
    # The model predicts the leading space right, the first two digits right and then "x":
    # 2 of 5 digits (the space is not scored; counting it would give 3 of 6).
    def two_digits(input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        logits = copying_oracle()(input_ids, position_ids)
        data = bytes(t if t < 256 else 0 for t in input_ids[0].tolist())
        q_end = data.rfind(QUESTION_BYTES) + len(QUESTION_BYTES)
        for t in range(q_end - 1 + 3, input_ids.shape[1]):  # from the third digit on
            logits[0, t] = 0.0
            logits[0, t, ord("x")] = 30.0
        return logits

    r = evaluate_passkey(two_digits, Bytes(), [150], [0.5], trials=3, seed=2, progress=False)
    assert r.exact_match == [[0.0]]
    assert r.token_accuracy == [[pytest.approx(0.4)]]


def odd_keys_oracle(input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """The copying oracle where the key's last digit is odd; uniform (always wrong) elsewhere."""
    logits = copying_oracle()(input_ids, position_ids)
    for r in range(input_ids.shape[0]):
        data = bytes(t if t < 256 else 0 for t in input_ids[r].tolist())
        key = re.search(re.escape(NEEDLE_HEAD) + rb"(\d+)\.", data).group(1)
        if key[-1] % 2 == 0:
            logits[r] = 0.0
    return logits


def test_trials_and_intervals_by_length(capsys):
    depths, trials = [0.0, 0.25, 0.5], 3
    r = evaluate_passkey(
        odd_keys_oracle, Bytes(), [300], depths, trials=trials, seed=1, progress=False,
        interval_level=0.9, bootstrap_resamples=400, progress_lines=True,
    )  # fmt: skip
    want = [[[float(int(make_passkey_prompt(Bytes(), 300, d, 1, t).key[-1]) % 2)
              for t in range(trials)] for d in depths]]  # fmt: skip
    assert r.exact_match_trials == want and r.token_accuracy_trials == want
    assert 0 < sum(map(sum, want[0])) < 9  # some trials right, some wrong
    np.testing.assert_allclose(r.exact_match, [[sum(c) / trials for c in want[0]]])
    values = [v for cell in r.exact_match_trials[0] for v in cell]
    want = bootstrap_mean_interval(
        values, level=0.9, resamples=400, strata=[0, 0, 0, 1, 1, 1, 2, 2, 2]
    )
    assert r.interval_by_length() == {300: want}
    assert want[0] <= r.mean_by_length()[300] <= want[1]
    d = r.to_dict()
    assert d["exact_match_interval_by_length"] == {"300": list(want)}
    assert d["token_accuracy_interval_by_length"] == {
        "300": list(r.interval_by_length("token_accuracy")[300])
    }
    assert d["interval_level"] == 0.9 and d["bootstrap_resamples"] == 400
    assert d["exact_match_trials"] == r.exact_match_trials
    err = capsys.readouterr().err.strip().splitlines()
    assert [line.split(",")[0] for line in err] == [f"passkey@300: {n}/9 trials" for n in (3, 6, 9)]
    assert all(" eta " in line for line in err)


def test_result_without_trials_has_no_intervals():
    r = PasskeyResult([128], [0.5], 2, 0, 5, [[0.5]], [[0.7]])
    assert not r.has_intervals
    assert r.to_dict()["exact_match_interval_by_length"] is None
    with pytest.raises(ValueError, match="exact_match_trials"):
        r.interval_by_length()
    with pytest.raises(ValueError, match="bootstrap_resamples"):
        evaluate_passkey(uniform, Bytes(), [150], [0.5], 1, 0, bootstrap_resamples=-1)
    with pytest.raises(ValueError, match="interval_level"):
        evaluate_passkey(uniform, Bytes(), [150], [0.5], 1, 0, interval_level=1.5)


def test_answer_in_length_keeps_the_answer_inside_the_window():
    # A model that only works at input positions < 200 (trained at 200): with 200-token prompts
    # every digit is predicted at positions >= 200; counting the answer in the length (6 bytes:
    # " " + 5 digits) moves the prompt to 194 tokens, the last prediction (the extra token after
    # the key) to position 199, and the oracle is perfect.
    oracle = copying_oracle()

    def trained_at_200(input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        logits = oracle(input_ids, position_ids)
        logits[position_ids >= 200] = 0.0  # ties -> id 0: never a digit
        return logits

    depths = [0.0, 0.5, 1.0]
    out = evaluate_passkey(trained_at_200, Bytes(), [200], depths, 2, seed=3, progress=False)
    inside = evaluate_passkey(
        trained_at_200, Bytes(), [200], depths, 2, seed=3, progress=False, answer_in_length=True
    )
    assert out.exact_match == [[0.0, 0.0, 0.0]] and out.token_accuracy == [[0.0, 0.0, 0.0]]
    assert inside.exact_match == [[1.0, 1.0, 1.0]] and inside.token_accuracy == [[1.0] * 3]
    assert inside.to_dict()["answer_in_length"] is True
    assert out.to_dict()["answer_in_length"] is False
    p = make_passkey_prompt(Bytes(), 200, 0.5, 3, 0, answer_in_length=True)
    assert len(p.ids) + len(p.answer_ids) == 200 and len(p.answer_ids) == 6
    assert len(make_passkey_prompt(Bytes(), 200, 0.5, 3, 0).ids) == 200
