"""CUDA checkpoints through megatron-core ``dist_checkpointing`` (reshardable across TP/PP/DP).

Same directory contract as the CPU format (``iter_N`` published by rename after every rank
wrote, tracker rewritten atomically; see checkpoint.py), but the payload is megatron-core's
sharded format: a checkpoint saved with one TP/PP layout loads into another. Model chunks are
stored under ``model`` (or ``model0``, ``model1``, ... with virtual pipeline stages), the optimizer
through its own ``sharded_state_dict``, and per-rank RNG states as ``ShardedObject`` s.
Checkpoints in the legacy per-shard format (``--ckpt-format torch``, Megatron-LM's, our CPU
path's) are saved and loaded by :mod:`.legacy_cuda`.

As in Megatron-LM, the state dict is that of the UNWRAPPED model chunks (``objs.module``): the
megatron DDP wrapper's default ``sharded_state_dict`` would prefix every key with ``module.``,
which neither Megatron-LM nor this module's own ``load_state_dict`` (which the wrapper forwards to
the inner model) would accept.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megatron_endprompt import checkpoint as ckpt
from megatron_endprompt.atomic_io import writing
from megatron_endprompt.checkpoint import legacy_cuda, megatron_lm
from megatron_endprompt.checkpoint.adam_fallback import (
    keep_own_adam_steps,
    prime_fresh_torch_adam,
    restore_torch_adam_steps,
)
from megatron_endprompt.checkpoint.layout import agree_on_write, fresh_tmp_dir
from megatron_endprompt.device import synchronize


def _model_keys(n: int) -> list[str]:
    return ["model"] if n == 1 else [f"model{i}" for i in range(n)]


def _rng_sharded(rt, seed: int) -> Any:
    # Megatron-LM's list of one dict (random/np/torch/cuda/tracker states).
    state = megatron_lm.rng_state_list(seed, rt.tp_rank, rt.pp_rank)
    # One object per (PP, TP) coordinate, replicated over DP x CP (as Megatron-LM stores it):
    # the replica id must be the rank in the DP x CP group, or the CP ranks of DP rank 0 would
    # all claim to be the main replica (dist_checkpointing: "Duplicate ShardedObject keys").
    return ShardedObject(
        "rng_state",
        state,
        (rt.pp_size, rt.tp_size),
        (rt.pp_rank, rt.tp_rank),
        replica_id=ps.get_data_parallel_rank(with_context_parallel=True),
    )


def _layout(rt) -> list[int]:
    """(PP, TP) of the run: the shape of the RNG ShardedObject grid."""
    return [rt.pp_size, rt.tp_size]


def sharding_metadata(run) -> dict[str, Any]:
    """The content metadata of a save, as Megatron-LM core_v0.16.1 builds it.

    With the distributed optimizer, ``dp_reshardable`` (Megatron-LM's default: parallel save and
    load, resharding along DP only) or, with ``--dist-ckpt-optim-fully-reshardable``,
    ``fully_reshardable`` (gathered on DP rank 0; loads at any TP/PP). Without this metadata
    megatron-core 0.16.1 falls back to ``fully_sharded_model_space``, whose flattened tensors its
    own writer rejects. Stored in the checkpoint (``content_metadata``) and read back on load, so
    a checkpoint is always loaded with the metadata it was saved with.
    """
    metadata: dict[str, Any] = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    if run.parallel.use_distributed_optimizer:
        fully = run.checkpoint.dist_ckpt_optim_fully_reshardable
        metadata["distrib_optim_sharding_type"] = "fully_reshardable" if fully else "dp_reshardable"
    return metadata


def _with_groups(metadata: dict[str, Any] | None) -> dict[str, Any]:
    """Metadata plus the live DP x CP group TE's layers ask for (never serialised)."""
    group = ps.get_data_parallel_group(with_context_parallel=True)
    return {**(metadata or {}), "dp_cp_group": group}


def sharded_state(
    run,
    rt,
    objs,
    state,
    for_load: bool = False,
    load_rng: bool = True,
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The sharded state dict of model chunks, optimizer, scheduler, RNG and progress.

    ``load_rng=False`` leaves the RNG states out of a load (saved with another (PP, TP) grid,
    whose ShardedObject keys this run cannot address). ``metadata``: the content metadata (the
    run's :func:`sharding_metadata` on save, the checkpoint's own on load).
    """
    metadata = _with_groups(sharding_metadata(run) if metadata is None else metadata)
    chunks = objs.module  # unwrapped (no DDP / Float16Module): keys without "module."
    sd: dict[str, Any] = {}
    for key, chunk in zip(_model_keys(len(chunks)), chunks):
        sd[key] = chunk.sharded_state_dict(metadata=metadata)
    model_sd = sd if len(chunks) > 1 else sd["model"]
    if not (for_load and (run.checkpoint.finetune or run.checkpoint.no_load_optim)):
        sd["optimizer"] = objs.optimizer.sharded_state_dict(
            model_sd, is_loading=for_load, metadata=metadata
        )
        sd["opt_param_scheduler"] = objs.scheduler.state_dict()
    if not (for_load and (run.checkpoint.finetune or run.checkpoint.no_load_rng or not load_rng)):
        sd["rng_state"] = _rng_sharded(rt, run.training.seed)
    sd["iteration"] = state.iteration
    sd["consumed_samples"] = state.consumed_samples
    if not for_load:  # read back with .get: older checkpoints lack the validation position
        sd["valid_consumed_samples"] = state.valid_consumed_samples
        sd["rng_layout"] = _layout(rt)
        sd["run_config"] = run.to_dict()
        # Megatron-LM's common keys: its load reads consumed samples from ``args`` and checks
        # the model flags against it (megatron-core allowlists argparse.Namespace for
        # weights_only loads when it is imported).
        sd["args"] = megatron_lm.megatron_args(
            run, state.consumed_samples, state.valid_consumed_samples, state.iteration, "torch_dist"
        )
        sd["checkpoint_version"] = megatron_lm.CHECKPOINT_VERSION
        sd["num_floating_point_operations_so_far"] = 0
    return sd


def save(run, rt, objs, state) -> str:
    """Save iteration ``state.iteration`` with dist_checkpointing; publish atomically."""
    save_dir = run.checkpoint.save
    final = ckpt.iteration_dir(save_dir, state.iteration)
    tmp = final + ".tmp"
    rank0 = dist.get_rank() == 0
    fresh = functools.partial(fresh_tmp_dir, save_dir, tmp)
    agree_on_write(fresh if rank0 else None, tmp, cleanup=tmp)
    metadata = sharding_metadata(run)
    sharded = sharded_state(run, rt, objs, state, metadata=metadata)

    def write() -> None:
        # megatron-core's writer reports a refused write of any rank's files on every rank
        # (its exception's text carries the errno): WriteError naming the checkpoint.
        with writing(tmp):
            dist_checkpointing.save(sharded, tmp, content_metadata=metadata)

    agree_on_write(write, tmp, cleanup=tmp)

    def publish() -> None:
        ckpt.publish_iteration(save_dir, state.iteration, tmp, keep_last=run.checkpoint.keep_last)

    agree_on_write(publish if rank0 else None, final, cleanup=None)
    return final


def _check_layout_change(run, rt, saved_layout, metadata: dict[str, Any] | None, path: str) -> None:
    """A dp_reshardable distributed-optimizer state cannot move to another (PP, TP) layout."""
    c = run.checkpoint
    if saved_layout is None or list(saved_layout) == _layout(rt):
        return
    if c.finetune or c.no_load_optim:
        return
    sharding = (metadata or {}).get("distrib_optim_sharding_type")
    if sharding is not None and sharding != "fully_reshardable":
        raise ValueError(
            f"--load={c.load}: {path} was saved at (PP, TP) = {tuple(saved_layout)} with the "
            f"distributed optimizer's {sharding!r} state, which only reshards along DP; this run "
            f"has (PP, TP) = {tuple(_layout(rt))}. Load it with --no-load-optim (weights, "
            "scheduler restarts) or save with --dist-ckpt-optim-fully-reshardable"
        )


def load(run, rt, objs, state) -> bool:
    """Load the latest checkpoint of --load into ``objs``/``state``; False when there is none."""
    iteration = ckpt.read_tracker(run.checkpoint.load)
    if iteration is None:
        return False
    path = ckpt.stored_iteration_dir(run.checkpoint.load, iteration)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--load: tracker names {path}, which does not exist")
    if legacy_cuda.is_legacy_checkpoint(path):
        return legacy_cuda.load(run, rt, objs, state, iteration)
    common = dist_checkpointing.load_common_state_dict(path)
    ckpt.check_checkpoint_model(run.model, common, run.checkpoint.load)
    metadata = dist_checkpointing.load_content_metadata(preloaded_state_dict=common)
    saved = megatron_lm.saved_layout(common)  # ours or Megatron-LM's args
    saved_layout = None if saved is None else [saved[1], saved[0]]  # [PP, TP]
    _check_layout_change(run, rt, saved_layout, metadata, path)
    load_rng = saved_layout is None or list(saved_layout) == _layout(rt)
    c = run.checkpoint
    if not (c.finetune or c.no_load_optim):
        prime_fresh_torch_adam(objs.optimizer)
    if not load_rng and rt.is_logging_rank and not (c.finetune or c.no_load_rng):
        print(
            f"--load: checkpoint saved with (PP, TP) = {tuple(saved_layout)}, this run has "
            f"{tuple(_layout(rt))}: its RNG states are not loaded",
            flush=True,
        )
    loaded = dist_checkpointing.load(
        sharded_state(
            run, rt, objs, state, for_load=True, load_rng=load_rng, metadata=metadata or {}
        ),
        path,
    )
    for key, chunk in zip(_model_keys(len(objs.module)), objs.module):
        chunk.load_state_dict(loaded[key], strict=True)
    # dist_checkpointing.load returns the WHOLE common state (the optimizer's non-sharded part
    # and the scheduler included) whatever was asked for: decide by the flags, not by the keys.
    if not (c.finetune or c.no_load_optim):
        # Copies into the main params; with fp32 parameters those are views of the model's
        # leaf parameters (megatron-core's dp_reshardable loader does not disable autograd).
        # megatron-core's fully_reshardable loader passes no Adam step (adam_fallback.py).
        fully = (metadata or {}).get("distrib_optim_sharding_type") == "fully_reshardable"
        with torch.no_grad(), keep_own_adam_steps(objs.optimizer, enabled=fully):
            objs.optimizer.load_state_dict(loaded["optimizer"])
        restore_torch_adam_steps(objs.optimizer)
        where = f"--load={c.load}"
        megatron_lm.load_scheduler_state(objs.scheduler, loaded["opt_param_scheduler"], where)
    else:
        # Weights only: the optimizer's fp32 main params (bf16/fp16) still hold the initial
        # weights; copy the loaded ones in, or the first step would overwrite them.
        objs.optimizer.reload_model_params()
    if load_rng and not (c.finetune or c.no_load_rng):
        rng = loaded["rng_state"]  # Megatron-LM's [dict] (ours since v2) or our older dict
        first = rng[0] if isinstance(rng, (list, tuple)) else rng
        if isinstance(rng, (list, tuple)):
            megatron_lm.restore_rng({"rng_state": rng})
        else:
            ckpt.set_rng_state(rng)
        tensor_parallel.get_cuda_rng_tracker().set_states(first["rng_tracker_states"])
    if not run.checkpoint.finetune:
        state.iteration, state.consumed_samples, state.valid_consumed_samples = (
            megatron_lm.progress(loaded)
        )
    synchronize(rt.device)
    return True
