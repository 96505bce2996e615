"""Training metrics: a console line per interval and TensorBoard scalars.

Only the last pipeline stage's data-parallel rank 0 of tensor-parallel rank 0 writes (it is the
one that sees the loss); ``MetricsLogger(enabled=False)`` makes every call a no-op elsewhere.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass, field

import torch

from megatron_endprompt.atomic_io import atomic_write
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

            self._writer = SummaryWriter(log_dir=self.tensorboard_dir)

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
            for name, value in scalars.items():
                self._writer.add_scalar(f"train/{name}", value, iteration)
            self._writer.flush()
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
            self._writer.add_scalar("valid/loss", loss, iteration)
            self._writer.add_scalar("valid/ppl", math.exp(min(loss, 50.0)), iteration)
            self._writer.flush()
        print(f"validation at iter {iteration}: loss {loss:.4f} ppl {math.exp(min(loss, 50)):.2f}")

    def close(self) -> None:
        """Flush and close TensorBoard; draw the loss curve PNG."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self.enabled and self.plot_path and self._train:
            plot_loss_curve(self._train, self._valid, self.plot_path)


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
