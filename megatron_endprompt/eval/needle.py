"""RULER-style needle-in-a-haystack variants (Hsieh et al. 2024), on the passkey filler.

Needles read "One of the special magic numbers for {word} is: {number}." and sit at random
depths (sentence boundaries of the filler). Tasks:

- ``single``: one needle; ask for its number.
- ``multikey``: the needle plus ``num_distractors`` needles with other words; ask for one word.
- ``multivalue``: ``num_values`` needles with the same word and different numbers; ask for all.

Score of a trial (as RULER): the fraction of the expected numbers that appear as substrings of
the greedy answer, so 0/1 for ``single`` and ``multikey``. Words and numbers come from a
generator seeded by (seed, task, length, trial), so a prompt never changes between runs. Every
trial's score is kept (``scores``), and a percentile-bootstrap interval of each length's mean
(``eval/intervals.py``) comes with it.
"""

from __future__ import annotations

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
from megatron_endprompt.eval.passkey import check_lengths, check_positive_ints
from megatron_endprompt.eval.progress import ProgressLines
from megatron_endprompt.eval.scoring import LogitsFn, greedy_decode
from megatron_endprompt.passkey_text import Tokenizer, build_haystack

TASKS = ("single", "multikey", "multivalue")
NEEDLE = "One of the special magic numbers for {word} is: {number}."
QUESTION_ONE = (
    "What is the special magic number for {word} mentioned in the provided text? "
    "The special magic number for {word} mentioned in the provided text is"
)
QUESTION_ALL = (
    "What are all the special magic numbers for {word} mentioned in the provided text? "
    "The special magic numbers for {word} mentioned in the provided text are"
)
WORDS = (
    "apple", "river", "candle", "falcon", "marble", "garden", "silver", "thunder",
    "lantern", "harbor", "meadow", "copper", "violet", "anchor", "glacier", "pepper",
    "compass", "orchid", "saddle", "timber", "walnut", "beacon", "crystal", "dolphin",
    "ember", "fossil", "granite", "hollow", "island", "jasmine", "kettle", "lemon",
    "mirror", "nectar", "oyster", "pebble", "quartz", "ribbon", "sparrow", "tulip",
)  # fmt: skip
NUMBER_DIGITS = 7


@dataclass(frozen=True)
class NeedlePrompt:
    """One needle trial: the prompt, the expected numbers and where each needle starts."""

    ids: list[int]
    word: str
    expected: list[str]
    needle_starts: list[int]
    max_new_tokens: int


def _draw(rng: np.random.Generator, task: str, num_distractors: int, num_values: int):
    """``(needles as (word, number) pairs, queried word, expected numbers)`` for one trial."""
    n_words = 1 + (num_distractors if task == "multikey" else 0)
    n_numbers = n_words if task != "multivalue" else num_values
    words = [WORDS[i] for i in rng.choice(len(WORDS), size=n_words, replace=False)]
    numbers = rng.choice(9 * 10 ** (NUMBER_DIGITS - 1), size=n_numbers, replace=False)
    numbers = [str(int(n) + 10 ** (NUMBER_DIGITS - 1)) for n in numbers]
    if task == "multivalue":
        return [(words[0], n) for n in numbers], words[0], numbers
    return list(zip(words, numbers)), words[0], [numbers[0]]


def make_needle_prompt(
    tokenizer: Tokenizer,
    task: str,
    length: int,
    seed: int,
    trial: int,
    num_distractors: int = 3,
    num_values: int = 4,
) -> NeedlePrompt:
    """The prompt of one trial; deterministic in (seed, task, length, trial, counts).

    Args:
        tokenizer: tokenizer of the model.
        task: "single", "multikey" or "multivalue".
        length: prompt length in tokens (BOS and question included).
        seed: evaluation seed (>= 0).
        trial: trial index (>= 0).
        num_distractors: other-word needles for ``multikey`` (>= 1).
        num_values: numbers for the one word of ``multivalue`` (>= 1).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    check_positive_ints("num_distractors", [num_distractors])
    check_positive_ints("num_values", [num_values])
    if num_distractors + 1 > len(WORDS):
        raise ValueError(f"num_distractors must be < {len(WORDS)}, got {num_distractors}")
    if seed < 0 or trial < 0:
        raise ValueError(f"seed and trial must be >= 0, got seed={seed}, trial={trial}")
    rng = np.random.default_rng(
        [seed, TASKS.index(task), length, trial, num_distractors, num_values]
    )
    pairs, word, expected = _draw(rng, task, num_distractors, num_values)
    depths = rng.uniform(0.0, 1.0, size=len(pairs))
    needles = [
        (float(d), tokenizer.tokenize(" " + NEEDLE.format(word=w, number=n)))
        for d, (w, n) in zip(depths, pairs)
    ]
    question = QUESTION_ALL if task == "multivalue" else QUESTION_ONE
    question_ids = tokenizer.tokenize(" " + question.format(word=word))
    ids, starts = build_haystack(tokenizer, length, needles, question_ids)
    # Room for every number with a separator and a little slack for a lead-in word.
    per_number = len(tokenizer.tokenize(" " + expected[0] + ","))
    return NeedlePrompt(ids, word, expected, starts, per_number * len(expected) + 4)


def score_answer(answer: str, expected: Sequence[str]) -> float:
    """Fraction of ``expected`` strings that occur in ``answer`` (RULER's string match)."""
    if not expected:
        raise ValueError(f"expected must not be empty, got {list(expected)!r}")
    return sum(e in answer for e in expected) / len(expected)


@dataclass
class NeedleResult:
    """Mean score per length for one needle task."""

    task: str
    lengths: list[int]
    trials: int
    seed: int
    accuracy: list[float] = field(default_factory=list)
    # Score of every trial: scores[length][trial] (empty for a result of means only).
    scores: list[list[float]] = field(default_factory=list)
    # Percentile-bootstrap intervals: their level and resample count (0: no intervals).
    interval_level: float = DEFAULT_LEVEL
    bootstrap_resamples: int = DEFAULT_RESAMPLES
    bootstrap_seed: int = 0

    @property
    def has_intervals(self) -> bool:
        """Whether per-trial scores are kept and intervals are enabled (resamples >= 1)."""
        return bool(self.scores) and self.bootstrap_resamples > 0

    def interval_by_length(
        self, level: float | None = None, resamples: int | None = None, seed: int | None = None
    ) -> dict[int, tuple[float, float]]:
        """Bootstrap interval (over trials) of each length's mean score.

        ``level`` / ``resamples`` / ``seed`` default to the result's ``interval_level``,
        ``bootstrap_resamples`` and ``bootstrap_seed``.

        Raises:
            ValueError: for a result without per-trial scores, or bad level / resamples.
        """
        if not self.scores:
            raise ValueError("scores: this result keeps no per-trial scores")
        level, resamples, seed = resolve_options(self, level, resamples, seed)
        return {
            n: bootstrap_mean_interval(row, level=level, resamples=resamples, seed=seed)
            for n, row in zip(self.lengths, self.scores)
        }

    def to_dict(self) -> dict:
        """Every number, JSON-ready."""
        intervals = None
        if self.has_intervals:
            intervals = {str(k): list(v) for k, v in self.interval_by_length().items()}
        return {
            "task": f"needle_{self.task}",
            "lengths": self.lengths,
            "trials": self.trials,
            "seed": self.seed,
            "accuracy": self.accuracy,
            "scores": self.scores,
            "accuracy_interval_by_length": intervals,
            "interval_level": self.interval_level,
            "bootstrap_resamples": self.bootstrap_resamples,
            "bootstrap_seed": self.bootstrap_seed,
        }


def evaluate_needle(
    logits_fn: LogitsFn,
    tokenizer: Tokenizer,
    task: str,
    lengths: Sequence[int],
    trials: int,
    seed: int,
    max_position: int | None = None,
    num_distractors: int = 3,
    num_values: int = 4,
    progress: bool = True,
    interval_level: float = DEFAULT_LEVEL,
    bootstrap_resamples: int = DEFAULT_RESAMPLES,
    progress_lines: bool = False,
) -> NeedleResult:
    """Greedy-decoding score of a needle task at each length, averaged over ``trials``.

    Args:
        logits_fn: the model.
        tokenizer: its tokenizer.
        task: "single", "multikey" or "multivalue".
        lengths: prompt lengths in tokens (each <= max_position).
        trials: prompts per length (>= 1).
        seed: evaluation seed (>= 0).
        max_position: the model's context window; None skips the check.
        num_distractors: other-word needles for ``multikey``.
        num_values: numbers of the ``multivalue`` word.
        progress: show a tqdm bar on stderr.
        interval_level: coverage of the per-length bootstrap intervals, in (0, 1).
        bootstrap_resamples: bootstrap resamples (0: no intervals).
        progress_lines: print progress lines with an ETA on stderr (a few per length; for
            logs, with ``progress=False``).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    lengths = check_lengths(lengths, max_position)
    check_positive_ints("trials", [trials])
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    check_interval_options(interval_level, bootstrap_resamples)
    result = NeedleResult(
        task, lengths, trials, seed,
        interval_level=float(interval_level), bootstrap_resamples=int(bootstrap_resamples),
    )  # fmt: skip
    lines = ProgressLines(len(lengths) * trials, enabled=progress_lines)
    every = max(1, -(-trials // 4))  # about four lines per length
    bar = tqdm(
        total=len(lengths) * trials, desc=f"needle/{task}", file=sys.stderr, disable=not progress
    )
    with bar:
        for length in lengths:
            row = []
            for trial in range(trials):
                prompt = make_needle_prompt(
                    tokenizer, task, length, seed, trial, num_distractors, num_values
                )
                generated = greedy_decode(
                    logits_fn, prompt.ids, prompt.max_new_tokens, stop_ids=(tokenizer.eod,)
                )
                row.append(score_answer(tokenizer.detokenize(generated), prompt.expected))
                bar.update(1)
                lines.update(1)
                if (trial + 1) % every == 0 or trial + 1 == trials:
                    lines.report(f"needle/{task}@{length}", trial + 1, trials, "trials")
            result.scores.append(row)
            result.accuracy.append(float(np.mean(row)))
    return result
