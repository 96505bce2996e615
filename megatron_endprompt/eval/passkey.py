"""Passkey retrieval (Mohtashami & Jaggi 2023; the LongLoRA / PoSE variant).

A prompt of exactly ``length`` tokens: repeated filler sentences with one needle
"The pass key is K. Remember it. K is the pass key." at a requested depth, then the question
"What is the pass key? The pass key is". Two metrics per (length, depth) cell:

- exact match: greedy decoding, whitespace removed, the leading run of digits equals the key;
- digit accuracy: teacher-forced argmax accuracy of the key's digit-bearing tokens (the soft
  metric that shows partial recovery; it and exact match should agree at the training length).
  A token without a digit (SentencePiece's lone leading "▁", the byte tokenizer's space) is not
  scored: it is predictable without retrieving anything. Stored as ``token_accuracy``.

The greedy answer text of every trial is kept too (``answers``), to read what a model said, and
so is every trial's score (``exact_match_trials``, ``token_accuracy_trials``): the percentile
bootstrap of ``eval/intervals.py`` turns them into an uncertainty interval of each length's mean
(trials resampled within each depth).

Prompts are built at the token level (each sentence tokenized once, with a leading space so the
pieces join like running text), which makes the length exact for any tokenizer. The length counts
the BOS token (when the tokenizer has one) and the question, not the generated answer (the
reference evaluations' convention), so the answer's ``a`` tokens sit at positions ``length ..
length + a - 1``. With ``answer_in_length`` the prompt is ``a`` tokens shorter and the answer ends
at position ``length - 1``: the whole episode fits in a context of ``length`` tokens, as in the
passkey training documents of ``prep/passkey_corpus.py`` (whose exact length includes the
answer). That is the honest reading for a model trained at exactly that length; at small scale
the answer is a large share of the window (6 of 128 tokens) and positions past the trained ones
decide the score. Measured (a 4-layer base trained at 128 on documents ending with the answer at
position 127, 11 depths x 20 trials): exact match 0.10 with 128-token prompts, 0.82 with 122-token
prompts, i.e. ``answer_in_length``.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from megatron_endprompt.eval.intervals import (
    DEFAULT_LEVEL,
    DEFAULT_RESAMPLES,
    bootstrap_mean_interval,
    check_interval_options,
    resolve_options,
)
from megatron_endprompt.eval.progress import ProgressLines
from megatron_endprompt.eval.scoring import LogitsFn, greedy_decode, teacher_forced_token_correct
from megatron_endprompt.passkey_text import NEEDLE, QUESTION, Tokenizer, build_haystack


def check_positive_ints(name: str, values: Sequence[int]) -> list[int]:
    """Return ``values`` as a non-empty list of ints >= 1, else raise ValueError naming ``name``."""
    values = list(values)
    if not values:
        raise ValueError(f"{name} must not be empty, got {values!r}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must hold integers >= 1, got {v!r}")
    return [int(v) for v in values]


def check_lengths(lengths: Sequence[int], max_position: int | None) -> list[int]:
    """Validate evaluation lengths against the model's maximum position."""
    lengths = check_positive_ints("lengths", lengths)
    if max_position is not None:
        for length in lengths:
            if length > max_position:
                raise ValueError(
                    f"lengths: {length} is longer than max_position={max_position} "
                    "(the model's evaluated context window)"
                )
    return lengths


def check_depths(depths: Sequence[float]) -> list[float]:
    """Return ``depths`` as floats in [0, 1], else raise ValueError naming the bad value."""
    depths = list(depths)
    if not depths:
        raise ValueError(f"depths must not be empty, got {depths!r}")
    for d in depths:
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d <= 1.0:
            raise ValueError(f"depths must be numbers in [0, 1], got {d!r}")
    return [float(d) for d in depths]


@dataclass(frozen=True)
class PasskeyPrompt:
    """One passkey trial: the prompt, the key and where the needle starts."""

    ids: list[int]
    key: str
    answer_ids: list[int]
    needle_start: int


def make_passkey_prompt(
    tokenizer: Tokenizer,
    length: int,
    depth: float,
    seed: int,
    trial: int,
    digits: int = 5,
    answer_in_length: bool = False,
) -> PasskeyPrompt:
    """The prompt for one trial; deterministic in (seed, length, depth, trial, digits).

    Args:
        tokenizer: tokenizer of the model.
        length: prompt length in tokens (BOS and question included); with ``answer_in_length``
            the prompt plus the answer's tokens.
        depth: needle position as a fraction of the filler (0 = start, 1 = end).
        seed: evaluation seed (>= 0).
        trial: trial index (>= 0).
        digits: number of key digits (>= 1); the first digit is never 0.
        answer_in_length: the answer ends at position ``length - 1`` (module docstring).
    """
    check_depths([depth])
    check_positive_ints("digits", [digits])
    if seed < 0 or trial < 0:
        raise ValueError(f"seed and trial must be >= 0, got seed={seed}, trial={trial}")
    rng = np.random.default_rng([seed, length, round(depth * 1_000_000), trial, digits])
    key = str(int(rng.integers(10 ** (digits - 1), 10**digits)))
    needle = tokenizer.tokenize(" " + NEEDLE.format(key=key))
    question = tokenizer.tokenize(" " + QUESTION)
    answer = tokenizer.tokenize(" " + key)
    prompt_length = length - len(answer) if answer_in_length else length
    ids, starts = build_haystack(tokenizer, prompt_length, [(depth, needle)], question)
    return PasskeyPrompt(ids, key, answer, starts[0])


def leading_digits(text: str) -> str:
    """The leading run of digits of ``text`` with all whitespace removed."""
    match = re.match(r"\d*", re.sub(r"\s+", "", text))
    return match.group(0) if match else ""


@dataclass
class PasskeyResult:
    """Passkey accuracy on a length x depth grid (rows: lengths, columns: depths)."""

    lengths: list[int]
    depths: list[float]
    trials: int
    seed: int
    digits: int
    exact_match: list[list[float]] = field(default_factory=list)
    token_accuracy: list[list[float]] = field(default_factory=list)
    # Greedy answer text of every trial: answers[length][depth][trial].
    answers: list[list[list[str]]] = field(default_factory=list)
    # Score of every trial, [length][depth][trial]: exact match 0/1, digit accuracy fractions.
    # Empty for a result built from cell means only (then it has no intervals).
    exact_match_trials: list[list[list[float]]] = field(default_factory=list)
    token_accuracy_trials: list[list[list[float]]] = field(default_factory=list)
    # Percentile-bootstrap intervals: their level and resample count (0: no intervals).
    interval_level: float = DEFAULT_LEVEL
    bootstrap_resamples: int = DEFAULT_RESAMPLES
    bootstrap_seed: int = 0
    answer_in_length: bool = False
    """Whether each length counts the answer's tokens too (``make_passkey_prompt``)."""

    def mean_by_length(self, metric: str = "exact_match") -> dict[int, float]:
        """Mean over depths of ``metric`` ("exact_match" or "token_accuracy") per length."""
        _check_metric(metric)
        grid = getattr(self, metric)
        return {n: float(np.mean(row)) for n, row in zip(self.lengths, grid)}

    @property
    def has_intervals(self) -> bool:
        """Whether per-trial scores are kept and intervals are enabled (resamples >= 1)."""
        return bool(self.exact_match_trials) and self.bootstrap_resamples > 0

    def interval_by_length(
        self,
        metric: str = "exact_match",
        level: float | None = None,
        resamples: int | None = None,
        seed: int | None = None,
    ) -> dict[int, tuple[float, float]]:
        """Bootstrap interval of each length's mean ``metric``, trials resampled within depths.

        Args:
            metric: "exact_match" or "token_accuracy".
            level / resamples / seed: default to the result's ``interval_level``,
                ``bootstrap_resamples`` and ``bootstrap_seed``.

        Raises:
            ValueError: for an unknown metric, a result without per-trial scores, or bad
                level / resamples.
        """
        _check_metric(metric)
        trials = getattr(self, f"{metric}_trials")
        if not trials:
            raise ValueError(f"{metric}_trials: this result keeps no per-trial scores")
        level, resamples, seed = resolve_options(self, level, resamples, seed)
        out = {}
        for n, row in zip(self.lengths, trials):
            values = [v for cell in row for v in cell]
            strata = [d for d, cell in enumerate(row) for _ in cell]
            out[n] = bootstrap_mean_interval(
                values, level=level, resamples=resamples, seed=seed, strata=strata
            )
        return out

    def _intervals_json(self, metric: str) -> dict[str, list[float]] | None:
        if not self.has_intervals:
            return None
        return {str(k): list(v) for k, v in self.interval_by_length(metric).items()}

    def to_dict(self) -> dict:
        """Every number, JSON-ready."""
        return {
            "task": "passkey",
            "lengths": self.lengths,
            "depths": self.depths,
            "trials": self.trials,
            "seed": self.seed,
            "digits": self.digits,
            "exact_match": self.exact_match,
            "token_accuracy": self.token_accuracy,
            "answers": self.answers,
            "exact_match_trials": self.exact_match_trials,
            "token_accuracy_trials": self.token_accuracy_trials,
            "mean_exact_match_by_length": {str(k): v for k, v in self.mean_by_length().items()},
            "mean_token_accuracy_by_length": {
                str(k): v for k, v in self.mean_by_length("token_accuracy").items()
            },
            "exact_match_interval_by_length": self._intervals_json("exact_match"),
            "token_accuracy_interval_by_length": self._intervals_json("token_accuracy"),
            "interval_level": self.interval_level,
            "bootstrap_resamples": self.bootstrap_resamples,
            "bootstrap_seed": self.bootstrap_seed,
            "answer_in_length": self.answer_in_length,
        }


def _check_metric(metric: str) -> None:
    if metric not in ("exact_match", "token_accuracy"):
        raise ValueError(f"metric must be exact_match or token_accuracy, got {metric!r}")


def score_passkey_trial(
    logits_fn: LogitsFn, tokenizer: Tokenizer, prompt: PasskeyPrompt
) -> tuple[float, float, str]:
    """``(exact match 0/1, teacher-forced digit accuracy, greedy answer text)`` of one trial.

    Greedy decoding runs one token past the answer so that an extra digit counts as wrong. With a
    KV-cached model both metrics share one forward pass of the prompt.
    """
    generated = greedy_decode(
        logits_fn, prompt.ids, len(prompt.answer_ids) + 1, stop_ids=(tokenizer.eod,)
    )
    answer = tokenizer.detokenize(generated)
    exact = float(leading_digits(answer) == prompt.key)
    correct = teacher_forced_token_correct(logits_fn, prompt.ids, prompt.answer_ids)
    scored = [ok for ok, t in zip(correct, prompt.answer_ids) if key_token(tokenizer, t)]
    scored = scored or correct  # a tokenizer whose key pieces hold no digit text: score all
    return exact, sum(scored) / len(scored), answer


def key_token(tokenizer: Tokenizer, token_id: int) -> bool:
    """Whether ``token_id`` carries a digit of the key (scored by the digit accuracy)."""
    return any(ch.isdigit() for ch in tokenizer.detokenize([token_id]))


def evaluate_passkey(
    logits_fn: LogitsFn,
    tokenizer: Tokenizer,
    lengths: Sequence[int],
    depths: Sequence[float],
    trials: int,
    seed: int,
    max_position: int | None = None,
    digits: int = 5,
    progress: bool = True,
    interval_level: float = DEFAULT_LEVEL,
    bootstrap_resamples: int = DEFAULT_RESAMPLES,
    progress_lines: bool = False,
    answer_in_length: bool = False,
) -> PasskeyResult:
    """Passkey retrieval accuracy for every (length, depth) cell, ``trials`` keys each.

    Args:
        logits_fn: the model.
        tokenizer: its tokenizer.
        lengths: prompt lengths in tokens (each <= max_position).
        depths: needle depths in [0, 1].
        trials: keys per cell (>= 1).
        seed: evaluation seed (>= 0); the prompts depend only on it and the cell/trial.
        max_position: the model's context window; None skips the check.
        digits: key digits.
        progress: show a tqdm bar on stderr.
        interval_level: coverage of the per-length bootstrap intervals, in (0, 1).
        bootstrap_resamples: bootstrap resamples (0: no intervals).
        progress_lines: print one line with an ETA per finished (length, depth) cell on stderr
            (for logs, with ``progress=False``).
        answer_in_length: each length counts the answer too (``make_passkey_prompt``).
    """
    lengths = check_lengths(lengths, max_position)
    depths = check_depths(depths)
    check_positive_ints("trials", [trials])
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    check_interval_options(interval_level, bootstrap_resamples)
    result = PasskeyResult(
        lengths, depths, trials, seed, digits,
        interval_level=float(interval_level), bootstrap_resamples=int(bootstrap_resamples),
        answer_in_length=bool(answer_in_length),
    )  # fmt: skip
    lines = ProgressLines(len(lengths) * len(depths) * trials, enabled=progress_lines)
    bar = tqdm(
        total=len(lengths) * len(depths) * trials,
        desc="passkey",
        file=sys.stderr,
        disable=not progress,
    )
    with bar:
        for length in lengths:
            exact_row, token_row, answer_row, exact_trials, token_trials = [], [], [], [], []
            for d, depth in enumerate(depths):
                scores = []
                for trial in range(trials):
                    prompt = make_passkey_prompt(
                        tokenizer, length, depth, seed, trial, digits, answer_in_length
                    )
                    scores.append(score_passkey_trial(logits_fn, tokenizer, prompt))
                    bar.update(1)
                    lines.update(1)
                exact_trials.append([float(s[0]) for s in scores])
                token_trials.append([float(s[1]) for s in scores])
                exact_row.append(float(np.mean(exact_trials[-1])))
                token_row.append(float(np.mean(token_trials[-1])))
                answer_row.append([s[2] for s in scores])
                lines.report(f"passkey@{length}", (d + 1) * trials, len(depths) * trials, "trials")
            result.exact_match.append(exact_row)
            result.token_accuracy.append(token_row)
            result.answers.append(answer_row)
            result.exact_match_trials.append(exact_trials)
            result.token_accuracy_trials.append(token_trials)
    return result
