"""Cost of position-aware RoPE inside one transformer layer, measured side by side in one run.

Forward + backward time of one megatron-core ``TransformerLayer`` (the project's local spec:
megatron modules with torch SDPA core attention; ``--impl te`` for Transformer Engine on GPU) when
its rotary tensor comes from
  (a) ``PositionRotaryEmbedding`` on an EndPrompt layout [0 .. a-1, L-t .. L-1], rebuilt every
      step (position ids change per batch), against
  (b) megatron-core's own ``RotaryEmbedding`` on contiguous positions 0 .. S-1.
Both arms use the same layer, weights and inputs; only the rotary tensor differs. Repetitions are
interleaved (alternating order) and the median of each arm is reported.

megatron-core's ``RotaryEmbedding.forward`` is ``lru_cache``d and its ``get_emb`` moves
``inv_freq`` to ``torch.cuda.current_device()``, which fails without CUDA. On CUDA arm (b) calls
``forward`` itself. On CPU it calls ``get_freqs_non_repeated`` (CPU-safe, built with
``use_cpu_initialization=True``) and applies get_emb's non-interleaved layout
``cat(freqs, freqs)[:, None, None, :]``, wrapped in ``functools.lru_cache`` like ``forward``, so
its per-step cost is what megatron-core pays. The construction-only ratio compares against the
uncached construction instead (a cache hit costs nothing to compare with).

    python benchmarks/bench_rope.py                  # S = 8192 on CPU
    python benchmarks/bench_rope.py --quick          # S = 1024, a few seconds
    python benchmarks/bench_rope.py --device cuda --impl te

Prints ``RESULT rope_fwd_bwd_time_ratio <ours / megatron>`` (target <= 1.05) and
``RESULT rope_build_time_ratio <ours / megatron uncached>``.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_endprompt.device import (
    destroy_distributed,
    init_distributed,
    initialize_model_parallel,
    model_parallel_seed,
)
from megatron_endprompt.model.rotary import PositionRotaryEmbedding
from megatron_endprompt.model.specs import get_layer_spec


def init_parallel(device: str) -> None:
    """World-size-1 process group and megatron model parallel state (TP = PP = 1)."""
    init_distributed("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
    initialize_model_parallel(1, 1)
    model_parallel_seed(1234)  # also megatron's CUDA RNG tracker when on CUDA


def build_layer(args: argparse.Namespace) -> torch.nn.Module:
    """One TransformerLayer, float32 on CPU or bfloat16 on CUDA, dropout off."""
    cuda = args.device == "cuda"
    config = TransformerConfig(
        num_layers=1,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_heads,
        ffn_hidden_size=4 * args.hidden_size,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=not cuda,
        params_dtype=torch.bfloat16 if cuda else torch.float32,
        bf16=cuda,
    )
    torch.manual_seed(1234)
    spec = get_layer_spec(args.impl)
    layer = build_module(spec, config=config, layer_number=1)
    return layer.to(args.device)


def megatron_rope_fn(kv_channels: int, seq_length: int, device: str) -> tuple[Callable, Callable]:
    """(per-step, uncached) builders of megatron-core's rotary tensor for positions 0 .. S-1."""
    if device == "cuda":
        rope = RotaryEmbedding(kv_channels, 1.0)
        return (lambda: rope(seq_length)), (lambda: rope.get_emb(seq_length))
    rope = RotaryEmbedding(kv_channels, 1.0, use_cpu_initialization=True)

    def build() -> torch.Tensor:
        # RotaryEmbedding.get_emb without its move to CUDA (non-interleaved layout).
        freqs = rope.get_freqs_non_repeated(seq_length)
        return torch.cat((freqs, freqs), dim=-1)[:, None, None, :]

    return functools.lru_cache(maxsize=1)(build), build


def endprompt_position_ids(args: argparse.Namespace) -> torch.Tensor:
    """[1, S] EndPrompt layout: S - t context positions, then t terminal ones ending at L - 1."""
    s, t, target = args.seq_length, args.seq_length // 8, args.target_length
    ids = torch.cat([torch.arange(s - t), torch.arange(target - t, target)])
    return ids[None].to(args.device)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_step(layer, x_sbh, grad_sbh, make_rope: Callable, device: str) -> float:
    """Seconds for rotary construction + forward + backward of the layer."""
    _sync(device)
    start = time.perf_counter()
    emb = make_rope()
    out, _ = layer(x_sbh, attention_mask=None, rotary_pos_emb=emb)
    out.backward(grad_sbh)
    _sync(device)
    elapsed = time.perf_counter() - start
    layer.zero_grad(set_to_none=True)
    x_sbh.grad = None
    return elapsed


def time_build(make_rope: Callable, device: str, calls: int = 20) -> float:
    """Median seconds of one rotary-tensor construction."""
    times = []
    for _ in range(calls):
        _sync(device)
        start = time.perf_counter()
        make_rope()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(args: argparse.Namespace) -> dict[str, float]:
    """Measure both arms; return medians and ratios."""
    layer = build_layer(args)
    dtype = next(layer.parameters()).dtype
    gen = torch.Generator().manual_seed(0)
    shape = (args.seq_length, args.batch_size, args.hidden_size)
    x_sbh = torch.randn(shape, generator=gen).to(args.device, dtype).requires_grad_()
    grad_sbh = torch.randn(shape, generator=gen).to(args.device, dtype)

    kv_channels = args.hidden_size // args.num_heads
    ours = PositionRotaryEmbedding(kv_channels).to(args.device)
    pos_bs = endprompt_position_ids(args).expand(args.batch_size, -1)
    arms = {"ours": lambda: ours(pos_bs)}
    arms["megatron"], megatron_uncached = megatron_rope_fn(
        kv_channels, args.seq_length, args.device
    )

    for make_rope in arms.values():  # warm-up (allocator, kernels, lru_cache fill)
        time_step(layer, x_sbh, grad_sbh, make_rope, args.device)
    times: dict[str, list[float]] = {name: [] for name in arms}
    for rep in range(args.reps):
        order = list(arms) if rep % 2 == 0 else list(reversed(arms))
        for name in order:
            times[name].append(time_step(layer, x_sbh, grad_sbh, arms[name], args.device))
    ours_s, megatron_s = statistics.median(times["ours"]), statistics.median(times["megatron"])
    build_ours = time_build(arms["ours"], args.device)
    build_megatron = time_build(megatron_uncached, args.device)
    return {
        "ours_s": ours_s,
        "megatron_s": megatron_s,
        "fwd_bwd_ratio": ours_s / megatron_s,
        "build_ours_s": build_ours,
        "build_megatron_s": build_megatron,
        "build_ratio": build_ours / build_megatron,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-length", type=int, default=8192)
    parser.add_argument("--target-length", type=int, default=65536, help="EndPrompt window L")
    parser.add_argument("--quick", action="store_true", help="S = 1024, 3 repetitions")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--impl", choices=("local", "te"), default="local")
    args = parser.parse_args(argv)
    if args.quick:
        args.seq_length, args.reps = 1024, 3
    if args.target_length < args.seq_length:
        raise ValueError(f"--target-length={args.target_length}: must be >= --seq-length")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device=cuda: no CUDA device is available")
    if args.impl == "te" and args.device != "cuda":
        raise ValueError("--impl=te: Transformer Engine needs --device cuda")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    init_parallel(args.device)
    try:
        res = run(args)
    finally:
        destroy_distributed()
    print(
        f"S={args.seq_length} hidden={args.hidden_size} heads={args.num_heads} "
        f"batch={args.batch_size} device={args.device} impl={args.impl} reps={args.reps}"
    )
    print(
        f"fwd+bwd median: ours {res['ours_s'] * 1e3:.1f} ms, "
        f"megatron {res['megatron_s'] * 1e3:.1f} ms"
    )
    print(
        f"rotary build median: ours {res['build_ours_s'] * 1e6:.0f} us, "
        f"megatron (uncached) {res['build_megatron_s'] * 1e6:.0f} us"
    )
    print(f"RESULT rope_fwd_bwd_time_ratio {res['fwd_bwd_ratio']:.4f}")
    print(f"RESULT rope_build_time_ratio {res['build_ratio']:.4f}")


if __name__ == "__main__":
    main()
