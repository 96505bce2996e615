"""Layer norms of the local spec, with Megatron-LM's ``--apply-layernorm-1p``.

megatron-core's ``WrappedTorchNorm`` (its norm without apex or TE) refuses
``layernorm_zero_centered_gamma``; :class:`LocalNorm` builds the same torch modules (same parameter
names, so checkpoints are unchanged) and, with zero-centred gamma, a subclass that stores
``gamma - 1`` (initialised to 0) and scales by ``weight + 1``, as apex's and TE's norms do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_config import TransformerConfig


class ZeroCenteredLayerNorm(torch.nn.LayerNorm):
    """LayerNorm whose weight is stored as gamma - 1."""

    def reset_parameters(self) -> None:  # noqa: D102 (torch API)
        super().reset_parameters()
        if self.elementwise_affine:
            torch.nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return F.layer_norm(x, self.normalized_shape, self.weight + 1, self.bias, self.eps)


class ZeroCenteredRMSNorm(torch.nn.RMSNorm):
    """RMSNorm whose weight is stored as gamma - 1."""

    def reset_parameters(self) -> None:  # noqa: D102 (torch API)
        super().reset_parameters()
        if self.elementwise_affine:
            torch.nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return F.rms_norm(x, self.normalized_shape, self.weight + 1, self.eps)


class LocalNorm:
    """Norm factory with megatron-core's norm signature (``build_module`` calls it)."""

    def __new__(
        cls,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "LayerNorm",
    ) -> torch.nn.Module:
        if not config.layernorm_zero_centered_gamma:
            return WrappedTorchNorm(config, hidden_size, eps, persist_layer_norm,
                                    zero_centered_gamma, normalization)  # fmt: skip
        assert not config.sequence_parallel, "sequence parallel needs --transformer-impl te"
        if config.normalization == "LayerNorm":
            return ZeroCenteredLayerNorm(hidden_size, eps=eps)
        if config.normalization == "RMSNorm":
            return ZeroCenteredRMSNorm(hidden_size, eps=eps)
        raise ValueError(f"--normalization={config.normalization}: must be LayerNorm or RMSNorm")
