"""Model-side configuration: RoPE scaling, model shape and numerics, parallel layout.

The rest of a run (data, EndPrompt layout, schedule, checkpoints, logging) is in
:mod:`megatron_endprompt.config.sections`. Each dataclass validates itself in ``__post_init__`` and
raises ``ValueError`` naming the field (and the command-line flag it comes from) with the offending
value, so a bad run fails before any compute. Field names follow Megatron-LM / Hugging Face so
conversions are lossless.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, get_args

RopeScalingType = Literal["none", "linear", "ntk", "yarn", "llama3"]
ROPE_SCALING_TYPES: tuple[str, ...] = get_args(RopeScalingType)


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

    rope_type: RopeScalingType = "none"
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


Normalization = Literal["RMSNorm", "LayerNorm"]
TransformerImpl = Literal["local", "te"]
ParamsDtype = Literal["float32", "bfloat16", "float16"]
NORMALIZATIONS: tuple[str, ...] = get_args(Normalization)
TRANSFORMER_IMPLS: tuple[str, ...] = get_args(TransformerImpl)
"""Internal names; ``transformer_engine`` (Megatron-LM's spelling) is accepted for ``te``."""
PARAMS_DTYPES: tuple[str, ...] = get_args(ParamsDtype)


@dataclass
class ModelConfig:
    """Shape and numerics of a GPT (Llama-style) model; defaults are the ``tiny`` recipe."""

    num_layers: int = 4
    """Number of transformer layers."""
    hidden_size: int = 128
    """Transformer hidden size."""
    ffn_hidden_size: int | None = 352
    """MLP intermediate size (per branch of the SwiGLU gate); None derives Megatron-LM's:
    int(8h/3 / 64) x 64 with --swiglu, else 4h."""
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
    normalization: Normalization = "RMSNorm"
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
    layernorm_zero_centered_gamma: bool = False
    """Norm weights stored as gamma - 1 (Megatron-LM's --apply-layernorm-1p)."""
    transformer_impl: str = "local"
    """local (megatron-core modules + torch SDPA, runs on CPU) | transformer_engine (alias te;
    Transformer Engine, GPU)."""
    params_dtype: ParamsDtype = "float32"
    """Parameter dtype: float32 | bfloat16 | float16."""

    def __post_init__(self) -> None:
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.transformer_impl == "transformer_engine":
            self.transformer_impl = "te"
        if self.ffn_hidden_size is None and isinstance(self.hidden_size, int):
            h = self.hidden_size  # Megatron-LM's validate_args derivation
            self.ffn_hidden_size = int((4 * h * 2 / 3) / 64) * 64 if self.swiglu else 4 * h
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
    overlap_grad_reduce: bool = False
    """CUDA path: overlap the data-parallel gradient reduction with the backward pass."""
    overlap_param_gather: bool = False
    """CUDA path, distributed optimizer: overlap the parameter all-gather with the forward."""
    grad_reduce_in_bf16: bool = False
    """CUDA path: reduce gradients in bf16 instead of fp32."""
    distributed_timeout_minutes: int = 10
    """Timeout of collective operations (torch.distributed's init_process_group)."""

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
        _require(
            not self.overlap_param_gather or self.use_distributed_optimizer,
            "--overlap-param-gather",
            True,
            "needs --use-distributed-optimizer (as Megatron-LM)",
        )
        _require(
            self.distributed_timeout_minutes >= 1,
            "--distributed-timeout-minutes",
            self.distributed_timeout_minutes,
            "must be >= 1",
        )

    @property
    def model_parallel_size(self) -> int:
        """TP x PP: ranks holding one copy of the model."""
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size


def _flag(name: str) -> str:
    """The Megatron-style flag of a field: ``num_layers`` -> ``--num-layers``."""
    return "--" + name.replace("_", "-")


def model_config_from_dict(values: Mapping[str, Any]) -> ModelConfig:
    """ModelConfig from its ``asdict`` form (as checkpoints record it); unknown keys are ignored.

    Raises:
        ValueError: When a field is invalid (the config's own message).
    """
    known = {f.name for f in fields(ModelConfig)}
    kwargs = {k: v for k, v in values.items() if k in known}
    scaling = kwargs.get("rope_scaling")
    if isinstance(scaling, Mapping):
        scaling_known = {f.name for f in fields(RopeScalingConfig)}
        kwargs["rope_scaling"] = RopeScalingConfig(
            **{k: v for k, v in scaling.items() if k in scaling_known}
        )
    elif scaling is None:
        kwargs.pop("rope_scaling", None)
    return ModelConfig(**kwargs)
