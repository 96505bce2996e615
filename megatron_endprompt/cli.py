"""The training command line: Megatron-LM flag names, generated from the config dataclasses.

``parse_run_config(argv)`` returns a :class:`~megatron_endprompt.config.RunConfig`, which checks
itself (every cross-field rule lives in ``config/run.py``) and fails before any compute, naming
the flags involved.
"""

from __future__ import annotations

import argparse
import dataclasses

from megatron_endprompt.checkpoint.stored import open_checkpoint
from megatron_endprompt.cli_utils import (
    Flag,
    StrictArgumentParser,
    add_dataclass_args,
    dataclass_from_args,
)
from megatron_endprompt.config import (
    CheckpointConfig,
    DataConfig,
    EndPromptConfig,
    LoggingConfig,
    ModelConfig,
    ParallelConfig,
    RopeScalingConfig,
    RunConfig,
    TrainingConfig,
)
from megatron_endprompt.config.megatron_flags import (
    add_compat_flags,
    megatron_notices,
    refused_flags,
)
from megatron_endprompt.megatron_args import (
    add_translated_flags,
    apply_checkpoint_args,
    megatron_model_base,
    resolve_megatron_semantics,
    rope_scaling_from_flags,
)
from megatron_endprompt.recipes import get_recipe

ROPE_FLAGS = {
    "rope_type": Flag("--rope-scaling-type"),
    "factor": Flag("--rope-scaling-factor"),
    "original_max_position_embeddings": Flag("--rope-original-max-position-embeddings"),
    "low_freq_factor": Flag("--rope-scaling-low-freq-factor"),
    "high_freq_factor": Flag("--rope-scaling-high-freq-factor"),
    "beta_fast": Flag("--rope-scaling-beta-fast"),
    "beta_slow": Flag("--rope-scaling-beta-slow"),
    "attention_factor": Flag("--rope-scaling-attention-factor"),
}
MODEL_FLAGS = {
    "add_bias_linear": Flag("--disable-bias-linear", invert=True),
    "layernorm_zero_centered_gamma": Flag("--apply-layernorm-1p"),
}
DATA_FLAGS = {"mmap_bin_files": Flag("--no-mmap-bin-files", invert=True)}
ENDPROMPT_FLAGS = {
    "terminal": Flag("--endprompt-terminal"),
    "placement": Flag("--endprompt-placement"),
    "cues": Flag("--endprompt-cues"),
    "tail_length": Flag("--endprompt-tail-length"),
    "terminal_loss_weight": Flag("--endprompt-terminal-loss-weight"),
    "terminal_source": Flag("--endprompt-terminal-source"),
}
CHECKPOINT_FLAGS = {
    "exit_signal_handler": Flag("--no-exit-signal-handler", invert=True),
    "use_checkpoint_opt_param_scheduler": Flag("--use-checkpoint-opt_param-scheduler"),
    "override_opt_param_scheduler": Flag("--override-opt_param-scheduler"),
}
TRAINING_FLAGS = {"rampup_batch_size": Flag("--rampup-batch-size", nargs=3)}


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (``python -m megatron_endprompt.train --help``).

    Strict (:class:`~megatron_endprompt.cli_utils.StrictArgumentParser`): no abbreviations, no
    repeated flag, non-finite floats refused; usage errors raise ``ValueError``.
    """
    p = StrictArgumentParser(
        prog="python -m megatron_endprompt.train",
        description="Train / extend a RoPE language model with EndPrompt on megatron-core.",
    )
    p.add_argument(
        "--model-preset",
        default=None,
        help="Named model shape (tiny, llama2-7b, llama3-8b, llama3-70b, mistral-7b); "
        "explicit shape flags override it.",
    )
    p.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="auto: cuda when available, else cpu (default: auto)",
    )
    p.add_argument(
        "--num-layers-per-virtual-pipeline-stage",
        type=int,
        default=None,
        help="Interleaved pipeline: layers per virtual stage (sets the virtual "
        "pipeline size to num_layers / PP / this).",
    )
    add_dataclass_args(p, ModelConfig, "model", flags=MODEL_FLAGS, skip=("vocab_size",))
    add_dataclass_args(p, RopeScalingConfig, "rope scaling", flags=ROPE_FLAGS)
    add_dataclass_args(
        p, ParallelConfig, "parallelism", skip=("virtual_pipeline_model_parallel_size",)
    )
    add_dataclass_args(p, DataConfig, "data", flags=DATA_FLAGS)
    add_dataclass_args(p, EndPromptConfig, "endprompt", flags=ENDPROMPT_FLAGS)
    add_dataclass_args(p, TrainingConfig, "training", flags=TRAINING_FLAGS)
    add_dataclass_args(p, CheckpointConfig, "checkpointing", flags=CHECKPOINT_FLAGS)
    add_dataclass_args(p, LoggingConfig, "logging")
    add_translated_flags(p)
    add_compat_flags(p)
    return p


def _vpp_size(args: argparse.Namespace, model: ModelConfig, parallel_pp: int) -> int | None:
    layers_per_stage = getattr(args, "num_layers_per_virtual_pipeline_stage", None)
    if layers_per_stage is None:
        return None
    per_rank = model.num_layers // parallel_pp
    if layers_per_stage < 1 or per_rank % layers_per_stage:
        raise ValueError(
            f"--num-layers-per-virtual-pipeline-stage={layers_per_stage}: must divide "
            f"--num-layers / --pipeline-model-parallel-size = {per_rank}"
        )
    vpp = per_rank // layers_per_stage
    return vpp if vpp > 1 else None


def resolve_device(device: str, cuda_available: bool) -> str:
    """``auto`` -> cuda when available; an explicit cuda request without CUDA is an error."""
    if device == "auto":
        return "cuda" if cuda_available else "cpu"
    if device == "cuda" and not cuda_available:
        raise ValueError("--device=cuda: CUDA is not available on this machine (use --device cpu)")
    return device


def _recorded_model(args: argparse.Namespace) -> dict:
    """The model fields the --load checkpoint recorded (ours, or Megatron-LM's args)."""
    load = getattr(args, "load", None)
    if not load:
        raise ValueError("--use-checkpoint-args=True: needs --load")
    stored = open_checkpoint(load, where=f"--use-checkpoint-args: --load={load}")
    return stored.model_config.to_dict()


def _model_config(args: argparse.Namespace) -> ModelConfig:
    """The model: the flags on the preset, or on Megatron-LM's defaults without one."""
    preset = get_recipe(args.model_preset) if args.model_preset else None
    rope = rope_scaling_from_flags(args, preset.rope_scaling if preset is not None else None)
    if preset is None:
        return dataclass_from_args(
            ModelConfig, args, rope_scaling=rope, **megatron_model_base(args)
        )
    derived = {}  # the preset's head size follows its own shape, not overridden ones
    if not hasattr(args, "kv_channels") and (
        hasattr(args, "hidden_size") or hasattr(args, "num_attention_heads")
    ):
        derived["kv_channels"] = None
    return dataclass_from_args(ModelConfig, args, base=preset, rope_scaling=rope, **derived)


def parse_run_config(
    argv: list[str] | None,
    world_size: int = 1,
    cuda_available: bool = False,
    te_available: bool | None = None,
) -> RunConfig:
    """Parse and validate the command line into a :class:`RunConfig`.

    Without ``--model-preset`` the model flags mean what they mean in Megatron-LM, defaults
    included (LayerNorm, GELU, biases, tied embeddings, dropout 0.1, one KV head per query head
    unless ``--group-query-attention``). ``RunConfig.notices`` holds one line per flag that has
    no effect here or means something slightly different, for the entry point to print.
    ``te_available`` (default: whether Transformer Engine is installed) decides what Megatron-LM's
    default ``--transformer-impl transformer_engine`` becomes on CUDA; planning passes True.
    """
    args = build_parser().parse_args(argv)
    refused_flags(args)
    notices = megatron_notices(args)
    device = resolve_device(args.device, cuda_available)
    if getattr(args, "use_checkpoint_args", False):
        notices += apply_checkpoint_args(args, _recorded_model(args))
    notices += resolve_megatron_semantics(
        args, device, has_preset=args.model_preset is not None, te_available=te_available
    )
    model = _model_config(args)
    parallel = dataclass_from_args(
        ParallelConfig,
        args,
        virtual_pipeline_model_parallel_size=_vpp_size(
            args, model, getattr(args, "pipeline_model_parallel_size", 1)
        ),
    )
    training = dataclass_from_args(TrainingConfig, args)
    if training.bf16:  # Megatron-LM: --bf16 means bf16 parameters (fp32 master weights)
        model = dataclasses.replace(model, params_dtype="bfloat16")
    if training.fp16:
        model = dataclasses.replace(model, params_dtype="float16")
    run = RunConfig(
        model=model,
        parallel=parallel,
        data=dataclass_from_args(DataConfig, args),
        endprompt=dataclass_from_args(EndPromptConfig, args),
        training=training,
        checkpoint=dataclass_from_args(CheckpointConfig, args),
        logging=dataclass_from_args(LoggingConfig, args),
        device=device,
        model_preset=args.model_preset,
        world_size=world_size,
        notices=tuple(notices),
    )
    return run
