"""Configuration dataclasses.

Each dataclass validates itself in ``__post_init__`` and raises ``ValueError`` naming the field
(and the command-line flag it comes from) with the offending value, so a bad run fails before any
compute. Field names follow Megatron-LM / Hugging Face so conversions are lossless.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

ROPE_SCALING_TYPES = ("none", "linear", "ntk", "yarn", "llama3")


def _require(cond: bool, flag: str, value: Any, why: str) -> None:
    """Raise ``ValueError('<flag>=<value>: <why>')`` unless ``cond`` holds."""
    if not cond:
        raise ValueError(f"{flag}={value!r}: {why}")


@dataclass
class RopeScalingConfig:
    """RoPE context-extension scaling, parameterised exactly like Hugging Face ``rope_scaling``.

    ``rope_type`` "none" means plain RoPE. Keys unused by a type are ignored by it (and dropped at
    export), so a config converts to and from Hugging Face without loss.
    """

    rope_type: str = "none"
    """none | linear (Position Interpolation) | ntk (NTK-aware base) | yarn | llama3."""
    factor: float = 1.0
    """Extension factor s = L / L_orig. Fractional values are allowed (linear, ntk, yarn)."""
    original_max_position_embeddings: int | None = None
    """Pre-training context L_orig (required by yarn and llama3)."""
    low_freq_factor: float = 1.0
    """llama3: wavelengths above L_orig / low_freq_factor are fully interpolated."""
    high_freq_factor: float = 4.0
    """llama3: wavelengths below L_orig / high_freq_factor are kept as they are."""
    beta_fast: float = 32.0
    """yarn: rotations-per-context above which a dimension is extrapolated."""
    beta_slow: float = 1.0
    """yarn: rotations-per-context below which a dimension is interpolated."""
    attention_factor: float | None = None
    """yarn: cos/sin multiplier (attention temperature); None -> 0.1 * ln(factor) + 1."""

    def __post_init__(self) -> None:
        _require(
            self.rope_type in ROPE_SCALING_TYPES,
            "--rope-scaling-type",
            self.rope_type,
            f"must be one of {', '.join(ROPE_SCALING_TYPES)}",
        )
        _require(self.factor > 0, "--rope-scaling-factor", self.factor, "must be > 0")
        if self.rope_type in ("yarn", "llama3"):
            _require(
                self.original_max_position_embeddings is not None
                and self.original_max_position_embeddings > 0,
                "--rope-original-max-position-embeddings",
                self.original_max_position_embeddings,
                f"is required (> 0) for rope scaling type {self.rope_type}",
            )
        if self.rope_type == "llama3":
            _require(
                self.high_freq_factor > self.low_freq_factor > 0,
                "--rope-scaling-high-freq-factor",
                self.high_freq_factor,
                f"must exceed --rope-scaling-low-freq-factor={self.low_freq_factor} (> 0)",
            )
        if self.rope_type == "yarn":
            _require(
                self.beta_fast > self.beta_slow > 0,
                "--rope-scaling-beta-fast",
                self.beta_fast,
                f"must exceed --rope-scaling-beta-slow={self.beta_slow} (> 0)",
            )
        if self.attention_factor is not None:
            _require(
                self.attention_factor > 0,
                "--rope-scaling-attention-factor",
                self.attention_factor,
                "must be > 0",
            )

    @property
    def enabled(self) -> bool:
        """True when positions or frequencies are modified (type other than none)."""
        return self.rope_type != "none"

    def to_dict(self) -> dict[str, Any]:
        """All fields as a plain dict (for checkpoints and reports)."""
        return asdict(self)


NORMALIZATIONS = ("RMSNorm", "LayerNorm")
TRANSFORMER_IMPLS = ("local", "te")
PARAMS_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ModelConfig:
    """Shape and numerics of a GPT (Llama-style) model; defaults are the ``tiny`` recipe."""

    num_layers: int = 4
    """Number of transformer layers."""
    hidden_size: int = 128
    """Transformer hidden size."""
    ffn_hidden_size: int = 352
    """MLP intermediate size (per branch of the SwiGLU gate)."""
    num_attention_heads: int = 4
    """Number of query heads."""
    num_query_groups: int | None = 2
    """Key/value heads (grouped-query attention); None means one per query head."""
    kv_channels: int | None = None
    """Head dimension; None means hidden_size / num_attention_heads."""
    seq_length: int = 256
    """Training sequence length S (input tokens per sample)."""
    max_position_embeddings: int = 2048
    """Context window the model is built for (positions stay below it)."""
    vocab_size: int = 512
    """Tokenizer vocabulary size (before padding)."""
    make_vocab_size_divisible_by: int = 128
    """Pad the vocabulary to a multiple of this times the tensor-parallel size (as Megatron)."""
    rotary_base: float = 10000.0
    """RoPE base theta."""
    rotary_percent: float = 1.0
    """Fraction of each head dimension that is rotated."""
    rotary_interleaved: bool = False
    """Rotate interleaved channel pairs (GPT-J style) instead of the two halves (Llama)."""
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    """RoPE context-extension scaling."""
    normalization: str = "RMSNorm"
    """RMSNorm | LayerNorm."""
    norm_epsilon: float = 1e-5
    """Epsilon of the normalization layers."""
    swiglu: bool = True
    """SwiGLU MLP (gate and up projections fused in linear_fc1)."""
    untie_embeddings_and_output_weights: bool = True
    """Separate input embedding and output projection weights."""
    add_bias_linear: bool = False
    """Biases in the linear layers (Megatron's --disable-bias-linear turns them off)."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""
    hidden_dropout: float = 0.0
    """Dropout after the attention and MLP blocks."""
    init_method_std: float = 0.02
    """Standard deviation of the normal weight initialisation."""
    transformer_impl: str = "local"
    """local (megatron-core modules + torch SDPA, runs on CPU) | te (Transformer Engine, GPU)."""
    params_dtype: str = "float32"
    """Parameter dtype: float32 | bfloat16 | float16."""

    def __post_init__(self) -> None:
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        for name in (
            "num_layers",
            "hidden_size",
            "ffn_hidden_size",
            "num_attention_heads",
            "num_query_groups",
            "seq_length",
            "max_position_embeddings",
            "vocab_size",
            "make_vocab_size_divisible_by",
        ):
            value = getattr(self, name)
            _require(
                isinstance(value, int) and not isinstance(value, bool) and value > 0,
                _flag(name),
                value,
                "must be a positive integer",
            )
        if self.kv_channels is None:
            _require(
                self.hidden_size % self.num_attention_heads == 0,
                "--hidden-size",
                self.hidden_size,
                f"is not divisible by --num-attention-heads={self.num_attention_heads} "
                "(set --kv-channels explicitly)",
            )
            self.kv_channels = self.hidden_size // self.num_attention_heads
        _require(self.kv_channels > 0, "--kv-channels", self.kv_channels, "must be > 0")
        _require(
            self.num_attention_heads % self.num_query_groups == 0,
            "--num-attention-heads",
            self.num_attention_heads,
            f"is not divisible by --num-query-groups={self.num_query_groups}",
        )
        _require(
            self.seq_length <= self.max_position_embeddings,
            "--seq-length",
            self.seq_length,
            f"exceeds --max-position-embeddings={self.max_position_embeddings}",
        )
        self._check_numerics()

    def _check_numerics(self) -> None:
        _require(self.rotary_base > 1, "--rotary-base", self.rotary_base, "must be > 1")
        _require(
            0 < self.rotary_percent <= 1,
            "--rotary-percent",
            self.rotary_percent,
            "must be in (0, 1]",
        )
        _require(
            isinstance(self.rope_scaling, RopeScalingConfig),
            "rope_scaling",
            self.rope_scaling,
            "must be a RopeScalingConfig",
        )
        _require(
            self.normalization in NORMALIZATIONS,
            "--normalization",
            self.normalization,
            f"must be one of {', '.join(NORMALIZATIONS)}",
        )
        _require(self.norm_epsilon > 0, "--norm-epsilon", self.norm_epsilon, "must be > 0")
        for name in ("attention_dropout", "hidden_dropout"):
            value = getattr(self, name)
            _require(0 <= value < 1, _flag(name), value, "must be in [0, 1)")
        _require(self.init_method_std > 0, "--init-method-std", self.init_method_std, "must be > 0")
        _require(
            self.transformer_impl in TRANSFORMER_IMPLS,
            "--transformer-impl",
            self.transformer_impl,
            f"must be one of {', '.join(TRANSFORMER_IMPLS)}",
        )
        _require(
            self.params_dtype in PARAMS_DTYPES,
            "--params-dtype",
            self.params_dtype,
            f"must be one of {', '.join(PARAMS_DTYPES)}",
        )

    def padded_vocab_size(self, tensor_model_parallel_size: int = 1) -> int:
        """Vocabulary padded to a multiple of make_vocab_size_divisible_by x TP (as Megatron)."""
        multiple = self.make_vocab_size_divisible_by * tensor_model_parallel_size
        return -(-self.vocab_size // multiple) * multiple

    def validate_against(self, parallel: ParallelConfig) -> None:
        """Check that the model shape splits over the parallel layout.

        Raises:
            ValueError: Naming both flags, e.g. "--num-attention-heads=12: is not divisible by
                --tensor-model-parallel-size=8".
        """
        tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
        tp_flag = f"--tensor-model-parallel-size={tp}"
        for name in ("num_attention_heads", "num_query_groups", "ffn_hidden_size"):
            value = getattr(self, name)
            _require(value % tp == 0, _flag(name), value, f"is not divisible by {tp_flag}")
        _require(
            self.num_layers % pp == 0,
            "--num-layers",
            self.num_layers,
            f"is not divisible by --pipeline-model-parallel-size={pp}",
        )
        vpp = parallel.virtual_pipeline_model_parallel_size
        if vpp is not None:
            _require(
                self.num_layers % (pp * vpp) == 0,
                "--num-layers",
                self.num_layers,
                f"is not divisible by --pipeline-model-parallel-size={pp} x "
                f"--virtual-pipeline-model-parallel-size={vpp}",
            )
        if parallel.sequence_parallel:
            _require(
                self.seq_length % tp == 0,
                "--seq-length",
                self.seq_length,
                f"is not divisible by {tp_flag} (needed by --sequence-parallel)",
            )
        cp = parallel.context_parallel_size
        if cp > 1:
            _require(
                self.seq_length % (2 * cp) == 0,
                "--seq-length",
                self.seq_length,
                f"is not divisible by 2 x --context-parallel-size={cp}",
            )

    def to_dict(self) -> dict[str, Any]:
        """All fields as a plain dict (for checkpoints and reports)."""
        return asdict(self)


@dataclass
class ParallelConfig:
    """How the model is split over devices (megatron-core parallel state)."""

    tensor_model_parallel_size: int = 1
    """Tensor-parallel size (splits heads, MLP and vocabulary)."""
    pipeline_model_parallel_size: int = 1
    """Pipeline-parallel size (splits layers)."""
    virtual_pipeline_model_parallel_size: int | None = None
    """Model chunks per pipeline rank (interleaved schedule); None for no interleaving."""
    context_parallel_size: int = 1
    """Context-parallel size (splits the sequence inside attention; needs TE)."""
    sequence_parallel: bool = False
    """Shard norms and dropout activations along the sequence over the tensor-parallel group."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (megatron-core distributed optimizer)."""

    def __post_init__(self) -> None:
        for name in (
            "tensor_model_parallel_size",
            "pipeline_model_parallel_size",
            "context_parallel_size",
        ):
            value = getattr(self, name)
            _require(
                isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                _flag(name),
                value,
                "must be an integer >= 1",
            )
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None:
            _require(
                isinstance(vpp, int) and vpp >= 2,
                "--virtual-pipeline-model-parallel-size",
                vpp,
                "must be an integer >= 2 (or unset)",
            )
            _require(
                self.pipeline_model_parallel_size > 1,
                "--virtual-pipeline-model-parallel-size",
                vpp,
                "needs --pipeline-model-parallel-size > 1",
            )
        _require(
            not self.sequence_parallel or self.tensor_model_parallel_size > 1,
            "--sequence-parallel",
            self.sequence_parallel,
            "needs --tensor-model-parallel-size > 1",
        )

    @property
    def model_parallel_size(self) -> int:
        """TP x PP: ranks holding one copy of the model."""
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size


def _flag(name: str) -> str:
    """The Megatron-style flag of a field: ``num_layers`` -> ``--num-layers``."""
    return "--" + name.replace("_", "-")


POSITION_MODES = ("contiguous", "endprompt", "pose", "endprompt_pose")
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

    def __post_init__(self) -> None:
        _require(
            self.position_mode in POSITION_MODES,
            "--position-mode",
            self.position_mode,
            f"must be one of {', '.join(POSITION_MODES)}",
        )
        _require(
            self.terminal in ("cue", "tail"),
            "--endprompt-terminal",
            self.terminal,
            "must be cue or tail",
        )
        _require(
            self.placement in ("fixed", "random"),
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
            ("--train-iters", self.train_iters),
            ("--train-samples", self.train_samples),
        ):
            _require(value is None or value >= 1, flag, value, "must be >= 1")
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
        _require(
            self.eval_interval >= 0 and self.eval_iters >= 0,
            "--eval-interval",
            self.eval_interval,
            "--eval-interval and --eval-iters must be >= 0",
        )
        if self.exit_interval is not None:
            _require(self.exit_interval >= 1, "--exit-interval", self.exit_interval, "must be >= 1")


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
    exit_signal_handler: bool = True
    """On SIGTERM: save a checkpoint and exit 0."""

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
