"""The training command line: Megatron-LM flag names, generated from the config dataclasses.

``parse_run_config(argv)`` returns a validated :class:`RunConfig`; every cross-field rule that
needs more than one dataclass (parallel layout vs model shape, batch arithmetic, sequence vs
target length, CPU limits) lives in :func:`validate_run_config` and fails before any compute,
naming the flags involved.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from megatron_endprompt.cli_utils import Flag, add_dataclass_args, dataclass_from_args
from megatron_endprompt.config import ModelConfig, ParallelConfig, RopeScalingConfig
from megatron_endprompt.fp8 import check_fp8_shapes
from megatron_endprompt.run_config import (
    CheckpointConfig,
    DataConfig,
    EndPromptConfig,
    LoggingConfig,
    TrainingConfig,
)

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
MODEL_FLAGS = {"add_bias_linear": Flag("--disable-bias-linear", invert=True)}
ENDPROMPT_FLAGS = {
    "terminal": Flag("--endprompt-terminal"),
    "placement": Flag("--endprompt-placement"),
    "cues": Flag("--endprompt-cues"),
    "tail_length": Flag("--endprompt-tail-length"),
    "terminal_loss_weight": Flag("--endprompt-terminal-loss-weight"),
}
CHECKPOINT_FLAGS = {"exit_signal_handler": Flag("--no-exit-signal-handler", invert=True)}


@dataclass
class RunConfig:
    """Everything one training run is configured by."""

    model: ModelConfig
    parallel: ParallelConfig
    data: DataConfig
    endprompt: EndPromptConfig
    training: TrainingConfig
    checkpoint: CheckpointConfig
    logging: LoggingConfig
    device: str = "cpu"
    model_preset: str | None = None
    world_size: int = 1

    @property
    def data_parallel_size(self) -> int:
        """World size / (TP x PP x CP)."""
        p = self.parallel
        mp = p.tensor_model_parallel_size * p.pipeline_model_parallel_size
        return self.world_size // (mp * p.context_parallel_size)

    @property
    def num_microbatches(self) -> int:
        """Micro-batches per iteration per data-parallel rank."""
        return self.training.global_batch_size // (
            self.training.micro_batch_size * self.data_parallel_size
        )

    @property
    def target_length(self) -> int:
        """L: the window the positions span."""
        return self.endprompt.target_length or self.model.max_position_embeddings

    @property
    def train_iters(self) -> int:
        """Iterations to run (from --train-iters or --train-samples)."""
        t = self.training
        if t.train_iters is not None:
            return t.train_iters
        return -(-t.train_samples // t.global_batch_size)

    def to_dict(self) -> dict:
        """Plain-dict view (checkpoints, reports)."""
        return dataclasses.asdict(self)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (``python -m megatron_endprompt.train --help``)."""
    p = argparse.ArgumentParser(
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
    add_dataclass_args(p, DataConfig, "data")
    add_dataclass_args(p, EndPromptConfig, "endprompt", flags=ENDPROMPT_FLAGS)
    add_dataclass_args(p, TrainingConfig, "training")
    add_dataclass_args(p, CheckpointConfig, "checkpointing", flags=CHECKPOINT_FLAGS)
    add_dataclass_args(p, LoggingConfig, "logging")
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


def parse_run_config(
    argv: list[str] | None, world_size: int = 1, cuda_available: bool = False
) -> RunConfig:
    """Parse and validate the command line into a :class:`RunConfig`."""
    from megatron_endprompt.recipes import get_recipe

    args = build_parser().parse_args(argv)
    preset = get_recipe(args.model_preset) if args.model_preset else None
    rope_base = preset.rope_scaling if preset is not None else None
    rope = dataclass_from_args(RopeScalingConfig, args, base=rope_base)
    model = dataclass_from_args(ModelConfig, args, base=preset, rope_scaling=rope)
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
    run = RunConfig(
        model=model,
        parallel=parallel,
        data=dataclass_from_args(DataConfig, args),
        endprompt=dataclass_from_args(EndPromptConfig, args),
        training=training,
        checkpoint=dataclass_from_args(CheckpointConfig, args),
        logging=dataclass_from_args(LoggingConfig, args),
        device=resolve_device(args.device, cuda_available),
        model_preset=args.model_preset,
        world_size=world_size,
    )
    validate_run_config(run)
    return run


def _fail(message: str) -> None:
    raise ValueError(message)


def _validate_batch(run: RunConfig) -> None:
    p, t = run.parallel, run.training
    grid = p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
    if run.world_size % grid:
        _fail(
            f"world size {run.world_size} is not divisible by --tensor-model-parallel-size="
            f"{p.tensor_model_parallel_size} x --pipeline-model-parallel-size="
            f"{p.pipeline_model_parallel_size} x --context-parallel-size={p.context_parallel_size}"
        )
    dp = run.data_parallel_size
    if t.global_batch_size is None:
        run.training = dataclasses.replace(t, global_batch_size=t.micro_batch_size * dp)
    elif t.global_batch_size % (t.micro_batch_size * dp):
        _fail(
            f"--global-batch-size={t.global_batch_size} is not divisible by --micro-batch-size="
            f"{t.micro_batch_size} x data-parallel size {dp}"
        )
    pp, m = p.pipeline_model_parallel_size, run.num_microbatches
    if p.virtual_pipeline_model_parallel_size and m % pp:
        # megatron-core's interleaved schedule runs micro-batches in groups of PP per virtual
        # stage and refuses a partial last group.
        _fail(
            f"--num-layers-per-virtual-pipeline-stage: the interleaved schedule needs the "
            f"micro-batches per iteration (--global-batch-size / (--micro-batch-size x DP) = {m}) "
            f"to be a multiple of --pipeline-model-parallel-size={pp}"
        )


def _validate_lengths(run: RunConfig) -> None:
    S, L, m = run.model.seq_length, run.target_length, run.model
    if L > m.max_position_embeddings:
        _fail(
            f"--target-length={L} exceeds --max-position-embeddings={m.max_position_embeddings}: "
            "set --max-position-embeddings to the extended window"
        )
    if S > L:
        _fail(f"--seq-length={S} exceeds --target-length={L}: positions must stay below L")


def _validate_backend(run: RunConfig) -> None:
    p, t, impl = run.parallel, run.training, run.model.transformer_impl
    if t.fp8_format is not None and impl != "te":
        _fail(f"--fp8-format={t.fp8_format} needs --transformer-impl te")
    if t.fp8_format is not None:
        check_fp8_shapes(run.model, p, t)
    if p.context_parallel_size > 1 and impl != "te":
        _fail("--context-parallel-size > 1 needs --transformer-impl te (TE's CP attention)")
    if run.device != "cpu":
        return
    unsupported = {
        "--pipeline-model-parallel-size > 1": p.pipeline_model_parallel_size > 1,
        "--context-parallel-size > 1": p.context_parallel_size > 1,
        "--sequence-parallel (gloo has no reduce-scatter)": p.sequence_parallel,
        "--use-distributed-optimizer": p.use_distributed_optimizer,
        "--transformer-impl te": impl == "te",
        "--bf16": t.bf16,
        "--fp8-format": t.fp8_format is not None,
        "--recompute-granularity": t.recompute_granularity is not None,
    }
    bad = [flag for flag, on in unsupported.items() if on]
    if bad:
        _fail(
            f"--device cpu does not support {', '.join(bad)}: megatron-core's pipeline "
            "schedules, distributed optimizer, TE and mixed precision need CUDA"
        )


def validate_run_config(run: RunConfig) -> None:
    """Cross-field checks; raises ValueError naming the flags. Fills --global-batch-size."""
    run.model.validate_against(run.parallel)
    _validate_batch(run)
    _validate_lengths(run)
    _validate_backend(run)
    if not run.data.data_path:
        _fail("--data-path is required (a Megatron .bin/.idx prefix, or weight/prefix pairs)")
    if run.data.tokenizer_type != "ByteTokenizer" and not run.data.tokenizer_model:
        _fail(f"--tokenizer-type={run.data.tokenizer_type} needs --tokenizer-model")
