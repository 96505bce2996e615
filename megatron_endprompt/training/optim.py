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

EMBEDDING_OR_OUTPUT = ("embedding.word_embeddings.weight", "output_layer.weight")
"""Parameters --decoupled-lr applies to (megatron-core's is_embedding_or_output_parameter)."""


def param_groups(
    model: torch.nn.Module, decoupled_lr: float | None = None, decoupled_min_lr: float | None = None
) -> list[dict]:
    """Decayed matrices, and biases / norm weights / 1-D params without decay.

    ``wd_mult`` is the key megatron's scheduler multiplies the scheduled weight decay by. With
    ``decoupled_lr`` the input embedding and output layer get their own groups whose ``max_lr``
    / ``min_lr`` keys the scheduler reads (as megatron-core's optimizer builds them).
    """
    groups: dict[tuple[bool, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim < 2  # biases, norm weights (incl. TE's fused layer_norm_weight)
        decoupled = decoupled_lr is not None and name.endswith(EMBEDDING_OR_OUTPUT)
        groups.setdefault((no_decay, decoupled), []).append(param)
    out = []
    for (no_decay, decoupled), params in sorted(groups.items()):
        group = {"params": params, "wd_mult": 0.0 if no_decay else 1.0}
        if decoupled:
            group["max_lr"] = decoupled_lr
            if decoupled_min_lr is not None:
                group["min_lr"] = decoupled_min_lr
        out.append(group)
    return out


def build_adamw(
    model: torch.nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    decoupled_lr: float | None = None,
    decoupled_min_lr: float | None = None,
) -> torch.optim.AdamW:
    """torch AdamW over :func:`param_groups` (the CPU optimizer)."""
    groups = param_groups(model, decoupled_lr, decoupled_min_lr)
    return torch.optim.AdamW(
        groups, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, foreach=False
    )


def build_scheduler(
    optimizer,
    lr: float,
    min_lr: float,
    weight_decay: float,
    warmup_steps: float,
    decay_steps: int,
    decay_style: str,
    wd_incr_steps: int | None = None,
    use_checkpoint: bool = False,
    override: bool = False,
) -> OptimizerParamScheduler:
    """Megatron's scheduler, counted in samples (step it by the global batch size).

    ``warmup_steps`` / ``decay_steps`` / ``wd_incr_steps`` are samples, as
    ``TrainingConfig.schedule_steps`` / ``wd_incr_steps`` give them (Megatron-LM's
    get_optimizer_param_scheduler; None: the decay length). ``use_checkpoint`` / ``override``:
    --use-checkpoint-opt_param-scheduler / --override-opt_param-scheduler (resume checks).
    """
    decay = max(decay_steps, warmup_steps + 1)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup_steps > 0 else lr,
        max_lr=lr,
        min_lr=min_lr,
        lr_warmup_steps=warmup_steps,
        lr_decay_steps=decay,
        lr_decay_style=decay_style,
        start_wd=weight_decay,
        end_wd=weight_decay,
        wd_incr_steps=decay if wd_incr_steps is None else wd_incr_steps,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=use_checkpoint,
        override_opt_param_scheduler=override,
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
