"""The backend seam: build, train_step, evaluate, save, load; two implementations.

* :class:`LocalBackend` (CPU): gloo, torch DDP, torch AdamW, the per-shard checkpoint format
  (Megatron-LM's legacy ``torch`` layout; ``torch_dist`` checkpoints resume too, see
  ``checkpoint/resume.py``).
* :class:`MegatronBackend` (CUDA): megatron-core DDP, (distributed) optimizer, pipeline
  schedules, ``dist_checkpointing`` (or, with ``--ckpt-format torch``, Megatron-LM's legacy
  per-shard format, ``checkpoint/legacy_cuda.py``).

Chosen once per run from the device (:func:`make_backend`, ``device.backend_kind``); the loop
only talks to the protocol. Both share the step core (``step.fetch_microbatches``,
``weighted_mean``, ``loss.py``, ``device.all_reduce``) and the checkpoint publishing
(``checkpoint.publish_iteration``).
Model chunks are a list everywhere (length 1 without virtual pipeline stages).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from megatron_endprompt import checkpoint as ckpt
from megatron_endprompt.checkpoint import dist as dist_checkpoint
from megatron_endprompt.checkpoint import legacy_cuda
from megatron_endprompt.checkpoint.resume import resume_local
from megatron_endprompt.device import backend_kind
from megatron_endprompt.model.gpt import build_model
from megatron_endprompt.training import megatron_step
from megatron_endprompt.training.optim import build_adamw
from megatron_endprompt.training.runtime import Runtime
from megatron_endprompt.training.state import (
    TrainingObjects,
    TrainState,
    build_scheduler_for_run,
    build_tokenizer_for_run,
    state_to_save,
)
from megatron_endprompt.training.step import Progress, StepShape, evaluate_cpu, train_step_cpu


class Backend(Protocol):
    """What the training loop needs from a backend."""

    def build(self) -> TrainingObjects:
        """Tokenizer, model chunks (wrapped and bare), optimizer, LR schedule."""

    def load(self, objs: TrainingObjects) -> TrainState:
        """Resume (or --finetune) from --load, which the loop has checked holds a checkpoint."""

    def train_step(
        self, objs: TrainingObjects, data_iterator: Iterator | None, shape: StepShape
    ) -> dict[str, float]:
        """One iteration of ``shape`` (its micro-batch count follows the global batch of the
        iteration): ``loss``, ``grad_norm`` (+ ``skipped``, ``loss_scale`` when known)."""

    def evaluate(
        self, objs: TrainingObjects, data_iterator: Iterator | None, progress: Progress = None
    ) -> float:
        """Global weighted validation loss over --eval-iters iterations; ``progress(done)`` is
        called after each one."""

    def save(self, objs: TrainingObjects, state: TrainState) -> str:
        """Write and publish the checkpoint of ``state.iteration``; returns its directory."""


@dataclass
class _BackendState:
    """What every backend is made with: the run, its process groups and its batch geometry
    at the full --global-batch-size (validation's; a training step gets its own)."""

    run: object
    rt: Runtime
    shape: StepShape


class LocalBackend(_BackendState):
    """CPU: gloo, torch DDP over the data-parallel group, torch AdamW, per-shard checkpoints."""

    def build(self) -> TrainingObjects:
        run, rt = self.run, self.rt
        tokenizer = build_tokenizer_for_run(run)
        module = build_model(run.model, run.parallel, seed=run.training.seed).to(rt.device)
        model = module
        if rt.dp_size > 1:
            model = torch.nn.parallel.DistributedDataParallel(module, process_group=rt.dp_group)
        t = run.training
        betas = (t.adam_beta1, t.adam_beta2)
        optimizer = build_adamw(
            module, t.lr, t.weight_decay, betas, t.adam_eps, t.decoupled_lr, t.decoupled_min_lr
        )
        scheduler = build_scheduler_for_run(run, optimizer)
        return TrainingObjects(tokenizer, [model], [module], optimizer, scheduler)

    def load(self, objs: TrainingObjects) -> TrainState:
        c, rt = self.run.checkpoint, self.rt
        rank = ckpt.ShardRank(rt.tp_rank, rt.pp_rank, 0, rt.pp_size)

        def log(message: str) -> None:
            if rt.is_logging_rank:
                print(message, flush=True)

        module, opt, sched = objs.module[0], objs.optimizer, objs.scheduler
        state = TrainState(*resume_local(self.run, rank, rt.tp_size, module, opt, sched, log))
        if not c.finetune:
            log(f"resumed from {c.load} at iteration {state.iteration}")
        return state

    def train_step(
        self, objs: TrainingObjects, data_iterator: Iterator | None, shape: StepShape
    ) -> dict[str, float]:
        (model,) = objs.model
        clip = self.run.training.clip_grad
        return train_step_cpu(model, objs.optimizer, data_iterator, shape, self.rt, clip)

    def evaluate(
        self, objs: TrainingObjects, data_iterator: Iterator | None, progress: Progress = None
    ) -> float:
        (model,) = objs.model
        iters = self.run.training.eval_iters
        return evaluate_cpu(model, data_iterator, self.shape, self.rt, iters, progress)

    def save(self, objs: TrainingObjects, state: TrainState) -> str:
        rt, c = self.rt, self.run.checkpoint
        rank = ckpt.ShardRank(rt.tp_rank, rt.pp_rank, rt.dp_rank, rt.pp_size)
        shard = state_to_save(self.run, objs, state, rt.tp_rank, rt.pp_rank)
        return ckpt.save_checkpoint(c.save, state.iteration, shard, rank, keep_last=c.keep_last)


class MegatronBackend(_BackendState):
    """CUDA: megatron-core DDP, optimizer, schedules (PP, VPP); dist or legacy checkpoints."""

    def build(self) -> TrainingObjects:
        run, rt = self.run, self.rt
        tokenizer = build_tokenizer_for_run(run)
        chunks = megatron_step.build_model_chunks(run, rt)
        wrapped, optimizer = megatron_step.build_megatron_training(run, rt, chunks)
        scheduler = build_scheduler_for_run(run, optimizer)
        return TrainingObjects(tokenizer, wrapped, chunks, optimizer, scheduler)

    def load(self, objs: TrainingObjects) -> TrainState:
        state = TrainState()
        if not dist_checkpoint.load(self.run, self.rt, objs, state):
            load = self.run.checkpoint.load
            raise FileNotFoundError(f"--load={load}: no checkpoint (its tracker is gone)")
        return state

    def train_step(
        self, objs: TrainingObjects, data_iterator: Iterator | None, shape: StepShape
    ) -> dict[str, float]:
        return megatron_step.train_step_megatron(
            objs.model, objs.optimizer, data_iterator, shape, self.rt
        )

    def evaluate(
        self, objs: TrainingObjects, data_iterator: Iterator | None, progress: Progress = None
    ) -> float:
        iters, shape, model = self.run.training.eval_iters, self.shape, objs.model
        return megatron_step.evaluate_megatron(
            model, data_iterator, shape, self.rt, iters, progress
        )

    def save(self, objs: TrainingObjects, state: TrainState) -> str:
        if self.run.checkpoint.ckpt_format == "torch":  # Megatron-LM's legacy format
            return legacy_cuda.save(self.run, self.rt, objs, state)
        return dist_checkpoint.save(self.run, self.rt, objs, state)


def make_backend(run, rt: Runtime, shape: StepShape) -> Backend:
    """The run's backend, chosen once from its device."""
    kind = backend_kind(run.device)
    return (MegatronBackend if kind == "megatron" else LocalBackend)(run, rt, shape)
