"""Optimizer, learning-rate schedule and tensor-parallel-aware gradient clipping (CPU path).

The learning-rate schedule is megatron-core's ``OptimizerParamScheduler`` on both paths, stepped
in samples as Megatron-LM does, so ``--lr-warmup-iters`` etc. mean the same thing everywhere.
On CUDA the optimizer is megatron-core's (distributed optimizer, fp32 master weights); on CPU it is
``torch.optim.AdamW`` with the same parameter groups (no weight decay on biases and norms).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.tensor_parallel.layers import param_is_not_tensor_parallel_duplicate

from megatron_endprompt.device import all_reduce


def param_groups(model: torch.nn.Module) -> list[dict]:
    """Two groups: decayed matrices, and biases / norm weights / 1-D params without decay.

    ``wd_mult`` is the key megatron's scheduler multiplies the scheduled weight decay by.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2:  # biases, norm weights (incl. TE's fused layer_norm_weight)
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "wd_mult": 1.0}, {"params": no_decay, "wd_mult": 0.0}]
    return [g for g in groups if g["params"]]


def build_adamw(
    model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], eps: float
) -> torch.optim.AdamW:
    """torch AdamW over :func:`param_groups` (the CPU optimizer)."""
    return torch.optim.AdamW(
        param_groups(model), lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, foreach=False
    )


def build_scheduler(
    optimizer,
    lr: float,
    min_lr: float,
    weight_decay: float,
    warmup_iters: int,
    decay_iters: int,
    decay_style: str,
    global_batch_size: int,
) -> OptimizerParamScheduler:
    """Megatron's scheduler, counted in samples (step it by the global batch size)."""
    warmup = warmup_iters * global_batch_size
    decay = max(decay_iters * global_batch_size, warmup + 1)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup_iters > 0 else lr,
        max_lr=lr,
        min_lr=min_lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=decay,
        lr_decay_style=decay_style,
        start_wd=weight_decay,
        end_wd=weight_decay,
        wd_incr_steps=decay,
        wd_incr_style="constant",
        wsd_decay_steps=max(decay // 10, 1) if decay_style == "WSD" else None,
        lr_wsd_decay_style="linear" if decay_style == "WSD" else None,
    )


def grad_norm(
    params: list[torch.nn.Parameter], model_parallel_group: dist.ProcessGroup | None = None
) -> float:
    """L2 norm of the FULL model's gradient, counting TP-replicated parameters once.

    Each rank sums the squares of the gradients it owns (TP-sharded parameters, and replicated
    ones on TP rank 0 only); the sums are added over the model-parallel group.
    """
    total = torch.zeros((), dtype=torch.float64)
    for p in params:
        if p.grad is not None and param_is_not_tensor_parallel_duplicate(p):
            total += p.grad.detach().double().pow(2).sum().cpu()
    return math.sqrt(float(all_reduce(total, model_parallel_group)))


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float, norm: float) -> None:
    """Scale gradients in place so their global norm is at most ``max_norm`` (0 disables)."""
    if max_norm <= 0 or not math.isfinite(norm) or norm <= max_norm:
        return
    coeff = max_norm / (norm + 1e-6)
    for p in params:
        if p.grad is not None:
            p.grad.mul_(coeff)
