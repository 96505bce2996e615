"""The weighted language-modelling loss ``sum(w * CE) / sum(w)`` over the GLOBAL batch.

``loss_mask`` carries per-token weights (EndPrompt's terminal predictions weigh less than
context predictions). Averaging per micro-batch or per rank would weigh micro-batches with few
weighted tokens as much as full ones; instead every iteration first sums the weights of all its
micro-batches on all data-parallel (and context-parallel) ranks, W, and each micro-batch
contributes ``sum_mb(w * CE) / W`` to the gradient.

Data-parallel wrappers (torch DDP, megatron DDP) AVERAGE gradients over the DP ranks and
megatron's schedules divide each micro-batch loss by the number of micro-batches; ``grad_scale``
undoes both so the total gradient is exactly that of the global weighted mean.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_endprompt.device import all_reduce


def global_weight_sum(
    loss_masks: list[torch.Tensor], group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """W = sum of every weight of this iteration on every rank of ``group`` (float64 scalar).

    Args:
        loss_masks: the iteration's micro-batch weights on this rank.
        group: the data-parallel (x context-parallel) group; None for a single process.
    """
    total = torch.zeros((), dtype=torch.float64, device=loss_masks[0].device)
    for mask in loss_masks:
        total += mask.double().sum()
    return all_reduce(total, group)


def weighted_loss_sum(per_token_loss_bs: torch.Tensor, loss_mask_bs: torch.Tensor) -> torch.Tensor:
    """``sum(w * CE)`` of one micro-batch (float32 accumulation, as megatron does)."""
    if per_token_loss_bs.shape != loss_mask_bs.shape:
        raise ValueError(
            f"per-token loss shape {tuple(per_token_loss_bs.shape)} != loss_mask shape "
            f"{tuple(loss_mask_bs.shape)}"
        )
    return (per_token_loss_bs.float() * loss_mask_bs.float()).sum()


def masked_loss_sum(
    per_token_loss_bs: torch.Tensor, loss_mask_bs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum(w * CE), sum(w))`` of one micro-batch; the loss is their ratio over a batch."""
    return weighted_loss_sum(per_token_loss_bs, loss_mask_bs), loss_mask_bs.float().sum()


def microbatch_objective(
    per_token_loss_bs: torch.Tensor,
    loss_mask_bs: torch.Tensor,
    weight_total: torch.Tensor,
    grad_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What one micro-batch back-propagates, and its (detached) weighted loss sum for logging.

    Args:
        per_token_loss_bs: cross-entropy per token ``[b, s]``.
        loss_mask_bs: weights ``[b, s]``.
        weight_total: W from :func:`global_weight_sum`.
        grad_scale: number of DP ranks the wrapper averages over, times the number of
            micro-batches when the schedule divides by it.

    Returns:
        ``(objective, weighted_sum)``: back-propagate the first; sum the second over the
        iteration (and ranks) and divide by W to report the loss.
    """
    weighted = weighted_loss_sum(per_token_loss_bs, loss_mask_bs)
    # No host synchronisation: when every weight of the global batch is zero (padding only),
    # there is nothing to learn from: the scale is 0 instead of a division by zero.
    positive = weight_total > 0
    scale = torch.where(positive, grad_scale / torch.where(positive, weight_total, 1.0), 0.0)
    objective = weighted * scale.to(weighted.dtype)
    return objective, weighted.detach()
