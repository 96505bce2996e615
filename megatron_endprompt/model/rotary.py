"""Position-aware rotary embedding (RoPE) with Hugging Face compatible context-extension scaling.

megatron-core 0.16.1's ``RotaryEmbedding`` builds the rotary tensor from the sequence length alone
(positions 0..s-1), takes only integer interpolation factors and ignores ``position_ids``. EndPrompt
and PoSE need arbitrary, per-sample position layouts such as ``[0 .. a-1, L-t .. L-1]``, so this
module maps ``position_ids`` [b, s] straight to the frequency tensor megatron-core's attention
consumes (``apply_rotary_pos_emb`` takes cos/sin of it and rotates the first ``d_rot`` channels of
every head):

* ``[s, 1, 1, d_rot]`` when every row of the batch has the same layout (identical to what
  ``RotaryEmbedding.forward`` returns, so TE's fused RoPE and context-parallel slicing apply);
* ``[s, b, 1, d_rot]`` otherwise (the unfused path broadcasts it over the heads).

Angles are computed in float64 and reduced modulo 2*pi before the float32 cast. Attention takes
cos/sin of the tensor itself, so the reduction changes nothing mathematically, but it keeps position
2**20 as exact (about 2e-7 rad) as position 10, where a float32 ``position * inv_freq`` is off by
up to ~0.05 rad.

Scaling types mirror Hugging Face ``rope_scaling`` (``transformers.modeling_rope_utils``):
linear (Position Interpolation), yarn, llama3, and ntk (NTK-aware base, closed form).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from megatron_endprompt.config import RopeScalingConfig

_TWO_PI = 2.0 * math.pi


def rotary_dim(kv_channels: int, rotary_percent: float = 1.0) -> int:
    """Number of rotated channels per head, computed as megatron-core does.

    Args:
        kv_channels: Head dimension.
        rotary_percent: Fraction of the head dimension that is rotated, in (0, 1].

    Returns:
        ``int(kv_channels * rotary_percent)``; must be a positive even number.

    Raises:
        ValueError: If an argument is out of range or the rotary dimension is odd or zero.
    """
    if isinstance(kv_channels, bool) or not isinstance(kv_channels, int) or kv_channels <= 0:
        raise ValueError(f"kv_channels must be a positive int, got {kv_channels!r}")
    if not 0.0 < rotary_percent <= 1.0:
        raise ValueError(f"rotary_percent must be in (0, 1], got {rotary_percent!r}")
    dim = int(kv_channels * rotary_percent) if rotary_percent < 1.0 else kv_channels
    if dim <= 0 or dim % 2:
        raise ValueError(
            f"rotary_percent={rotary_percent!r} with kv_channels={kv_channels} gives rotary "
            f"dimension {dim}; it must be a positive even number"
        )
    return dim


def _default_inv_freq(rot_dim: int, base: float) -> np.ndarray:
    """Plain RoPE: base ** (-2i / d) for i in 0 .. d/2 - 1."""
    return 1.0 / base ** (np.arange(0, rot_dim, 2, dtype=np.float64) / rot_dim)


def _linear_inv_freq(rot_dim: int, base: float, scaling: RopeScalingConfig) -> np.ndarray:
    # HF divides inv_freq by the factor; identical to dividing positions by it (PI).
    return _default_inv_freq(rot_dim, base) / scaling.factor


def _ntk_inv_freq(rot_dim: int, base: float, scaling: RopeScalingConfig) -> np.ndarray:
    # NTK-aware: stretch the base so the lowest frequency is interpolated by exactly `factor`
    # while the highest is untouched. (HF's "dynamic" NTK depends on the live sequence length.)
    ntk_base = base * scaling.factor ** (rot_dim / (rot_dim - 2))
    return _default_inv_freq(rot_dim, ntk_base)


def _llama3_inv_freq(rot_dim: int, base: float, scaling: RopeScalingConfig) -> np.ndarray:
    """Llama 3.1 scaling, line for line as transformers' ``_compute_llama3_parameters``."""
    inv_freq = _default_inv_freq(rot_dim, base)
    factor = scaling.factor
    old_context_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_context_len / scaling.low_freq_factor
    high_freq_wavelen = old_context_len / scaling.high_freq_factor
    wavelen = _TWO_PI / inv_freq
    inv_freq_llama = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, inv_freq_llama)


def _yarn_correction_range(
    rot_dim: int, base: float, scaling: RopeScalingConfig
) -> tuple[float, float]:
    """Dimension bounds of the yarn ramp (HF ``find_correction_range`` with truncate=True)."""

    def correction_dim(num_rotations: float) -> float:
        return (
            rot_dim * math.log(scaling.original_max_position_embeddings / (num_rotations * _TWO_PI))
        ) / (2 * math.log(base))

    # HF's default `truncate=True`: floor/ceil the bounds (the YaRN reference implementation).
    low = math.floor(correction_dim(scaling.beta_fast))
    high = math.ceil(correction_dim(scaling.beta_slow))
    return max(low, 0), min(high, rot_dim - 1)


def _yarn_inv_freq(rot_dim: int, base: float, scaling: RopeScalingConfig) -> np.ndarray:
    """YaRN frequencies, as transformers' ``_compute_yarn_parameters``."""
    pos_freqs = base ** (np.arange(0, rot_dim, 2, dtype=np.float64) / rot_dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (scaling.factor * pos_freqs)
    low, high = _yarn_correction_range(rot_dim, base, scaling)
    if low == high:
        high += 0.001  # HF: prevent a zero-width ramp
    # HF ramps over index i of the rot_dim/2 frequencies against bounds measured in rot_dim units;
    # mirrored as is so exported checkpoints behave the same.
    ramp = np.clip((np.arange(rot_dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    extrapolation_weight = 1.0 - ramp
    return interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight


_INV_FREQ_FNS: dict[str, Callable[[int, float, RopeScalingConfig], np.ndarray]] = {
    "linear": _linear_inv_freq,
    "ntk": _ntk_inv_freq,
    "llama3": _llama3_inv_freq,
    "yarn": _yarn_inv_freq,
}


def compute_inv_freq(
    rot_dim: int, base: float, scaling: RopeScalingConfig | None = None
) -> np.ndarray:
    """Inverse frequencies of RoPE with optional context-extension scaling, in float64.

    Args:
        rot_dim: Rotary dimension d_rot (positive, even).
        base: RoPE base theta (> 1).
        scaling: Scaling config; None or type "none" gives plain RoPE.

    Returns:
        float64 array of shape [rot_dim / 2]; angle of frequency i at position p is p * inv_freq[i].

    Raises:
        ValueError: If ``rot_dim`` or ``base`` is invalid.
    """
    if isinstance(rot_dim, bool) or not isinstance(rot_dim, int) or rot_dim <= 0 or rot_dim % 2:
        raise ValueError(f"rot_dim must be a positive even int, got {rot_dim!r}")
    if not base > 1.0:
        raise ValueError(f"base must be > 1, got {base!r}")
    if scaling is not None and not isinstance(scaling, RopeScalingConfig):
        raise ValueError(f"scaling must be a RopeScalingConfig or None, got {scaling!r}")
    if scaling is None or scaling.rope_type == "none":
        return _default_inv_freq(rot_dim, float(base))
    if scaling.rope_type == "ntk" and rot_dim == 2:
        raise ValueError("rot_dim=2: ntk scaling needs a rotary dimension of at least 4")
    return _INV_FREQ_FNS[scaling.rope_type](rot_dim, float(base), scaling)


def attention_scaling(scaling: RopeScalingConfig | None) -> float:
    """Hugging Face's cos/sin multiplier (YaRN attention temperature); 1.0 for other types.

    Args:
        scaling: Scaling config or None.

    Returns:
        yarn: ``attention_factor`` if set, else ``0.1 * ln(factor) + 1`` (1.0 when factor <= 1),
        exactly as transformers' ``_compute_yarn_parameters`` without ``mscale`` keys. Else 1.0.
    """
    if scaling is None or scaling.rope_type != "yarn":
        return 1.0
    if scaling.attention_factor is not None:
        return float(scaling.attention_factor)
    if scaling.factor <= 1:
        return 1.0
    return 0.1 * math.log(scaling.factor) + 1.0


def _check_position_ids(position_ids_bs: torch.Tensor) -> None:
    """Shape and dtype checks that need no device synchronisation."""
    if not isinstance(position_ids_bs, torch.Tensor):
        raise ValueError(f"position_ids must be a torch.Tensor, got {type(position_ids_bs)}")
    if position_ids_bs.dim() != 2:
        raise ValueError(
            f"position_ids must be 2-D [batch, seq], got shape {tuple(position_ids_bs.shape)}"
        )
    if position_ids_bs.dtype.is_floating_point or position_ids_bs.dtype.is_complex:
        raise ValueError(f"position_ids must be an integer tensor, got {position_ids_bs.dtype}")
    if position_ids_bs.numel() == 0:
        raise ValueError(
            f"position_ids must be non-empty, got shape {tuple(position_ids_bs.shape)}"
        )


def is_batch_shared(position_ids_bs: torch.Tensor) -> bool:
    """True when every row of ``position_ids_bs`` [b, s] equals the first one.

    A batch-shared layout can use the [s, 1, 1, d] rotary tensor (TE fused RoPE, CP slicing).

    Raises:
        ValueError: If ``position_ids_bs`` is not a non-empty 2-D integer tensor.
    """
    _check_position_ids(position_ids_bs)
    if position_ids_bs.shape[0] == 1:
        return True
    return bool((position_ids_bs == position_ids_bs[:1]).all())


def rotary_angles(position_ids_sb: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Angles ``position * inv_freq`` reduced to [0, 2*pi), computed in float64, returned float32.

    Args:
        position_ids_sb: Non-negative integer positions, any shape P.
        inv_freq: float64 inverse frequencies [d_rot / 2] on the same device.

    Returns:
        float32 tensor of shape P + [d_rot / 2].
    """
    # Work in turns: frac() of a non-negative float64 is exact, and three in-place ops on CPU are
    # several times cheaper than torch.remainder. cos/sin are 2*pi periodic, so the reduction is
    # exact for attention; float32 then only has to hold a number below 2*pi (error ~2e-7 rad)
    # instead of one near 1e6.
    turns = position_ids_sb.to(torch.float64).unsqueeze(-1) * (inv_freq / _TWO_PI)
    return turns.frac_().mul_(_TWO_PI).to(torch.float32)


class PositionRotaryEmbedding(torch.nn.Module):
    """Rotary frequency tensor from explicit position ids, for megatron-core attention.

    Args:
        kv_channels: Head dimension.
        rotary_percent: Fraction of each head that is rotated (megatron-core semantics).
        rotary_base: RoPE base theta.
        scaling: Context-extension scaling (Hugging Face ``rope_scaling`` semantics) or None.
        rotary_interleaved: Megatron's interleaved layout [f0, f0, f1, f1, ...] instead of
            [f0 .. f_{d/2-1}, f0 .. f_{d/2-1}]; must match ``TransformerConfig.rotary_interleaved``.

    Raises:
        ValueError: On invalid dimensions, base or scaling.
    """

    def __init__(
        self,
        kv_channels: int,
        rotary_percent: float = 1.0,
        rotary_base: float = 10000.0,
        scaling: RopeScalingConfig | None = None,
        rotary_interleaved: bool = False,
    ) -> None:
        super().__init__()
        self.kv_channels = kv_channels
        self.rot_dim = rotary_dim(kv_channels, rotary_percent)
        self.rotary_base = float(rotary_base)
        self.scaling = scaling
        self.rotary_interleaved = bool(rotary_interleaved)
        self._attention_scaling = attention_scaling(scaling)
        if self._attention_scaling != 1.0 and self.rot_dim != kv_channels:
            # Folding the temperature into the softmax scale (see `attention_scaling`) would also
            # scale the pass-through channels, which Hugging Face leaves untouched.
            raise ValueError(
                f"rotary_percent={rotary_percent!r}: yarn attention scaling "
                f"{self._attention_scaling} needs rotary_percent=1.0"
            )
        self._inv_freq_np = compute_inv_freq(self.rot_dim, self.rotary_base, scaling)
        self.register_buffer(
            "inv_freq", torch.from_numpy(self._inv_freq_np.copy()), persistent=False
        )
        self._values_checked = False

    @property
    def attention_scaling(self) -> float:
        """YaRN attention temperature m (1.0 unless yarn).

        Hugging Face multiplies cos and sin by m, i.e. rotated q and k are each scaled by m, so
        every logit q.k / sqrt(d) becomes m**2 * q.k / sqrt(d). The rotation is linear, so the
        same logits come from the unscaled rotary tensor with softmax scale m**2 / sqrt(d) (see
        ``softmax_scale``). That keeps this tensor a pure angle tensor, which is what megatron's
        and TE's RoPE kernels take. Valid because all channels are rotated (checked in __init__).
        """
        return self._attention_scaling

    def softmax_scale(self) -> float:
        """Softmax scale for ``TransformerConfig.softmax_scale``: attention_scaling**2 / sqrt(d)."""
        return self._attention_scaling**2 / math.sqrt(self.kv_channels)

    def _apply(self, fn, *args, **kwargs):  # noqa: ANN001, ANN202 - torch.nn.Module internals
        # Megatron's Float16Module (and .half()/.bfloat16()) cast every floating buffer; the
        # angle computation needs the float64 frequencies, so restore them on the new device.
        module = super()._apply(fn, *args, **kwargs)
        if self.inv_freq.dtype != torch.float64:
            device = self.inv_freq.device
            self.inv_freq = torch.from_numpy(self._inv_freq_np.copy()).to(device)
        return module

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001, ANN202
        # Derived from the config, never loaded (mirrors megatron-core's RotaryEmbedding).
        state_dict.pop(f"{prefix}inv_freq", None)
        return super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, position_ids_bs: torch.Tensor, shared: bool | None = None) -> torch.Tensor:
        """Map position ids to megatron-core's rotary frequency tensor.

        Args:
            position_ids_bs: Integer position ids [b, s], non-negative.
            shared: Whether every row has the same layout, when the caller knows it for the whole
                run (``True``: [s, 1, 1, d] from row 0; ``False``: always [s, b, 1, d]). None:
                decided from the values. The values are checked (non-negative; equal rows when
                declared shared) on CPU tensors, when ``shared`` is None, and on the first call
                on an accelerator; later declared calls on an accelerator need no host
                synchronisation.

        Returns:
            float32 angles on the device of ``position_ids_bs``: [s, 1, 1, d_rot] if the layout is
            shared, else [s, b, 1, d_rot]. Layout [freqs, freqs] (or interleaved), as megatron-core.

        Raises:
            ValueError: If ``position_ids_bs`` is not 2-D integer, holds negative values, or its
                rows differ although ``shared=True``.
        """
        _check_position_ids(position_ids_bs)
        on_cpu = position_ids_bs.device.type == "cpu"
        if shared is None or on_cpu or not self._values_checked:
            # One host synchronisation for both data-dependent checks.
            negative, equal = torch.stack(
                [(position_ids_bs < 0).any(), (position_ids_bs == position_ids_bs[:1]).all()]
            ).tolist()
            if negative:
                raise ValueError(
                    f"position_ids must be >= 0, got minimum {int(position_ids_bs.min())}"
                )
            if shared and not equal:
                raise ValueError(
                    "position_ids rows differ, but the run declared a batch-shared layout "
                    "(fused RoPE needs one layout per micro-batch)"
                )
            if shared is None:
                shared = equal
            elif not on_cpu:
                self._values_checked = True
        rows_bs = position_ids_bs[:1] if shared else position_ids_bs
        angles_sbf = rotary_angles(rows_bs.t(), self.inv_freq.to(position_ids_bs.device))
        if self.rotary_interleaved:
            emb_sbd = angles_sbf.repeat_interleave(2, dim=-1)
        else:
            emb_sbd = torch.cat((angles_sbf, angles_sbf), dim=-1)
        return emb_sbd.unsqueeze(2)

    def extra_repr(self) -> str:
        kind = self.scaling.rope_type if self.scaling is not None else "none"
        return (
            f"rot_dim={self.rot_dim}, base={self.rotary_base}, scaling={kind}, "
            f"interleaved={self.rotary_interleaved}"
        )
