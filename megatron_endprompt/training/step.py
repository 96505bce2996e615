"""The step core both backends share, and the local backend's iteration and evaluation.

Shared: :class:`StepShape`, :func:`fetch_microbatches` (all micro-batches of an iteration first,
so the weight total W of the GLOBAL batch is known before any backward, see loss.py) and
:func:`weighted_mean`. The local (CPU: gloo, torch DDP, AdamW) iteration then accumulates
gradients micro-batch by micro-batch (DDP synchronises only on the last one), clips the TP-aware
global norm and steps; the megatron-core iteration is in megatron_step.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from megatron_endprompt.device import all_reduce
from megatron_endprompt.training.batch import BatchGroups, get_batch
from megatron_endprompt.training.loss import (
    global_weight_sum,
    masked_loss_sum,
    microbatch_objective,
)
from megatron_endprompt.training.optim import clip_gradients, grad_norm
from megatron_endprompt.training.runtime import Runtime

Progress = Callable[[int], None] | None
"""Called with the number of evaluation iterations done (progress lines)."""


@dataclass
class StepShape:
    """Batch geometry of one iteration on one rank."""

    micro_batch_size: int
    seq_length: int
    num_microbatches: int


def batch_groups(rt: Runtime) -> BatchGroups:
    """The TP/CP groups a batch travels through."""
    return BatchGroups(tp_group=rt.tp_group, tp_src_rank=rt.tp_src_rank, cp_group=rt.cp_group)


def fetch_microbatches(
    data_iterator: Iterator | None, shape: StepShape, rt: Runtime
) -> list[dict[str, torch.Tensor]]:
    """All micro-batches of one iteration on this rank."""
    groups = batch_groups(rt)
    return [
        get_batch(data_iterator, shape.micro_batch_size, shape.seq_length, rt.device, groups)
        for _ in range(shape.num_microbatches)
    ]


def weighted_mean(weighted: torch.Tensor, total: torch.Tensor, empty: float) -> float:
    """``sum(w * CE) / sum(w)`` of already reduced sums; ``empty`` when no weight at all."""
    return float(weighted / total) if float(total) > 0 else empty


def forward_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-token cross-entropy ``[b, s]`` of one micro-batch."""
    return model(batch["tokens"], batch["position_ids"], labels=batch["labels"])


def train_step_cpu(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data_iterator: Iterator | None,
    shape: StepShape,
    rt: Runtime,
    clip_grad: float,
) -> dict[str, float]:
    """Forward/backward over the iteration's micro-batches, clip, optimizer step.

    ``model`` is wrapped in torch DDP over the data-parallel group when DP > 1 (DDP averages
    gradients, hence ``grad_scale = DP``). Context parallelism is a CUDA-path feature.

    Returns:
        ``loss`` (global weighted mean), ``grad_norm`` (before clipping), ``weight_total``.
    """
    batches = fetch_microbatches(data_iterator, shape, rt)
    w_total = global_weight_sum([b["loss_mask"] for b in batches], rt.dp_cp_group)
    optimizer.zero_grad(set_to_none=True)
    weighted = torch.zeros((), dtype=torch.float64, device=rt.device)
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        sync = (
            contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        )
        with sync:
            per_token = forward_loss(model, batch)
            objective, wsum = microbatch_objective(
                per_token, batch["loss_mask"], w_total, grad_scale=float(rt.dp_size)
            )
            objective.backward()
        weighted += wsum.double()
    params = [p for p in model.parameters() if p.requires_grad]
    norm = grad_norm(params, rt.model_parallel_group)
    clip_gradients(params, clip_grad, norm)
    optimizer.step()
    all_reduce(weighted, rt.dp_cp_group)
    loss = weighted_mean(weighted, w_total, empty=0.0)
    return {"loss": loss, "grad_norm": norm, "weight_total": float(w_total)}


@torch.no_grad()
def evaluate_cpu(
    model: torch.nn.Module,
    data_iterator: Iterator | None,
    shape: StepShape,
    rt: Runtime,
    eval_iters: int,
    progress: Progress = None,
) -> float:
    """Global weighted mean loss over ``eval_iters`` iterations' worth of validation batches;
    ``progress(done)`` after each iteration."""
    was_training = model.training
    model.eval()
    weighted = torch.zeros((), dtype=torch.float64, device=rt.device)
    total = torch.zeros((), dtype=torch.float64, device=rt.device)
    for done in range(1, eval_iters + 1):
        for batch in fetch_microbatches(data_iterator, shape, rt):
            wsum, msum = masked_loss_sum(forward_loss(model, batch), batch["loss_mask"])
            weighted += wsum.double()
            total += msum.double()
        if progress is not None:
            progress(done)
    all_reduce(weighted, rt.dp_cp_group)
    all_reduce(total, rt.dp_cp_group)
    model.train(was_training)
    return weighted_mean(weighted, total, empty=float("nan"))
