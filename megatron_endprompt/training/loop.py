"""The training loop: load, step, log, evaluate, save; reads top to bottom.

``train(run)`` is what ``python -m megatron_endprompt.train`` (under torchrun or alone) calls.
The device picks the backend once (backend.py): CPU runs use gloo + torch DDP + AdamW, CUDA runs
megatron-core's DDP, optimizer and pipeline schedules. Data, model, loss and the checkpoint
directory contract are the same on both.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

from megatron_endprompt.cli import RunConfig
from megatron_endprompt.training.backend import make_backend
from megatron_endprompt.training.data import cycle_iterator, make_data_iterator
from megatron_endprompt.training.logging import (
    MetricsLogger,
    memory_stats,
    model_flops_per_token,
    peak_memory_gib,
)
from megatron_endprompt.training.runtime import Runtime, seed_everything, setup_runtime
from megatron_endprompt.training.signals import ExitSignalHandler
from megatron_endprompt.training.state import TrainState, build_datasets_for_run
from megatron_endprompt.training.step import StepShape


@dataclass
class TrainResult:
    """What a finished (or interrupted) run reports."""

    iterations: int
    consumed_samples: int
    losses: list[float]
    grad_norms: list[float]
    """Gradient norm (before clipping) of each iteration run by this process."""
    final_loss: float
    valid_loss: float | None
    tokens_per_s: float
    checkpoint: str | None
    interrupted: bool
    reporting: bool = True
    """True on the rank that sees the loss (last pipeline stage, TP/DP/CP rank 0)."""
    peak_memory_gib: float = float("nan")
    """This rank's peak memory (``logging.peak_memory_gib``)."""
    peak_memory_kind: str = ""
    """What ``peak_memory_gib`` measured: ``cuda_max_allocated`` or ``process_peak_rss``."""


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


def _save(run: RunConfig, rt: Runtime, backend, objs, state: TrainState) -> str | None:
    if not run.checkpoint.save:
        return None
    path = backend.save(objs, state)
    if rt.is_logging_rank:
        print(f"saved checkpoint {path}", flush=True)
    return path


@dataclass
class _Meter:
    """Interval and whole-run throughput (the first, warm-up iteration is excluded)."""

    tokens_per_iter: int
    t_interval: float = field(default_factory=time.perf_counter)
    iters_interval: int = 0
    t_first: float | None = None
    iters_after_first: int = 0

    def tick(self) -> None:
        self.iters_interval += 1
        if self.t_first is None:
            self.t_first = time.perf_counter()
        else:
            self.iters_after_first += 1

    def interval(self) -> tuple[float, float]:
        """(seconds, tokens/s) since the last call."""
        dt = time.perf_counter() - self.t_interval
        tps = self.tokens_per_iter * self.iters_interval / dt
        self.t_interval, self.iters_interval = time.perf_counter(), 0
        return dt, tps

    def overall(self) -> float:
        if not self.iters_after_first:
            return float("nan")
        return self.tokens_per_iter * self.iters_after_first / (time.perf_counter() - self.t_first)


def _log(run, rt, logger, objs, state, metrics, meter) -> None:
    dt, tps = meter.interval()
    scalars = {
        "loss": metrics["loss"],
        "lr": objs.optimizer.param_groups[0]["lr"],
        "grad_norm": metrics["grad_norm"],
        "tokens_per_s": tps,
        "tflops_per_device": tps * _flops_per_token(run) / 1e12 / rt.world_size,
        **{k: metrics[k] for k in ("loss_scale",) if k in metrics},
        **memory_stats(rt.device),
    }
    logger.log(state.iteration, scalars, dt)


def _due(interval: int | None, iteration: int) -> bool:
    return bool(interval) and iteration % interval == 0


def train(run: RunConfig) -> TrainResult:
    """Run training as configured; returns the losses and throughput."""
    p, t = run.parallel, run.training
    rt = setup_runtime(
        run.device,
        p.tensor_model_parallel_size,
        p.pipeline_model_parallel_size,
        p.virtual_pipeline_model_parallel_size,
        p.context_parallel_size,
    )
    seed_everything(t.seed)
    shape = StepShape(t.micro_batch_size, run.model.seq_length, run.num_microbatches)
    backend = make_backend(run, rt, shape)
    objs = backend.build()
    state = backend.load(objs) if run.checkpoint.load else TrainState()
    train_ds, valid_ds = build_datasets_for_run(run, rt, objs.tokenizer)
    train_iter = make_data_iterator(
        train_ds,
        state.consumed_samples,
        t.micro_batch_size,
        rt.dp_rank,
        rt.dp_size,
        run.data.num_workers,
    )
    valid_iter = cycle_iterator(valid_ds, t.micro_batch_size, rt.dp_rank, rt.dp_size)
    plot_dir = run.logging.tensorboard_dir or run.checkpoint.save
    logger = MetricsLogger(
        run.logging.tensorboard_dir,
        run.train_iters,
        rt.is_logging_rank,
        state.iteration,
        plot_path=os.path.join(plot_dir, "loss_curve.png") if plot_dir else None,
    )
    handler = ExitSignalHandler() if run.checkpoint.exit_signal_handler else None
    meter = _Meter(t.global_batch_size * run.model.seq_length)
    losses, grad_norms, last_path, interrupted, valid_loss = [], [], None, False, None
    while state.iteration < run.train_iters:
        metrics = backend.train_step(objs, train_iter)
        if not metrics.get("skipped"):
            # As Megatron-LM: the LR schedule advances only on a successful update (an fp16
            # overflow skips the step); iterations and consumed samples always advance.
            objs.scheduler.step(increment=t.global_batch_size)
        state.iteration += 1
        state.consumed_samples += t.global_batch_size
        losses.append(metrics["loss"])
        grad_norms.append(metrics["grad_norm"])
        meter.tick()
        if _due(run.logging.log_interval, state.iteration) or state.iteration == run.train_iters:
            _log(run, rt, logger, objs, state, metrics, meter)
        if t.eval_iters and _due(t.eval_interval, state.iteration):
            valid_loss = backend.evaluate(objs, valid_iter)
            logger.log_eval(state.iteration, valid_loss)
        if not math.isfinite(metrics["loss"]):
            raise FloatingPointError(f"loss is {metrics['loss']} at iteration {state.iteration}")
        if state.iteration == run.train_iters:
            break
        stop = _due(t.exit_interval, state.iteration)
        stop = (handler is not None and handler.should_exit(rt.device)) or stop
        if stop or _due(run.checkpoint.save_interval, state.iteration):
            last_path = _save(run, rt, backend, objs, state)
        if stop:
            interrupted = True
            break
    if not interrupted:
        if t.eval_iters and not _due(t.eval_interval, state.iteration):
            valid_loss = backend.evaluate(objs, valid_iter)
            logger.log_eval(state.iteration, valid_loss)
        last_path = _save(run, rt, backend, objs, state) or last_path
    if handler is not None:
        handler.restore()
    logger.close()
    peak_gib, peak_kind = peak_memory_gib(rt.device)
    return TrainResult(
        iterations=state.iteration,
        consumed_samples=state.consumed_samples,
        losses=losses,
        grad_norms=grad_norms,
        final_loss=losses[-1] if losses else float("nan"),
        valid_loss=valid_loss,
        tokens_per_s=meter.overall(),
        checkpoint=last_path,
        interrupted=interrupted,
        reporting=rt.is_logging_rank,
        peak_memory_gib=peak_gib,
        peak_memory_kind=peak_kind,
    )
