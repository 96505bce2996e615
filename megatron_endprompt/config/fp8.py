"""FP8 preflight: the Transformer Engine shape rules a run must meet, checked before any compute.

A shape TE cannot quantize fails at the first GEMM of the first iteration, after the model was
built and the data loaded; here it fails at parse time, naming the flags.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from megatron_endprompt.config.model import ModelConfig, ParallelConfig

if TYPE_CHECKING:
    from megatron_endprompt.config.training import TrainingConfig


def check_fp8_shapes(
    model: ModelConfig,
    parallel: ParallelConfig,
    training: TrainingConfig,
    compute_capability: tuple[int, int] | None = None,
) -> None:
    """Check that every GEMM of a GPT layer can run in Transformer Engine FP8 on each rank.

    TE quantizes a GEMM input only when the product of its leading dimensions (the tokens) is
    divisible by 8 and its last dimension by 16 (32 and 32 for MXFP8, as megatron-core's
    ``get_fp8_align_size``). Per rank the tokens are seq / CP x micro-batch; with sequence
    parallelism the row-parallel outputs are reduce-scattered, so seq / CP / TP x micro-batch is
    checked too. Widths: hidden (QKV and fc1 input), QKV output and attention-projection input
    per TP rank, and ffn / TP (fc2 input; fc1's output 2 x ffn / TP follows). The vocabulary
    projection is megatron's own linear layer, not a TE one, so it is not constrained.

    Args:
        model: Model shape.
        parallel: Parallel layout (TP, CP, sequence parallelism).
        training: Micro-batch size and FP8 format / recipe (nothing is checked without FP8).
        compute_capability: (major, minor) of the GPU; None queries the current CUDA device, and
            skips the MXFP8 check where there is none.

    Raises:
        ValueError: Naming the flags and the offending number.
    """
    if training.fp8_format is None:
        return
    model.validate_against(parallel)  # every division below is then exact
    head = f"--fp8-format {training.fp8_format}"
    mx = training.fp8_recipe == "mxfp8"
    why = "(Transformer Engine MXFP8)" if mx else "(Transformer Engine FP8)"
    token_align, width_align = (32, 32) if mx else (8, 16)
    if mx:
        _check_blackwell(head, compute_capability)
    mbs = training.micro_batch_size
    for what, per_sample in _fp8_tokens_per_sample(model, parallel):
        if (per_sample * mbs) % token_align:
            raise ValueError(
                f"{head}: {what} x --micro-batch-size {mbs} = {per_sample * mbs} tokens per "
                f"GEMM, must be divisible by {token_align} {why}"
            )
    for what, width in _fp8_widths(model, parallel.tensor_model_parallel_size):
        if width % width_align:
            raise ValueError(f"{head}: {what} = {width}, must be divisible by {width_align} {why}")


def _fp8_tokens_per_sample(model: ModelConfig, parallel: ParallelConfig) -> list[tuple[str, int]]:
    """(how it is computed, value) of each per-rank token count a GEMM sees, per sample."""
    tp, cp = parallel.tensor_model_parallel_size, parallel.context_parallel_size
    seq = model.seq_length
    counts = [(f"--seq-length {seq} / --context-parallel-size {cp}", seq // cp)]
    if parallel.sequence_parallel:
        what = (
            f"--seq-length {seq} / --context-parallel-size {cp} / "
            f"--tensor-model-parallel-size {tp} (--sequence-parallel)"
        )
        counts.append((what, seq // cp // tp))
    return counts


def _fp8_widths(model: ModelConfig, tp: int) -> list[tuple[str, int]]:
    """(how it is computed, value) of each GEMM's last dimension on one TP rank."""
    heads, groups, kv = model.num_attention_heads, model.num_query_groups, model.kv_channels
    per_tp = f" / --tensor-model-parallel-size {tp}"
    return [
        (f"--hidden-size {model.hidden_size}", model.hidden_size),
        (
            f"QKV width (--num-attention-heads {heads} + 2 x --num-query-groups {groups}) x "
            f"--kv-channels {kv}{per_tp}",
            (heads + 2 * groups) * kv // tp,
        ),
        (
            f"attention output width --num-attention-heads {heads} x --kv-channels {kv}{per_tp}",
            heads * kv // tp,
        ),
        (f"--ffn-hidden-size {model.ffn_hidden_size}{per_tp}", model.ffn_hidden_size // tp),
    ]


def _check_blackwell(head: str, compute_capability: tuple[int, int] | None) -> None:
    """MXFP8 GEMMs exist only on compute capability >= 10.0 (Blackwell)."""
    if compute_capability is None:
        import torch  # lazily: the config layer needs no torch otherwise

        if not torch.cuda.is_available():
            return  # cannot know here; TE refuses it at the first GEMM
        compute_capability = torch.cuda.get_device_capability()
    if tuple(compute_capability) < (10, 0):
        major, minor = compute_capability
        raise ValueError(
            f"{head} --fp8-recipe mxfp8: needs a Blackwell GPU (compute capability >= 10.0), "
            f"this device has {major}.{minor}; use --fp8-recipe delayed or tensorwise"
        )
