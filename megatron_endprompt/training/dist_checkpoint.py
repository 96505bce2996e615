"""CUDA checkpoints through megatron-core ``dist_checkpointing`` (reshardable across TP/PP/DP).

Same directory contract as the CPU format (``iter_N`` published by rename after every rank
wrote, tracker rewritten atomically; see checkpoint.py), but the payload is megatron-core's
sharded format: a checkpoint saved with one TP/PP layout loads into another. Model chunks are
stored under ``model`` (or ``model0``, ``model1``, ... with virtual pipeline stages), the optimizer
through its own ``sharded_state_dict``, and per-rank RNG states as ``ShardedObject`` s.

As in Megatron-LM, the state dict is that of the UNWRAPPED model chunks (``objs.module``): the
megatron DDP wrapper's default ``sharded_state_dict`` would prefix every key with ``module.``,
which neither Megatron-LM nor this module's own ``load_state_dict`` (which the wrapper forwards to
the inner model) would accept.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import torch
import torch.distributed as dist

from megatron_endprompt.atomic_io import atomic_write_text
from megatron_endprompt.training import checkpoint as ckpt


def _model_keys(n: int) -> list[str]:
    return ["model"] if n == 1 else [f"model{i}" for i in range(n)]


def _rng_sharded(rt) -> Any:
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    state = ckpt.get_rng_state()
    state["rng_tracker_states"] = tensor_parallel.get_cuda_rng_tracker().get_states()
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


def sharded_state(
    run, rt, objs, state, for_load: bool = False, load_rng: bool = True
) -> dict[str, Any]:
    """The sharded state dict of model chunks, optimizer, scheduler, RNG and progress.

    ``load_rng=False`` leaves the RNG states out of a load (saved with another (PP, TP) grid,
    whose ShardedObject keys this run cannot address).
    """
    chunks = objs.module  # unwrapped (no DDP / Float16Module): keys without "module."
    sd: dict[str, Any] = {}
    for key, chunk in zip(_model_keys(len(chunks)), chunks):
        sd[key] = chunk.sharded_state_dict()
    model_sd = sd if len(chunks) > 1 else sd["model"]
    if not (for_load and (run.checkpoint.finetune or run.checkpoint.no_load_optim)):
        sd["optimizer"] = objs.optimizer.sharded_state_dict(model_sd, is_loading=for_load)
        sd["opt_param_scheduler"] = objs.scheduler.state_dict()
    if not (for_load and (run.checkpoint.finetune or run.checkpoint.no_load_rng or not load_rng)):
        sd["rng_state"] = _rng_sharded(rt)
    sd["iteration"] = state.iteration
    sd["consumed_samples"] = state.consumed_samples
    if not for_load:
        sd["rng_layout"] = _layout(rt)
    return sd


def save(run, rt, objs, state) -> str:
    """Save iteration ``state.iteration`` with dist_checkpointing; publish atomically."""
    from megatron.core import dist_checkpointing

    final = ckpt.iteration_dir(run.checkpoint.save, state.iteration)
    tmp = final + ".tmp"
    if dist.get_rank() == 0:
        os.makedirs(run.checkpoint.save, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    dist_checkpointing.save(sharded_state(run, rt, objs, state), tmp)
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write_text(
            os.path.join(run.checkpoint.save, ckpt.TRACKER), f"{state.iteration}\n", fsync=True
        )
        if run.checkpoint.keep_last:
            ckpt.prune_checkpoints(run.checkpoint.save, run.checkpoint.keep_last)
    dist.barrier()
    return final


def load(run, rt, objs, state) -> bool:
    """Load the latest checkpoint of --load into ``objs``/``state``; False when there is none."""
    from megatron.core import dist_checkpointing, tensor_parallel

    iteration = ckpt.read_tracker(run.checkpoint.load)
    if iteration is None:
        return False
    path = ckpt.iteration_dir(run.checkpoint.load, iteration)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--load: tracker names {path}, which does not exist")
    if os.path.isdir(os.path.join(path, ckpt.ShardRank(rt.tp_rank, rt.pp_rank).shard_name)):
        return _load_legacy(run, rt, objs, state, iteration)
    saved_layout = dist_checkpointing.load_common_state_dict(path).get("rng_layout")
    load_rng = saved_layout is None or list(saved_layout) == _layout(rt)
    if not load_rng and rt.is_logging_rank:
        print(
            f"--load: checkpoint saved with (PP, TP) = {tuple(saved_layout)}, this run has "
            f"{tuple(_layout(rt))}: its RNG states are not loaded",
            flush=True,
        )
    loaded = dist_checkpointing.load(
        sharded_state(run, rt, objs, state, for_load=True, load_rng=load_rng), path
    )
    for key, chunk in zip(_model_keys(len(objs.module)), objs.module):
        chunk.load_state_dict(loaded[key], strict=True)
    # dist_checkpointing.load returns the WHOLE common state (the optimizer's non-sharded part
    # and the scheduler included) whatever was asked for: decide by the flags, not by the keys.
    c = run.checkpoint
    if not (c.finetune or c.no_load_optim):
        objs.optimizer.load_state_dict(loaded["optimizer"])
        objs.scheduler.load_state_dict(loaded["opt_param_scheduler"])
    else:
        # Weights only: the optimizer's fp32 main params (bf16/fp16) still hold the initial
        # weights; copy the loaded ones in, or the first step would overwrite them.
        objs.optimizer.reload_model_params()
    if load_rng and not (c.finetune or c.no_load_rng):
        rng = loaded["rng_state"]
        ckpt.set_rng_state(rng)
        tensor_parallel.get_cuda_rng_tracker().set_states(rng["rng_tracker_states"])
    if not run.checkpoint.finetune:
        state.iteration = int(loaded["iteration"])
        state.consumed_samples = int(loaded["consumed_samples"])
    torch.cuda.synchronize()
    return True


def _load_legacy(run, rt, objs, state, iteration: int) -> bool:
    """Weights (and, when resuming, progress) from the per-shard torch format of checkpoint.py.

    This is the format of CPU runs and of converted Hugging Face checkpoints; its optimizer
    state is torch AdamW's, so only ``--finetune`` or ``--no-load-optim`` can take it on CUDA.
    """
    if len(objs.model) > 1:
        raise ValueError(
            "--load: a per-shard (CPU-format) checkpoint cannot be loaded with virtual pipeline "
            "stages; train without --num-layers-per-virtual-pipeline-stage"
        )
    if not (run.checkpoint.finetune or run.checkpoint.no_load_optim):
        raise ValueError(
            "--load: this checkpoint was written by a CPU run (torch AdamW state); pass "
            "--finetune or --no-load-optim to take its weights on CUDA"
        )
    shard = ckpt.load_checkpoint(
        run.checkpoint.load, ckpt.ShardRank(rt.tp_rank, rt.pp_rank), iteration
    )
    ckpt.load_model_weights(objs.module[0], shard, run.checkpoint.load, run.model)
    # The optimizer's fp32 main params (bf16/fp16) were copied from the initial weights.
    objs.optimizer.reload_model_params()
    if not run.checkpoint.finetune:
        state.iteration = int(shard.get("iteration", 0))
        state.consumed_samples = int(shard.get("consumed_samples", 0))
    return True
