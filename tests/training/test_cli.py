"""Training flags: Megatron names, presets, and validation that fails before any compute."""

import dataclasses
import subprocess
import sys

import pytest

from megatron_endprompt.cli import build_parser, parse_run_config
from megatron_endprompt.plan import memory_estimate_gib, parameter_count

BASE = ["--tokenizer-type", "ByteTokenizer", "--data-path", "x", "--train-iters", "10"]


def parse(*flags, world_size=1, cuda=False):
    """The flags on the tiny preset unless they name a preset (tests/training/test_megatron_flags.py
    covers the no-preset defaults, which are Megatron-LM's)."""
    preset = [] if "--model-preset" in flags else ["--model-preset", "tiny"]
    return parse_run_config([*BASE, *preset, *flags], world_size=world_size, cuda_available=cuda)


def test_megatron_flag_names_exist():
    help_text = build_parser().format_help()
    for flag in (
        "--tensor-model-parallel-size",
        "--pipeline-model-parallel-size",
        "--context-parallel-size",
        "--sequence-parallel",
        "--use-distributed-optimizer",
        "--num-layers",
        "--hidden-size",
        "--ffn-hidden-size",
        "--num-attention-heads",
        "--num-query-groups",
        "--seq-length",
        "--max-position-embeddings",
        "--rotary-base",
        "--rotary-percent",
        "--normalization",
        "--swiglu",
        "--untie-embeddings-and-output-weights",
        "--disable-bias-linear",
        "--rope-scaling-type",
        "--rope-scaling-factor",
        "--rope-original-max-position-embeddings",
        "--position-mode",
        "--target-length",
        "--endprompt-terminal",
        "--endprompt-placement",
        "--endprompt-cues",
        "--endprompt-tail-length",
        "--endprompt-terminal-loss-weight",
        "--pose-num-chunks",
        "--data-path",
        "--split",
        "--data-cache-path",
        "--tokenizer-type",
        "--tokenizer-model",
        "--micro-batch-size",
        "--global-batch-size",
        "--train-iters",
        "--train-samples",
        "--lr",
        "--min-lr",
        "--lr-warmup-iters",
        "--lr-decay-style",
        "--weight-decay",
        "--clip-grad",
        "--adam-beta1",
        "--adam-beta2",
        "--seed",
        "--bf16",
        "--fp8-format",
        "--fp8-recipe",
        "--recompute-granularity",
        "--save",
        "--load",
        "--save-interval",
        "--no-load-optim",
        "--finetune",
        "--tensorboard-dir",
        "--log-interval",
        "--eval-interval",
        "--eval-iters",
        "--transformer-impl",
        "--device",
        "--model-preset",
        "--num-layers-per-virtual-pipeline-stage",
    ):
        assert flag in help_text, flag


def test_preset_then_flags_override():
    run = parse("--model-preset", "llama3-8b", "--num-layers", "2", "--seq-length", "1024")
    assert run.model.hidden_size == 4096 and run.model.num_layers == 2
    assert run.model.seq_length == 1024
    assert run.model.rope_scaling.rope_type == "none"
    run = parse("--rope-scaling-type", "linear", "--rope-scaling-factor", "2.5")
    assert run.model.rope_scaling.factor == 2.5


def test_global_batch_defaults_and_microbatches():
    run = parse("--micro-batch-size", "2", world_size=4)  # DP 4
    assert run.training.global_batch_size == 8 and run.num_microbatches == 1
    run = parse("--micro-batch-size", "2", "--global-batch-size", "32", world_size=4)
    assert run.num_microbatches == 4


def test_train_samples_gives_iterations():
    run = parse_run_config(
        [
            "--model-preset",
            "tiny",
            "--tokenizer-type",
            "ByteTokenizer",
            "--data-path",
            "x",
            "--train-samples",
            "100",
            "--global-batch-size",
            "8",
        ]
    )
    # Megatron-LM's update_train_iters: train_samples // global_batch_size; the training split
    # is built for --train-samples (its get_train_valid_test_num_samples).
    assert run.train_iters == 12 and run.train_dataset_samples == 100


@pytest.mark.parametrize(
    "flags, world, cuda, match",
    [
        (
            [
                "--num-attention-heads",
                "4",
                "--num-query-groups",
                "2",
                "--tensor-model-parallel-size",
                "4",
            ],
            4,
            True,
            "num-query-groups",
        ),
        (["--tensor-model-parallel-size", "3"], 3, True, "tensor-model-parallel-size"),
        (
            ["--num-layers", "4", "--pipeline-model-parallel-size", "3"],
            3,
            True,
            "pipeline-model-parallel-size",
        ),
        (["--global-batch-size", "6", "--micro-batch-size", "4"], 1, False, "global-batch-size"),
        (
            ["--seq-length", "512", "--max-position-embeddings", "2048", "--target-length", "256"],
            1,
            False,
            "--seq-length=512 exceeds --target-length=256",
        ),
        (["--target-length", "4096"], 1, False, "max-position-embeddings"),
        (["--pipeline-model-parallel-size", "2"], 2, False, "--device cpu does not support"),
        (["--bf16"], 1, False, "--device cpu does not support --bf16"),
        (["--fp8-format", "hybrid"], 1, True, "transformer-impl te"),
        (["--context-parallel-size", "2", "--transformer-impl", "te"], 2, True, "divisible by 2 x"),
        (["--position-mode", "middle"], 1, False, "--position-mode"),
        (
            ["--rope-scaling-type", "yarn", "--rope-scaling-factor", "4"],
            1,
            False,
            "rope-original-max-position-embeddings",
        ),
        (["--lr-decay-style", "exp"], 1, False, "--lr-decay-style"),
        (["--tensor-model-parallel-size", "2"], 3, True, "world size 3"),
    ],
)
def test_invalid_combinations_name_the_flag(flags, world, cuda, match):
    if "divisible by 2 x" in match:
        flags = [*flags, "--seq-length", "250", "--max-position-embeddings", "2048"]
    with pytest.raises(ValueError, match=match):
        parse(*flags, world_size=world, cuda=cuda)


def test_cuda_requested_without_cuda():
    with pytest.raises(ValueError, match="CUDA is not available"):
        parse("--device", "cuda", cuda=False)


def test_parameter_count_matches_published_sizes():
    run = parse("--model-preset", "llama3-8b")
    assert abs(parameter_count(run, 128256) - 8.03e9) < 0.01e9
    run = parse("--model-preset", "llama2-7b")
    assert abs(parameter_count(run, 32000) - 6.74e9) < 0.01e9


def test_memory_estimate_hand_worked():
    run = parse("--model-preset", "llama3-8b", world_size=8, cuda=True)
    # 1e9 params, TP=PP=1, fp32 weights (4) + fp32 grads (4) + Adam state not sharded (12).
    assert memory_estimate_gib(run, 10**9) == pytest.approx(20e9 / 2**30)


def test_entry_point_reports_bad_flags_without_traceback():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_endprompt.train",
            *BASE,
            "--tensor-model-parallel-size",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "Traceback" not in proc.stderr


# FP8 preflight (check_fp8_shapes): hand-picked shapes, one bad dimension at a time.
FP8_CUDA = ["--device", "cuda", "--transformer-impl", "te", "--fp8-format", "hybrid", "--bf16"]


def fp8_configs(mbs=1, recipe="delayed", sp=False, **model):
    from megatron_endprompt.config import ModelConfig, ParallelConfig, TrainingConfig

    shape = dict(num_layers=2, hidden_size=128, ffn_hidden_size=352, num_attention_heads=4,
                 num_query_groups=2, seq_length=256, max_position_embeddings=2048)  # fmt: skip
    tp = model.pop("tp", 2 if sp else 1)
    cp = model.pop("cp", 1)
    return (
        ModelConfig(**{**shape, **model}),
        ParallelConfig(
            tensor_model_parallel_size=tp, context_parallel_size=cp, sequence_parallel=sp
        ),
        TrainingConfig(micro_batch_size=mbs, train_iters=1, fp8_format="e4m3", fp8_recipe=recipe),
    )


def test_fp8_shapes_good_config_passes():
    from megatron_endprompt.config.fp8 import check_fp8_shapes

    check_fp8_shapes(*fp8_configs())  # 256 tokens, hidden 128, QKV 256, proj 128, ffn 352
    check_fp8_shapes(*fp8_configs(sp=True))  # 256 and 128 tokens, TP 2 widths 128/64/176
    check_fp8_shapes(*fp8_configs(seq_length=4, mbs=2))  # 8 tokens: the product is what counts
    check_fp8_shapes(*fp8_configs(recipe="mxfp8"), compute_capability=(10, 0))
    model, parallel, training = fp8_configs(seq_length=100)
    check_fp8_shapes(model, parallel, dataclasses.replace(training, fp8_format=None))  # no FP8


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            dict(seq_length=100),
            r"--fp8-format e4m3: --seq-length 100 / --context-parallel-size 1 x "
            r"--micro-batch-size 1 = 100 tokens per GEMM, must be divisible by 8 "
            r"\(Transformer Engine FP8\)",
        ),
        (dict(seq_length=20, cp=2), r"--context-parallel-size 2 x --micro-batch-size 1 = 10 "),
        (
            dict(seq_length=24, sp=True),
            r"--tensor-model-parallel-size 2 \(--sequence-parallel\) x "
            r"--micro-batch-size 1 = 12 tokens",
        ),
        (dict(seq_length=6, mbs=3), r"--micro-batch-size 3 = 18 tokens"),
        (dict(hidden_size=120, num_attention_heads=4, kv_channels=32), r"--hidden-size 120 = 120"),
        (
            dict(hidden_size=128, num_attention_heads=4, num_query_groups=4, kv_channels=10),
            r"QKV width \(--num-attention-heads 4 \+ 2 x --num-query-groups 4\) x "
            r"--kv-channels 10 / --tensor-model-parallel-size 1 = 120",
        ),
        (
            dict(num_attention_heads=4, num_query_groups=4, kv_channels=12, tp=2),
            r"QKV width .* = 72, must be divisible by 16",
        ),
        (
            dict(num_attention_heads=2, num_query_groups=1, kv_channels=4),
            r"attention output width --num-attention-heads 2 x --kv-channels 4 .* = 8,",
        ),
        (
            dict(ffn_hidden_size=344),
            r"--ffn-hidden-size 344 / --tensor-model-parallel-size 1 = 344",
        ),
        (dict(ffn_hidden_size=368, tp=2), r"--ffn-hidden-size 368 / .* 2 = 184"),
        (dict(recipe="mxfp8", seq_length=16), r"divisible by 32 \(Transformer Engine MXFP8\)"),
    ],
)
def test_fp8_shapes_bad_dimension_names_its_flag(kwargs, match):
    from megatron_endprompt.config.fp8 import check_fp8_shapes

    with pytest.raises(ValueError, match=match):
        check_fp8_shapes(*fp8_configs(**kwargs), compute_capability=(10, 0))


def test_fp8_mxfp8_needs_blackwell():
    from megatron_endprompt.config.fp8 import check_fp8_shapes

    with pytest.raises(ValueError, match=r"--fp8-recipe mxfp8: needs a Blackwell GPU .* has 9.0"):
        check_fp8_shapes(*fp8_configs(recipe="mxfp8"), compute_capability=(9, 0))


def test_fp8_shapes_checked_by_the_parser():
    run = parse(*FP8_CUDA, "--fp8-recipe", "tensorwise", cuda=True)
    assert run.training.fp8_format == "hybrid" and run.model.seq_length == 256
    for flags, match in (
        (["--seq-length", "100"], "--seq-length 100 / --context-parallel-size 1 x"),
        (["--micro-batch-size", "3", "--seq-length", "90"], "= 270 tokens per GEMM"),
        (["--ffn-hidden-size", "344"], "--ffn-hidden-size 344"),
        (["--hidden-size", "120", "--kv-channels", "32"], "--hidden-size 120"),
        (
            ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--seq-length", "200"],
            r"\(--sequence-parallel\) x --micro-batch-size 1 = 100",
        ),
    ):
        with pytest.raises(ValueError, match=match):
            parse(*FP8_CUDA, *flags, world_size=2, cuda=True)


# Issue 13: the parser refuses what it used to guess (abbreviations, repeats, non-finite floats).
def test_abbreviated_flag_is_refused():
    for flags in (["--lr-warm", "5"], ["--lr-warm=5"]):
        with pytest.raises(ValueError, match="unrecognized arguments: --lr-warm"):
            parse(*flags)
    assert parse("--lr-warmup-iters=5").training.lr_warmup_iters == 5  # full name with '='


@pytest.mark.parametrize(
    "flags, name",
    [
        (["--lr", "1e-3", "--lr", "5"], "--lr"),
        (["--lr=1e-3", "--lr", "5"], "--lr"),
        (["--data-path", "y"], "--data-path"),  # BASE gives it once already
        (["--endprompt-cues", "a", "b", "--endprompt-cues=c"], "--endprompt-cues"),
        (["--sequence-parallel", "--sequence-parallel"], "--sequence-parallel"),
    ],
)
def test_repeated_flag_is_refused(flags, name):
    with pytest.raises(ValueError, match=f"^{name} is given more than once"):
        parse(*flags)


def test_multi_value_flags_are_not_repeats():
    run = parse_run_config(
        ["--tokenizer-type", "ByteTokenizer", "--train-iters", "10", "--model-preset", "tiny"]
        + ["--data-path", "0.3", "a", "0.7", "b", "--endprompt-cues", "x", "y"]
    )
    assert run.data.data_path == ["0.3", "a", "0.7", "b"] and run.endprompt.cues == ["x", "y"]


@pytest.mark.parametrize(
    "flag",
    ["--lr", "--rope-scaling-factor", "--rotary-base", "--norm-epsilon", "--init-method-std"],
)
@pytest.mark.parametrize("value", ["inf", "nan", "1e999"])
def test_non_finite_float_is_refused(flag, value):
    match = f"argument {flag}: must be a finite number, got '{value}'"
    with pytest.raises(ValueError, match=match):
        parse(flag, value)


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--global-batch-size", "0"], r"--global-batch-size=0: must be >= 1"),
        (["--lr-decay-iters", "0"], r"--lr-decay-iters=0: must be >= 1"),
        (["--lr-decay-iters", "-2"], r"--lr-decay-iters=-2: must be >= 1"),
        (
            ["--lr-warmup-iters", "4", "--lr-decay-iters", "4"],
            r"--lr-warmup-iters=4 must be less than --lr-decay-iters=4",
        ),
        (
            ["--lr-warmup-iters", "12"],
            r"--lr-warmup-iters=12 must be less than the decay length, --train-iters=10 when "
            r"--lr-decay-iters is not given",
        ),
        (["--params-dtype", "float16"], r"--device cpu does not support --params-dtype float16"),
    ],
)
def test_schedule_and_dtype_sanity(flags, match):
    with pytest.raises(ValueError, match=match):
        parse(*flags)


def test_warmup_against_train_samples_and_good_schedules():
    base = ["--tokenizer-type", "ByteTokenizer", "--data-path", "x", "--global-batch-size", "8",
            "--model-preset", "tiny"]  # fmt: skip
    # Megatron-LM: a sample-based run takes its warmup in samples (validate_args asserts it).
    with pytest.raises(ValueError, match=r"--lr-warmup-iters.*does not go with --train-samples"):
        parse_run_config([*base, "--train-samples", "20", "--lr-warmup-iters", "3"])
    with pytest.raises(
        ValueError,
        match=r"--lr-warmup-samples=20 must be less than "
        r"--train-samples=20 when --lr-decay-samples is not given",
    ):
        parse_run_config([*base, "--train-samples", "20", "--lr-warmup-samples", "20"])
    assert parse("--lr-warmup-iters", "9").training.lr_warmup_iters == 9  # < train iters 10
    assert parse("--lr-warmup-iters", "11", "--lr-decay-iters", "20").training.lr_decay_iters == 20
    assert parse("--params-dtype", "float16", "--device", "cuda", cuda=True).device == "cuda"


def test_usage_errors_raise_instead_of_exiting():
    with pytest.raises(ValueError, match="argument --device: invalid choice: 'tpu'"):
        parse_run_config(["--device", "tpu"])
    with pytest.raises(ValueError, match="argument --lr: expected a number, got 'abc'"):
        parse("--lr", "abc")
