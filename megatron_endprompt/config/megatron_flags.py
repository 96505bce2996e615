"""Megatron-LM's flags that are not fields of our configuration: accepted with a note, or refused.

A launch script written for Megatron-LM core_v0.16.1 (``pretrain_gpt.py``) runs here with only the
entry point changed. Every flag of Megatron-LM's Llama, Mistral and GPT examples and of its
``docs/llama_mistral.md`` is one of:

* a field of :mod:`megatron_endprompt.config` with Megatron-LM's name and meaning (most flags);
* translated here into fields (:data:`TRANSLATED`: ``--group-query-attention``,
  ``--use-rope-scaling``, ``--rotary-seq-len-interpolation-factor``, ``--fp16``, ...);
* accepted with no effect, with one log line saying why (:data:`INERT`: kernel fusions this
  package does not use, profiling hooks, ...);
* refused with the reason (:data:`REFUSED`).

Nothing is accepted and silently ignored: :func:`megatron_notices` returns the log lines the
training entry point prints once, on the logging rank.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass


@dataclass(frozen=True)
class CompatFlag:
    """A Megatron-LM flag handled here rather than by a config field."""

    name: str
    reason: str
    """Why it has no effect (INERT) or why it is refused (REFUSED)."""
    nargs: int | str = 0
    """0: a switch; 1: one value; "+" or 3: several values (as Megatron-LM's parser)."""
    choices: tuple[str, ...] | None = None


_SDPA = "attention is torch SDPA (--transformer-impl local) or Transformer Engine's own kernels"
_NO_PROFILER = "no profiler hooks: wrap the launch in nsys or torch.profiler instead"

INERT: tuple[CompatFlag, ...] = (
    CompatFlag("--use-mcore-models", "the models are always megatron-core's"),
    CompatFlag(
        "--attention-backend",
        "the kernel is not selected by flag: " + _SDPA,
        nargs=1,
        choices=("flash", "fused", "unfused", "local", "auto"),
    ),
    CompatFlag(
        "--cross-entropy-loss-fusion",
        "the loss is this package's per-token weighted cross entropy (EndPrompt terminal "
        "weights), computed without megatron's fused kernel",
    ),
    CompatFlag(
        "--calculate-per-token-loss",
        "the loss is always the per-token mean over the global batch (what this flag "
        "selects in Megatron-LM)",
    ),
    CompatFlag("--manual-gc", "Python's garbage collector is left to run automatically"),
    CompatFlag("--manual-gc-interval", "see --manual-gc", nargs=1),
    CompatFlag("--no-manual-gc-eval", "see --manual-gc"),
    CompatFlag(
        "--empty-unused-memory-level",
        "the CUDA caching allocator is not emptied between steps",
        nargs=1,
        choices=("0", "1", "2"),
    ),
    CompatFlag("--log-throughput", "throughput (tokens/s) is always logged"),
    CompatFlag("--log-timers-to-tensorboard", "no per-phase timers are recorded"),
    CompatFlag("--log-validation-ppl-to-tensorboard", "validation loss is logged; take exp()"),
    CompatFlag(
        "--no-create-attention-mask-in-dataloader",
        "no attention mask is ever built: attention is causal over the sample",
    ),
    CompatFlag("--profile", _NO_PROFILER),
    CompatFlag("--use-pytorch-profiler", _NO_PROFILER),
    CompatFlag("--profile-step-start", _NO_PROFILER, nargs=1),
    CompatFlag("--profile-step-end", _NO_PROFILER, nargs=1),
    CompatFlag("--profile-ranks", _NO_PROFILER, nargs="+"),
    CompatFlag("--no-masked-softmax-fusion", "no fused masked softmax: " + _SDPA),
    CompatFlag(
        "--attention-softmax-in-fp32",
        "SDPA and Transformer Engine accumulate the softmax in fp32 already",
    ),
    CompatFlag(
        "--no-rope-fusion",
        "RoPE is this package's position-aware rotary (per-sample position ids); TE's fused "
        "kernel is used only for batch-shared layouts",
    ),
    CompatFlag(
        "--no-gradient-accumulation-fusion",
        "gradient accumulation fusion is not used (it needs apex/TE fused wgrad)",
    ),
    CompatFlag("--no-bias-swiglu-fusion", "no fused bias-SwiGLU kernel is used"),
    CompatFlag("--no-bias-dropout-fusion", "no fused bias-dropout kernel is used"),
    CompatFlag("--no-bias-gelu-fusion", "no fused bias-GeLU kernel is used"),
    CompatFlag("--no-persist-layer-norm", "layer norms are torch's or Transformer Engine's"),
    CompatFlag("--use-flash-attn", "deprecated in Megatron-LM; " + _SDPA),
    CompatFlag(
        "--no-async-tensor-model-parallel-allreduce", "deprecated in Megatron-LM; no effect"
    ),
    CompatFlag("--log-params-norm", "the parameter norm is not logged"),
    CompatFlag("--log-num-zeros-in-grad", "zeros in the gradient are not counted"),
    CompatFlag("--timing-log-level", "no per-phase timers are recorded", nargs=1),
    CompatFlag(
        "--tensorboard-log-interval", "TensorBoard is written every --log-interval", nargs=1
    ),
    CompatFlag("--tensorboard-queue-size", "TensorBoard's writer uses its own queue", nargs=1),
    CompatFlag("--wandb-project", "no Weights & Biases logging (TensorBoard only)", nargs=1),
    CompatFlag("--wandb-exp-name", "no Weights & Biases logging (TensorBoard only)", nargs=1),
    CompatFlag("--wandb-save-dir", "no Weights & Biases logging (TensorBoard only)", nargs=1),
    CompatFlag(
        "--fp8-param-gather",
        "FP8 parameters are not gathered in FP8: weights stay in --bf16 and are cast by TE",
    ),
    CompatFlag(
        "--distributed-backend",
        "the backend follows --device (nccl on CUDA, gloo on CPU)",
        nargs=1,
        choices=("nccl", "gloo"),
    ),
    CompatFlag("--local-rank", "torchrun's LOCAL_RANK environment variable is read", nargs=1),
    CompatFlag(
        "--use-cpu-initialization", "weights are initialised on CPU exactly when CUDA is absent"
    ),
    CompatFlag(
        "--accumulate-allreduce-grads-in-fp32",
        "gradients are reduced in fp32 unless --grad-reduce-in-bf16",
    ),
    CompatFlag("--ckpt-fully-parallel-save", "megatron-core's dist-checkpoint defaults are used"),
    CompatFlag("--ckpt-fully-parallel-load", "megatron-core's dist-checkpoint defaults are used"),
    CompatFlag(
        "--no-ckpt-fully-parallel-save", "megatron-core's dist-checkpoint defaults are used"
    ),
    CompatFlag("--async-save", "checkpoints are saved synchronously (then published atomically)"),
    CompatFlag(
        "--use-dist-ckpt", "deprecated in Megatron-LM: --ckpt-format torch_dist is the default"
    ),
    CompatFlag("--log-memory-to-tensorboard", "peak memory is reported in the run's summary"),
    CompatFlag("--log-progress", "progress is logged every --log-interval"),
    CompatFlag(
        "--no-check-for-nan-in-loss-and-grad",
        "a non-finite loss always stops the run (fp16 overflow steps are skipped, as Megatron-LM)",
    ),
    CompatFlag(
        "--exit-signal-handler",
        "a SIGTERM saves and exits by default (--no-exit-signal-handler turns it off)",
    ),
)

REFUSED: tuple[CompatFlag, ...] = (
    CompatFlag("--use-legacy-models", "only megatron-core models are supported"),
    CompatFlag(
        "--no-save-optim",
        "a checkpoint always holds the optimizer (load with --no-load-optim to skip it)",
    ),
    CompatFlag(
        "--no-save-rng",
        "a checkpoint always holds the RNG states (load with --no-load-rng to skip them)",
    ),
    CompatFlag("--tp-comm-overlap", "Transformer Engine's userbuffer TP overlap is not wired"),
    CompatFlag("--skip-train", "evaluation of a checkpoint is tools/evaluate.py"),
    CompatFlag("--num-experts", "mixture-of-experts models are not supported", nargs=1),
    CompatFlag(
        "--lr-wsd-decay-iters",
        "the WSD decay phase is the last tenth of the decay here; a custom length is not "
        "implemented",
        nargs=1,
    ),
    CompatFlag("--lr-wsd-decay-samples", "see --lr-wsd-decay-iters", nargs=1),
    CompatFlag(
        "--data-args-path", "give the blend with --data-path (weight prefix pairs)", nargs=1
    ),
    CompatFlag(
        "--train-data-path",
        "separate train/valid/test paths are not supported: give --data-path and --split",
        nargs="+",
    ),
    CompatFlag("--valid-data-path", "see --train-data-path", nargs="+"),
    CompatFlag("--test-data-path", "see --train-data-path", nargs="+"),
)

TRANSLATED: dict[str, str] = {
    "--group-query-attention": "enables --num-query-groups (without it every head has its own KV)",
    "--position-embedding-type": "only rope (this package extends RoPE models)",
    "--use-rotary-position-embeddings": "the same as --position-embedding-type rope",
    "--no-position-embedding": "no learned absolute position embedding (RoPE only)",
    "--use-rope-scaling": "Llama-3.x RoPE scaling (--rope-scaling-type llama3)",
    "--rotary-seq-len-interpolation-factor": "linear Position Interpolation (--rope-scaling-type "
    "linear)",
    "--fp16": "fp16 parameters with dynamic loss scaling (CUDA path)",
    "--lr-warmup-samples": "warmup counted in samples",
    "--lr-decay-samples": "decay counted in samples",
    "--lr-warmup-fraction": "warmup as a fraction of the decay length",
}
"""Megatron-LM flags that map onto config fields, with what they set (added by cli.py)."""


def add_compat_flags(parser: argparse.ArgumentParser) -> None:
    """Add the INERT and REFUSED flags (``dest`` ``compat_<name>``, default absent)."""
    group = parser.add_argument_group(
        "Megatron-LM flags without effect here (accepted with a log line, or refused)"
    )
    for flag in INERT + REFUSED:
        kwargs: dict = {"dest": _dest(flag.name), "default": argparse.SUPPRESS}
        if flag.nargs == 0:
            kwargs["action"] = "store_true"
        else:
            if flag.nargs != 1:
                kwargs["nargs"] = flag.nargs
            if flag.choices:
                kwargs["choices"] = flag.choices
        kind = "refused" if flag in REFUSED else "no effect"
        group.add_argument(flag.name, help=f"({kind}) {flag.reason}", **kwargs)


def _dest(name: str) -> str:
    return "compat_" + name.lstrip("-").replace("-", "_")


def refused_flags(args: argparse.Namespace) -> None:
    """Raise ValueError naming the first REFUSED flag that was given, with the reason."""
    for flag in REFUSED:
        if hasattr(args, _dest(flag.name)):
            raise ValueError(f"{flag.name}: not supported: {flag.reason}")


def megatron_notices(args: argparse.Namespace) -> list[str]:
    """One line per INERT flag that was given: ``--flag: no effect here: <reason>``."""
    return [
        f"{flag.name}: no effect here: {flag.reason}"
        for flag in INERT
        if hasattr(args, _dest(flag.name))
    ]
