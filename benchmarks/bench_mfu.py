"""Throughput and MFU of Llama-3-8B-shaped layers: EndPrompt positions vs contiguous ones.

Forward + backward of an ``EndPromptGPTModel`` with a few Llama-3-8B layers (hidden 4096, ffn
14336, 32 heads in 8 query groups, rope base 5e5) and a small vocabulary, at S = 8192, fed
  (a) an EndPrompt layout built with :mod:`megatron_endprompt.positions` (``endprompt_pose``:
      a PoSE context and a terminal segment ending at L - 1, drawn per sample, as in training;
      or ``--layout endprompt``, the fixed layout [0 .. a-1, L-t .. L-1]), against
  (b) contiguous positions 0 .. S-1 (plain pre-training),
with the same weights and tokens, in bf16 and, when Transformer Engine is importable on a GPU of
compute capability >= 8.9, FP8 with delayed scaling and with current (tensorwise) scaling. Arms
alternate per repetition; the median step time of each is reported. Position ids are made before
timing (the data loader makes them in training); the rotary tensor is built inside the timed step.

MFU = tokens/s x :func:`megatron_endprompt.training.logging.model_flops_per_token` / peak, against
the named peak: ``--peak-tflops`` (default 989, H100/H200 SXM dense bf16) for bf16 and
``--fp8-peak-tflops`` (default 1979, dense FP8) for FP8.

    python benchmarks/bench_mfu.py --device cuda           # 2 layers, S = 8192 (one GPU)
    python benchmarks/bench_mfu.py --device cpu --tiny     # seconds, smoke test

Prints ``RESULT <precision>_<arm>_tokens_per_s``, ``RESULT <precision>_<arm>_mfu``,
``RESULT <precision>_endprompt_vs_contiguous_tokens_per_s_ratio`` and, for FP8,
``RESULT <precision>_vs_bf16_endprompt_tokens_per_s_ratio`` (precision: bf16, fp8_delayed,
fp8_tensorwise; arm: contiguous, endprompt).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import sys
import time
import warnings

import numpy as np
import torch

from megatron_endprompt import positions
from megatron_endprompt.config import ModelConfig, ParallelConfig, TrainingConfig
from megatron_endprompt.config.fp8 import check_fp8_shapes
from megatron_endprompt.training.logging import model_flops_per_token

ARMS = ("contiguous", "endprompt")
PRECISIONS = ("fp32", "bf16", "fp8_delayed", "fp8_tensorwise")
LLAMA3_8B_LAYER = dict(
    hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32, num_query_groups=8,
    rotary_base=500000.0, seq_length=8192, target_length=65536,
)  # fmt: skip
TINY = dict(
    num_layers=2, hidden_size=128, ffn_hidden_size=352, num_attention_heads=4, num_query_groups=2,
    rotary_base=10000.0, seq_length=256, target_length=2048, reps=3, warmup=1,
)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Benchmark flags; ``--tiny`` replaces the shape with a 2-layer hidden-128 model."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--tiny", action="store_true", help="tiny shapes and 3 reps (CPU smoke test)")
    p.add_argument("--num-layers", type=int, default=2)
    for name, value in LLAMA3_8B_LAYER.items():
        flag, kind = "--" + name.replace("_", "-"), type(value)
        p.add_argument(flag, type=kind, default=value, help=f"default {value} (Llama-3-8B)")
    p.add_argument("--vocab-size", type=int, default=1024, help="small: the layers are measured")
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--layout", choices=("endprompt_pose", "endprompt"), default="endprompt_pose")
    p.add_argument("--tail-length", type=int, default=None, help="terminal inputs t (S / 16)")
    p.add_argument("--impl", choices=("auto", "local", "te"), default="auto")
    p.add_argument(
        "--precisions",
        default=None,
        help=f"comma list of {', '.join(PRECISIONS)} (default: bf16, plus both FP8 recipes "
        "when TE and a GPU of compute capability >= 8.9 are there)",
    )
    p.add_argument("--fp8-format", choices=("hybrid", "e4m3"), default="hybrid")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200)")
    p.add_argument("--fp8-peak-tflops", type=float, default=1979.0, help="dense FP8 peak")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    if args.tiny:
        for name, value in TINY.items():
            setattr(args, name, value)
    return _resolve(args)


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the auto choices and refuse combinations that cannot run, naming the flag."""
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device=cuda: no CUDA device is available")
    te_ok = args.device == "cuda" and importlib.util.find_spec("transformer_engine") is not None
    if args.impl == "auto":
        args.impl = "te" if te_ok else "local"
    if args.impl == "te" and not te_ok:
        raise ValueError("--impl=te: Transformer Engine needs --device cuda and the te extra")
    if args.precisions is None:
        fp8_ok = args.impl == "te" and torch.cuda.get_device_capability() >= (8, 9)
        args.precisions = "bf16,fp8_delayed,fp8_tensorwise" if fp8_ok else "bf16"
    args.precisions = [s.strip() for s in args.precisions.split(",") if s.strip()]
    for name in args.precisions:
        if name not in PRECISIONS:
            raise ValueError(f"--precisions: {name!r} is not one of {', '.join(PRECISIONS)}")
        if name.startswith("fp8") and args.impl != "te":
            raise ValueError(f"--precisions {name}: FP8 needs --impl te (Transformer Engine)")
    if args.tail_length is None:
        args.tail_length = max(1, args.seq_length // 16)
    if not 1 <= args.tail_length < args.seq_length - 1:
        raise ValueError(f"--tail-length={args.tail_length}: must be in [1, --seq-length - 2]")
    if args.target_length < args.seq_length:
        raise ValueError(f"--target-length={args.target_length}: must be >= --seq-length")
    if args.reps < 1 or args.warmup < 0:
        raise ValueError(f"--reps={args.reps} / --warmup={args.warmup}: need >= 1 / >= 0")
    return args


def model_config(args: argparse.Namespace, params_dtype: str) -> ModelConfig:
    """The benchmarked shape (Llama architecture: RMSNorm, SwiGLU, GQA, no biases)."""
    return ModelConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        seq_length=args.seq_length,
        max_position_embeddings=args.target_length,
        vocab_size=args.vocab_size,
        rotary_base=args.rotary_base,
        transformer_impl=args.impl,
        params_dtype=params_dtype,
    )


def precision_settings(args: argparse.Namespace, name: str) -> tuple[str, dict, float]:
    """(params dtype, TransformerConfig overrides, peak TFLOP/s) of a precision."""
    if name == "fp32":
        return "float32", {}, args.peak_tflops
    if name == "bf16":
        return "bfloat16", {}, args.peak_tflops
    recipe = name.removeprefix("fp8_")
    return "bfloat16", {"fp8": args.fp8_format, "fp8_recipe": recipe}, args.fp8_peak_tflops


def position_batches(args: argparse.Namespace, arm: str, count: int) -> list[torch.Tensor]:
    """``count`` position-id batches [b, S] of one arm, built by the library's layouts."""
    S, t, L, b = args.seq_length, args.tail_length, args.target_length, args.micro_batch_size
    rng = np.random.default_rng(args.seed)

    def row() -> np.ndarray:
        if arm == "contiguous":
            return positions.contiguous_positions(S)
        if args.layout == "endprompt":
            return positions.endprompt_positions(S - t, t, L, placement="fixed")
        return positions.endprompt_pose_positions(S - t, t, L, num_chunks=2, rng=rng)

    batches = [np.stack([row() for _ in range(b)]) for _ in range(count)]
    return [torch.from_numpy(x).to(args.device) for x in batches]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_step(model, tokens_bs, labels_bs, position_ids_bs, device: str) -> float:  # noqa: ANN001
    """Seconds of one forward (rotary tensor, layers, per-token loss) + backward."""
    _sync(device)
    start = time.perf_counter()
    loss_bs = model(tokens_bs, position_ids_bs, labels=labels_bs)
    loss_bs.mean().backward()
    _sync(device)
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return elapsed


def bench_precision(args: argparse.Namespace, name: str) -> dict[str, float]:
    """Median fwd+bwd seconds per arm for one precision (one model, both arms interleaved)."""
    from megatron_endprompt.model.gpt import build_model

    params_dtype, overrides, _ = precision_settings(args, name)
    config = model_config(args, params_dtype)
    if "fp8" in overrides:
        training = TrainingConfig(
            micro_batch_size=args.micro_batch_size,
            train_iters=1,
            fp8_format=overrides["fp8"],
            fp8_recipe=overrides["fp8_recipe"],
        )
        check_fp8_shapes(config, ParallelConfig(), training)
    model = build_model(
        config,
        seed=args.seed,
        use_cpu_initialization=args.device == "cpu",
        # One sample per micro-batch: every layout is batch-shared, so TE's fused RoPE applies to
        # EndPrompt and contiguous alike; several samples with per-sample layouts cannot fuse.
        batch_shared_positions=args.micro_batch_size == 1,
        apply_rope_fusion=args.impl == "te" and args.micro_batch_size == 1,
        **overrides,
    )
    # As Float16Module does in training: every float tensor (norm weights too) in the params dtype.
    dtype = getattr(torch, params_dtype)
    model = model.to(device=args.device, dtype=dtype).train()
    gen = torch.Generator().manual_seed(args.seed)
    shape = (args.micro_batch_size, args.seq_length)
    tokens_bs = torch.randint(0, args.vocab_size, shape, generator=gen).to(args.device)
    labels_bs = torch.roll(tokens_bs, -1, dims=1)
    steps = args.warmup + args.reps
    pos = {arm: position_batches(args, arm, steps) for arm in ARMS}
    times: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for step in range(steps):
        order = ARMS if step % 2 == 0 else tuple(reversed(ARMS))
        for arm in order:
            elapsed = time_step(model, tokens_bs, labels_bs, pos[arm][step], args.device)
            if step >= args.warmup:
                times[arm].append(elapsed)
    del model
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return {arm: statistics.median(values) for arm, values in times.items()}


def flops_per_token(args: argparse.Namespace) -> float:
    """Training FLOPs per token of the benchmarked model (padded vocabulary)."""
    padded = model_config(args, "float32").padded_vocab_size()
    return model_flops_per_token(
        args.num_layers,
        args.hidden_size,
        args.ffn_hidden_size,
        args.seq_length,
        padded,
        args.num_attention_heads,
        args.num_query_groups,
        swiglu=True,
    )


def results(args: argparse.Namespace, medians: dict[str, dict[str, float]]) -> dict[str, float]:
    """Headline figures (tokens/s, MFU, ratios) keyed by their RESULT name."""
    tokens = args.micro_batch_size * args.seq_length
    fpt = flops_per_token(args)
    out: dict[str, float] = {}
    for name, arm_s in medians.items():
        peak = precision_settings(args, name)[2]
        for arm in ARMS:
            tps = tokens / arm_s[arm]
            out[f"{name}_{arm}_tokens_per_s"] = tps
            out[f"{name}_{arm}_mfu"] = tps * fpt / (peak * 1e12)
        out[f"{name}_endprompt_vs_contiguous_tokens_per_s_ratio"] = (
            arm_s["contiguous"] / arm_s["endprompt"]
        )
        if name.startswith("fp8") and "bf16" in medians:
            out[f"{name}_vs_bf16_endprompt_tokens_per_s_ratio"] = (
                medians["bf16"]["endprompt"] / arm_s["endprompt"]
            )
    return out


def main(argv: list[str] | None = None) -> int:
    """Run every precision, print the setup and one RESULT line per figure; 1 if one failed."""
    for notice in (  # megatron-core's import-time notices, as in megatron_endprompt.train
        ".*Transformer Engine and Apex are not installed.*",
        ".*Apex is not installed.*",
        ".*full scope is deprecated.*",
    ):
        warnings.filterwarnings("ignore", message=notice)
    from megatron_endprompt import device as dev

    try:
        args = parse_args(argv)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    dev.init_distributed("nccl" if args.device == "cuda" else "gloo", rank=0, world_size=1)
    dev.initialize_model_parallel(1, 1)
    medians, failed = {}, []
    try:
        for name in args.precisions:
            try:
                medians[name] = bench_precision(args, name)
            except (RuntimeError, ValueError, AssertionError, ImportError) as err:
                print(f"FAILED {name}: {type(err).__name__}: {err}", flush=True)
                failed.append(name)
    finally:
        dev.destroy_distributed()
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(
        f"layers={args.num_layers} hidden={args.hidden_size} ffn={args.ffn_hidden_size} "
        f"heads={args.num_attention_heads}/{args.num_query_groups} S={args.seq_length} "
        f"L={args.target_length} b={args.micro_batch_size} layout={args.layout} "
        f"t={args.tail_length} impl={args.impl} device={gpu} reps={args.reps}"
    )
    print(
        f"MFU against {args.peak_tflops:g} TFLOP/s (bf16/fp32, dense) and "
        f"{args.fp8_peak_tflops:g} TFLOP/s (FP8, dense); {flops_per_token(args):.4g} FLOPs/token"
    )
    for name, arm_s in medians.items():
        print(
            f"{name}: fwd+bwd median contiguous {arm_s['contiguous'] * 1e3:.2f} ms, "
            f"endprompt {arm_s['endprompt'] * 1e3:.2f} ms"
        )
    for key, value in results(args, medians).items():
        print(f"RESULT {key} {value:.6g}" if math.isfinite(value) else f"RESULT {key} nan")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
