"""Optimizer states between megatron-core's optimizers and the CPU path's torch AdamW.

megatron-core 0.16.1 (``megatron/core/optimizer/optimizer.py``) saves, in the legacy format:

* ``FP32Optimizer.state_dict()``: the inner torch optimizer's ``{"state", "param_groups"}``;
* ``Float16OptimizerWithFloat16Params.state_dict()`` (bf16/fp16): ``{"optimizer": <that>,
  "grad_scaler": ..., "fp32_from_fp16_params": [[fp32 master copies per group]]}``;
* ``ChainedOptimizer`` with one optimizer: that one's; with several: a list;
* the distributed optimizer: its parameter state in a separate ``distrib_optim.pt``.

Its ``load_state_dict`` matches param groups by ``(wd_mult, lr_mult, is_expert_parallel,
is_decoupled_lr)`` (``param_group_identifier_keys``), so a saved group must carry all four;
megatron-core's groups also carry ``max_lr`` / ``min_lr``, which its scheduler prefers over its
own. Torch AdamW keeps a ``step`` per parameter state; Transformer Engine's FusedAdam keeps it in
the group, and megatron-core's sharded form as ``state["common_step"]``.

``torch_dist`` checkpoints hold the optimizer state sharded: :mod:`.dist_optim` reads it per
parameter, :func:`check_masters` and :func:`load_param_states` put it into torch AdamW.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any

import torch

IDENTIFIER_DEFAULTS = {"lr_mult": 1.0, "is_expert_parallel": False, "is_decoupled_lr": False}
DISTRIB_OPTIM_FILE = "distrib_optim.pt"


def megatron_optimizer_state(sd: Mapping[str, Any], lr: float, min_lr: float) -> dict[str, Any]:
    """A torch optimizer ``state_dict()`` whose groups megatron-core's ``load_state_dict`` matches
    (the four identifier keys, ``default_config``, ``max_lr``, ``min_lr`` added where missing)."""
    out = dict(sd)
    groups = []
    for group in sd["param_groups"]:
        extra = {"wd_mult": 1.0, **IDENTIFIER_DEFAULTS, "default_config": True,
                 "max_lr": lr, "min_lr": min_lr}  # fmt: skip
        groups.append({**extra, **group})
    out["param_groups"] = groups
    return out


def _inner(saved: Any, where: str) -> tuple[dict[str, Any], list | None]:
    """(torch optimizer state dict, fp32 master params or None) of a saved megatron optimizer."""
    if isinstance(saved, (list, tuple)):
        if len(saved) != 1:
            raise ValueError(
                f"{where}: the checkpoint holds {len(saved)} chained optimizer states (e.g. "
                "decoupled learning rates); the CPU path has one optimizer: pass --no-load-optim"
            )
        saved = saved[0]
    if not isinstance(saved, Mapping):
        raise ValueError(f"{where}: the optimizer state is a {type(saved).__name__}, not a dict")
    masters = None
    if "param_groups" not in saved and isinstance(saved.get("optimizer"), Mapping):
        masters = saved.get("fp32_from_fp16_params")
        saved = saved["optimizer"]
    if "param_groups" not in saved or "state" not in saved:
        raise ValueError(
            f"{where}: the optimizer state has no 'param_groups'/'state' (keys "
            f"{sorted(map(str, saved))[:6]}): pass --no-load-optim to take the weights only"
        )
    return copy.copy(dict(saved)), masters


def _fill_steps(sd: dict[str, Any]) -> None:
    """Give every parameter state a float32 ``step`` tensor (torch AdamW needs one)."""
    state = dict(sd["state"])
    common = state.pop("common_step", None)
    for group in sd["param_groups"]:
        group_step = group.get("step", common)
        for idx in group["params"]:
            if idx not in state:
                continue
            entry = dict(state[idx])
            step = entry.get("step", group_step)
            if step is None:
                step = 0
            entry["step"] = torch.as_tensor(step, dtype=torch.float32).detach().clone().reshape(())
            state[idx] = entry
    sd["state"] = state


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: Any, where: str) -> None:
    """Load a megatron-core (or our torch AdamW) optimizer state into a torch optimizer.

    fp32 master copies of a bf16/fp16 run, when saved, replace the parameters' values (they are
    the higher-precision weights megatron-core would have continued from).

    Raises:
        ValueError: naming ``where``, when the groups or parameter counts differ.
    """
    sd, masters = _inner(saved, where)
    ours = optimizer.param_groups
    theirs = list(sd["param_groups"])
    sizes = ([len(g["params"]) for g in ours], [len(g["params"]) for g in theirs])
    if sizes[0] != sizes[1]:
        raise ValueError(
            f"{where}: optimizer parameter groups differ (checkpoint {sizes[1]} parameters per "
            f"group, this model {sizes[0]}); pass --no-load-optim to take the weights only"
        )
    defaults = [{k: v for k, v in g.items() if k != "params"} for g in ours]
    sd["param_groups"] = [{**d, **dict(g)} for d, g in zip(defaults, theirs)]
    _fill_steps(sd)
    optimizer.load_state_dict(sd)
    if masters is not None:
        _copy_masters(ours, masters, where)


def _copy_masters(groups: list[dict], masters: Any, where: str) -> None:
    with torch.no_grad():
        for group, copies in zip(groups, masters):
            for param, master in zip(group["params"], copies):
                if tuple(master.shape) != tuple(param.shape):
                    raise ValueError(f"{where}: fp32 master weight shape {tuple(master.shape)} "
                                     f"!= parameter {tuple(param.shape)}")  # fmt: skip
                param.copy_(master.to(param.dtype))


def check_no_distributed_optimizer(shard_path: str, where: str) -> None:
    """Refuse a legacy shard whose optimizer state lives in Megatron-LM's ``distrib_optim.pt``."""
    if os.path.isfile(os.path.join(os.path.dirname(shard_path), DISTRIB_OPTIM_FILE)):
        raise ValueError(
            f"{where}: {shard_path} was saved with Megatron-LM's distributed optimizer (its state "
            f"is in {DISTRIB_OPTIM_FILE}, which the CPU path does not read): pass --no-load-optim"
        )


# ---------------------------------------------------------------- torch_dist (dist_optim.py)

HYPERPARAMETERS = ("lr", "weight_decay", "betas", "eps", "max_lr", "min_lr")
"""What a saved megatron-core param group sets in ours (its optimizer's implementation flags,
``foreach`` / ``fused`` / ..., stay the CPU path's)."""


def _group_id(group: Mapping[str, Any]) -> tuple[float, float, bool, bool]:
    """megatron-core's ``param_group_identifier_keys`` of a group (ours: decoupled groups are the
    ones with their own ``max_lr``)."""
    decoupled = group.get("is_decoupled_lr", "max_lr" in group)
    return (float(group.get("wd_mult", 1.0)), float(group.get("lr_mult", 1.0)),
            bool(group.get("is_expert_parallel", False)), bool(decoupled))  # fmt: skip


def check_masters(state: Any, weights: Mapping[str, torch.Tensor], where: str) -> None:
    """The fp32 master weights of ``state`` (a :class:`.dist_optim.OptimizerState`) rounded to
    the stored weights' dtype must BE the stored weights (megatron-core copies them so).

    This is what proves a distributed-optimizer bucket layout was mapped right.

    Raises:
        ValueError: naming --no-load-optim and the first parameter that differs.
    """
    for name, entry in state.tensors.items():
        main, weight = entry.get("main"), weights.get(name)
        if main is not None and weight is not None and not torch.equal(main.to(weight.dtype),
                                                                       weight):  # fmt: skip
            raise ValueError(
                f"{where}: the {state.sharding!r} optimizer state's master weight of {name} is "
                "not the checkpoint's weight (a layout this run cannot map): pass --no-load-optim"
            )


def load_param_states(
    optimizer: torch.optim.Optimizer, module: torch.nn.Module, state: Any, where: str
) -> None:
    """Load per-parameter Adam state (a :class:`.dist_optim.OptimizerState`) into torch AdamW.

    Each of our param groups takes the hyperparameters of the saved group with the same
    megatron-core identifiers (``wd_mult``, ``lr_mult``, ``is_expert_parallel``,
    ``is_decoupled_lr``); every parameter gets the moments, its own ``step`` tensor and, when
    saved, its fp32 master weight as its value (the weights megatron-core continues from).

    Raises:
        ValueError: naming --no-load-optim, when a group or a parameter has no saved state.
    """
    names = {id(p): n for n, p in module.named_parameters()}
    saved = {_group_id(g): g for g in state.groups}
    groups, entries, masters = [], {}, []
    for group in optimizer.param_groups:
        match = saved.get(_group_id(group))
        if match is None:
            raise ValueError(
                f"{where}: the checkpoint has no optimizer param group like ours (wd_mult, "
                f"lr_mult, experts, decoupled lr = {_group_id(group)}; it has "
                f"{sorted(saved)}): pass --no-load-optim"
            )
        new = {k: v for k, v in group.items() if k != "params"}
        new.update({k: match[k] for k in HYPERPARAMETERS if k in match})
        new["betas"] = tuple(new["betas"])
        new["params"] = list(range(len(entries), len(entries) + len(group["params"])))
        for param in group["params"]:
            entry = state.tensors[names[id(param)]]
            step = torch.tensor(state.step, dtype=torch.float32)  # one per parameter
            entries[len(entries)] = {"step": step, "exp_avg": entry["exp_avg"],
                                     "exp_avg_sq": entry["exp_avg_sq"]}  # fmt: skip
            if "main" in entry:
                masters.append((param, entry["main"]))
        groups.append(new)
    optimizer.load_state_dict({"state": entries, "param_groups": groups})
    with torch.no_grad():
        for param, main in masters:
            param.copy_(main.to(param.dtype))
