"""What the loop builds once: tokenizer, model, optimizer, scheduler, datasets; and resume.

Kept apart from loop.py so the loop reads as a loop.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from megatron_endprompt.cli import RunConfig
from megatron_endprompt.data.builder import (
    build_datasets,
    is_dataset_built_on_rank,
    parse_blend,
)
from megatron_endprompt.data.dataset import EndPromptDatasetConfig
from megatron_endprompt.data.tokenizers import build_tokenizer
from megatron_endprompt.model.gpt import build_model
from megatron_endprompt.training import checkpoint as ckpt
from megatron_endprompt.training.checkpoint import ShardRank
from megatron_endprompt.training.optim import build_adamw, build_scheduler
from megatron_endprompt.training.runtime import Runtime


@dataclass
class TrainState:
    """Progress that a checkpoint carries besides weights and optimizer."""

    iteration: int = 0
    consumed_samples: int = 0


@dataclass
class TrainingObjects:
    """The built model (possibly DDP-wrapped), its unwrapped module, optimizer and scheduler."""

    tokenizer: Any
    model: torch.nn.Module
    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any


def build_training_objects(run: RunConfig, rt: Runtime) -> TrainingObjects:
    """Tokenizer -> model (vocab from the tokenizer) -> DDP -> optimizer -> LR schedule.

    CPU: one module, torch DDP, torch AdamW. CUDA: megatron-core model chunks, DDP and optimizer
    (``objs.model`` / ``objs.module`` are then lists of chunks).
    """
    tokenizer = build_tokenizer(run.data.tokenizer_type, run.data.tokenizer_model)
    run.model = dataclasses.replace(run.model, vocab_size=tokenizer.vocab_size)
    if run.device == "cuda":
        return _build_megatron_objects(run, rt, tokenizer)
    module = build_model(run.model, run.parallel, seed=run.training.seed).to(rt.device)
    model = module
    if rt.dp_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(module, process_group=rt.dp_group)
    t = run.training
    optimizer = build_adamw(module, t.lr, t.weight_decay, (t.adam_beta1, t.adam_beta2), t.adam_eps)
    return TrainingObjects(tokenizer, model, module, optimizer, _scheduler(run, optimizer))


def _build_megatron_objects(run: RunConfig, rt: Runtime, tokenizer) -> TrainingObjects:
    from megatron_endprompt.training.megatron_step import (
        build_megatron_training,
        build_model_chunks,
    )

    chunks = build_model_chunks(run, rt)
    wrapped, optimizer = build_megatron_training(run, rt, chunks)
    return TrainingObjects(tokenizer, wrapped, chunks, optimizer, _scheduler(run, optimizer))


def _scheduler(run: RunConfig, optimizer):
    """megatron-core's LR/WD schedule for the run, counted in samples."""
    t = run.training
    return build_scheduler(
        optimizer,
        t.lr,
        t.min_lr,
        t.weight_decay,
        t.lr_warmup_iters,
        t.lr_decay_iters or run.train_iters,
        t.lr_decay_style,
        t.global_batch_size,
    )


def state_to_save(run: RunConfig, objs: TrainingObjects, state: TrainState) -> dict[str, Any]:
    """This rank's checkpoint shard."""
    return {
        "model": objs.module.state_dict(),
        "optimizer": objs.optimizer.state_dict(),
        "scheduler": objs.scheduler.state_dict(),
        "rng": ckpt.get_rng_state(),
        "consumed_samples": state.consumed_samples,
        "run_config": run.to_dict(),
        "format": "megatron_endprompt/v1",
    }


def load_into(run: RunConfig, rt: Runtime, objs: TrainingObjects) -> TrainState:
    """Resume (or, with --finetune, take weights only) from --load; fresh state otherwise."""
    c = run.checkpoint
    if not c.load:
        return TrainState()
    if run.device == "cuda":
        from megatron_endprompt.training import dist_checkpoint

        state = TrainState()
        if not dist_checkpoint.load(run, rt, objs, state) and rt.is_logging_rank:
            print(f"--load={c.load}: no checkpoint found, starting from scratch", flush=True)
        return state
    shard = ckpt.load_checkpoint(c.load, ShardRank(rt.tp_rank, rt.pp_rank, 0))
    if shard is None:
        if rt.is_logging_rank:
            print(f"--load={c.load}: no checkpoint found, starting from scratch", flush=True)
        return TrainState()
    ckpt.load_model_weights(objs.module, shard, c.load, run.model)
    if c.finetune:
        return TrainState()
    if not c.no_load_optim and "optimizer" in shard:
        objs.optimizer.load_state_dict(shard["optimizer"])
        objs.scheduler.load_state_dict(shard["scheduler"])
    if not c.no_load_rng and "rng" in shard:
        ckpt.set_rng_state(shard["rng"])
    state = TrainState(shard.get("iteration", 0), shard.get("consumed_samples", 0))
    if rt.is_logging_rank:
        print(f"resumed from {c.load} at iteration {state.iteration}", flush=True)
    return state


def dataset_config(run: RunConfig, tokenizer) -> EndPromptDatasetConfig:
    """The EndPromptDatasetConfig of a run."""
    d, e = run.data, run.endprompt
    return EndPromptDatasetConfig(
        random_seed=run.training.seed,
        sequence_length=run.model.seq_length,
        blend=parse_blend(d.data_path),
        split=d.split,
        path_to_cache=d.data_cache_path,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=d.eod_mask_loss,
        create_attention_mask=False,
        position_mode=e.position_mode,
        terminal=e.terminal,
        placement=e.placement,
        target_length=run.target_length,
        tail_length=e.tail_length,
        pose_num_chunks=e.pose_num_chunks,
        cues=e.cues,
        terminal_loss_weight=e.terminal_loss_weight,
    )


def build_datasets_for_run(run: RunConfig, rt: Runtime, tokenizer):
    """(train, valid) datasets on the reading ranks (None elsewhere)."""
    t = run.training
    gbs = t.global_batch_size
    n_evals = (run.train_iters // t.eval_interval if t.eval_interval else 0) + 1
    sizes = [run.train_iters * gbs, n_evals * t.eval_iters * gbs if t.eval_iters else 0, 0]
    train, valid, _ = build_datasets(
        dataset_config(run, tokenizer), sizes, is_built_on_rank=is_dataset_built_on_rank
    )
    if rt.is_data_reader and train is None:
        raise ValueError(f"--split={run.data.split} leaves no training data")
    return train, valid
