"""Reliability table of the training command line: every bad input -> one ``error:`` line.

Each row is (argv fragment appended to a tiny valid CPU run, expected exit status, expected
substring of the first stderr line). Rows run through ``megatron_endprompt.train.main`` in-process
and must fail at parse / validation time, before any data is read (``--data-path`` points nowhere),
without a traceback.

Extend the table whenever a flag or an input appears: a new flag gets a row for each way it can
be wrong (bad type, out of range, non-finite, conflicting with another flag).
"""

import os

import pytest

from megatron_endprompt.cli import parse_run_config
from megatron_endprompt.train import main

TINY = [
    "--model-preset", "tiny",
    "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128",
    "--num-attention-heads", "4", "--num-query-groups", "2", "--seq-length", "32",
    "--max-position-embeddings", "256", "--make-vocab-size-divisible-by", "1",
]  # fmt: skip
BASE = [
    *TINY[:2], "--device", "cpu", *TINY[2:], "--tokenizer-type", "ByteTokenizer",
    "--data-path", "/nonexistent/reliability/corpus_text_document", "--train-iters", "4",
]  # fmt: skip

SAMPLES = ["--train-samples", "64"]
"""A row starting with these is a sample-based run: BASE's ``--train-iters 4`` is left out."""
RAMP_WHY = "(megatron-core's calculator asserts it)"

NON_FINITE = [
    (flag, value)
    for flag in (
        "--lr",
        "--min-lr",
        "--rope-scaling-factor",
        "--rotary-base",
        "--rotary-percent",
        "--norm-epsilon",
        "--init-method-std",
        "--hidden-dropout",
        "--clip-grad",
        "--weight-decay",
        "--adam-beta1",
        "--endprompt-terminal-loss-weight",
    )
    for value in ("inf", "nan")
] + [("--lr=-inf", None), ("--lr", "1e999"), ("--rotary-base", "Infinity"), ("--lr", "NaN")]

ROWS = [
    # Abbreviations are refused (Megatron-LM: allow_abbrev=False).
    (["--lr-warm", "5"], 2, "unrecognized arguments: --lr-warm"),
    (["--lr-warm=5"], 2, "unrecognized arguments: --lr-warm=5"),
    (["--micro-batch", "2"], 2, "unrecognized arguments: --micro-batch"),
    # A flag given twice: the last would silently win.
    (["--lr", "1e-3", "--lr", "5"], 2, "--lr is given more than once"),
    (["--lr=1e-3", "--lr", "5"], 2, "--lr is given more than once"),
    (["--train-iters", "8"], 2, "--train-iters is given more than once"),
    (["--data-path", "a", "b"], 2, "--data-path is given more than once"),
    (["--endprompt-cues", "a", "b", "--endprompt-cues", "c"], 2, "--endprompt-cues is given"),
    (["--bf16", "--bf16"], 2, "--bf16 is given more than once"),
    (["--device=cpu"], 2, "--device is given more than once"),
    # Non-finite floats, refused by the parser's float type.
    *(
        (
            [flag] if value is None else [flag, value],
            2,
            f"argument {flag.split('=')[0]}: must be a finite number",
        )
        for flag, value in NON_FINITE
    ),
    (["--lr", "abc"], 2, "argument --lr: expected a number, got 'abc'"),
    (["--num-layers-per-virtual-pipeline-stage", "x"], 2, "--num-layers-per-virtual-pipeline"),
    (["--micro-batch-size", "1.5"], 2, "argument --micro-batch-size: invalid int value"),
    (["--lr"], 2, "argument --lr: expected one argument"),
    (["--lr", "-inf"], 2, "argument --lr: expected one argument"),  # argparse: "-inf" is a flag
    (["--model-preset", "gpt5"], 2, "--model-preset='gpt5': unknown"),
    # Schedule sanity (megatron-core's OptimizerParamScheduler: decay > 0, warmup < decay).
    (["--global-batch-size", "0"], 2, "--global-batch-size=0: must be >= 1"),
    (["--global-batch-size", "-4"], 2, "--global-batch-size=-4: must be >= 1"),
    (["--micro-batch-size", "0"], 2, "--micro-batch-size=0: must be >= 1"),
    (["--lr-decay-iters", "0"], 2, "--lr-decay-iters=0: must be >= 1"),
    (["--lr-decay-iters", "-3"], 2, "--lr-decay-iters=-3: must be >= 1"),
    (["--lr-warmup-iters", "5"], 2, "--lr-warmup-iters=5 must be less than the decay length"),
    (["--lr-warmup-iters", "4"], 2, "--train-iters=4 when --lr-decay-iters is not given"),
    (["--lr-warmup-iters", "3", "--lr-decay-iters", "3"], 2, "less than --lr-decay-iters=3"),
    (["--lr-warmup-iters", "-1"], 2, "--lr-warmup-iters=-1: must be >= 0"),
    (["--lr", "0"], 2, "--lr=0.0: must be > 0"),
    (["--min-lr", "1"], 2, "--min-lr=1.0: must be in [0, --lr]"),
    (["--lr-decay-style", "exp"], 2, "--lr-decay-style"),
    (["--train-samples", "8"], 2, "give exactly one of --train-iters and --train-samples"),
    # What the CPU path cannot run.
    (["--params-dtype", "float16"], 2, "--device cpu does not support --params-dtype float16"),
    (["--bf16"], 2, "--device cpu does not support --bf16"),
    (["--pipeline-model-parallel-size", "2"], 2, "pipeline-model-parallel-size"),
    (["--fp8-format", "hybrid"], 2, "--fp8-format=hybrid needs --transformer-impl te"),
    # Shapes and lengths (from tests/training/test_cli.py).
    (["--tensor-model-parallel-size", "3"], 2, "tensor-model-parallel-size"),
    (["--global-batch-size", "6", "--micro-batch-size", "4"], 2, "--global-batch-size=6"),
    (["--target-length", "4096"], 2, "max-position-embeddings"),
    (["--target-length", "16"], 2, "--seq-length=32 exceeds --target-length=16"),
    (["--position-mode", "middle"], 2, "--position-mode"),
    (["--rope-scaling-type", "yarn", "--rope-scaling-factor", "4"], 2, "rope-original-max"),
    (["--split", "1,2,3,4"], 2, "--split='1,2,3,4'"),
    (["--num-workers", "-1"], 2, "--num-workers=-1: must be >= 0"),
    # Megatron-LM flags this package cannot honour, and meanings it will not guess (issue 11).
    (["--position-embedding-type", "learned_absolute"], 2, "this package extends RoPE models"),
    (["--mock-data"], 2, "--mock-data=True: give it or --data-path, not both: a single data"),
    (["--mock-data=1"], 2, "--mock-data: ignored explicit argument '1'"),
    # --rampup-batch-size: Megatron-LM's rules (arguments.py, megatron-core's calculator).
    (
        ["--rampup-batch-size", "4", "4", "100"],
        2,
        "expected no batch-size rampup for iteration-based training",
    ),
    (
        ["--use-checkpoint-opt_param-scheduler", "--override-opt_param-scheduler"],
        2,
        "--override-opt_param-scheduler=True: cannot be combined with --use-checkpoint-opt_param",
    ),
    (
        [*SAMPLES, "--global-batch-size", "128"],
        2,
        "--train-samples=64: is less than one --global-batch-size (128)",
    ),
    ([*SAMPLES, "--rampup-batch-size", "4", "4"], 2, "--rampup-batch-size: expected 3 arguments"),
    ([*SAMPLES, "--rampup-batch-size", "4", "x", "100"], 2, "invalid int value: 'x'"),
    (
        [*SAMPLES, "--rampup-batch-size", "0", "4", "100", "--global-batch-size", "8"],
        2,
        "--rampup-batch-size=0 4 100: START and INCREMENT must be >= 1 and SAMPLES >= 0",
    ),
    (
        [*SAMPLES, "--rampup-batch-size", "4", "0", "100", "--global-batch-size", "8"],
        2,
        "--rampup-batch-size=4 0 100: START and INCREMENT must be >= 1",
    ),
    (
        [*SAMPLES, "--rampup-batch-size", "4", "4", "-1", "--global-batch-size", "8"],
        2,
        "--rampup-batch-size=4 4 -1: START and INCREMENT must be >= 1 and SAMPLES >= 0",
    ),
    (
        [*SAMPLES, "--rampup-batch-size", "16", "4", "100", "--global-batch-size", "8"],
        2,
        f"--global-batch-size=8 must be START plus a multiple of INCREMENT {RAMP_WHY}",
    ),
    (
        [*SAMPLES, "--rampup-batch-size", "2", "4", "100", "--global-batch-size", "8"],
        2,
        f"--global-batch-size=8 must be START plus a multiple of INCREMENT {RAMP_WHY}",
    ),
    (
        [*SAMPLES, "--rampup-batch-size", "8", "4", "100", "--global-batch-size", "8"],
        2,
        "START equals --global-batch-size=8, a ramp of no increments",
    ),
    (
        [
            *SAMPLES,
            "--rampup-batch-size",
            "2",
            "2",
            "100",
            "--global-batch-size",
            "8",
            "--micro-batch-size",
            "4",
        ],
        2,
        "the global batch of iteration 1, 2, is not divisible by --micro-batch-size=4",
    ),
    (["--num-experts", "8"], 2, "--num-experts: not supported: mixture-of-experts"),
    (["--lr-decay-samples", "100"], 2, "--lr-decay-samples does not go with --train-iters"),
    (["--rope-scaling-factor", "8"], 2, "--rope-scaling-factor: no effect without a scaling"),
    (["--use-rope-scaling", "--rotary-seq-len-interpolation-factor", "4"], 2, "give one"),
    (["--target-length", "256"], 2, "--allow-unscaled-extension"),
    (["--ckpt-format", "torch_dcp"], 2, "--ckpt-format='torch_dcp': must be one of"),
    (["--use-checkpoint-args"], 2, "--use-checkpoint-args=True: needs --load"),
    (["--fp16", "--bf16"], 2, "--fp16=True: cannot be combined with --bf16"),
    (["--lr-warmup-fraction", "1.5"], 2, "--lr-warmup-fraction=1.5: must be in [0, 1)"),
    # A --load that cannot be meant, refused before the model is built (issue 13).
    (["--load", __file__], 2, "is a file, not a checkpoint directory"),
    (["--load", "/nonexistent/reliability/ckpt", "--finetune"], 2, "nothing to --finetune"),
    (["--load", "/nonexistent/reliability/ckpt", "--exit-on-missing-checkpoint"], 2, "and --exit"),
    # Output paths that cannot be written, refused before the model is built.
    (["--save", __file__], 2, f"--save={__file__}: is a file, not a directory"),
    (["--save", __file__ + "/sub"], 2, f"--save={__file__}/sub: cannot be created"),
    (["--tensorboard-dir", __file__ + "/tb"], 2, f"--tensorboard-dir={__file__}/tb: cannot be"),
    (["--data-cache-path", __file__ + "/c"], 2, f"--data-cache-path={__file__}/c: cannot be"),
    (["--exit-on-missing-checkpoint=yes"], 2, "--exit-on-missing-checkpoint: ignored explicit"),
]


def _run(fragment, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    base = BASE[2:] if "--model-preset" in fragment else BASE  # BASE[0:2]: --model-preset tiny
    if fragment[: len(SAMPLES)] == SAMPLES:
        i = base.index("--train-iters")
        base = base[:i] + base[i + 2 :]
    status = main([*base, *fragment])
    err = capsys.readouterr().err
    return status, err


def _clean(status, err, expected_status, expected):
    lines = err.strip().splitlines()
    return (
        status == expected_status
        and "Traceback" not in err
        and bool(lines)
        and lines[0].startswith("error: ")
        and expected in lines[0]
    )


def test_base_flags_are_valid():
    run = parse_run_config(BASE, world_size=1, cuda_available=False)
    assert run.device == "cpu" and run.train_iters == 4


@pytest.mark.parametrize("fragment, status, expected", ROWS, ids=[" ".join(r[0]) for r in ROWS])
def test_bad_input_gives_one_error_line(fragment, status, expected, capsys, monkeypatch):
    got, err = _run(fragment, capsys, monkeypatch)
    assert "Traceback" not in err
    assert got == status, err
    first = err.strip().splitlines()[0]
    assert first.startswith("error: ") and expected in first, first


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only directories")
@pytest.mark.parametrize("flag", ["--save", "--tensorboard-dir", "--data-cache-path"])
def test_read_only_output_dir_is_refused(flag, tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        got, err = _run([flag, str(ro)], capsys, monkeypatch)
    finally:
        ro.chmod(0o700)
    assert _clean(got, err, 2, f"{flag}={ro}: directory is not writable"), err


def test_read_only_data_cache_with_built_cache_is_accepted(tmp_path, monkeypatch):
    from megatron_endprompt.atomic_io import check_writable_dir
    from megatron_endprompt.training.preflight import has_index_cache

    monkeypatch.setattr(os, "access", lambda path, mode: False)  # read-only, also for root
    with pytest.raises(ValueError, match="--data-cache-path=.*: directory is not writable"):
        check_writable_dir(str(tmp_path), "--data-cache-path", has_index_cache)
    (tmp_path / "abc-GPTDataset-train-document_index.npy").write_bytes(b"")
    check_writable_dir(str(tmp_path), "--data-cache-path", has_index_cache)


def test_reliability_count(capsys, monkeypatch):
    clean = sum(_clean(*_run(f, capsys, monkeypatch), s, e) for f, s, e in ROWS)
    with capsys.disabled():
        print(f"\nreliability: {clean}/{len(ROWS)} bad inputs give one clean error line")
    assert clean == len(ROWS)
