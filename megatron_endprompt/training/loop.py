"""The training loop: load, step, log, evaluate, save; reads top to bottom.

``train(run)`` is what ``python -m megatron_endprompt.train`` (under torchrun or alone) calls.
The device picks the backend once (backend.py): CPU runs use gloo + torch DDP + AdamW, CUDA runs
megatron-core's DDP, optimizer and pipeline schedules. Data, model, loss and the checkpoint
directory contract are the same on both.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_endprompt import checkpoint as ckpt
from megatron_endprompt.checkpoint.layout import check_load_dir
from megatron_endprompt.config import RunConfig
from megatron_endprompt.config.batch_ramp import BatchSchedule
from megatron_endprompt.training.backend import Backend, make_backend
from megatron_endprompt.training.data import cycle_iterator, make_data_iterator
from megatron_endprompt.training.logging import (
    MetricsLogger,
    memory_stats,
    model_flops_per_token,
    peak_memory_gib,
)
from megatron_endprompt.training.preflight import check_output_paths
from megatron_endprompt.training.runtime import Runtime, seed_everything, setup_runtime
from megatron_endprompt.training.signals import ExitSignalHandler
from megatron_endprompt.training.state import TrainingObjects, TrainState, build_datasets_for_run
from megatron_endprompt.training.step import StepShape


@dataclass
class TrainResult:
    """What a finished (or interrupted) run reports."""

    iterations: int
    consumed_samples: int
    losses: list[float]
    grad_norms: list[float]
    """Gradient norm (before clipping) of each iteration run by this process."""
    final_loss: float | None
    """The last iteration's loss; None when no iteration ran (a finished run resumed)."""
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
    global_batch_sizes: list[int] = field(default_factory=list)
    """The global batch of each iteration run by this process (changes with a ramp)."""


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

    t_interval: float = field(default_factory=time.perf_counter)
    tokens_interval: int = 0
    t_first: float | None = None
    tokens_after_first: int = 0

    def tick(self, tokens: int) -> None:
        """One iteration of ``tokens`` tokens (its global batch x sequence length) done."""
        self.tokens_interval += tokens
        if self.t_first is None:
            self.t_first = time.perf_counter()
        else:
            self.tokens_after_first += tokens

    def interval(self) -> tuple[float, float]:
        """(seconds, tokens/s) since the last call."""
        dt = time.perf_counter() - self.t_interval
        tps = self.tokens_interval / dt
        self.t_interval, self.tokens_interval = time.perf_counter(), 0
        return dt, tps

    def overall(self) -> float:
        if not self.tokens_after_first:
            return float("nan")
        return self.tokens_after_first / (time.perf_counter() - self.t_first)


_OPTIONAL_SCALARS = ("loss_scale", "global_batch_size", "consumed_samples")
"""Logged when the step reports them (fp16's loss scale; a ramp's batch and consumed samples)."""


def _log(run, rt, logger, objs, state, metrics, meter) -> None:
    dt, tps = meter.interval()
    scalars = {
        "loss": metrics["loss"],
        "lr": objs.optimizer.param_groups[0]["lr"],
        "grad_norm": metrics["grad_norm"],
        "tokens_per_s": tps,
        "tflops_per_device": tps * _flops_per_token(run) / 1e12 / rt.world_size,
        **{k: metrics[k] for k in _OPTIONAL_SCALARS if k in metrics},
        **memory_stats(rt.device),
    }
    logger.log(state.iteration, scalars, dt)


def _due(interval: int | None, iteration: int) -> bool:
    return bool(interval) and iteration % interval == 0


@dataclass
class _Loop:
    """Everything the loop works on: built once by :func:`_start`, advanced by :func:`_step`."""

    run: RunConfig
    rt: Runtime
    backend: Backend
    objs: TrainingObjects
    state: TrainState
    train_iter: Iterator
    valid_iter: Iterator | None
    logger: MetricsLogger
    meter: _Meter
    handler: ExitSignalHandler | None
    schedule: BatchSchedule
    """The global batch of each iteration (--global-batch-size, or the ramp's calculator)."""
    shape: StepShape
    """The batch geometry at the full --global-batch-size; each iteration's has its own count."""
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    valid_loss: float | None = None
    last_path: str | None = None
    interrupted: bool = False
    started: float = field(default_factory=time.monotonic)


def _has_checkpoint(run: RunConfig, rt: Runtime) -> bool:
    """Whether --load holds a checkpoint, decided before anything is built (see check_load_dir)."""
    c = run.checkpoint
    if not c.load:
        return False
    found = check_load_dir(c.load, c.finetune, c.exit_on_missing_checkpoint)
    if not found and rt.is_logging_rank:
        print(f"--load={c.load}: no checkpoint found, starting from scratch", flush=True)
    return found


def _data_iterators(run: RunConfig, rt: Runtime, objs, state: TrainState):
    """(train, valid) iterators, each resuming at the position ``state`` records."""
    train_ds, valid_ds = build_datasets_for_run(run, rt, objs.tokenizer)
    mbs, workers = run.training.micro_batch_size, run.data.num_workers
    train_iter = make_data_iterator(
        train_ds, state.consumed_samples, mbs, rt.dp_rank, rt.dp_size, workers
    )
    valid_iter = None
    if run.training.eval_iters:  # no validation asked for: its split is never read
        if rt.is_data_reader and valid_ds is None:
            raise ValueError(
                f"--eval-iters={run.training.eval_iters}: --split={run.data.split} leaves no "
                "validation data (give its second part a weight, or --eval-iters 0)"
            )
        valid_iter = cycle_iterator(
            valid_ds, mbs, rt.dp_rank, rt.dp_size, state.valid_consumed_samples
        )
    return train_iter, valid_iter


def _start(run: RunConfig) -> _Loop:
    """Process groups, seeds, backend objects, resume, data iterators, logger, signal handler."""
    p, t = run.parallel, run.training
    rt = setup_runtime(
        run.device,
        p.tensor_model_parallel_size,
        p.pipeline_model_parallel_size,
        p.virtual_pipeline_model_parallel_size,
        p.context_parallel_size,
        timeout_minutes=p.distributed_timeout_minutes,
    )
    check_output_paths(run)
    resume = _has_checkpoint(run, rt)
    seed_everything(t.seed)
    shape = StepShape(t.micro_batch_size, run.model.seq_length, run.num_microbatches)
    backend = make_backend(run, rt, shape)
    objs = backend.build()
    state = backend.load(objs) if resume else TrainState()
    # The loaded (or seeded) RNG states, applied again once the data pipeline is built: nothing
    # built in between may shift the stream that dropout draws from.
    rng = ckpt.get_rng_state()
    train_iter, valid_iter = _data_iterators(run, rt, objs, state)
    plot_dir = run.logging.tensorboard_dir or run.checkpoint.save
    logger = MetricsLogger(
        run.logging.tensorboard_dir,
        run.train_iters,
        rt.is_logging_rank,
        state.iteration,
        plot_path=os.path.join(plot_dir, "loss_curve.png") if plot_dir else None,
    )
    handler = ExitSignalHandler() if run.checkpoint.exit_signal_handler else None
    ckpt.set_rng_state(rng)
    return _Loop(run, rt, backend, objs, state, train_iter, valid_iter, logger, _Meter(), handler,
                 run.batch_schedule(), shape)  # fmt: skip


def _evaluate(lp: _Loop) -> None:
    progress = lp.logger.eval_progress(lp.run.training.eval_iters)
    lp.valid_loss = lp.backend.evaluate(lp.objs, lp.valid_iter, progress)
    # Every rank counts (not only the data readers): the position is saved with the checkpoint.
    lp.state.valid_consumed_samples += (
        lp.run.training.eval_iters * lp.run.training.global_batch_size
    )
    lp.logger.log_eval(lp.state.iteration, lp.valid_loss)


def _global_batch(lp: _Loop) -> int:
    """This iteration's global batch: the calculator decides from the consumed samples, at the
    start of each iteration (as Megatron-LM); a ramp's changes are printed."""
    gbs = lp.schedule.global_batch_at(lp.state.consumed_samples)
    last = lp.batch_sizes[-1] if lp.batch_sizes else None
    if lp.schedule.ramps and gbs != last and lp.rt.is_logging_rank:
        change = f"{last} -> {gbs}" if last is not None else f"{gbs}"
        print(f"global batch size {change} at {lp.state.consumed_samples} consumed samples "
              "(--rampup-batch-size)", flush=True)  # fmt: skip
    return gbs


def _ramp_step_ends(lp: _Loop, gbs: int) -> bool:
    """Whether the next iteration's global batch differs: Megatron-LM saves a checkpoint then."""
    return lp.schedule.ramps and lp.schedule.global_batch_at(lp.state.consumed_samples) != gbs


def _step(lp: _Loop) -> bool:
    """One iteration with its logging, evaluation and saving; False when the loop must stop."""
    run, t, state = lp.run, lp.run.training, lp.state
    gbs = _global_batch(lp)
    shape = dataclasses.replace(lp.shape, num_microbatches=lp.schedule.num_microbatches(gbs))
    metrics = lp.backend.train_step(lp.objs, lp.train_iter, shape)
    if not metrics.get("skipped"):
        # As Megatron-LM: the LR schedule advances only on a successful update (an fp16
        # overflow skips the step); iterations and consumed samples always advance.
        lp.objs.scheduler.step(increment=gbs)
    state.iteration += 1
    state.consumed_samples += gbs
    lp.losses.append(metrics["loss"])
    lp.grad_norms.append(metrics["grad_norm"])
    lp.batch_sizes.append(gbs)
    lp.meter.tick(gbs * run.model.seq_length)
    if lp.schedule.ramps:
        metrics = {**metrics, "global_batch_size": gbs, "consumed_samples": state.consumed_samples}
    last = state.iteration == run.train_iters
    if _due(run.logging.log_interval, state.iteration) or last:
        _log(run, lp.rt, lp.logger, lp.objs, state, metrics, lp.meter)
    if t.eval_iters and _due(t.eval_interval, state.iteration):
        _evaluate(lp)
    if not math.isfinite(metrics["loss"]):
        raise FloatingPointError(f"loss is {metrics['loss']} at iteration {state.iteration}")
    if last:
        return False
    stop = _due(t.exit_interval, state.iteration) or _out_of_time(lp)
    stop = (lp.handler is not None and lp.handler.should_exit(lp.rt.device)) or stop
    due = _due(run.checkpoint.save_interval, state.iteration) or _ramp_step_ends(lp, gbs)
    if stop or due:
        lp.last_path = _save(run, lp.rt, lp.backend, lp.objs, state)
    lp.interrupted = stop
    return not stop


def _out_of_time(lp: _Loop) -> bool:
    """--exit-duration-in-mins: elapsed since the start, the slowest rank deciding (as
    Megatron-LM, so every rank stops at the same iteration)."""
    limit = lp.run.training.exit_duration_in_mins
    if limit is None:
        return False
    elapsed = torch.tensor([(time.monotonic() - lp.started) / 60.0], device=lp.rt.device)
    if lp.rt.world_size > 1:
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    out = bool(elapsed.item() > limit)
    if out and lp.rt.is_logging_rank:
        print(f"exiting: --exit-duration-in-mins={limit} reached at iteration "
              f"{lp.state.iteration}", flush=True)  # fmt: skip
    return out


def _finish(lp: _Loop) -> TrainResult:
    """The final evaluation and save (unless interrupted), then the result."""
    t = lp.run.training
    if not lp.interrupted:
        if t.eval_iters and not _due(t.eval_interval, lp.state.iteration):
            _evaluate(lp)
        if lp.losses:  # a resumed run that trained nothing keeps the checkpoint it loaded
            lp.last_path = _save(lp.run, lp.rt, lp.backend, lp.objs, lp.state) or lp.last_path
    if lp.handler is not None:
        lp.handler.restore()
    lp.logger.close()
    peak_gib, peak_kind = peak_memory_gib(lp.rt.device)
    return TrainResult(
        iterations=lp.state.iteration,
        consumed_samples=lp.state.consumed_samples,
        losses=lp.losses,
        grad_norms=lp.grad_norms,
        final_loss=lp.losses[-1] if lp.losses else None,
        valid_loss=lp.valid_loss,
        tokens_per_s=lp.meter.overall(),
        checkpoint=lp.last_path,
        interrupted=lp.interrupted,
        reporting=lp.rt.is_logging_rank,
        peak_memory_gib=peak_gib,
        peak_memory_kind=peak_kind,
        global_batch_sizes=lp.batch_sizes,
    )


def train(run: RunConfig) -> TrainResult:
    """Run training as configured; returns the losses and throughput."""
    lp = _start(run)
    if lp.state.iteration >= run.train_iters:  # only a resumed run starts there
        lp.last_path = ckpt.iteration_dir(run.checkpoint.load, lp.state.iteration)
        if lp.rt.is_logging_rank:
            print(
                f"--load={run.checkpoint.load}: the checkpoint is at iteration "
                f"{lp.state.iteration}, the run's length is {run.train_iters} iterations: "
                "nothing left to train",
                flush=True,
            )
    while lp.state.iteration < run.train_iters and _step(lp):
        pass
    return _finish(lp)
