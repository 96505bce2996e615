"""Training metrics: a console line per interval and TensorBoard scalars.

Only the last pipeline stage's data-parallel rank 0 of tensor-parallel rank 0 writes (it is the
one that sees the loss); ``MetricsLogger(enabled=False)`` makes every call a no-op elsewhere.

Logs never stop a run: when the system refuses a TensorBoard or loss-curve write (a full disk, a
quota), one ``warning:`` line names the path and the errno, that output stops, and training goes
on (its next checkpoint save reports a full disk as an error of its own).
"""

from __future__ import annotations

import contextlib
import math
import resource
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from megatron_endprompt.atomic_io import WriteError, atomic_write, writing
from megatron_endprompt.cli_utils import format_duration
from megatron_endprompt.device import peak_allocated_gib


def model_flops_per_token(
    num_layers: int,
    hidden_size: int,
    ffn_hidden_size: int,
    seq_length: int,
    vocab_size: int,
    num_attention_heads: int,
    num_query_groups: int,
    swiglu: bool,
) -> float:
    """Training FLOPs per token (forward + backward = 3x forward) of a decoder-only transformer.

    Counts the matmuls: QKV and output projections (with GQA), the causal attention score and
    value products (half of the S x S square), the MLP (three matrices with SwiGLU) and the
    output layer.
    """
    kv_ratio = num_query_groups / num_attention_heads
    attn_proj = 2 * hidden_size * hidden_size * (2 + 2 * kv_ratio)
    attn_core = 2 * 2 * hidden_size * seq_length / 2  # causal: half the scores are computed
    mlp = 2 * hidden_size * ffn_hidden_size * (3 if swiglu else 2)
    forward = num_layers * (attn_proj + attn_core + mlp) + 2 * hidden_size * vocab_size
    return 3.0 * forward


@dataclass
class MetricsLogger:
    """Console + TensorBoard logger for the training loop."""

    tensorboard_dir: str | None
    total_iters: int
    enabled: bool = True
    start_iter: int = 0
    """Iteration the run (re)started from: ETA counts only iterations done by this process."""
    plot_path: str | None = None
    """Where :meth:`close` draws the loss curve (PNG); None draws nothing."""
    _train: list[tuple[int, float]] = field(default_factory=list, init=False, repr=False)
    _valid: list[tuple[int, float]] = field(default_factory=list, init=False, repr=False)
    _writer: object = field(default=None, init=False, repr=False)
    _t_start: float = field(default_factory=time.perf_counter, init=False)

    def __post_init__(self) -> None:
        if self.enabled and self.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            _quiet_tensorboard_thread()
            self._tensorboard(lambda: setattr(self, "_writer", SummaryWriter(self.tensorboard_dir)))

    def _tensorboard(self, write: Callable[[], object]) -> None:
        """Run a TensorBoard write; a refused one stops TensorBoard with one warning line."""
        try:
            with writing(self.tensorboard_dir):
                write()
        except WriteError as err:
            print(f"warning: TensorBoard logging stopped, training goes on: {err}", flush=True)
            writer, self._writer = self._writer, None
            if writer is not None:
                with contextlib.suppress(Exception):  # its queue cannot be written either
                    writer.close()

    def log(self, iteration: int, scalars: dict[str, float], interval_s: float) -> str | None:
        """Write ``scalars`` at ``iteration`` and print one console line.

        Args:
            iteration: completed iterations.
            scalars: e.g. ``loss``, ``lr``, ``grad_norm``, ``tokens_per_s``, ``tflops``.
            interval_s: wall time of the interval the scalars summarise.

        Returns:
            The console line (None when disabled).
        """
        if not self.enabled:
            return None
        if "loss" in scalars:
            self._train.append((iteration, float(scalars["loss"])))
        if self._writer is not None:

            def write() -> None:
                for name, value in scalars.items():
                    self._writer.add_scalar(f"train/{name}", value, iteration)
                self._writer.flush()

            self._tensorboard(write)
        elapsed = time.perf_counter() - self._t_start
        done = max(iteration - self.start_iter, 1)
        eta = elapsed / done * (self.total_iters - iteration)
        parts = [f"iter {iteration:>6d}/{self.total_iters}"]
        for name, value in scalars.items():
            parts.append(f"{name} {value:.6g}" if abs(value) < 1e5 else f"{name} {value:.3e}")
        parts.append(f"interval {interval_s:.2f}s")
        parts.append(f"elapsed {format_duration(elapsed)} eta {format_duration(eta)}")
        line = " | ".join(parts)
        print(line, flush=True)
        return line

    def log_eval(self, iteration: int, loss: float) -> None:
        """Validation loss (and perplexity) at ``iteration``."""
        if not self.enabled:
            return
        self._valid.append((iteration, float(loss)))
        if self._writer is not None:

            def write() -> None:
                self._writer.add_scalar("valid/loss", loss, iteration)
                self._writer.add_scalar("valid/ppl", math.exp(min(loss, 50.0)), iteration)
                self._writer.flush()

            self._tensorboard(write)
        print(f"validation at iter {iteration}: loss {loss:.4f} ppl {math.exp(min(loss, 50)):.2f}")

    def eval_progress(self, total: int, min_interval_s: float = 10.0) -> Callable[[int], None]:
        """A ``progress(done)`` callback for a validation pass of ``total`` iterations.

        It prints ``validation: DONE/TOTAL iterations, elapsed .. eta ..`` at each tenth of the
        pass that comes at least ``min_interval_s`` after the previous line, so a long pass (a
        large --eval-iters, a big model) shows it is alive and a short one prints nothing.
        """
        start = last = time.perf_counter()
        step = max(1, math.ceil(total / 10))

        def progress(done: int) -> None:
            nonlocal last
            now = time.perf_counter()
            if not self.enabled or done % step and done != total or now - last < min_interval_s:
                return
            last, elapsed = now, now - start
            eta = elapsed / done * (total - done)
            print(f"validation: {done}/{total} iterations, elapsed {format_duration(elapsed)} "
                  f"eta {format_duration(eta)}", flush=True)  # fmt: skip

        return progress

    def close(self) -> None:
        """Flush and close TensorBoard; draw the loss curve PNG."""
        if self._writer is not None:
            self._tensorboard(self._writer.close)
            self._writer = None
        if self.enabled and self.plot_path and self._train:
            try:
                plot_loss_curve(self._train, self._valid, self.plot_path)
            except WriteError as err:
                print(f"warning: loss curve not written: {err}", flush=True)


def _quiet_tensorboard_thread() -> None:
    """TensorBoard's writer thread prints a traceback when a write fails, then hands the error
    to the next ``add_scalar``, where :meth:`MetricsLogger._tensorboard` reports it in one line:
    keep only that line (other threads' errors still reach the previous hook)."""
    previous = threading.excepthook
    if getattr(previous, "_quiets_tensorboard", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        thread = type(args.thread).__name__ if args.thread is not None else ""
        if not (thread == "_AsyncWriterThread" and issubclass(args.exc_type, OSError)):
            previous(args)

    hook._quiets_tensorboard = True  # type: ignore[attr-defined]
    threading.excepthook = hook


def plot_loss_curve(
    train: list[tuple[int, float]], valid: list[tuple[int, float]], path: str
) -> str:
    """Training loss per logged iteration (and validation points) as a PNG, written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 3.6))
    ax = fig.add_subplot()
    ax.plot(*zip(*train), label="train (logged iterations)")
    if valid:
        ax.plot(*zip(*valid), "o-", label="validation")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (weighted mean)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return atomic_write(path, FigureCanvasAgg(fig).print_png)


def peak_memory_gib(device: torch.device) -> tuple[float, str]:
    """``(GiB, what was measured)``: the allocator's peak on CUDA, else the process's peak RSS.

    CPU torch keeps no allocation statistics; the peak resident set size (``ru_maxrss``, KiB on
    Linux) includes the interpreter and imported libraries, so compare it only between runs of
    the same program.
    """
    if device.type == "cuda":
        return peak_allocated_gib(device), "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process_peak_rss"


def memory_stats(device: torch.device) -> dict[str, float]:
    """Peak allocated GPU memory in GiB (empty on CPU, where torch does not track it)."""
    if device.type != "cuda":
        return {}
    return {"mem_peak_gib": peak_memory_gib(device)[0]}
