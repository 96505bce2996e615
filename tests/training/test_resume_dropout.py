"""Resume is bit-exact with dropout on, validation included (issue 13)."""

import pytest
import torch
from train_fixtures import make_corpus, override_flags, train_flags

from megatron_endprompt.cli import parse_run_config
from megatron_endprompt.training.data import cycle_iterator
from megatron_endprompt.training.logging import MetricsLogger
from megatron_endprompt.training.loop import train

DROPOUT = [
    "--hidden-dropout", "0.1", "--attention-dropout", "0.1",
    "--eval-interval", "2", "--eval-iters", "1", "--train-iters", "6",
]  # fmt: skip


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    return make_corpus(str(d)), str(d / "cache")


@pytest.fixture
def valid_losses(monkeypatch):
    """Every validation loss the runs log, as (iteration, loss)."""
    seen: list[tuple[int, float]] = []
    log_eval = MetricsLogger.log_eval

    def record(self, iteration, loss):
        seen.append((iteration, float(loss)))
        log_eval(self, iteration, loss)

    monkeypatch.setattr(MetricsLogger, "log_eval", record)
    return seen


def _train(data, cache, *extra):
    return train(parse_run_config(train_flags(data, cache, *override_flags(DROPOUT, list(extra)))))


def test_resume_with_dropout_is_bitwise_identical(corpus, tmp_path, valid_losses):
    data, cache = corpus
    straight = _train(data, cache)
    straight_valid = list(valid_losses)
    assert [i for i, _ in straight_valid] == [2, 4, 6]
    valid_losses.clear()
    save = str(tmp_path / "ckpt")
    first = _train(data, cache, "--exit-interval", "3", "--save", save)
    assert first.interrupted and first.iterations == 3
    second = _train(data, cache, "--load", save, "--save", save)
    assert second.iterations == 6
    assert first.losses + second.losses == straight.losses  # float for float
    assert valid_losses == straight_valid


def test_dropout_is_active(corpus):
    """The test above would prove nothing if dropout drew no random numbers."""
    data, cache = corpus
    on = _train(data, cache, "--train-iters", "2", "--eval-iters", "0")
    off = _train(
        data, cache, "--train-iters", "2", "--eval-iters", "0", "--hidden-dropout", "0",
        "--attention-dropout", "0",
    )  # fmt: skip
    assert on.losses[0] != off.losses[0]


def test_cycle_iterator_resumes_at_consumed_samples():
    dataset = [{"x": torch.tensor(i)} for i in range(10)]
    straight = cycle_iterator(dataset, 2, 0, 1)
    order = [int(v) for _ in range(8) for v in next(straight)["x"]]
    assert order == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2, 3, 4, 5]
    resumed = cycle_iterator(dataset, 2, 0, 1, consumed_samples=6)
    assert [int(v) for _ in range(5) for v in next(resumed)["x"]] == order[6:16]
    wrapped = cycle_iterator(dataset, 2, 0, 1, consumed_samples=14)  # past one cycle
    assert [int(v) for v in next(wrapped)["x"]] == [4, 5]
    with pytest.raises(ValueError, match="fewer than one micro-batch"):
        next(cycle_iterator(dataset[:1], 2, 0, 1))
