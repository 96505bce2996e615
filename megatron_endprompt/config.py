"""Configuration dataclasses.

Each dataclass validates itself in ``__post_init__`` and raises ``ValueError`` naming the field
(and the command-line flag it comes from) with the offending value, so a bad run fails before any
compute. Field names follow Megatron-LM / Hugging Face so conversions are lossless.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
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
