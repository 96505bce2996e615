"""End-to-end CPU training: runs, learns, and resumes bit-exactly."""

import os
import signal
import subprocess
import sys

import pytest
from train_fixtures import make_corpus, train_flags

from megatron_endprompt import checkpoint as ckpt
from megatron_endprompt.cli import parse_run_config
from megatron_endprompt.train import main
from megatron_endprompt.training.loop import train


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    return make_corpus(str(d)), str(d / "cache")


def run(flags):
    return train(parse_run_config(flags))


@pytest.mark.parametrize(
    "mode",
    [
        ["--position-mode", "contiguous"],
        [
            "--position-mode",
            "endprompt",
            "--max-position-embeddings",
            "256",
            "--target-length",
            "256",
            "--endprompt-terminal",
            "cue",
            "--endprompt-cues",
            "End.",
            "--allow-unscaled-extension",
        ],
    ],
)
def test_resume_is_bitwise_identical(corpus, tmp_path, mode):
    data, cache = corpus
    straight = run(train_flags(data, cache, "--train-iters", "6", *mode))
    assert straight.iterations == 6 and len(straight.losses) == 6
    save = str(tmp_path / "ckpt")
    first = run(
        train_flags(
            data, cache, "--train-iters", "6", "--exit-interval", "3", "--save", save, *mode
        )
    )
    assert first.interrupted and first.iterations == 3
    assert ckpt.read_tracker(save) == 3
    second = run(
        train_flags(data, cache, "--train-iters", "6", "--load", save, "--save", save, *mode)
    )
    assert second.iterations == 6
    assert first.losses + second.losses == straight.losses  # bitwise, float for float


def test_training_reduces_loss(corpus):
    data, cache = corpus
    result = run(
        train_flags(data, cache, "--train-iters", "30", "--lr", "3e-3", "--eval-iters", "2")
    )
    assert sum(result.losses[-5:]) / 5 < result.losses[0] - 1.0  # byte entropy falls fast
    assert result.valid_loss is not None and result.valid_loss < result.losses[0]


def test_finetune_loads_weights_only(corpus, tmp_path):
    data, cache = corpus
    save = str(tmp_path / "base")
    base = run(train_flags(data, cache, "--train-iters", "4", "--save", save))
    tuned = run(
        train_flags(
            data,
            cache,
            "--train-iters",
            "2",
            "--load",
            save,
            "--finetune",
            "--lr-decay-iters",
            "2",
            "--lr-warmup-iters",
            "1",
        )  # fmt: skip
    )
    assert tuned.iterations == 2  # iteration counter reset
    fresh = run(
        train_flags(
            data, cache, "--train-iters", "2", "--lr-decay-iters", "2", "--lr-warmup-iters", "1"
        )
    )
    assert tuned.losses[0] < fresh.losses[0]  # it starts from the trained weights
    assert base.checkpoint.endswith("iter_0000004")


def test_sigterm_saves_and_exits_zero(corpus, tmp_path):
    data, cache = corpus
    save = str(tmp_path / "ckpt")
    cmd = [
        sys.executable,
        "-m",
        "megatron_endprompt.train",
        *train_flags(data, cache, "--train-iters", "500", "--save", save),
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    for line in proc.stdout:
        if line.startswith("iter      2/"):
            proc.send_signal(signal.SIGTERM)
            break
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert '"interrupted": true' in out
    saved = ckpt.read_tracker(save)
    assert saved is not None and 2 <= saved < 500


def test_validation_without_a_validation_split_is_a_clear_error(corpus):
    data, cache = corpus
    no_valid = ["--train-iters", "2", "--split", "100,0,0"]
    flags = train_flags(data, cache, *no_valid, "--eval-iters", "1")
    with pytest.raises(ValueError, match="--split=100,0,0 leaves no validation data"):
        run(flags)
    # Without --eval-iters the (empty) validation split is never read.
    assert run(train_flags(data, cache, *no_valid)).iterations == 2


def test_resuming_a_finished_run_trains_nothing_and_keeps_its_checkpoint(corpus, tmp_path, capsys):
    data, cache = corpus
    save = str(tmp_path / "done")
    flags = train_flags(data, cache, "--train-iters", "2", "--save", save, "--eval-iters", "0")
    first = run(flags)
    shard = [os.path.join(d, f) for d, _, fs in os.walk(first.checkpoint) for f in fs]
    stamps = {p: os.stat(p).st_mtime_ns for p in shard}
    capsys.readouterr()
    again = run([*flags, "--load", save])
    assert again.iterations == 2 and again.losses == [] and again.final_loss is None
    assert again.checkpoint == first.checkpoint  # the loaded one, not re-saved
    assert {p: os.stat(p).st_mtime_ns for p in shard} == stamps
    assert (
        "at iteration 2, the run's length is 2 iterations: nothing left" in capsys.readouterr().out
    )


def test_a_tokenizer_other_than_the_checkpoints_is_a_clear_error(corpus, tmp_path, capsys):
    """ByteTokenizer (259 ids) saved, NullTokenizer --vocab-size 300 (301 ids) resumed: refused
    naming the tokenizer flags through the entry point's one error line, not a load traceback."""
    data, cache = corpus
    save = str(tmp_path / "bytes")
    run(train_flags(data, cache, "--train-iters", "1", "--save", save, "--eval-iters", "0"))
    other = ["--tokenizer-type", "NullTokenizer", "--vocab-size", "300"]
    flags = train_flags(
        data, cache, "--train-iters", "2", "--load", save, "--eval-iters", "0", *other
    )
    capsys.readouterr()
    assert main(flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --load={save}: its vocabulary has 259")
    assert "the run's 301" in err[0] and "--tokenizer-type" in err[0]
