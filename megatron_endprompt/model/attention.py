"""Core attention for the local spec: torch ``scaled_dot_product_attention``.

megatron-core's local ``DotProductAttention`` materialises the [b*np, sq, sk] score matrix in a
CUDA-only global memory buffer; this drop-in replacement (same constructor and forward signatures)
calls torch SDPA instead, which runs on CPU and picks a fused kernel on GPUs without Transformer
Engine. It supports causal masking, grouped-query attention, attention dropout, an explicit
megatron boolean mask (True = masked out) and a custom softmax scale (YaRN's temperature is folded
into ``TransformerConfig.softmax_scale``).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

from megatron_endprompt import device


class SDPACoreAttention(MegatronModule):
    """Drop-in for megatron-core's ``DotProductAttention`` built on torch SDPA.

    Args:
        config: The model's transformer config.
        layer_number: 1-based layer index (kept for interface parity).
        attn_mask_type: Default mask type (causal for GPT).
        attention_type: "self" or "cross" (unused, as in megatron-core).
        attention_dropout: Overrides ``config.attention_dropout`` when given.
        softmax_scale: Logit scale; None means 1/sqrt(head_dim).
        cp_comm_type: Context-parallel communication type (CP is not supported here).
        pg_collection: Process groups; None uses megatron's global tensor-parallel group.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: ProcessGroupCollection | None = None,
    ) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError(
                f"--context-parallel-size={config.context_parallel_size}: the local attention "
                "does not support context parallelism; use --transformer-impl te"
            )
        if config.softmax_type != "vanilla":
            raise ValueError(f"softmax_type={config.softmax_type!r}: only 'vanilla' is supported")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp_size = pg_collection.tp.size()
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.head_dim = config.kv_channels
        self.num_heads_per_partition = divide(config.num_attention_heads, tp_size)
        self.num_groups_per_partition = divide(config.num_query_groups, tp_size)
        self.hidden_size_per_partition = self.num_heads_per_partition * self.head_dim
        # megatron's apply_query_key_layer_scaling divides the scale by the layer number and
        # multiplies it back inside the softmax: the net logit scale is unchanged, so ignore it.
        self.softmax_scale = (
            1.0 / math.sqrt(self.head_dim) if softmax_scale is None else float(softmax_scale)
        )
        self.dropout_p = (
            config.attention_dropout if attention_dropout is None else float(attention_dropout)
        )

    def _dropout_rng(self) -> contextlib.AbstractContextManager:
        """Per-TP-rank RNG stream for dropout (as megatron-core); the default one on CPU."""
        if self.config.sequence_parallel or not device.cuda_available():
            return contextlib.nullcontext()
        tracker = tensor_parallel.get_cuda_rng_tracker()
        if not tracker.get_states():
            return contextlib.nullcontext()
        return tracker.fork()

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> torch.Tensor:
        """Attention over one tensor-parallel partition of the heads.

        Args:
            query: [sq, b, np, hn].
            key: [sk, b, ng, hn] (ng query groups, np % ng == 0).
            value: [sk, b, ng, hn].
            attention_mask: Boolean, broadcastable to [b, np, sq, sk], True = masked out;
                combined with the causal mask when the mask type is causal. None for none.
            attn_mask_type: Overrides the constructor's mask type.
            attention_bias: Unsupported (must be None).
            packed_seq_params: Unsupported (must be None).

        Returns:
            Context [sq, b, np * hn].
        """
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("SDPACoreAttention supports neither attention_bias nor packed input")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        causal = mask_type == AttnMaskType.causal
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        sq, sk = q.shape[2], k.shape[2]
        attn_mask = None
        if attention_mask is not None:
            attn_mask = ~attention_mask.to(torch.bool)  # SDPA: True = attend
        if causal and (attn_mask is not None or sq != sk):
            # SDPA's is_causal is top-left aligned; megatron's causal mask is bottom-right aligned
            # when sq < sk (decoding), so build it explicitly whenever it is not the plain square.
            keep = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
            attn_mask = keep if attn_mask is None else attn_mask & keep
            causal = False
        dropout_p = self.dropout_p if self.training else 0.0
        with self._dropout_rng():
            context = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=attn_mask,
                dropout_p=dropout_p,
                is_causal=causal and sq > 1,
                scale=self.softmax_scale,
                enable_gqa=self.num_heads_per_partition != self.num_groups_per_partition,
            )
        # [b, np, sq, hn] -> [sq, b, np * hn]
        b = context.shape[0]
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)
