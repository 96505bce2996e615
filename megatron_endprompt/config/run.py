"""A whole training run's configuration and its cross-field rules.

:class:`RunConfig` joins the sections (model, parallel layout, data, EndPrompt layout, schedule,
checkpoints, logging) and checks, in ``__post_init__``, every rule that needs more than one of them
(parallel layout vs model shape, batch arithmetic, warmup vs decay length, sequence vs target
length, the device's limits, FP8 shapes), naming the flags, before any compute.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megatron_endprompt.config.fp8 import check_fp8_shapes
from megatron_endprompt.config.model import ModelConfig, ParallelConfig
from megatron_endprompt.config.sections import (
    CheckpointConfig,
    DataConfig,
    EndPromptConfig,
    LoggingConfig,
    TrainingConfig,
)


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

    def __post_init__(self) -> None:
        # Every rule that needs more than one section: a RunConfig built in Python is checked
        # exactly as one parsed from flags.
        validate_run_config(self)

    def to_dict(self) -> dict:
        """Plain-dict view (checkpoints, reports)."""
        return dataclasses.asdict(self)


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


def _validate_schedule(run: RunConfig) -> None:
    # megatron-core's OptimizerParamScheduler asserts lr_warmup_steps < lr_decay_steps; refuse it
    # here, naming both flags, instead of an assertion (or a silently clamped schedule) later.
    t = run.training
    warmup = t.lr_warmup_iters
    if t.lr_decay_iters is not None:
        if warmup >= t.lr_decay_iters:
            _fail(
                f"--lr-warmup-iters={warmup} must be less than --lr-decay-iters="
                f"{t.lr_decay_iters} (megatron-core asserts warmup < decay)"
            )
        return
    if warmup >= run.train_iters:
        length = (
            f"--train-iters={t.train_iters}"
            if t.train_iters is not None
            else f"--train-samples={t.train_samples} / --global-batch-size="
            f"{t.global_batch_size} = {run.train_iters} iterations"
        )
        _fail(
            f"--lr-warmup-iters={warmup} must be less than the decay length, {length} when "
            "--lr-decay-iters is not given (megatron-core asserts warmup < decay)"
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
        "--params-dtype float16 (fp16 needs loss scaling)": run.model.params_dtype == "float16",
    }
    bad = [flag for flag, on in unsupported.items() if on]
    if bad:
        _fail(
            f"--device cpu does not support {', '.join(bad)}: megatron-core's pipeline "
            "schedules, distributed optimizer, TE and mixed precision need CUDA"
        )


def validate_run_config(run: RunConfig) -> None:
    """Cross-field checks (RunConfig.__post_init__); ValueError naming the flags.

    Fills ``--global-batch-size`` (micro x DP) when it is None.
    """
    run.model.validate_against(run.parallel)
    _validate_batch(run)
    _validate_schedule(run)
    _validate_lengths(run)
    _validate_backend(run)
    if not run.data.data_path:
        _fail("--data-path is required (a Megatron .bin/.idx prefix, or weight/prefix pairs)")
    if run.data.tokenizer_type != "ByteTokenizer" and not run.data.tokenizer_model:
        _fail(f"--tokenizer-type={run.data.tokenizer_type} needs --tokenizer-model")
