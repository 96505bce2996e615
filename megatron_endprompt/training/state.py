"""What a run holds besides the loop: progress, the built objects, tokenizer, schedule, datasets.

Kept apart from loop.py so the loop reads as a loop; the backends (backend.py) build the objects.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from megatron_endprompt import checkpoint as ckpt
from megatron_endprompt.config import RunConfig
from megatron_endprompt.data.builder import (
    build_datasets,
    is_dataset_built_on_rank,
    parse_blend,
)
from megatron_endprompt.data.dataset import EndPromptDatasetConfig
from megatron_endprompt.data.tokenizers import build_tokenizer
from megatron_endprompt.training.optim import build_scheduler
from megatron_endprompt.training.runtime import Runtime


@dataclass
class TrainState:
    """Progress that a checkpoint carries besides weights and optimizer."""

    iteration: int = 0
    consumed_samples: int = 0
    valid_consumed_samples: int = 0
    """Validation samples read so far (all DP ranks): where the validation iterator resumes."""


@dataclass
class TrainingObjects:
    """What a backend builds: model chunks (wrapped and bare), optimizer, LR schedule.

    ``model`` / ``module``: one entry per virtual pipeline stage (one without VPP), wrapped
    (DDP, Float16Module) and unwrapped.
    """

    tokenizer: Any
    model: list[torch.nn.Module]
    module: list[torch.nn.Module]
    optimizer: Any
    scheduler: Any


def build_tokenizer_for_run(run: RunConfig):
    """The run's tokenizer; the model's vocabulary size becomes the tokenizer's."""
    tokenizer = build_tokenizer(run.data.tokenizer_type, run.data.tokenizer_model)
    run.model = dataclasses.replace(run.model, vocab_size=tokenizer.vocab_size)
    return tokenizer


def build_scheduler_for_run(run: RunConfig, optimizer):
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
        "model": objs.module[0].state_dict(),
        "optimizer": objs.optimizer.state_dict(),
        "scheduler": objs.scheduler.state_dict(),
        "rng": ckpt.get_rng_state(),
        "consumed_samples": state.consumed_samples,
        "valid_consumed_samples": state.valid_consumed_samples,
        "run_config": run.to_dict(),
        "format": "megatron_endprompt/v1",
    }


def dataset_config(run: RunConfig, tokenizer) -> EndPromptDatasetConfig:
    """The EndPromptDatasetConfig of a run.

    Every EndPrompt field the dataset has is taken by name from ``run.endprompt`` (a new option
    cannot be forgotten on the way), ``target_length`` resolved (default: the model's maximum
    position); the rest comes from the model, data and training sections.
    """
    names = {f.name for f in dataclasses.fields(EndPromptDatasetConfig)}
    e = run.endprompt
    layout = {f.name: getattr(e, f.name) for f in dataclasses.fields(e) if f.name in names}
    layout["target_length"] = run.target_length
    d = run.data
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
        **layout,
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
