"""The reference-code fidelity flags: names, defaults, validation, and their path to the dataset."""

import re

import pytest

from megatron_endprompt.cli import build_parser, parse_run_config
from megatron_endprompt.data.tokenizers import ByteTokenizer
from megatron_endprompt.training.state import dataset_config

BASE = ["--tokenizer-type", "ByteTokenizer", "--data-path", "x", "--train-iters", "10"]
TAIL = ["--endprompt-terminal", "tail", "--endprompt-tail-length", "3"]
SHAPE = ["--model-preset", "tiny", "--seq-length", "8", "--max-position-embeddings", "64",
         "--allow-unscaled-extension"]  # fmt: skip


def parse(*flags):
    return parse_run_config([*BASE, *SHAPE, *flags])


def test_flags_exist_with_todays_defaults():
    help_text = build_parser().format_help()
    for flag in ("--endprompt-terminal-source", "--pose-chunk-sampler", "--pose-skip-text"):
        assert flag in help_text, flag
    e = parse().endprompt
    assert (e.terminal_source, e.pose_chunk_sampler, e.pose_skip_text) == (
        "contiguous",
        "paper",
        False,
    )


@pytest.mark.parametrize(
    "flags, sampler",
    [
        (["--position-mode", "pose"], "reference"),
        (["--position-mode", "pose", "--pose-num-chunks", "1"], "reference"),
        (["--position-mode", "endprompt_pose", *TAIL], "reference"),
        (["--position-mode", "pose", "--pose-num-chunks", "3"], "paper"),  # reference: 2 chunks
        (["--position-mode", "pose", "--pose-chunk-sampler", "paper"], "paper"),
        (["--position-mode", "endprompt", *TAIL], "paper"),  # not PoSE: the sampler is unused
    ],
)
def test_pose_chunk_sampler_defaults_to_the_reference_where_it_applies(flags, sampler):
    """The replication's evidence chose the reference sampler (README, Fidelity options); the
    run config and the dataset config resolve an unset sampler the same way."""
    run = parse(*flags)
    assert run.endprompt.pose_chunk_sampler == sampler
    assert dataset_config(run, ByteTokenizer()).pose_chunk_sampler == sampler


def test_flags_reach_the_dataset_config():
    source = ["--endprompt-terminal-source", "document_end"]
    run = parse("--position-mode", "endprompt", *TAIL, *source)
    config = dataset_config(run, ByteTokenizer())
    assert config.terminal_source == "document_end"
    run = parse("--position-mode", "pose", "--pose-chunk-sampler", "reference", "--pose-skip-text")
    config = dataset_config(run, ByteTokenizer())
    assert (config.pose_chunk_sampler, config.pose_skip_text) == ("reference", True)


POSE = ["--position-mode", "pose"]
DOC_END = ["--endprompt-terminal-source", "document_end"]
BAD = [
    (["--endprompt-terminal-source", "middle"], "--endprompt-terminal-source='middle'"),
    (DOC_END, "needs --endprompt-terminal tail"),
    ([*POSE, *TAIL, *DOC_END], "--position-mode endprompt or endprompt_pose"),
    (["--pose-chunk-sampler", "reference"], "needs --position-mode pose"),
    ([*POSE, "--pose-chunk-sampler", "x"], "must be paper or reference"),
    ([*POSE, "--pose-chunk-sampler", "reference", "--pose-num-chunks", "3"], "--pose-num-chunks=3"),
    (["--pose-skip-text"], "--pose-skip-text=True: needs --position-mode pose"),
    (["--position-mode", "endprompt_pose", *TAIL, "--pose-skip-text", *DOC_END], "two text"),
]


@pytest.mark.parametrize("flags, needle", BAD)
def test_invalid_combinations_name_the_flag(flags, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        parse(*flags)
