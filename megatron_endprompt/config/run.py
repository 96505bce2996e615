"""A whole training run's configuration and its cross-field rules.

:class:`RunConfig` joins the sections (model, parallel layout, data, EndPrompt layout, schedule,
checkpoints, logging) and checks, in ``__post_init__``, every rule that needs more than one of them
(parallel layout vs model shape, batch arithmetic, warmup vs decay length, sequence vs target
length, the device's limits, FP8 shapes), naming the flags, before any compute.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from megatron_endprompt.config.batch_ramp import (
    BatchSchedule,
    RampPlan,
    check_rampup,
    compute_ramp_plan,
    ramp_flag,
)
from megatron_endprompt.config.fp8 import check_fp8_shapes
from megatron_endprompt.config.model import ModelConfig, ParallelConfig
from megatron_endprompt.config.sections import (
    CheckpointConfig,
    DataConfig,
    EndPromptConfig,
    LoggingConfig,
)
from megatron_endprompt.config.training import TrainingConfig


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
    notices: tuple[str, ...] = ()
    """Lines the entry point prints once: flags without effect here, Megatron-LM adjustments."""

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
        """Iterations to run (from --train-iters or --train-samples, along the ramp if any)."""
        t = self.training
        if t.train_iters is not None:
            return t.train_iters
        if t.rampup_batch_size is not None:
            return self.ramp_plan().iterations
        return t.train_samples // t.global_batch_size  # Megatron-LM's update_train_iters

    @property
    def train_dataset_samples(self) -> int:
        """Samples the training split is built for, as Megatron-LM builds it: --train-samples
        when given (with a ramp, what the ramp reads when that is more), else iterations x
        global batch."""
        t = self.training
        if t.train_samples is None:
            return self.train_iters * t.global_batch_size
        if t.rampup_batch_size is None:
            return t.train_samples
        return max(t.train_samples, self.ramp_plan().consumed_samples)

    def ramp_plan(self) -> RampPlan:
        """The --rampup-batch-size run's iterations (config/batch_ramp.py); needs a ramp."""
        t = self.training
        return compute_ramp_plan(
            tuple(t.rampup_batch_size), t.global_batch_size, t.micro_batch_size,
            self.data_parallel_size, t.train_samples,
        )  # fmt: skip

    def batch_schedule(self) -> BatchSchedule:
        """The global batch of each iteration (constant, or the ramp's calculator)."""
        t = self.training
        return BatchSchedule(
            t.global_batch_size, t.micro_batch_size, self.data_parallel_size, t.rampup_batch_size
        )

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
    if t.rampup_batch_size is not None:
        _validate_ramp(run)
    pp, m = p.pipeline_model_parallel_size, run.num_microbatches
    if p.virtual_pipeline_model_parallel_size and m % pp:
        # megatron-core's interleaved schedule runs micro-batches in groups of PP per virtual
        # stage and refuses a partial last group.
        _fail(
            f"--num-layers-per-virtual-pipeline-stage: the interleaved schedule needs the "
            f"micro-batches per iteration (--global-batch-size / (--micro-batch-size x DP) = {m}) "
            f"to be a multiple of --pipeline-model-parallel-size={pp}"
        )


def _validate_ramp(run: RunConfig) -> None:
    """Every global batch the ramp reaches splits into micro-batches (megatron-core's calculator
    asserts it each iteration) and, with virtual pipeline stages, into groups of PP."""
    t, p = run.training, run.parallel
    check_rampup(t.rampup_batch_size, t.global_batch_size)
    flag = ramp_flag(t.rampup_batch_size)
    step, pp = t.micro_batch_size * run.data_parallel_size, p.pipeline_model_parallel_size
    for size, iteration in run.ramp_plan().first_iterations().items():
        if size % step:
            _fail(
                f"{flag}: the global batch of iteration {iteration}, {size}, is not divisible "
                f"by --micro-batch-size={t.micro_batch_size} x data-parallel size "
                f"{run.data_parallel_size} (megatron-core's calculator asserts it)"
            )
        if p.virtual_pipeline_model_parallel_size and (size // step) % pp:
            _fail(
                f"{flag}: iteration {iteration} runs {size // step} micro-batches; the "
                f"interleaved schedule (--num-layers-per-virtual-pipeline-stage) needs a "
                f"multiple of --pipeline-model-parallel-size={pp}"
            )


def _validate_schedule(run: RunConfig) -> None:
    # megatron-core's OptimizerParamScheduler asserts lr_warmup_steps < lr_decay_steps; refuse it
    # here, naming the flags, instead of an assertion (or a silently clamped schedule) later.
    t = run.training
    warmup, decay = t.schedule_steps(run.train_iters, t.global_batch_size)
    if warmup < decay:
        return
    why = "(megatron-core asserts warmup < decay)"
    if t.lr_warmup_fraction is not None:
        _fail(f"--lr-warmup-fraction={t.lr_warmup_fraction} leaves no decay {why}")
    if t.train_iters is None:
        length = (
            f"--lr-decay-samples={t.lr_decay_samples}"
            if t.lr_decay_samples is not None
            else f"--train-samples={t.train_samples} when --lr-decay-samples is not given"
        )
        _fail(f"--lr-warmup-samples={t.lr_warmup_samples} must be less than {length} {why}")
    if t.lr_decay_iters is not None:
        _fail(
            f"--lr-warmup-iters={t.lr_warmup_iters} must be less than --lr-decay-iters="
            f"{t.lr_decay_iters} {why}"
        )
    _fail(
        f"--lr-warmup-iters={t.lr_warmup_iters} must be less than the decay length, "
        f"--train-iters={t.train_iters} when --lr-decay-iters is not given {why}"
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
    _validate_extension(run)


def _validate_extension(run: RunConfig) -> None:
    """No implicit context extension: positions past the RoPE's original context need a scaling
    or an explicit confirmation."""
    ep, m = run.endprompt, run.model
    if ep.position_mode == "contiguous" or m.rope_scaling.enabled or ep.allow_unscaled_extension:
        return
    original = m.rope_scaling.original_max_position_embeddings or m.seq_length
    if run.target_length > original:
        _fail(
            f"--target-length={run.target_length} with --position-mode {ep.position_mode} trains "
            f"positions up to {run.target_length - 1}, beyond the RoPE's original context "
            f"({original}: --rope-original-max-position-embeddings, else --seq-length), with no "
            "RoPE scaling: give one (--rope-scaling-type, or Megatron-LM's --use-rope-scaling / "
            "--rotary-seq-len-interpolation-factor) or confirm with --allow-unscaled-extension"
        )


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
        "--fp16": t.fp16,
        "--pipeline-model-parallel-size > 1": p.pipeline_model_parallel_size > 1,
        "--context-parallel-size > 1": p.context_parallel_size > 1,
        "--sequence-parallel (gloo has no reduce-scatter)": p.sequence_parallel,
        "--use-distributed-optimizer": p.use_distributed_optimizer,
        "--transformer-impl te": impl == "te",
        "--bf16": t.bf16,
        "--fp8-format": t.fp8_format is not None,
        "--recompute-granularity": t.recompute_granularity is not None,
        "--params-dtype float16 (fp16 needs loss scaling)": run.model.params_dtype == "float16"
        and not t.fp16,
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
    if run.training.eval_iters is None:  # Megatron-LM: no validation split, no validation
        default = 100 if run.data.split_weights()[1] > 0 else 0
        run.training = dataclasses.replace(run.training, eval_iters=default)
    _validate_batch(run)
    _validate_schedule(run)
    _validate_lengths(run)
    _validate_backend(run)
    if not run.data.data_path and not run.data.mock_data:
        _fail(
            "--data-path is required (a Megatron .bin/.idx prefix, or weight/prefix pairs; "
            "--mock-data for synthetic data)"
        )
    needs_model = run.data.tokenizer_type not in ("ByteTokenizer", "NullTokenizer",
                                                  "GPT2BPETokenizer")  # fmt: skip
    if needs_model and not run.data.tokenizer_model:
        _fail(f"--tokenizer-type={run.data.tokenizer_type} needs --tokenizer-model")
