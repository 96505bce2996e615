"""Resume a CPU (local backend) run from --load: our shards, Megatron-LM's, or ``torch_dist``.

* Per-shard ``torch`` checkpoints (ours, older ours, Megatron-LM's legacy format): weights under
  either layer spec's names, optimizer (torch AdamW, megatron-core FP32 / Float16 optimizer),
  LR schedule, RNG, iteration and consumed samples, as Megatron-LM's ``load_checkpoint`` does.
* ``torch_dist`` (our CUDA runs, Megatron-LM's): the weights at any saved TP/PP/VPP layout
  through :mod:`.stored`; the optimizer's sharded state mapped onto torch AdamW per parameter
  (:mod:`.dist_optim`: FP32 / Float16 optimizer and the distributed optimizer's
  ``fully_reshardable`` state at any layout, its ``dp_reshardable`` state at the saved TP with
  PP = 1; other formats are refused naming ``--no-load-optim``), fp32 master weights as the
  parameters' values, the LR schedule, iteration and consumed samples, and the RNG states of
  this rank's (PP, TP) coordinate when the saved grid is this run's (else a note says they are
  not loaded, as Megatron-LM does).

Flags as in Megatron-LM: ``--finetune`` takes the weights only and restarts at iteration 0;
``--no-load-optim`` keeps iteration and consumed samples but starts the optimizer moments and the
LR schedule afresh (a note says so); ``--no-load-rng`` keeps the generators as seeded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from megatron_endprompt.checkpoint.dist_optim import read_optimizer_state
from megatron_endprompt.checkpoint.dist_reader import is_dist_checkpoint
from megatron_endprompt.checkpoint.layout import ShardRank, read_tracker, stored_iteration_dir
from megatron_endprompt.checkpoint.megatron_lm import (
    load_scheduler_state,
    progress,
    restore_rng,
    scheduler_state,
)
from megatron_endprompt.checkpoint.optim_state import (
    check_masters,
    check_no_distributed_optimizer,
    load_optimizer_state,
    load_param_states,
)
from megatron_endprompt.checkpoint.shards import (
    check_checkpoint_model,
    checkpoint_path,
    load_checkpoint,
    load_model_weights,
)
from megatron_endprompt.checkpoint.stored import DistCheckpoint, open_checkpoint, rank_state_dict
from megatron_endprompt.checkpoint.weights import load_megatron_state_dict

Progress = tuple[int, int, int]
"""(iteration, consumed training samples, consumed validation samples)."""


def resume_local(
    run: Any,
    rank: ShardRank,
    tp_size: int,
    module: torch.nn.Module,
    optimizer: Any,
    scheduler: Any,
    log: Callable[[str], None],
) -> Progress:
    """Load --load's latest checkpoint into this rank's module, optimizer and schedule.

    Raises:
        FileNotFoundError: no checkpoint (tracker gone) or a missing shard.
        ValueError: naming --load, on a model-config disagreement, mismatched weights or an
            optimizer state this path cannot take.
    """
    c = run.checkpoint
    iteration = read_tracker(c.load)
    if iteration is None:
        raise FileNotFoundError(f"--load={c.load}: no checkpoint (its tracker is gone)")
    if is_dist_checkpoint(stored_iteration_dir(c.load, iteration)):
        return _resume_dist(
            run, (tp_size, rank.tp_rank), module, (optimizer, scheduler), iteration, log
        )
    shard = load_checkpoint(c.load, rank, iteration)
    load_model_weights(module, shard, c.load, run.model)
    if c.finetune:
        return 0, 0, 0
    where = f"--load={c.load}"
    if c.no_load_optim:
        _note_fresh_schedule(log)
    elif "optimizer" in shard:
        check_no_distributed_optimizer(checkpoint_path(c.load, rank, iteration), where)
        load_optimizer_state(optimizer, shard["optimizer"], where)
        sched = scheduler_state(shard)
        if sched is not None:
            load_scheduler_state(scheduler, sched, where)
    if not c.no_load_rng:
        restore_rng(shard)
    return progress(shard)


def _note_fresh_schedule(log: Callable[[str], None]) -> None:
    log(
        "--no-load-optim: iteration and consumed samples come from the checkpoint; the "
        "optimizer moments and the LR schedule (warmup included) start afresh, as in Megatron-LM"
    )


def _resume_dist(
    run: Any,
    tp: tuple[int, int],
    module: torch.nn.Module,
    optim: tuple[Any, Any],
    iteration: int,
    log: Callable[[str], None],
) -> Progress:
    """A ``torch_dist`` checkpoint into this (TP size, TP rank) of the CPU path (PP = 1)."""
    c, where = run.checkpoint, f"--load={run.checkpoint.load}"
    stored = open_checkpoint(c.load, iteration)
    check_checkpoint_model(run.model, stored.record, c.load)
    weights = rank_state_dict(stored, run.model, tp)
    try:
        load_megatron_state_dict(module, weights)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err
    if c.finetune:
        return 0, 0, 0
    common = dict(stored.record)
    common.setdefault("iteration", iteration)
    if c.no_load_optim:
        _note_fresh_schedule(log)
    else:
        optimizer, scheduler = optim
        params = [(n, p.shape) for n, p in module.named_parameters() if p.requires_grad]
        state = read_optimizer_state(stored, run.model, params, tp, where)
        check_masters(state, weights, where)
        load_param_states(optimizer, module, state, where)
        sched = scheduler_state(common)
        if sched is not None:
            load_scheduler_state(scheduler, sched, where)
    if not c.no_load_rng:
        _restore_dist_rng(stored, tp, log)
    return progress(common)


def _restore_dist_rng(
    stored: DistCheckpoint, tp: tuple[int, int], log: Callable[[str], None]
) -> None:
    """This rank's ``rng_state`` ShardedObject (PP rank 0, TP rank), when the grid is ours."""
    (tp_size, tp_rank), reader = tp, stored.reader
    name = f"rng_state/shard_0.{tp_rank}_1.{tp_size}"  # offsets (PP, TP) _ grid (PP, TP)
    if name in reader.objects:
        restore_rng({"rng_state": reader.read_objects([name])[name]})
        return
    grids = {o.rsplit("_", 1)[1].replace(".", ", ") for o in reader.objects
             if o.startswith("rng_state/shard_")}  # fmt: skip
    saved = "holds no RNG state"
    if len(grids) == 1:
        saved = f"was saved with (PP, TP) = ({grids.pop()})"
    log(f"--load: the checkpoint {saved}, this run has (PP, TP) = (1, {tp_size}): its RNG "
        "states are not loaded")  # fmt: skip
