"""Dry-run planning: validate a full training configuration and print what it would do.

``tools/plan.py --world-size N <training flags>`` (and every example script with ``DRY_RUN=1``)
runs the same parsing and validation as training, for a cluster this machine need not be, and
prints the parallel layout, batch arithmetic, token budget, parameter count, a rough per-GPU
memory estimate and the position layout of a sample. Nothing is launched or read.
"""

from __future__ import annotations

import argparse

import numpy as np

from megatron_endprompt import positions
from megatron_endprompt.cli import RunConfig, parse_run_config


def parameter_count(run: RunConfig, vocab_size: int) -> int:
    """Parameters of the Llama-style decoder (norms included, vocabulary padded as Megatron)."""
    m = run.model
    h, heads = m.hidden_size, m.num_attention_heads
    groups = m.num_query_groups or heads
    hd = m.kv_channels or h // heads
    attn = h * hd * (heads + 2 * groups) + heads * hd * h
    mlp = h * m.ffn_hidden_size * (3 if m.swiglu else 2)
    biases = 0 if not m.add_bias_linear else hd * (heads + 2 * groups) + h + m.ffn_hidden_size + h
    per_layer = attn + mlp + biases + 2 * h
    embed = vocab_size * h * (2 if m.untie_embeddings_and_output_weights else 1)
    return m.num_layers * per_layer + embed + h


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


def example_layout(run: RunConfig) -> np.ndarray:
    """The position ids of sample 0 under the run's layout (cue of 12 tokens for cue mode)."""
    e, S, L = run.endprompt, run.model.seq_length, run.target_length
    rng = np.random.default_rng([run.training.seed, 0])
    t = e.tail_length if e.terminal == "tail" else min(12, S - 1)
    if e.position_mode == "contiguous":
        return positions.contiguous_positions(S)
    if e.position_mode == "pose":
        return positions.pose_positions(S, L, e.pose_num_chunks, rng)
    if e.position_mode == "endprompt":
        return positions.endprompt_positions(S - t, t, L, e.placement, rng)
    return positions.endprompt_pose_positions(S - t, t, L, e.pose_num_chunks, e.placement, rng)


def _short(pos: np.ndarray) -> str:
    if len(pos) <= 12:
        return " ".join(map(str, pos))
    return " ".join(map(str, pos[:4])) + " ... " + " ".join(map(str, pos[-6:]))


def describe(run: RunConfig, vocab_size: int = 128256) -> str:
    """A human-readable plan of the run."""
    p, t, m = run.parallel, run.training, run.model
    n = parameter_count(run, vocab_size)
    tokens_iter = t.global_batch_size * m.seq_length
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
        f"layout            {run.endprompt.position_mode} ({run.endprompt.terminal}, "
        f"{run.endprompt.placement}): {_short(example_layout(run))}",
        f"batch             micro {t.micro_batch_size} x DP {run.data_parallel_size} x "
        f"{run.num_microbatches} micro-batches = global {t.global_batch_size}",
        f"budget            {run.train_iters} iterations, {tokens_iter:,} tokens/iter, "
        f"{tokens_iter * run.train_iters / 1e9:.3f}B tokens",
        f"memory (no act.)  ~{memory_estimate_gib(run, n):.1f} GiB per GPU",
        f"checkpoints       load={run.checkpoint.load} save={run.checkpoint.save} "
        f"every {run.checkpoint.save_interval or 'end'}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``tools/plan.py``: validate flags for a given world size and print the plan."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--world-size", type=int, default=1)
    pre.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="Vocabulary size for the parameter count (default: preset's or 128256)",
    )
    known, rest = pre.parse_known_args(argv)
    try:
        run = parse_run_config(rest, world_size=known.world_size, cuda_available=True)
    except ValueError as err:
        print(f"error: {err}")
        return 2
    print(describe(run, known.vocab_size or run.model.vocab_size or 128256))
    print("PLAN_OK")
    return 0
