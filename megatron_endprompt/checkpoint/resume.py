"""Resume a CPU (local backend) run from --load: our shards, Megatron-LM's, or ``torch_dist``.

* Per-shard ``torch`` checkpoints (ours, older ours, Megatron-LM's legacy format): weights under
  either layer spec's names, optimizer (torch AdamW, megatron-core FP32 / Float16 optimizer),
  LR schedule, RNG, iteration and consumed samples, as Megatron-LM's ``load_checkpoint`` does.
* ``torch_dist`` (our CUDA runs, Megatron-LM): the weights at any saved TP/PP/VPP layout through
  :mod:`.stored`, plus iteration and consumed samples; the optimizer's sharded state is not read
  on CPU, so a resume needs ``--no-load-optim`` (or ``--finetune``).

Flags as in Megatron-LM: ``--finetune`` takes the weights only and restarts at iteration 0;
``--no-load-optim`` keeps iteration and consumed samples but starts the optimizer moments and the
LR schedule afresh (a note says so); ``--no-load-rng`` keeps the generators as seeded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from megatron_endprompt.checkpoint.dist_reader import is_dist_checkpoint
from megatron_endprompt.checkpoint.layout import ShardRank, read_tracker, stored_iteration_dir
from megatron_endprompt.checkpoint.megatron_lm import progress, restore_rng, scheduler_state
from megatron_endprompt.checkpoint.optim_state import (
    check_no_distributed_optimizer,
    load_optimizer_state,
)
from megatron_endprompt.checkpoint.shards import (
    check_checkpoint_model,
    checkpoint_path,
    load_checkpoint,
    load_model_weights,
)
from megatron_endprompt.checkpoint.stored import open_checkpoint, rank_state_dict
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
        return _resume_dist(run, rank, tp_size, module, iteration)
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
            scheduler.load_state_dict(dict(sched))
    if not c.no_load_rng:
        restore_rng(shard)
    return progress(shard)


def _note_fresh_schedule(log: Callable[[str], None]) -> None:
    log(
        "--no-load-optim: iteration and consumed samples come from the checkpoint; the "
        "optimizer moments and the LR schedule (warmup included) start afresh, as in Megatron-LM"
    )


def _resume_dist(
    run: Any, rank: ShardRank, tp_size: int, module: torch.nn.Module, iteration: int
) -> Progress:
    """Weights (and progress) of a ``torch_dist`` checkpoint on the CPU path."""
    c = run.checkpoint
    if not (c.finetune or c.no_load_optim):
        raise ValueError(
            f"--load={c.load}: a torch_dist (dist_checkpointing) checkpoint's optimizer state "
            "cannot be read by the CPU path; pass --no-load-optim (weights, iteration and "
            "consumed samples; fresh optimizer and LR schedule) or --finetune (weights only)"
        )
    stored = open_checkpoint(c.load, iteration)
    check_checkpoint_model(run.model, stored.record, c.load)
    tp, pp = (tp_size, rank.tp_rank), (rank.pp_size, rank.pp_rank)
    try:
        load_megatron_state_dict(module, rank_state_dict(stored, run.model, tp, pp))
    except ValueError as err:
        raise ValueError(f"--load={c.load}: {err}") from err
    if c.finetune:
        return 0, 0, 0
    common = dict(stored.record)
    common.setdefault("iteration", iteration)
    return progress(common)
