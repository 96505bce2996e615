"""The CUDA path: megatron-core DDP, optimizer and pipeline schedules (PP, virtual PP).

Mirrors Megatron-LM's ``training.py`` setup: one model chunk per virtual stage,
``Float16Module`` for bf16, megatron ``DistributedDataParallel`` with fp32 gradient buffers,
``get_megatron_optimizer`` (distributed optimizer optional), and ``get_forward_backward_func``
running the micro-batches. The loss is the same global weighted mean as on CPU: the schedule
(legacy 2-tuple loss) multiplies by CP and divides by the number of micro-batches, and megatron
DDP averages over DP x CP, so each micro-batch returns ``sum(w * CE) * DP * num_microbatches / W``.

This path needs CUDA; it is exercised by tests/gpu when a GPU is present.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import torch
from megatron.core import parallel_state as ps
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module

from megatron_endprompt.device import all_reduce, move_to_device
from megatron_endprompt.model.gpt import build_model
from megatron_endprompt.training.loss import (
    global_weight_sum,
    masked_loss_sum,
    microbatch_objective,
)
from megatron_endprompt.training.runtime import Runtime
from megatron_endprompt.training.step import (
    Progress,
    StepShape,
    fetch_microbatches,
    weighted_mean,
)


def batch_shared_layout(run) -> bool:
    """True when, by construction of the run's data, every micro-batch has ONE position layout.

    A fact of the flags, true for every micro-batch (so the decision is made once per run): one
    sample per micro-batch; contiguous positions; EndPrompt with a fixed placement and a tail
    terminal (a = S - t for every sample). Not in cue mode (the cue, and so the context length,
    is drawn per sample), nor with random placement or PoSE (drawn per sample).
    """
    e = run.endprompt
    if run.training.micro_batch_size == 1 or e.position_mode == "contiguous":
        return True
    return e.position_mode == "endprompt" and e.placement == "fixed" and e.terminal == "tail"


def transformer_overrides(run) -> dict:
    """TransformerConfig fields that come from training flags (recompute, FP8, RoPE fusion, p2p)."""
    t = run.training
    out: dict = {}
    if t.recompute_granularity is not None:
        out["recompute_granularity"] = t.recompute_granularity
        if t.recompute_granularity == "full":
            out["recompute_method"] = t.recompute_method
            out["recompute_num_layers"] = t.recompute_num_layers
    if t.fp8_format is not None:
        out["fp8"] = t.fp8_format
        out["fp8_recipe"] = t.fp8_recipe
        out["fp8_amax_history_len"] = t.fp8_amax_history_len
        out["fp8_amax_compute_algo"] = t.fp8_amax_compute_algo
    # TE's fused RoPE takes one [s, 1, 1, d] table: only when every micro-batch shares one layout.
    out["apply_rope_fusion"] = run.model.transformer_impl == "te" and batch_shared_layout(run)
    if (run.parallel.virtual_pipeline_model_parallel_size or 1) > 1:
        # Megatron-LM's interleaved-schedule default (--overlap-p2p-communication on, so no
        # batched p2p). megatron-core's own default (batch_p2p_comm=True) posts the send/recv
        # pairs of one step in a fixed order; at PP=2 the previous and the next rank are the same
        # peer and same-shaped activations and gradients are matched swapped.
        out["overlap_p2p_comm"] = True
        out["batch_p2p_comm"] = False
    return out


def build_model_chunks(run, rt: Runtime) -> list[torch.nn.Module]:
    """This rank's model chunks, on ``rt.device``: one per virtual pipeline stage (one without VPP).

    Every chunk is moved to the device before any wrapping, as Megatron-LM's ``get_model`` does:
    megatron-core builds its parallel linear layers on the GPU, but the local spec's torch norms
    are created on the CPU (megatron DDP copies parameters into its GPU buffer only with the
    distributed optimizer).

    Seeded once, before the first chunk, with ``seed + 100 * pp_rank`` (Megatron-LM's
    ``_set_random_seed``): re-seeding per chunk, or the same seed on every stage, would give
    every virtual/pipeline stage the same initial layer weights.
    """
    vpp = run.parallel.virtual_pipeline_model_parallel_size or 1
    overrides = transformer_overrides(run)
    shared = batch_shared_layout(run)
    pp_rank = ps.get_pipeline_model_parallel_rank() if ps.model_parallel_is_initialized() else 0
    seed = run.training.seed + 100 * pp_rank
    return [
        move_to_device(
            build_model(
                run.model,
                run.parallel,
                vp_stage=i if vpp > 1 else None,
                seed=seed if i == 0 else None,
                batch_shared_positions=shared,
                **overrides,
            ),
            rt.device,
        )
        for i in range(vpp)
    ]


def build_megatron_training(run, rt: Runtime, model_chunks: list[torch.nn.Module]):
    """Wrap model chunks in Float16Module/DDP, build the megatron optimizer; returns both."""
    t, p = run.training, run.parallel
    config = model_chunks[0].config
    # Mixed precision follows the parameters' dtype (--bf16 or --params-dtype), as Megatron-LM's
    # --bf16/--fp16 do: Float16Module plus fp32 main params in the optimizer (fp16 adds dynamic
    # loss scaling). fp32 parameters get neither.
    if config.bf16 or config.fp16:
        model_chunks = [Float16Module(config, m) for m in model_chunks]
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=not p.grad_reduce_in_bf16,
        overlap_grad_reduce=p.overlap_grad_reduce,
        overlap_param_gather=p.overlap_param_gather,
        use_distributed_optimizer=p.use_distributed_optimizer,
        # fp16 starts its dynamic loss scale at 2**32: early steps overflow by design and the
        # optimizer skips them; DDP's NaN/Inf check would raise instead. bf16/fp32 keep it.
        check_for_nan_in_grad=not config.fp16,
    )
    wrapped = [
        DistributedDataParallel(
            config=config, ddp_config=ddp_config, module=m, disable_bucketing=i > 0
        )
        for i, m in enumerate(model_chunks)
    ]
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=t.lr,
        min_lr=t.min_lr,
        decoupled_lr=t.decoupled_lr,
        decoupled_min_lr=t.decoupled_min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.clip_grad,
        bf16=config.bf16,
        fp16=config.fp16,
        params_dtype=config.params_dtype,
        use_distributed_optimizer=p.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, wrapped)
    config.no_sync_func = [m.no_sync for m in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
    if p.overlap_grad_reduce:  # the schedules start each chunk's reduction (as Megatron-LM)
        grad_sync = [m.start_grad_sync for m in wrapped]
        config.grad_sync_func = grad_sync if len(grad_sync) > 1 else grad_sync[0]
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    return wrapped, optimizer


def _forward_step(batches_iter: Iterator, model, loss_fn):
    batch = next(batches_iter)
    output = model(batch["tokens"], batch["position_ids"], labels=batch["labels"])
    return output, partial(loss_fn, batch["loss_mask"])


def train_step_megatron(
    model: list[torch.nn.Module],
    optimizer,
    data_iterator: Iterator | None,
    shape: StepShape,
    rt: Runtime,
) -> dict[str, float]:
    """One iteration through megatron-core's schedule; returns loss and grad norm."""
    batches = fetch_microbatches(data_iterator, shape, rt)
    w_total = global_weight_sum([b["loss_mask"] for b in batches], rt.dp_cp_group)
    grad_scale = float(rt.dp_size * shape.num_microbatches)

    def loss_fn(loss_mask, per_token_loss):
        objective, wsum = microbatch_objective(per_token_loss, loss_mask, w_total, grad_scale)
        return objective, {"weighted_sum": wsum}

    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    # Every virtual stage consumes every micro-batch once: one iterator per chunk.
    iterators = [iter(batches) for _ in model]
    outputs = get_forward_backward_func()(
        forward_step_func=lambda it, m: _forward_step(it, m, loss_fn),
        data_iterator=iterators if len(model) > 1 else iterators[0],
        model=model if len(model) > 1 else model[0],
        num_microbatches=shape.num_microbatches,
        seq_length=shape.seq_length,
        micro_batch_size=shape.micro_batch_size,
        forward_only=False,
    )
    ok, norm, _ = optimizer.step()
    weighted = torch.zeros((), dtype=torch.float64, device=rt.device)
    for out in outputs or []:
        weighted += out["weighted_sum"].double()
    if rt.is_last_stage:  # only the last stage holds losses (and its DP x CP peers too)
        all_reduce(weighted, rt.dp_cp_group)
    loss = weighted_mean(weighted, w_total, empty=0.0)
    return {
        "loss": loss,
        # A skipped (fp16 overflow) step has no norm; megatron returns None.
        "grad_norm": float(norm) if norm is not None else float("nan"),
        "skipped": float(not ok),
        "loss_scale": float(optimizer.get_loss_scale()),
    }


@torch.no_grad()
def evaluate_megatron(
    model: list[torch.nn.Module],
    data_iterator: Iterator | None,
    shape: StepShape,
    rt: Runtime,
    eval_iters: int,
    progress: Progress = None,
) -> float:
    """Global weighted mean validation loss through the schedule (forward only);
    ``progress(done)`` after each iteration."""
    for chunk in model:
        chunk.eval()
    weighted = torch.zeros((), dtype=torch.float64, device=rt.device)
    total = torch.zeros((), dtype=torch.float64, device=rt.device)
    for done in range(1, eval_iters + 1):
        batches = fetch_microbatches(data_iterator, shape, rt)
        total += sum(b["loss_mask"].double().sum() for b in batches)

        def loss_fn(loss_mask, per_token_loss):
            wsum, _ = masked_loss_sum(per_token_loss, loss_mask)
            # The schedule rescales the returned loss in place: report a copy.
            return wsum, {"weighted_sum": wsum.detach().clone()}

        outputs = get_forward_backward_func()(
            forward_step_func=lambda it, m: _forward_step(it, m, loss_fn),
            data_iterator=[iter(batches) for _ in model] if len(model) > 1 else iter(batches),
            model=model if len(model) > 1 else model[0],
            num_microbatches=shape.num_microbatches,
            seq_length=shape.seq_length,
            micro_batch_size=shape.micro_batch_size,
            forward_only=True,
        )
        for out in outputs or []:
            weighted += out["weighted_sum"].double()
        if progress is not None:
            progress(done)
    all_reduce(weighted, rt.dp_cp_group)
    all_reduce(total, rt.dp_cp_group)
    for chunk in model:
        chunk.train()
    return weighted_mean(weighted, total, empty=float("nan"))
