"""Configuration of a training run besides the model: data, EndPrompt layout, schedule,
checkpoints, logging.

Same conventions as :mod:`megatron_endprompt.config.model` (model, parallel layout, RoPE
scaling): one dataclass per concern, a one-line docstring under each field (the CLI help text),
validation in ``__post_init__`` raising ``ValueError`` that names the flag and the value.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_endprompt.config.model import _require
from megatron_endprompt.positions import (
    PLACEMENTS,
    POSE_CHUNK_SAMPLERS,
    POSITION_MODES,
    TERMINAL_SOURCES,
    TERMINALS,
)

LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")


@dataclass
class DataConfig:
    """Where the training text comes from and how it is tokenized."""

    data_path: list[str] = field(default_factory=list)
    """Megatron blend: PREFIX or W1 PREFIX1 W2 PREFIX2 ... (PREFIX without .bin/.idx)."""
    split: str = "969,30,1"
    """Train/valid/test split of each prefix, as Megatron's --split."""
    data_cache_path: str | None = None
    """Where dataset indices are cached (default: beside the data)."""
    tokenizer_type: str = "SentencePieceTokenizer"
    """SentencePieceTokenizer | HuggingFaceTokenizer | ByteTokenizer."""
    tokenizer_model: str | None = None
    """Tokenizer file (.model, tokenizer.json or its directory)."""
    eod_mask_loss: bool = False
    """Give the end-of-document label zero weight."""
    num_workers: int = 1
    """DataLoader worker processes per reading rank."""

    def __post_init__(self) -> None:
        _require(self.num_workers >= 0, "--num-workers", self.num_workers, "must be >= 0")
        parts = [p for p in self.split.replace("/", ",").split(",") if p.strip()]
        ok = len(parts) == 3 and all(_is_number(p) and float(p) >= 0 for p in parts)
        _require(
            ok and sum(float(p) for p in parts) > 0,
            "--split",
            self.split,
            "must be three non-negative weights like 969,30,1",
        )


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@dataclass
class EndPromptConfig:
    """How training samples are laid out in position space (the method)."""

    position_mode: str = "endprompt"
    """contiguous | endprompt | pose | endprompt_pose."""
    target_length: int | None = None
    """Target context window L (positions reach L-1); default: --max-position-embeddings."""
    terminal: str = "cue"
    """cue: append a cue (paper) | tail: the sample's own last tokens (reference code)."""
    placement: str = "fixed"
    """fixed: terminal ends at L-1 | random: terminal start drawn per sample."""
    cues: list[str] | None = None
    """Cue strings (default: the paper's EP_1 sentence, 'End.', and the end-of-document token)."""
    tail_length: int = 20
    """Terminal length t in tail mode."""
    terminal_loss_weight: float | None = None
    """Loss weight of terminal predictions (default 0.1 for cue, 1.0 for tail)."""
    pose_num_chunks: int = 2
    """PoSE chunks (pose and endprompt_pose modes)."""
    terminal_source: str = "contiguous"
    """Tail text: contiguous (the t tokens after the context) | document_end (its document's last
    t tokens after a gap, the reference code's random mode); tail terminal only."""
    pose_chunk_sampler: str = "paper"
    """PoSE first-chunk length: paper (l0 ~ U{1..S-1}) | reference (l0 ~ U{1..(S+1)//2})."""
    pose_skip_text: bool = False
    """PoSE: skip a random stretch of text before each later chunk (reference code's v)."""

    def __post_init__(self) -> None:
        _require(
            self.position_mode in POSITION_MODES,
            "--position-mode",
            self.position_mode,
            f"must be one of {', '.join(POSITION_MODES)}",
        )
        _require(
            self.terminal in TERMINALS,
            "--endprompt-terminal",
            self.terminal,
            "must be cue or tail",
        )
        _require(
            self.placement in PLACEMENTS,
            "--endprompt-placement",
            self.placement,
            "must be fixed or random",
        )
        _require(self.tail_length >= 1, "--endprompt-tail-length", self.tail_length, "must be >= 1")
        _require(
            self.pose_num_chunks >= 1, "--pose-num-chunks", self.pose_num_chunks, "must be >= 1"
        )
        if self.terminal_loss_weight is not None:
            _require(
                self.terminal_loss_weight >= 0,
                "--endprompt-terminal-loss-weight",
                self.terminal_loss_weight,
                "must be >= 0",
            )
        if self.target_length is not None:
            _require(self.target_length >= 2, "--target-length", self.target_length, "must be >= 2")
        self._check_fidelity_options()

    def _check_fidelity_options(self) -> None:
        """The reference-code fidelity options: each applies to some layouts only."""
        is_pose = self.position_mode in ("pose", "endprompt_pose")
        source, sampler = self.terminal_source, self.pose_chunk_sampler
        _require(
            source in TERMINAL_SOURCES,
            "--endprompt-terminal-source",
            source,
            f"must be one of {', '.join(TERMINAL_SOURCES)}",
        )
        _require(
            source == "contiguous"
            or (self.terminal == "tail" and self.position_mode in ("endprompt", "endprompt_pose")),
            "--endprompt-terminal-source",
            source,
            "needs --endprompt-terminal tail and --position-mode endprompt or endprompt_pose",
        )
        _require(
            sampler in POSE_CHUNK_SAMPLERS,
            "--pose-chunk-sampler",
            sampler,
            "must be paper or reference",
        )
        _require(
            sampler == "paper" or is_pose,
            "--pose-chunk-sampler",
            sampler,
            "needs --position-mode pose or endprompt_pose",
        )
        _require(
            sampler == "paper" or self.pose_num_chunks <= 2,
            "--pose-chunk-sampler",
            sampler,
            f"draws the reference code's two chunks; --pose-num-chunks={self.pose_num_chunks}",
        )
        _require(
            not self.pose_skip_text or is_pose,
            "--pose-skip-text",
            True,
            "needs --position-mode pose or endprompt_pose",
        )
        _require(
            not (self.pose_skip_text and source == "document_end"),
            "--pose-skip-text",
            True,
            "cannot be combined with --endprompt-terminal-source document_end (two text sources)",
        )

    @property
    def is_per_sample_random(self) -> bool:
        """True when two samples of a micro-batch can have different layouts."""
        return self.position_mode in ("pose", "endprompt_pose") or (
            self.position_mode == "endprompt" and self.placement == "random"
        )


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
    """Samples to train; iterations = train_samples / global batch."""
    lr: float = 3e-4
    """Peak learning rate."""
    min_lr: float = 0.0
    """Learning rate at the end of decay."""
    lr_warmup_iters: int = 0
    """Linear warmup iterations."""
    lr_decay_style: str = "cosine"
    """constant | linear | cosine | inverse-square-root | WSD."""
    lr_decay_iters: int | None = None
    """Iterations over which the rate decays (default: all training iterations)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    clip_grad: float = 1.0
    """Gradient-norm clipping threshold (0 disables)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    seed: int = 1234
    """Seed of initialisation, data order and layouts."""
    bf16: bool = False
    """bf16 parameters and compute (fp32 master weights in the optimizer)."""
    fp8_format: str | None = None
    """Transformer Engine FP8: e4m3 | hybrid (needs --transformer-impl te)."""
    fp8_recipe: str = "delayed"
    """TE FP8 recipe: delayed | tensorwise | mxfp8 | blockwise."""
    recompute_granularity: str | None = None
    """Activation recomputation: selective | full."""
    recompute_method: str = "uniform"
    """full recompute: uniform | block."""
    recompute_num_layers: int = 1
    """full recompute: layers per recompute unit."""
    eval_interval: int = 0
    """Validate every N iterations (0: only at the end when --eval-iters > 0)."""
    eval_iters: int = 0
    """Validation micro-batch iterations per evaluation."""
    exit_interval: int | None = None
    """Save a checkpoint and exit once the iteration number is divisible by N."""

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
        self._check_schedule()
        self._check_numerics()
        _require(
            self.eval_interval >= 0 and self.eval_iters >= 0,
            "--eval-interval",
            self.eval_interval,
            "--eval-interval and --eval-iters must be >= 0",
        )
        if self.exit_interval is not None:
            _require(self.exit_interval >= 1, "--exit-interval", self.exit_interval, "must be >= 1")

    def _check_schedule(self) -> None:
        """Learning rate, its schedule and the optimizer's constants."""
        _require(
            self.lr_decay_iters is None or self.lr_decay_iters >= 1,
            "--lr-decay-iters",
            self.lr_decay_iters,
            "must be >= 1 (megatron-core's OptimizerParamScheduler asserts lr_decay_steps > 0)",
        )
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


@dataclass
class CheckpointConfig:
    """Saving, loading and resuming."""

    save: str | None = None
    """Directory to save checkpoints to."""
    load: str | None = None
    """Directory to load a checkpoint from (resume, or --finetune from converted weights)."""
    save_interval: int = 0
    """Save every N iterations (0: only at the end and on SIGTERM)."""
    keep_last: int | None = None
    """Keep only the newest N checkpoints (default: keep all)."""
    no_load_optim: bool = False
    """Do not load optimizer and scheduler states."""
    no_load_rng: bool = False
    """Do not load RNG states."""
    finetune: bool = False
    """Load weights only; reset iteration, consumed samples, optimizer and scheduler."""
    exit_on_missing_checkpoint: bool = False
    """Fail when --load holds no checkpoint instead of training from scratch (Megatron-LM's
    flag; --finetune always fails then)."""
    exit_signal_handler: bool = True
    """On SIGTERM: save a checkpoint and exit 0."""
    dist_ckpt_optim_fully_reshardable: bool = False
    """CUDA, --use-distributed-optimizer: store the optimizer state so it loads at any TP/PP
    (gathered on DP rank 0; Megatron-LM's flag). Default: reshardable along DP only."""

    def __post_init__(self) -> None:
        _require(self.save_interval >= 0, "--save-interval", self.save_interval, "must be >= 0")
        if self.keep_last is not None:
            _require(self.keep_last >= 1, "--keep-last", self.keep_last, "must be >= 1")


@dataclass
class LoggingConfig:
    """Console and TensorBoard."""

    log_interval: int = 10
    """Print and record metrics every N iterations."""
    tensorboard_dir: str | None = None
    """TensorBoard event directory (default: no TensorBoard)."""

    def __post_init__(self) -> None:
        _require(self.log_interval >= 1, "--log-interval", self.log_interval, "must be >= 1")
