"""Dry-run planning: validate a full training configuration and print what it would do.

``tools/plan.py --world-size N <training flags>`` (and every example script with ``DRY_RUN=1``)
runs the same parsing and validation as training, for a cluster this machine need not be, and
prints the parallel layout, batch arithmetic, token budget, parameter count, a rough per-GPU
memory estimate, the position layout of a sample and the distance coverage of the first samples
(``--coverage-samples N``, ``--coverage-png PATH``; :mod:`megatron_endprompt.coverage`), drawn
with the dataset's own per-sample generator. Nothing is launched or read.
"""

from __future__ import annotations

import argparse

import numpy as np

from megatron_endprompt.cli import parse_run_config
from megatron_endprompt.cli_utils import parse_csv
from megatron_endprompt.config import RunConfig
from megatron_endprompt.coverage import distance_coverage, plot_coverage
from megatron_endprompt.data.layouts import LayoutSpec, draw_layout, sample_rng

DEFAULT_CUE_TOKENS = 12
"""Cue length assumed in cue mode without --coverage-cue-lengths (planning reads no tokenizer)."""


def parameter_count(run: RunConfig, vocab_size: int) -> int:
    """Parameters of the Llama-style decoder (norms included, vocabulary padded as Megatron)."""
    m = run.model
    h, heads = m.hidden_size, m.num_attention_heads
    groups = m.num_query_groups or heads
    hd = m.kv_channels or h // heads
    attn = h * hd * (heads + 2 * groups) + heads * hd * h
    mlp = h * m.ffn_hidden_size * (3 if m.swiglu else 2)
    fc1_out = m.ffn_hidden_size * (2 if m.swiglu else 1)
    biases = 0 if not m.add_bias_linear else hd * (heads + 2 * groups) + h + fc1_out + h
    norm = h * (2 if m.normalization == "LayerNorm" else 1)  # LayerNorm has a bias
    per_layer = attn + mlp + biases + 2 * norm
    embed = vocab_size * h * (2 if m.untie_embeddings_and_output_weights else 1)
    return m.num_layers * per_layer + embed + norm


def memory_estimate_gib(run: RunConfig, n_params: int) -> float:
    """Weights + gradients + Adam state per GPU (GiB), activations excluded.

    bf16 weights and fp32 grads (megatron DDP buffers) are split over TP x PP; fp32 master
    weights and two Adam moments (12 bytes/param) are split over DP too with the distributed
    optimizer.
    """
    p = run.parallel
    model_parallel = p.tensor_model_parallel_size * p.pipeline_model_parallel_size
    per_rank = n_params / model_parallel
    weight_bytes = 2 if run.training.bf16 else 4
    optim_bytes = 12 / (run.data_parallel_size if p.use_distributed_optimizer else 1)
    return per_rank * (weight_bytes + 4 + optim_bytes) / 2**30


def layout_spec(run: RunConfig, cue_lengths: tuple[int, ...] | None = None) -> LayoutSpec:
    """The run's position-layout configuration, as the dataset builds it.

    Args:
        run: the run.
        cue_lengths: token count of each cue in cue mode (one is drawn per sample when several);
            default one cue of ``min(12, S - 1)`` tokens, since planning reads no tokenizer.
    """
    e, S = run.endprompt, run.model.seq_length
    lengths: tuple[int, ...] = ()
    if e.position_mode in ("endprompt", "endprompt_pose"):
        if e.terminal == "tail":
            lengths = (e.tail_length,)
        else:
            lengths = tuple(cue_lengths or (min(DEFAULT_CUE_TOKENS, S - 1),))
            if max(lengths) >= S:
                raise ValueError(
                    f"--coverage-cue-lengths={','.join(map(str, lengths))}: every cue must be "
                    f"shorter than --seq-length={S}"
                )
    return LayoutSpec(
        position_mode=e.position_mode,
        sequence_length=S,
        target_length=run.target_length,
        placement=e.placement,
        terminal_lengths=lengths,
        pose_num_chunks=e.pose_num_chunks,
        pose_chunk_sampler=e.pose_chunk_sampler,
    )


def example_layout(run: RunConfig, cue_lengths: tuple[int, ...] | None = None) -> np.ndarray:
    """The position ids of dataset sample 0 (the dataset's own generator and draw)."""
    spec = layout_spec(run, cue_lengths)
    rng = sample_rng(run.training.seed, 0) if spec.needs_rng else None
    return draw_layout(spec, rng).positions


def describe_coverage(
    run: RunConfig,
    num_samples: int,
    cue_lengths: tuple[int, ...] | None = None,
    png: str | None = None,
) -> str:
    """The distance coverage of the run's first ``num_samples`` samples (and its PNG)."""
    spec = layout_spec(run, cue_lengths)
    report = distance_coverage(spec, run.training.seed, num_samples, run.target_length)
    text = "coverage          " + report.format(indent=" " * 18)
    if png:
        e = run.endprompt
        title = f"{e.position_mode} S={run.model.seq_length} L={run.target_length}"
        text += f"\n{'':18}plot: {plot_coverage(report, png, title)}"
    return text


def _short(pos: np.ndarray) -> str:
    if len(pos) <= 12:
        return " ".join(map(str, pos))
    return " ".join(map(str, pos[:4])) + " ... " + " ".join(map(str, pos[-6:]))


def _layout_name(run: RunConfig) -> str:
    """The layout and the options that shape it, e.g. ``endprompt (tail, fixed)``."""
    e = run.endprompt
    options = []
    if e.position_mode in ("endprompt", "endprompt_pose"):
        options += [e.terminal, e.placement]
        if e.terminal == "tail":
            options.append(f"text {e.terminal_source}")
    if e.position_mode in ("pose", "endprompt_pose"):
        options.append(f"{e.pose_num_chunks} chunks, sampler {e.pose_chunk_sampler}")
        options.append("text skip" if e.pose_skip_text else "contiguous text")
    return e.position_mode + (f" ({', '.join(options)})" if options else "")


def _ramp_lines(run: RunConfig) -> list[str]:
    """--rampup-batch-size: the ramp's sizes, its iterations and the constant phase after it."""
    t = run.training
    if t.rampup_batch_size is None:
        return []
    start, increment, samples = t.rampup_batch_size
    plan = run.ramp_plan()
    ramp_samples = sum(plan.ramp_batches)
    return [
        f"ramp              global {start} -> {t.global_batch_size} by {increment} over "
        f"{samples:,} samples: {len(plan.ramp_batches):,} iterations read {ramp_samples:,} "
        f"samples (batches {_short(np.array(plan.ramp_batches))}), then "
        f"{plan.constant_iterations:,} at {t.global_batch_size}; {plan.consumed_samples:,} of "
        f"--train-samples={t.train_samples:,} read",
    ]


def describe(
    run: RunConfig, vocab_size: int = 128256, cue_lengths: tuple[int, ...] | None = None
) -> str:
    """A human-readable plan of the run."""
    p, t, m = run.parallel, run.training, run.model
    n = parameter_count(run, vocab_size)
    tokens_iter = t.global_batch_size * m.seq_length
    ramp = run.ramp_plan() if t.rampup_batch_size else None
    samples = ramp.consumed_samples if ramp else t.global_batch_size * run.train_iters
    warmup, decay = t.schedule_steps(run.train_iters, t.global_batch_size)
    lines = [
        f"device            {run.device}, world size {run.world_size}",
        f"parallel          TP={p.tensor_model_parallel_size} PP={p.pipeline_model_parallel_size}"
        f" VPP={p.virtual_pipeline_model_parallel_size or 1} CP={p.context_parallel_size}"
        f" DP={run.data_parallel_size} SP={p.sequence_parallel}"
        f" dist-opt={p.use_distributed_optimizer}",
        f"model             {run.model_preset or 'custom'}: {m.num_layers} layers, hidden "
        f"{m.hidden_size}, heads {m.num_attention_heads} q / {m.num_query_groups} kv, "
        f"ffn {m.ffn_hidden_size}, {n / 1e9:.2f}B parameters at vocab {vocab_size}",
        f"rope              base {m.rotary_base}, scaling {m.rope_scaling.rope_type}"
        f" x{m.rope_scaling.factor}, impl {m.transformer_impl}",
        f"sequence          physical S={m.seq_length}, target L={run.target_length}",
        f"layout            {_layout_name(run)}: {_short(example_layout(run, cue_lengths))}",
        f"batch             micro {t.micro_batch_size} x DP {run.data_parallel_size} x "
        f"{run.num_microbatches} micro-batches = global {t.global_batch_size}",
        *_ramp_lines(run),
        f"budget            {run.train_iters} iterations, {tokens_iter:,} tokens/iter"
        f"{' at the full batch' if t.rampup_batch_size else ''}, "
        f"{samples * m.seq_length / 1e9:.3f}B tokens",
        f"schedule          {t.lr_decay_style} lr {t.lr:g} -> {t.min_lr:g}, warmup {warmup:,} / "
        f"decay {decay:,} samples",
        f"memory (no act.)  ~{memory_estimate_gib(run, n):.1f} GiB per GPU",
        f"checkpoints       load={run.checkpoint.load} save={run.checkpoint.save} "
        f"every {run.checkpoint.save_interval or 'end'}",
    ]
    lines += [f"note              {notice}" for notice in run.notices]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``tools/plan.py``: validate flags for a given world size and print the plan."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--world-size", type=int, default=1)
    pre.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="Vocabulary size for the parameter count (default: preset's or 128256)",
    )
    pre.add_argument(
        "--coverage-samples",
        type=int,
        default=16,
        help="Samples whose relative-distance coverage is reported (0: none; default 16)",
    )
    pre.add_argument("--coverage-png", default=None, help="Also plot the coverage to this PNG")
    pre.add_argument(
        "--coverage-cue-lengths",
        default=None,
        help=f"Cue mode: token count of each cue, e.g. 11,3,1 (default {DEFAULT_CUE_TOKENS})",
    )
    known, rest = pre.parse_known_args(argv)
    try:
        cue_lengths = _cue_lengths(known.coverage_cue_lengths)
        if known.coverage_samples < 0:
            raise ValueError(f"--coverage-samples={known.coverage_samples}: must be >= 0")
        run = parse_run_config(
            rest, world_size=known.world_size, cuda_available=True, te_available=True
        )
        text = describe(run, known.vocab_size or run.model.vocab_size or 128256, cue_lengths)
        if known.coverage_samples:
            text += "\n" + describe_coverage(
                run, known.coverage_samples, cue_lengths, known.coverage_png
            )
    except ValueError as err:
        print(f"error: {err}")
        return 2
    print(text)
    print("PLAN_OK")
    return 0


def _cue_lengths(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    lengths = tuple(parse_csv(text, "--coverage-cue-lengths", int))
    if min(lengths) < 1:
        raise ValueError(f"--coverage-cue-lengths {text!r}: every cue needs >= 1 token")
    return lengths
