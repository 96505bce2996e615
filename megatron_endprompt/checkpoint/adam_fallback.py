"""megatron-core's distributed optimizer over torch Adam: the fixes its checkpoint loaders need.

Without Transformer Engine or Apex, megatron-core 0.16.1 falls back to ``torch.optim.Adam`` inside
its ``DistributedOptimizer``. Torch Adam keeps a ``step`` tensor per parameter state, where TE's
FusedAdam keeps it in the param groups, and megatron-core's loaders assume the latter:

* ``DistributedOptimizer.state_dict()`` (also called while building a load state dict) reads the
  ``step`` of every state entry: a fresh optimizer has none (:func:`prime_fresh_torch_adam`);
* its ``load_state_dict`` gives every entry ONE shared step tensor, which torch Adam would then
  increment once per parameter, and its ``dp_reshardable`` loader copies a placeholder over it
  (:func:`restore_torch_adam_steps` rebuilds the steps from the groups);
* ``_set_main_param_and_optimizer_states`` copies every key of the entry, ``step`` included, from
  tensors that the ``fully_reshardable`` loader and ``load_parameter_state`` (``distrib_optim.pt``)
  never pass: a KeyError (:func:`keep_own_adam_steps`).

Used by both CUDA-path loaders (:mod:`.dist` for ``torch_dist``, :mod:`.legacy_cuda` for
Megatron-LM's legacy ``torch`` format). With TE or Apex none of these applies and each is a no-op.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer


def torch_adam_distributed(optimizer: Any) -> Iterator[tuple[DistributedOptimizer, Any]]:
    """(DistributedOptimizer, its inner torch Adam) pairs: megatron-core's no-TE/Apex fallback."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if isinstance(opt, DistributedOptimizer) and isinstance(inner, torch.optim.Adam):
            yield opt, inner


def prime_fresh_torch_adam(optimizer: Any) -> None:
    """Give a fresh distributed optimizer's torch Adam state entries with a ``step``.

    Zeros are enough: the checkpoint's values replace them in place.
    """
    for _, inner in torch_adam_distributed(optimizer):
        for group in inner.param_groups:
            for param in group["params"]:
                entry = inner.state[param]
                if "step" not in entry:
                    entry.setdefault("exp_avg", torch.zeros_like(param))
                    entry.setdefault("exp_avg_sq", torch.zeros_like(param))
                    entry["step"] = torch.zeros((), dtype=torch.float32)


def restore_torch_adam_steps(optimizer: Any) -> None:
    """Per-parameter Adam ``step`` tensors from the loaded param groups (one tensor each)."""
    for _, inner in torch_adam_distributed(optimizer):
        for group in inner.param_groups:
            if "step" not in group:
                continue
            for param in group["params"]:
                if param in inner.state:
                    inner.state[param]["step"] = torch.tensor(float(group["step"]))


@contextlib.contextmanager
def keep_own_adam_steps(optimizer: Any, enabled: bool = True) -> Iterator[None]:
    """Within this block, megatron-core's per-parameter state setter keeps each entry's own step.

    Each ``_set_main_param_and_optimizer_states`` call that lacks ``step`` is handed the entry's
    own (copied onto itself); the other tensors are copied as megatron-core copies them.
    ``enabled=False``: a no-op (a loader that passes the step itself).
    """
    patched = []
    if enabled:
        for opt, inner in torch_adam_distributed(optimizer):

            def with_step(model_param, tensors, opt=opt, inner=inner) -> None:  # noqa: ANN001
                group, order = opt.model_param_group_index_map[model_param]
                own = inner.state[inner.param_groups[group]["params"][order]]
                if "step" in own and "step" not in tensors:
                    tensors = {**tensors, "step": own["step"]}
                type(opt)._set_main_param_and_optimizer_states(opt, model_param, tensors)

            opt._set_main_param_and_optimizer_states = with_step
            patched.append(opt)
    try:
        yield
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states  # the class's method again
