"""The training loop: load, step, log, evaluate, save; reads top to bottom.

``train(run)`` is what ``python -m megatron_endprompt.train`` (under torchrun or alone) calls.
CPU runs use gloo + torch DDP + AdamW (``step.train_step_cpu``); CUDA runs use megatron-core's
DDP, optimizer and pipeline schedules (``megatron_step``). Data, model, loss and checkpoints are
the same on both.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from megatron_endprompt.cli import RunConfig
from megatron_endprompt.training import checkpoint as ckpt
from megatron_endprompt.training.data import cycle_iterator, make_data_iterator
from megatron_endprompt.training.logging import MetricsLogger, memory_stats, model_flops_per_token
from megatron_endprompt.training.runtime import Runtime, seed_everything, setup_runtime
from megatron_endprompt.training.signals import ExitSignalHandler
from megatron_endprompt.training.state import (
    TrainState,
    build_datasets_for_run,
    build_training_objects,
    load_into,
    state_to_save,
)
from megatron_endprompt.training.step import StepShape, evaluate_cpu, train_step_cpu


@dataclass
class TrainResult:
    """What a finished (or interrupted) run reports."""

    iterations: int
    consumed_samples: int
    losses: list[float]
    final_loss: float
    valid_loss: float | None
    tokens_per_s: float
    checkpoint: str | None
    interrupted: bool


def _flops_per_token(run: RunConfig) -> float:
    m = run.model
    return model_flops_per_token(
        m.num_layers,
        m.hidden_size,
        m.ffn_hidden_size,
        m.seq_length,
        m.vocab_size,
        m.num_attention_heads,
        m.num_query_groups or m.num_attention_heads,
        m.swiglu,
    )


def _save(run: RunConfig, rt: Runtime, objs, state: TrainState) -> str | None:
    if not run.checkpoint.save:
        return None
    rank = ckpt.ShardRank(rt.tp_rank, rt.pp_rank, rt.dp_rank)
    path = ckpt.save_checkpoint(
        run.checkpoint.save,
        state.iteration,
        state_to_save(run, objs, state),
        rank,
        keep_last=run.checkpoint.keep_last,
    )
    if rt.is_logging_rank:
        print(f"saved checkpoint {path}", flush=True)
    return path


def train(run: RunConfig) -> TrainResult:
    """Run training as configured; returns the losses and throughput."""
    rt = setup_runtime(
        run.device,
        run.parallel.tensor_model_parallel_size,
        run.parallel.pipeline_model_parallel_size,
        run.parallel.virtual_pipeline_model_parallel_size,
        run.parallel.context_parallel_size,
    )
    seed_everything(run.training.seed)
    objs = build_training_objects(run, rt)
    state = load_into(run, rt, objs)
    train_ds, valid_ds = build_datasets_for_run(run, rt, objs.tokenizer)
    t = run.training
    shape = StepShape(t.micro_batch_size, run.model.seq_length, run.num_microbatches)
    train_iter = make_data_iterator(
        train_ds,
        state.consumed_samples,
        t.micro_batch_size,
        rt.dp_rank,
        rt.dp_size,
        run.data.num_workers,
    )
    valid_iter = cycle_iterator(valid_ds, t.micro_batch_size, rt.dp_rank, rt.dp_size)
    logger = MetricsLogger(run.logging.tensorboard_dir, run.train_iters, rt.is_logging_rank)
    handler = ExitSignalHandler() if run.checkpoint.exit_signal_handler else None
    tokens_per_iter = t.global_batch_size * run.model.seq_length
    losses, last_path, interrupted = [], None, False
    interval_t0, interval_iters, run_t0, iters_done = time.perf_counter(), 0, None, 0
    valid_loss = None
    while state.iteration < run.train_iters:
        metrics = train_step_cpu(objs.model, objs.optimizer, train_iter, shape, rt, t.clip_grad)
        objs.scheduler.step(increment=t.global_batch_size)
        state.iteration += 1
        state.consumed_samples += t.global_batch_size
        losses.append(metrics["loss"])
        run_t0 = run_t0 or time.perf_counter()  # throughput excludes the first (warm-up) step
        iters_done += 1
        interval_iters += 1
        if state.iteration % run.logging.log_interval == 0 or state.iteration == run.train_iters:
            dt = time.perf_counter() - interval_t0
            tps = tokens_per_iter * interval_iters / dt
            scalars = {
                "loss": metrics["loss"],
                "lr": objs.optimizer.param_groups[0]["lr"],
                "grad_norm": metrics["grad_norm"],
                "tokens_per_s": tps,
                "tflops_per_device": tps * _flops_per_token(run) / 1e12 / rt.world_size,
                **memory_stats(rt.device),
            }
            logger.log(state.iteration, scalars, dt)
            interval_t0, interval_iters = time.perf_counter(), 0
        if t.eval_iters and t.eval_interval and state.iteration % t.eval_interval == 0:
            valid_loss = evaluate_cpu(objs.model, valid_iter, shape, rt, t.eval_iters)
            logger.log_eval(state.iteration, valid_loss)
        if not math.isfinite(metrics["loss"]):
            raise FloatingPointError(f"loss is {metrics['loss']} at iteration {state.iteration}")
        save_now = (
            run.checkpoint.save_interval and state.iteration % run.checkpoint.save_interval == 0
        )
        exit_now = t.exit_interval and state.iteration % t.exit_interval == 0
        if exit_now and state.iteration < run.train_iters:
            last_path, interrupted = _save(run, rt, objs, state), True
            break
        if handler is not None and handler.should_exit(rt.device):
            last_path, interrupted = _save(run, rt, objs, state), True
            break
        if save_now and state.iteration < run.train_iters:
            last_path = _save(run, rt, objs, state)
    if not interrupted:
        if t.eval_iters and (not t.eval_interval or state.iteration % t.eval_interval):
            valid_loss = evaluate_cpu(objs.model, valid_iter, shape, rt, t.eval_iters)
            logger.log_eval(state.iteration, valid_loss)
        last_path = _save(run, rt, objs, state) or last_path
    if handler is not None:
        handler.restore()
    logger.close()
    elapsed = time.perf_counter() - run_t0 if run_t0 else float("nan")
    steady = max(iters_done - 1, 0)
    return TrainResult(
        iterations=state.iteration,
        consumed_samples=state.consumed_samples,
        losses=losses,
        final_loss=losses[-1] if losses else float("nan"),
        valid_loss=valid_loss,
        tokens_per_s=tokens_per_iter * steady / elapsed if steady and elapsed > 0 else float("nan"),
        checkpoint=last_path,
        interrupted=interrupted,
    )
