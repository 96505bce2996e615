"""Configuration of a run's batch sizes, schedule, optimizer and numerics (TrainingConfig).

Same conventions as :mod:`megatron_endprompt.config.sections`: a one-line docstring under each
field (the CLI help text), validation in ``__post_init__`` raising ``ValueError`` that names the
flag and the value. Schedules follow Megatron-LM: iteration-based (``--train-iters``,
``--lr-*-iters``) or sample-based (``--train-samples``, ``--lr-*-samples``), never mixed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from megatron_endprompt.config.batch_ramp import ramp_flag
from megatron_endprompt.config.model import _require

LrDecayStyle = Literal["constant", "linear", "cosine", "inverse-square-root", "WSD"]
LR_DECAY_STYLES: tuple[str, ...] = get_args(LrDecayStyle)


@dataclass
class TrainingConfig:
    """Batch sizes, schedule, optimizer and numerics."""

    micro_batch_size: int = 1
    """Samples per micro-batch per data-parallel rank."""
    global_batch_size: int | None = None
    """Samples per iteration over all data-parallel ranks (default: micro x DP)."""
    train_iters: int | None = None
    """Iterations to train (or give --train-samples)."""
    train_samples: int | None = None
    """Samples to train; iterations = train_samples // global batch (Megatron-LM's floor)."""
    rampup_batch_size: list[int] | None = None
    """START INCREMENT SAMPLES: the global batch grows from START by INCREMENT over SAMPLES
    consumed samples up to --global-batch-size (Megatron-LM's ramp; needs --train-samples)."""
    lr: float = 3e-4
    """Peak learning rate."""
    min_lr: float = 0.0
    """Learning rate at the end of decay."""
    lr_warmup_iters: int = 0
    """Linear warmup iterations."""
    lr_warmup_samples: int = 0
    """Linear warmup samples (with --train-samples)."""
    lr_warmup_fraction: float | None = None
    """Warmup as a fraction of the decay length (instead of --lr-warmup-iters/-samples)."""
    lr_decay_style: LrDecayStyle = "linear"
    """constant | linear | cosine | inverse-square-root | WSD."""
    lr_decay_iters: int | None = None
    """Iterations over which the rate decays (default: all training iterations)."""
    lr_decay_samples: int | None = None
    """Samples over which the rate decays, with --train-samples (default: all)."""
    decoupled_lr: float | None = None
    """Peak learning rate of the input embedding and output layer (default: --lr)."""
    decoupled_min_lr: float | None = None
    """Final learning rate of the input embedding and output layer (default: --min-lr)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    clip_grad: float = 1.0
    """Gradient-norm clipping threshold (0 disables)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    seed: int = 1234
    """Seed of initialisation, data order and layouts."""
    bf16: bool = False
    """bf16 parameters and compute (fp32 master weights in the optimizer)."""
    fp16: bool = False
    """fp16 parameters and compute with dynamic loss scaling (CUDA path)."""
    fp8_format: str | None = None
    """Transformer Engine FP8: e4m3 | hybrid (needs --transformer-impl te)."""
    fp8_recipe: str = "delayed"
    """TE FP8 recipe: delayed | tensorwise | mxfp8 | blockwise."""
    fp8_amax_history_len: int = 1
    """Delayed scaling: amax history length."""
    fp8_amax_compute_algo: str = "most_recent"
    """Delayed scaling: most_recent | max over the history."""
    recompute_granularity: str | None = None
    """Activation recomputation: selective | full."""
    recompute_method: str = "uniform"
    """full recompute: uniform | block."""
    recompute_num_layers: int = 1
    """full recompute: layers per recompute unit."""
    eval_interval: int | None = None
    """Validate every N iterations (default: only at the end, when --eval-iters > 0)."""
    eval_iters: int | None = None
    """Validation iterations (global batches) per evaluation; 0 disables validation (default:
    100, or none when --split gives validation no weight, as Megatron-LM)."""
    exit_interval: int | None = None
    """Save a checkpoint and exit once the iteration number is divisible by N."""
    exit_duration_in_mins: float | None = None
    """Save a checkpoint and exit once training has run this many minutes."""

    def __post_init__(self) -> None:
        _require(
            self.micro_batch_size >= 1, "--micro-batch-size", self.micro_batch_size, "must be >= 1"
        )
        _require(
            (self.train_iters is None) != (self.train_samples is None),
            "--train-iters",
            self.train_iters,
            "give exactly one of --train-iters and "
            f"--train-samples (got --train-samples={self.train_samples})",
        )
        for flag, value in (
            ("--global-batch-size", self.global_batch_size),
            ("--train-iters", self.train_iters),
            ("--train-samples", self.train_samples),
        ):
            _require(value is None or value >= 1, flag, value, "must be >= 1")
        _require(
            self.train_samples is None
            or self.rampup_batch_size is not None
            or self.train_samples >= self.global_batch_size,
            "--train-samples",
            self.train_samples,
            f"is less than one --global-batch-size ({self.global_batch_size}): Megatron-LM "
            "trains train_samples // global_batch_size iterations, here none",
        )
        self._check_rampup()
        self._check_schedule()
        self._check_numerics()
        if self.eval_interval == 0:
            self.eval_interval = None
        _require(
            (self.eval_interval is None or self.eval_interval >= 1)
            and (self.eval_iters is None or self.eval_iters >= 0),
            "--eval-interval",
            self.eval_interval,
            "--eval-interval must be >= 1 and --eval-iters >= 0",
        )
        if self.exit_interval is not None:
            _require(self.exit_interval >= 1, "--exit-interval", self.exit_interval, "must be >= 1")
        if self.exit_duration_in_mins is not None:
            _require(
                self.exit_duration_in_mins > 0,
                "--exit-duration-in-mins",
                self.exit_duration_in_mins,
                "must be > 0",
            )

    def _check_rampup(self) -> None:
        """--rampup-batch-size: three values, sample-based training only (as Megatron-LM)."""
        ramp = self.rampup_batch_size
        if ramp is None:
            return
        flag = ramp_flag(ramp)
        if len(ramp) != 3:
            raise ValueError(f"{flag}: give three values, START INCREMENT SAMPLES")
        if self.train_iters is not None:
            raise ValueError(
                f"{flag}: expected no batch-size rampup for iteration-based training (as "
                "Megatron-LM): give --train-samples instead of --train-iters"
            )

    def _check_schedule(self) -> None:
        """Learning rate, its schedule and the optimizer's constants."""
        _require(
            self.lr_decay_iters is None or self.lr_decay_iters >= 1,
            "--lr-decay-iters",
            self.lr_decay_iters,
            "must be >= 1 (megatron-core's OptimizerParamScheduler asserts lr_decay_steps > 0)",
        )
        self._check_schedule_units()
        _require(self.lr > 0, "--lr", self.lr, "must be > 0")
        _require(0 <= self.min_lr <= self.lr, "--min-lr", self.min_lr, "must be in [0, --lr]")
        _require(
            self.lr_warmup_iters >= 0, "--lr-warmup-iters", self.lr_warmup_iters, "must be >= 0"
        )
        _require(
            self.lr_decay_style in LR_DECAY_STYLES,
            "--lr-decay-style",
            self.lr_decay_style,
            f"must be one of {', '.join(LR_DECAY_STYLES)}",
        )
        _require(self.clip_grad >= 0, "--clip-grad", self.clip_grad, "must be >= 0")
        _require(0 <= self.adam_beta1 < 1, "--adam-beta1", self.adam_beta1, "must be in [0, 1)")
        _require(0 <= self.adam_beta2 < 1, "--adam-beta2", self.adam_beta2, "must be in [0, 1)")

    def _check_schedule_units(self) -> None:
        """Iteration-based and sample-based schedules do not mix (Megatron-LM's rules)."""
        by_iters = self.train_iters is not None
        wrong = (
            {"--lr-decay-samples": self.lr_decay_samples is not None,
             "--lr-warmup-samples": self.lr_warmup_samples != 0}
            if by_iters
            else {"--lr-decay-iters": self.lr_decay_iters is not None,
                  "--lr-warmup-iters": self.lr_warmup_iters != 0}
        )  # fmt: skip
        bad = [flag for flag, given in wrong.items() if given]
        if bad:
            raise ValueError(
                f"{bad[0]} does not go with --train-{'iters' if by_iters else 'samples'}: "
                "iteration-based and sample-based schedules do not mix (as Megatron-LM)"
            )
        for flag, value in (
            ("--lr-warmup-samples", self.lr_warmup_samples),
            ("--lr-decay-samples", self.lr_decay_samples),
        ):
            _require(value is None or value >= 0, flag, value, "must be >= 0")
        if self.lr_warmup_fraction is not None:
            _require(
                0 <= self.lr_warmup_fraction < 1,
                "--lr-warmup-fraction",
                self.lr_warmup_fraction,
                "must be in [0, 1)",
            )
            _require(
                self.lr_warmup_iters == 0 and self.lr_warmup_samples == 0,
                "--lr-warmup-fraction",
                self.lr_warmup_fraction,
                "give only one of --lr-warmup-fraction, --lr-warmup-iters and --lr-warmup-samples",
            )
        for flag, value in (("--decoupled-lr", self.decoupled_lr),
                            ("--decoupled-min-lr", self.decoupled_min_lr)):  # fmt: skip
            _require(value is None or value >= 0, flag, value, "must be >= 0")

    def schedule_steps(self, train_iters: int, global_batch_size: int) -> tuple[float, int]:
        """(warmup, decay) of megatron-core's scheduler in samples, as Megatron-LM computes them
        (get_optimizer_param_scheduler: a --lr-warmup-fraction warmup is not rounded)."""
        if self.train_iters is not None:
            decay = (self.lr_decay_iters or train_iters) * global_batch_size
            warmup = self.lr_warmup_iters * global_batch_size
        else:
            decay = self.lr_decay_samples or self.train_samples
            warmup = self.lr_warmup_samples
        if self.lr_warmup_fraction is not None:
            warmup = self.lr_warmup_fraction * decay
        return warmup, decay

    def wd_incr_steps(self, global_batch_size: int) -> int:
        """The scheduler's weight-decay horizon in samples, as Megatron-LM sets it (and checks
        on resume): --train-iters x the global batch, or --train-samples."""
        if self.train_iters is not None:
            return self.train_iters * global_batch_size
        return self.train_samples

    def _check_numerics(self) -> None:
        """FP8 format and recipe, activation recomputation."""
        _require(
            self.fp8_format in (None, "e4m3", "hybrid"),
            "--fp8-format",
            self.fp8_format,
            "must be e4m3 or hybrid",
        )
        _require(
            self.fp8_recipe in ("delayed", "tensorwise", "mxfp8", "blockwise"),
            "--fp8-recipe",
            self.fp8_recipe,
            "must be delayed, tensorwise, mxfp8 or blockwise",
        )
        _require(
            self.fp8_amax_history_len >= 1,
            "--fp8-amax-history-len",
            self.fp8_amax_history_len,
            "must be >= 1",
        )
        _require(
            self.fp8_amax_compute_algo in ("most_recent", "max"),
            "--fp8-amax-compute-algo",
            self.fp8_amax_compute_algo,
            "must be most_recent or max",
        )
        _require(not (self.bf16 and self.fp16), "--fp16", True, "cannot be combined with --bf16")
        _require(
            self.recompute_granularity in (None, "selective", "full"),
            "--recompute-granularity",
            self.recompute_granularity,
            "must be selective or full",
        )
        _require(
            self.recompute_method in ("uniform", "block"),
            "--recompute-method",
            self.recompute_method,
            "must be uniform or block",
        )
