"""megatron-core's optimizer state in a ``torch_dist`` checkpoint, per parameter, on any machine.

What megatron-core 0.16.1's optimizers put into a dist checkpoint (``sharded_state_dict``; the
same calls write Megatron-LM's checkpoints), and where each format keeps Adam's state:

========================  ================================================  ========================
optimizer (format)        tensors (global, keyed by the model's keys)      step and param groups
========================  ================================================  ========================
``FP32Optimizer``         ``optimizer.state.{exp_avg,exp_avg_sq}.KEY``      ``common.pt``:
                                                                            ``optimizer.state.
                                                                            common_step`` (or each
                                                                            group's ``step``),
                                                                            ``param_groups``
``Float16Optimizer``      the same plus ``optimizer.state.fp32_param.KEY``  ``optimizer.optimizer``
(bf16/fp16)               (the fp32 master weights)                         (as above)
distributed optimizer,    ``optimizer.state.{param,exp_avg,exp_avg_sq}.     ``optimizer.optimizer.
``fully_reshardable``     KEY`` (``param``: the fp32 master weights)        param_groups`` (each
                                                                            group's ``step``)
distributed optimizer,    ``optimizer.distributed.dp_group_idx_G.gbuf_idx_  objects ``...dp_group_
``dp_reshardable``        B.dtype_(P, G).bucket_idx_K.{param,exp_avg,       idx_G.optimizer`` and
(Megatron-LM's default)   exp_avg_sq}``: one flat tensor per gradient       ``per_bucket_numel_
                          bucket of model-parallel rank G, in megatron-     unpadded``
                          core's bucket layout (below)
========================  ================================================  ========================

The model-space formats are read like the weights (:func:`.stored.rank_state_dict`, at any
saved and any loading TP). The ``dp_reshardable`` buckets follow ``_ParamAndGradBuffer``: a
model chunk's trainable parameters in REVERSE order of ``named_parameters()``, each starting at
a multiple of 64 elements, buckets closed at the sizes recorded in ``per_bucket_numel_unpadded``
(bucket offsets do not depend on the data-parallel size, which is why this format reshards
along DP). Reading them needs the saving rank's parameter order, so only the same (PP, TP)
layout without virtual pipeline stages can be mapped; the fp32 master weights found there are
then checked against the checkpoint's own model weights, so a layout this code got wrong is
refused, never loaded. It resolves what the stored weights resolve: two same-shaped parameters
whose bf16 weights are still equal (norm weights early in training) could not be told apart if
a layer spec ordered them differently; megatron-core's TE and local specs order them alike.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from megatron_endprompt.checkpoint.stored import (
    EMBEDDING,
    FINAL_NORM,
    OUTPUT,
    DistCheckpoint,
    rank_state_dict,
)
from megatron_endprompt.config import ModelConfig

MOMENTS = ("exp_avg", "exp_avg_sq")
MASTERS = ("param", "fp32_param")
"""Names of the fp32 master weights: distributed optimizer, Float16Optimizer."""
_MODEL_SPACE_RE = re.compile(r"^optimizer\.state\.(\w+)\.((?:embedding|decoder|output_layer)\..+)$")
_BUCKET_RE = re.compile(r"^optimizer\.distributed\.dp_group_idx_(\d+)\.gbuf_idx_(\d+)\.dtype_(.+)"
                        r"\.bucket_idx_(\d+)\.(\w+)$")  # fmt: skip
ALIGN = 64
"""megatron-core pads every parameter's start in a bucket to this many elements."""


@dataclass
class OptimizerState:
    """One rank's Adam state as read from a checkpoint.

    Attributes:
        tensors: parameter name (the loading model's) -> ``exp_avg``, ``exp_avg_sq`` and, when
            the checkpoint holds fp32 master weights, ``main``.
        step: Adam's step count (the same for every parameter in megatron-core).
        groups: the saved param groups' hyperparameters (``wd_mult``, ``lr``, ``betas``, ...).
        sharding: the format, for messages (``fp32``, ``float16``, ``dp_reshardable``, ...).
    """

    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    step: float = 0.0
    groups: list[dict[str, Any]] = field(default_factory=list)
    sharding: str = ""


def optimizer_sharding(common: Mapping[str, Any], where: str) -> str:
    """The optimizer format of a checkpoint's common state (see the module docstring).

    Raises:
        ValueError: naming --no-load-optim, when there is no optimizer state or several chained
            optimizers (the CPU path has one).
    """
    opt = common.get("optimizer")
    if not isinstance(opt, Mapping):
        raise ValueError(
            f"{where}: the checkpoint holds no optimizer state (saved with --no-save-optim?); "
            "pass --no-load-optim"
        )
    if opt and all(isinstance(k, int) for k in opt):
        raise ValueError(
            f"{where}: the checkpoint holds {len(opt)} chained optimizer states (e.g. experts or "
            "decoupled learning rates); the CPU path has one optimizer: pass --no-load-optim"
        )
    if "param_state_sharding_type" in opt:
        return str(opt["param_state_sharding_type"])
    return "float16" if isinstance(opt.get("optimizer"), Mapping) else "fp32"


def read_optimizer_state(
    stored: DistCheckpoint,
    model_config: ModelConfig,
    params: Sequence[tuple[str, torch.Size]],
    tp: tuple[int, int],
    where: str,
) -> OptimizerState:
    """One rank's per-parameter Adam state, from any format the module docstring lists.

    Args:
        stored: the opened checkpoint.
        model_config: the loading model (its spec names the parameters).
        params: the loading module's trainable parameters in ``named_parameters()`` order:
            (name, shape).
        tp: (size, rank) of tensor parallelism (pipeline parallelism: one stage).
        where: the prefix of every error message.

    Raises:
        ValueError: naming --no-load-optim, for a format or layout this cannot map.
    """
    sharding = optimizer_sharding(stored.record, where)
    if sharding == "dp_reshardable":
        state = _read_buckets(stored, params, tp, where)
    elif sharding in ("fp32", "float16", "fully_reshardable"):
        state = _read_model_space(stored, model_config, tp, where)
    else:
        raise ValueError(
            f"{where}: the distributed optimizer's {sharding!r} checkpoint format cannot be "
            "mapped onto the CPU path's optimizer: pass --no-load-optim"
        )
    state.sharding = sharding
    missing = [name for name, _ in params if name not in state.tensors]
    if missing:
        raise ValueError(
            f"{where}: the checkpoint's optimizer state has no entry for {missing[:3]}: pass "
            "--no-load-optim"
        )
    for name, shape in params:
        for key, value in state.tensors[name].items():
            if tuple(value.shape) != tuple(shape):
                raise ValueError(f"{where}: optimizer {key} of {name} has shape "
                                 f"{tuple(value.shape)}, the parameter {tuple(shape)}")  # fmt: skip
    return state


# ---------------------------------------------------------------- model space


class _StateView:
    """One optimizer state (``optimizer.state.exp_avg.`` ...) read like the checkpoint's weights
    (the duck type :func:`.stored.rank_state_dict` reads)."""

    def __init__(self, stored: DistCheckpoint, prefix: str) -> None:
        self.model_config, self.where = stored.model_config, stored.where
        self._reader, self._prefix, self._suffixes = stored.reader, prefix, stored.suffixes

    def _one(self, key: str) -> torch.Tensor:
        return self._reader.read({key: (self._prefix + key, None)})[key]

    def embedding(self) -> torch.Tensor:
        return self._one(EMBEDDING)

    def layer(self, i: int) -> dict[str, torch.Tensor]:
        p = self._prefix
        return self._reader.read({f"decoder.layers.{i}.{s}": (p + key, i)
                                  for s, key in self._suffixes.items()})  # fmt: skip

    def final_norm(self) -> torch.Tensor:
        return self._one(FINAL_NORM)

    def output_layer(self) -> torch.Tensor:
        tied = self._prefix + OUTPUT not in self._reader.tensors
        return self._one(EMBEDDING if tied else OUTPUT)


def _common_optimizer(common: Mapping[str, Any]) -> Mapping[str, Any]:
    opt = common["optimizer"]
    return opt["optimizer"] if isinstance(opt.get("optimizer"), Mapping) else opt


def _step_of(opt: Mapping[str, Any], groups: list[dict[str, Any]], where: str) -> float:
    """``common_step`` (torch Adam) or the groups' ``step`` (TE/Apex FusedAdam, DistOpt)."""
    common = (opt.get("state") or {}).get("common_step")
    steps = {float(g["step"]) for g in groups if g.get("step") is not None}
    if common is not None:
        steps.add(float(common))
    if len(steps) != 1:
        raise ValueError(
            f"{where}: the optimizer state records {'no' if not steps else 'several'} step "
            f"count{'s' if steps else ''} ({sorted(steps)}): pass --no-load-optim"
        )
    return steps.pop()


def _read_model_space(
    stored: DistCheckpoint, model_config: ModelConfig, tp: tuple[int, int], where: str
) -> OptimizerState:
    found: set[str] = set()
    for key in stored.reader.tensors:
        match = _MODEL_SPACE_RE.match(key)
        if match:
            found.add(match.group(1))
    unknown = found - set(MOMENTS) - set(MASTERS)
    if unknown or not set(MOMENTS) <= found:
        raise ValueError(
            f"{where}: the optimizer states {sorted(found)} are not Adam's "
            f"{list(MOMENTS)} (+ master weights): pass --no-load-optim"
        )
    state = OptimizerState()
    for key in sorted(found):
        view = _StateView(stored, f"optimizer.state.{key}.")
        name = "main" if key in MASTERS else key
        for param, tensor in rank_state_dict(view, model_config, tp).items():
            state.tensors.setdefault(param, {})[name] = tensor
    opt = _common_optimizer(stored.record)
    state.groups = [dict(g) for g in opt.get("param_groups", [])]
    state.step = _step_of(opt, state.groups, where)
    return state


# ---------------------------------------------------------------- dp_reshardable buckets


def bucket_layout(numels: Sequence[int], bucket_sizes: Sequence[int]) -> list[tuple[int, int]]:
    """(bucket, offset) of each parameter in megatron-core's distributed-optimizer buckets.

    Args:
        numels: the parameters' element counts in ``named_parameters()`` order.
        bucket_sizes: ``per_bucket_numel_unpadded`` of the checkpoint (one buffer).

    Returns:
        Per parameter (same order as ``numels``): its bucket and its first element's offset
        in that bucket's stored tensor.

    Raises:
        ValueError: when the parameters do not fill the recorded buckets exactly.
    """
    out: list[tuple[int, int]] = [(0, 0)] * len(numels)
    bucket, end = 0, 0
    for i in reversed(range(len(numels))):
        start = -(-end // ALIGN) * ALIGN
        if bucket < len(bucket_sizes) and end > 0 and start >= bucket_sizes[bucket]:
            if bucket_sizes[bucket] not in (end, start):
                break  # the recorded bucket ends inside the padding of another layout
            bucket, start = bucket + 1, 0
        if bucket >= len(bucket_sizes) or start + numels[i] > bucket_sizes[bucket]:
            break
        out[i], end = (bucket, start), start + numels[i]
    else:
        if bucket == len(bucket_sizes) - 1 and end == bucket_sizes[bucket]:
            return out
    raise ValueError(
        f"{len(numels)} parameters of {sum(numels)} elements do not fill the recorded "
        f"buckets {list(bucket_sizes)}"
    )


def _bucket_keys(stored: DistCheckpoint, group: int) -> dict[tuple[int, str], str]:
    """(bucket, state) -> stored key of data-parallel group ``group`` (one buffer only)."""
    out, buffers = {}, set()
    for key in stored.reader.tensors:
        match = _BUCKET_RE.match(key)
        if match and int(match.group(1)) == group:
            buffers.add((int(match.group(2)), match.group(3)))
            out[int(match.group(4)), match.group(5)] = key
    return out if len(buffers) == 1 else {}


def _check_same_layout(stored: DistCheckpoint, tp_size: int, where: str) -> None:
    saved = stored.layout  # (TP, PP)
    vpp = stored.virtual_pipeline
    if (saved is not None and saved != (tp_size, 1)) or vpp:
        layout = f"(TP, PP) = {saved}" + (f" with virtual pipeline {vpp}" if vpp else "")
        raise ValueError(
            f"{where}: saved with the distributed optimizer's 'dp_reshardable' state at {layout}, "
            f"which maps onto this run's (TP, PP) = ({tp_size}, 1) only at the same layout: pass "
            "--no-load-optim, or save with --dist-ckpt-optim-fully-reshardable"
        )


def _read_buckets(
    stored: DistCheckpoint, params: Sequence[tuple[str, torch.Size]], tp: tuple[int, int],
    where: str,
) -> OptimizerState:  # fmt: skip
    _check_same_layout(stored, tp[0], where)
    group = tp[1]  # the rank in the model-parallel (TP x PP) group, PP = 1
    prefix = f"optimizer.distributed.dp_group_idx_{group}."
    names = [prefix + "optimizer/shard_0_1", prefix + "per_bucket_numel_unpadded/shard_0_1"]
    keys = _bucket_keys(stored, group)
    if not keys or any(n not in stored.reader.objects for n in names):
        raise ValueError(
            f"{where}: no single-buffer distributed-optimizer state for model-parallel rank "
            f"{group} (virtual pipeline stages, experts or mixed dtypes?): pass --no-load-optim"
        )
    objs = stored.reader.read_objects(names)
    sizes = [b for buffer in objs[names[1]] for b in buffer.values()]
    states = sorted({s for _, s in keys})
    if len(sizes) != 1 or set(states) != {"param", *MOMENTS}:
        raise ValueError(f"{where}: distributed-optimizer buffers {sizes} with states {states} "
                         "cannot be mapped: pass --no-load-optim")  # fmt: skip
    numels = [int(torch.Size(shape).numel()) for _, shape in params]
    try:
        layout = bucket_layout(numels, sizes[0])
    except ValueError as err:
        raise ValueError(f"{where}: {err}: pass --no-load-optim") from err
    requests = {
        f"{name}\0{s}": (keys[b, s], (off,), (n,))
        for (name, _), (b, off), n in zip(params, layout, numels)
        for s in states
    }
    flat = stored.reader.read_regions(requests)
    state = OptimizerState()
    for name, shape in params:
        entry = {s: flat[f"{name}\0{s}"].reshape(shape) for s in states}
        entry["main"] = entry.pop("param")
        state.tensors[name] = entry
    state.groups = [dict(g) for g in objs[names[0]].get("param_groups", [])]
    state.step = _step_of({}, state.groups, where)
    return state
