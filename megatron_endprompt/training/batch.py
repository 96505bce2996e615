"""Micro-batches: read on tensor-parallel rank 0, broadcast to the TP group, split for CP.

Unlike megatron's GPT example, where middle pipeline stages read nothing, every pipeline stage
here receives ``position_ids``: each stage builds its own rotary tensor from them. For simplicity
and because the four tensors are tiny next to activations, every stage receives all four.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")
BATCH_DTYPES = {
    "tokens": torch.int64,
    "labels": torch.int64,
    "loss_mask": torch.float32,
    "position_ids": torch.int64,
}


@dataclass
class BatchGroups:
    """Process groups a batch travels through (None = not parallel along that axis)."""

    tp_group: dist.ProcessGroup | None = None
    """Tensor-parallel group; its rank 0 reads the data."""
    tp_src_rank: int = 0
    """Global rank of the TP group's rank 0 (the broadcast source)."""
    cp_group: dist.ProcessGroup | None = None
    """Context-parallel group; each rank keeps its load-balanced sequence chunks."""

    @property
    def is_reader(self) -> bool:
        """True on the rank that reads from the data iterator."""
        if self.tp_group is None or not dist.is_initialized():
            return True
        return dist.get_rank() == self.tp_src_rank


def _check_sample_batch(batch: dict[str, torch.Tensor], shape: tuple[int, int]) -> None:
    for key in BATCH_KEYS:
        if key not in batch:
            raise KeyError(f"data batch lacks {key!r}; keys: {sorted(batch)}")
        if tuple(batch[key].shape) != shape:
            raise ValueError(
                f"data batch {key!r} has shape {tuple(batch[key].shape)}, expected {shape} "
                "(--micro-batch-size, --seq-length)"
            )


def split_for_context_parallel(
    batch: dict[str, torch.Tensor], cp_rank: int, cp_size: int
) -> dict[str, torch.Tensor]:
    """Megatron's load-balanced CP split: 2*cp chunks, rank r keeps chunks r and 2*cp-1-r.

    All four tensors are split the same way, so each kept token keeps its label, weight and
    assigned position (the rotary tensor is built from the kept positions).
    """
    if cp_size == 1:
        return batch
    out = {}
    for key, val in batch.items():
        b, s = val.shape[:2]
        if s % (2 * cp_size):
            raise ValueError(
                f"--seq-length={s} must be divisible by 2 x --context-parallel-size={cp_size}"
            )
        chunks = val.view(b, 2 * cp_size, s // (2 * cp_size), *val.shape[2:])
        index = torch.tensor([cp_rank, 2 * cp_size - cp_rank - 1], device=val.device)
        out[key] = chunks.index_select(1, index).reshape(b, -1, *val.shape[2:])
    return out


def get_batch(
    data_iterator: Iterator[dict[str, torch.Tensor]] | None,
    micro_batch_size: int,
    seq_length: int,
    device: torch.device,
    groups: BatchGroups | None = None,
) -> dict[str, torch.Tensor]:
    """The next micro-batch on this rank: tokens, labels, loss_mask, position_ids ``[b, s]``.

    Args:
        data_iterator: yields collated CPU batches; only read on the TP source rank (may be None
            elsewhere).
        micro_batch_size: ``--micro-batch-size``.
        seq_length: ``--seq-length`` (before the CP split).
        device: where the tensors go.
        groups: TP/CP groups; None for a single process.
    """
    groups = groups or BatchGroups()
    shape = (micro_batch_size, seq_length)
    if groups.is_reader:
        if data_iterator is None:
            raise RuntimeError("the reading rank has no data iterator")
        raw = next(data_iterator)
        _check_sample_batch(raw, shape)
        batch = {k: raw[k].to(device=device, dtype=BATCH_DTYPES[k]) for k in BATCH_KEYS}
    else:
        batch = {k: torch.empty(shape, dtype=BATCH_DTYPES[k], device=device) for k in BATCH_KEYS}
    if groups.tp_group is not None and dist.get_world_size(groups.tp_group) > 1:
        for key in BATCH_KEYS:
            dist.broadcast(batch[key], src=groups.tp_src_rank, group=groups.tp_group)
    if groups.cp_group is not None:
        cp_size = dist.get_world_size(groups.cp_group)
        batch = split_for_context_parallel(batch, dist.get_rank(groups.cp_group), cp_size)
    return batch
