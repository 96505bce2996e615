"""What a run holds besides the loop: progress, the built objects, tokenizer, schedule, datasets.

Kept apart from loop.py so the loop reads as a loop; the backends (backend.py) build the objects.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import torch

from megatron_endprompt.checkpoint.megatron_lm import (
    CHECKPOINT_VERSION,
    SHARD_FORMAT,
    megatron_args,
    rng_state_list,
)
from megatron_endprompt.checkpoint.optim_state import megatron_optimizer_state
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
    d = run.data
    tokenizer = build_tokenizer(d.tokenizer_type, d.tokenizer_model, **d.tokenizer_options())
    notes = list(getattr(tokenizer, "notes", []))
    own_size = d.tokenizer_type not in ("NullTokenizer", "TikTokenizer")
    if d.vocab_size is not None and own_size and d.vocab_size != tokenizer.vocab_size:
        notes.append(f"--vocab-size={d.vocab_size}: not used by {d.tokenizer_type} (as "
                     f"Megatron-LM): its vocabulary has {tokenizer.vocab_size} tokens")  # fmt: skip
    if int(os.environ.get("RANK", "0")) == 0:
        for note in notes:
            print(f"note: {note}", flush=True)
    run.model = dataclasses.replace(run.model, vocab_size=tokenizer.vocab_size)
    return tokenizer


def build_scheduler_for_run(run: RunConfig, optimizer):
    """megatron-core's LR/WD schedule for the run, counted in samples."""
    t = run.training
    c = run.checkpoint
    warmup, decay = t.schedule_steps(run.train_iters, t.global_batch_size)
    return build_scheduler(
        optimizer, t.lr, t.min_lr, t.weight_decay, warmup, decay, t.lr_decay_style,
        wd_incr_steps=t.wd_incr_steps(t.global_batch_size),
        use_checkpoint=c.use_checkpoint_opt_param_scheduler,
        override=c.override_opt_param_scheduler,
    )  # fmt: skip


def state_to_save(
    run: RunConfig, objs: TrainingObjects, state: TrainState, tp_rank: int = 0, pp_rank: int = 0
) -> dict[str, Any]:
    """This rank's checkpoint shard, as Megatron-LM's legacy ``torch`` format holds it.

    Megatron-LM's keys (``checkpoint/megatron_lm.py``: ``args`` with the consumed samples,
    ``checkpoint_version`` 3.0, ``model``, ``optimizer`` in ``FP32Optimizer``'s layout,
    ``opt_param_scheduler``, ``rng_state``), plus ours, which it ignores.
    """
    t = run.training
    args = megatron_args(run, state.consumed_samples, state.valid_consumed_samples, state.iteration)
    optimizer = megatron_optimizer_state(objs.optimizer.state_dict(), t.lr, t.min_lr)
    return {
        "args": args,
        "checkpoint_version": CHECKPOINT_VERSION,
        "model": objs.module[0].state_dict(),
        "optimizer": optimizer,
        "opt_param_scheduler": objs.scheduler.state_dict(),
        "rng_state": rng_state_list(t.seed, tp_rank, pp_rank),
        "num_floating_point_operations_so_far": 0,
        "consumed_samples": state.consumed_samples,
        "valid_consumed_samples": state.valid_consumed_samples,
        "run_config": run.to_dict(),
        "format": SHARD_FORMAT,
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
        blend=None if d.mock_data else parse_blend(d.data_path),  # None: megatron's mock data
        split=d.split,
        path_to_cache=d.data_cache_path,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=d.eod_mask_loss,
        create_attention_mask=False,
        mmap_bin_files=d.mmap_bin_files,
        **layout,
    )


def build_datasets_for_run(run: RunConfig, rt: Runtime, tokenizer):
    """(train, valid) datasets on the reading ranks (None elsewhere)."""
    t = run.training
    gbs = t.global_batch_size
    n_evals = (run.train_iters // t.eval_interval if t.eval_interval else 0) + 1
    sizes = [run.train_dataset_samples, n_evals * t.eval_iters * gbs if t.eval_iters else 0, 0]
    train, valid, _ = build_datasets(
        dataset_config(run, tokenizer), sizes, is_built_on_rank=is_dataset_built_on_rank
    )
    if rt.is_data_reader and train is None:
        raise ValueError(f"--split={run.data.split} leaves no training data")
    return train, valid
