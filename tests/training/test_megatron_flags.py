"""Megatron-LM launch scripts run with only the entry point changed: flags, meanings, defaults.

The flag sets are Megatron-LM core_v0.16.1's own (``megatron_scripts.py``); the expected values are
Megatron-LM's (its arguments.py defaults and validate_args derivations, written here as facts).
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from megatron_scripts import gpt3_175b, llama3_8b_h100_fp8  # noqa: E402

from megatron_endprompt.cli import parse_run_config  # noqa: E402
from megatron_endprompt.config.megatron_flags import INERT, REFUSED  # noqa: E402
from megatron_endprompt.plan import describe  # noqa: E402
from megatron_endprompt.plan import main as plan_main  # noqa: E402

ENDPROMPT = ["--position-mode", "endprompt", "--target-length", "65536",
             "--rope-scaling-type", "yarn", "--rope-scaling-factor", "8",
             "--rope-original-max-position-embeddings", "8192"]  # fmt: skip
SHAPE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
         "--seq-length", "32", "--max-position-embeddings", "32"]  # fmt: skip
DATA = ["--tokenizer-type", "ByteTokenizer", "--data-path", "x", "--train-iters", "10"]


def fp8_script(**kw):
    return llama3_8b_h100_fp8("/ck", "/tb", "/tok", "/data/llama_text_document", "/cache", **kw)


def cuda_run(argv, world_size=8):
    return parse_run_config(argv, world_size=world_size, cuda_available=True, te_available=True)


def test_llama3_8b_fp8_script_means_what_it_means_in_megatron():
    argv = fp8_script(shrink={"--max-position-embeddings": "65536"}) + ENDPROMPT
    run = cuda_run(argv, world_size=64)
    m, t, p, d, c = run.model, run.training, run.parallel, run.data, run.checkpoint
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.kv_channels) == (32, 4096, 14336, 128)
    assert (m.num_attention_heads, m.num_query_groups) == (32, 8)
    assert m.layernorm_zero_centered_gamma and m.swiglu and m.untie_embeddings_and_output_weights
    assert not m.add_bias_linear and m.normalization == "LayerNorm"  # the script sets no norm
    assert m.rotary_base == 1e6 and m.transformer_impl == "te" and m.params_dtype == "bfloat16"
    # Megatron-LM's update_train_iters: train_samples // global_batch_size.
    assert (t.train_samples, run.train_iters) == (1953125000, 1953125000 // 128)
    # Megatron-LM's sample-based schedule: warmup and decay are the sample counts themselves.
    assert t.schedule_steps(run.train_iters, 128) == (3906252, 1949218748)
    assert (t.decoupled_lr, t.decoupled_min_lr) == (5e-4, 4.5e-5)
    fp8 = (t.fp8_format, t.fp8_amax_history_len, t.fp8_amax_compute_algo)
    assert fp8 == ("hybrid", 1024, "max")
    assert t.exit_duration_in_mins == 235 and (t.eval_iters, t.eval_interval) == (32, 100)
    assert p.use_distributed_optimizer and p.overlap_grad_reduce and p.overlap_param_gather
    assert p.grad_reduce_in_bf16 and p.distributed_timeout_minutes == 60
    assert not p.sequence_parallel  # Megatron-LM turns it off at TP=1
    assert d.split_weights() == (99.0, 1.0, 0.0) and not d.mmap_bin_files and d.num_workers == 1
    assert d.vocab_size == 128256 and c.ckpt_format == "torch_dist"
    assert run.endprompt.position_mode == "endprompt" and run.target_length == 65536
    noted = {n.split(":")[0] for n in run.notices}
    for flag in ("--use-mcore-models", "--attention-backend", "--cross-entropy-loss-fusion",
                 "--calculate-per-token-loss", "--manual-gc", "--empty-unused-memory-level",
                 "--log-throughput", "--no-create-attention-mask-in-dataloader", "--profile",
                 "--profile-step-start", "--profile-step-end", "--fp8-param-gather",
                 "--sequence-parallel"):  # fmt: skip
        assert flag in noted, flag


def test_llama3_8b_fp8_script_passes_the_dry_run(capsys):
    argv = fp8_script(shrink={"--max-position-embeddings": "65536"}) + ENDPROMPT
    assert plan_main(["--world-size", "64", *argv]) == 0
    out = capsys.readouterr().out
    assert "8.03B parameters" in out and "PLAN_OK" in out
    assert "warmup 3,906,252 / decay 1,949,218,748 samples" in out


def test_shape_flags_without_a_preset_mean_megatron_defaults():
    run = parse_run_config([*DATA, *SHAPE])
    m, t = run.model, run.training
    assert (m.normalization, m.swiglu, m.untie_embeddings_and_output_weights) == (
        "LayerNorm", False, False)  # fmt: skip
    assert m.add_bias_linear and (m.attention_dropout, m.hidden_dropout) == (0.1, 0.1)
    assert m.num_query_groups == 4 and m.ffn_hidden_size == 4 * 64 and m.kv_channels == 16
    assert (t.adam_beta2, t.lr_decay_style, t.eval_iters, t.eval_interval) == (
        0.999, "linear", 100, None)  # fmt: skip
    assert run.logging.log_interval == 100 and run.data.num_workers == 2
    assert run.checkpoint.ckpt_format == "torch_dist"
    assert run.endprompt.position_mode == "contiguous"  # no extension unless asked
    # --swiglu: Megatron-LM's int(4h * 2/3 / 64) * 64 = int(170.67 / 64) * 64 = 128
    assert parse_run_config([*DATA, *SHAPE, "--swiglu"]).model.ffn_hidden_size == 128


def test_missing_shape_flag_without_preset_is_named():
    with pytest.raises(ValueError, match="--num-layers: required without --model-preset"):
        parse_run_config([*DATA, *SHAPE[2:]])


def test_query_groups_count_only_with_group_query_attention():
    run = parse_run_config([*DATA, *SHAPE, "--num-query-groups", "2"])
    assert run.model.num_query_groups == 4
    assert any(n.startswith("--num-query-groups=2: no effect") for n in run.notices)
    run = parse_run_config([*DATA, *SHAPE, "--group-query-attention", "--num-query-groups", "2"])
    assert run.model.num_query_groups == 2
    run = parse_run_config([*DATA, *SHAPE, "--group-query-attention"])
    assert run.model.num_query_groups == 1  # Megatron-LM's default --num-query-groups


def test_megatron_rope_flags():
    run = parse_run_config([*DATA, *SHAPE, "--use-rope-scaling"])
    r = run.model.rope_scaling  # megatron-core's _apply_scaling constants
    assert (r.rope_type, r.factor, r.low_freq_factor, r.high_freq_factor) == ("llama3", 8, 1, 4)
    assert r.original_max_position_embeddings == 8192
    run = parse_run_config([*DATA, *SHAPE, "--use-rope-scaling", "--rope-scaling-factor", "32"])
    assert run.model.rope_scaling.factor == 32
    run = parse_run_config([*DATA, *SHAPE, "--rotary-seq-len-interpolation-factor", "4"])
    assert (run.model.rope_scaling.rope_type, run.model.rope_scaling.factor) == ("linear", 4)
    with pytest.raises(ValueError, match="--rope-scaling-factor: no effect without a scaling"):
        parse_run_config([*DATA, *SHAPE, "--rope-scaling-factor", "8"])
    with pytest.raises(ValueError, match="--use-rope-scaling conflicts with --rope-scaling-type"):
        parse_run_config([*DATA, *SHAPE, "--use-rope-scaling", "--rope-scaling-type", "yarn",
                          "--rope-original-max-position-embeddings", "32"])  # fmt: skip


def test_no_implicit_context_extension():
    shape = [*SHAPE[:-1], "256"]  # --max-position-embeddings 256, --seq-length 32
    assert parse_run_config([*DATA, *shape]).endprompt.position_mode == "contiguous"
    with pytest.raises(ValueError, match=r"--target-length=256 .* no RoPE scaling.*"
                       r"--allow-unscaled-extension"):  # fmt: skip
        parse_run_config([*DATA, *shape, "--target-length", "256"])
    run = parse_run_config([*DATA, *shape, "--target-length", "256", "--allow-unscaled-extension"])
    assert run.endprompt.position_mode == "endprompt"
    run = parse_run_config([*DATA, *shape, "--target-length", "256",
                            "--rotary-seq-len-interpolation-factor", "8"])  # fmt: skip
    assert run.target_length == 256


@pytest.mark.parametrize("flag", REFUSED, ids=lambda f: f.name)
def test_refused_flags_say_why(flag):
    values = {0: [], 1: ["1"], 3: ["16", "16", "100"], "+": ["a"]}[flag.nargs]
    with pytest.raises(ValueError, match=f"{flag.name}: not supported: "):
        parse_run_config([*DATA, *SHAPE, flag.name, *values])


@pytest.mark.parametrize("flag", INERT, ids=lambda f: f.name)
def test_inert_flags_are_accepted_with_one_notice(flag):
    values = [] if flag.nargs == 0 else [flag.choices[0] if flag.choices else "1"]
    if flag.nargs == "+":
        values = ["0"]
    run = parse_run_config([*DATA, *SHAPE, flag.name, *values])
    assert [n for n in run.notices if n.startswith(flag.name + ":")] == [
        f"{flag.name}: no effect here: {flag.reason}"
    ]


def test_position_embedding_other_than_rope_is_refused():
    with pytest.raises(ValueError, match="learned_absolute: not supported: this package extends"):
        parse_run_config([*DATA, *SHAPE, "--position-embedding-type", "learned_absolute"])
    run = parse_run_config([*DATA, *SHAPE])
    assert any(n.startswith("--position-embedding-type: rope") for n in run.notices)


def test_two_part_split_and_quoted_split_as_megatron_reads_them():
    assert parse_run_config([*DATA, *SHAPE, "--split", "98,2"]).data.split_weights() == (98, 2, 0)
    # the FP8 script's "--split '99,1,0'" reaches the parser with the quotes
    run = parse_run_config([*DATA, *SHAPE, "--split", "'99,1,0'"])
    assert run.data.split_weights() == (99, 1, 0)


def test_sample_and_iteration_schedules_do_not_mix():
    with pytest.raises(ValueError, match="--lr-decay-samples.*does not go with --train-iters"):
        parse_run_config([*DATA, *SHAPE, "--lr-decay-samples", "100"])
    run = parse_run_config([*DATA, *SHAPE, "--global-batch-size", "4", "--lr-decay-iters", "8",
                            "--lr-warmup-fraction", "0.25"])  # fmt: skip
    assert run.training.schedule_steps(run.train_iters, 4) == (8, 32)  # 0.25 x 8 x 4 samples


def test_gpt3_script_is_refused_as_megatron_lm_refuses_it():
    """The example gives --rampup-batch-size with --train-iters, which Megatron-LM's own
    validate_args refuses ('expected no batch-size rampup for iteration-based training')."""
    argv = gpt3_175b("/ck", "/tb", "/v.json", "/m.txt", "/data/gpt_text_document")
    with pytest.raises(ValueError, match="expected no batch-size rampup for iteration-based"):
        cuda_run(argv, world_size=128 * 8)
    i = argv.index("--rampup-batch-size")
    rest = argv[:i] + argv[i + 4 :]
    run = cuda_run([*rest, "--tokenizer-type", "GPT2BPETokenizer"], world_size=128 * 8)
    assert run.model.params_dtype == "float16" and run.training.lr_warmup_fraction == 0.001
    assert run.training.schedule_steps(run.train_iters, 1536) == (int(0.001 * 430000 * 1536),
                                                                  430000 * 1536)  # fmt: skip
    assert run.model.ffn_hidden_size == 4 * 12288 and run.model.num_query_groups == 96


def test_gpt3_script_ramps_in_samples_as_megatron_lm_counts_it():
    """The GPT-3 example made sample-based (GPT-3's 300B tokens: 146,484,375 samples of 2048;
    decay over 126,953,125): its ramp 16 -> 1536 by 16 over 5,859,375 samples at DP=8.

    Expected values by exact integer arithmetic, independently of megatron-core's float
    calculator: 95 increments, so the batch after c samples is 16 + 16 * (95c // 5859375)
    while c <= 5859375, then 1536 for whole batches of the samples left.
    """
    argv = gpt3_175b("/ck", "/tb", "/v.json", "/m.txt", "/data/gpt_text_document")
    i = argv.index("--train-iters")
    argv[i : i + 2] = ["--train-samples", "146484375"]
    i = argv.index("--lr-decay-iters")
    argv[i : i + 2] = ["--lr-decay-samples", "126953125"]
    run = cuda_run([*argv, "--tokenizer-type", "GPT2BPETokenizer"], world_size=128 * 8)
    consumed, ramp = 0, []
    while consumed <= 5859375:
        ramp.append(16 + 16 * (95 * consumed // 5859375))
        consumed += ramp[-1]
    constant = (146484375 - consumed) // 1536
    plan = run.ramp_plan()
    assert list(plan.ramp_batches) == ramp and plan.constant_iterations == constant
    assert run.train_iters == len(ramp) + constant and run.data_parallel_size == 8
    # get_optimizer_param_scheduler: lr_warmup_fraction * lr_decay_steps, not rounded.
    assert run.training.schedule_steps(run.train_iters, 1536) == (0.001 * 126953125, 126953125)
    text = describe(run, 50257)
    assert f"over 5,859,375 samples: {len(ramp):,} iterations read {sum(ramp):,}" in text
    assert f"then {constant:,} at 1536" in text


def test_llama3_fp8_script_default_mock_branch_runs_without_data():
    """The script's default (TOKENIZER_ARG/DATA_ARG "MOCK"): --mock-data, NullTokenizer with
    --vocab-size 128256, no --data-path; its --split is megatron-core's 1,1,1 for mock data."""
    mock = llama3_8b_h100_fp8("/ck", "/tb", "/tok", "MOCK", "/cache",
                              shrink={"--max-position-embeddings": "65536"})  # fmt: skip
    assert "--data-path" not in mock
    run = cuda_run(mock + ENDPROMPT, world_size=64)
    d = run.data
    assert d.mock_data and not d.data_path and d.split == "1,1,1"
    assert (d.tokenizer_type, d.vocab_size) == ("NullTokenizer", 128256)
    assert d.data_cache_path == "/cache"
    assert "--split='99,1,0': no effect with --mock-data" in "\n".join(run.notices)
