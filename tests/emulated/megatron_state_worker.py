"""Ranks of emulated ``--device cuda`` launches that also inspect and re-save loaded state.

    python -m torch.distributed.run --nproc-per-node N tests/emulated/megatron_state_worker.py P

``P`` (JSON) lists actions run in order by the same processes, each ``{"name", "out", "flags",
"action"}``:

* ``"train"``: a run of ``emulated_train.py`` (``training.loop.train``, ``--device cuda``);
* ``"dump"``: build the megatron-core objects of ``flags`` (which name ``--load``), load the
  checkpoint with the CUDA path's loader (megatron-core ``dist_checkpointing``), and write what
  megatron-core then holds to ``out/state.pt``: per parameter (by name) the fp32 master weight
  and Adam's ``exp_avg`` / ``exp_avg_sq``, the step, the param groups, the scheduler, the
  progress and the host RNG states. One rank (DP = 1): the reference the CPU path's reading of
  the same checkpoint is compared with;
* ``"megatron_lm_save"``: load the same way, then save the loaded state to ``save`` exactly as
  Megatron-LM core_v0.16.1's ``save_checkpoint`` does for ``--ckpt-format torch_dist``
  (:func:`megatron_lm_state_dict`), tracker included;
* ``"megatron_lm_legacy_save"``: the same for ``--ckpt-format torch`` (its legacy branch:
  ``iter_N/mp_rank_TT[_PPP]/model_optim_rng.pt`` from DP rank 0, ``distrib_optim.pt`` through
  ``save_parameter_state`` on every rank; :func:`megatron_lm_legacy_save`).

Test-only: megatron-core's private optimizer accessors are fine here, never in the library.
"""

from __future__ import annotations

import argparse
import os
import random
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cuda_emulation import cuda_emulation, read_plan  # noqa: E402
from emulated_train import _run_one  # noqa: E402

CHECKPOINT_VERSION = 3.0  # megatron/training/checkpointing.py: generate_state_dict


def _build_and_load(flags: list[str]):
    """(run, runtime, objects, state) of ``flags`` with --load's checkpoint loaded (CUDA path)."""
    from megatron_endprompt.cli import parse_run_config
    from megatron_endprompt.training.backend import make_backend
    from megatron_endprompt.training.runtime import seed_everything, setup_runtime
    from megatron_endprompt.training.step import StepShape

    world = int(os.environ.get("WORLD_SIZE", "1"))
    run = parse_run_config(["--device", "cuda", *flags], world_size=world, cuda_available=True)
    p, t = run.parallel, run.training
    rt = setup_runtime(run.device, p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                       p.virtual_pipeline_model_parallel_size, p.context_parallel_size)  # fmt: skip
    seed_everything(t.seed)
    backend = make_backend(run, rt, StepShape(t.micro_batch_size, run.model.seq_length, 1))
    objs = backend.build()
    return run, rt, objs, backend.load(objs)


def _param_states(objs) -> tuple[dict, float]:  # noqa: ANN001
    """name -> {main, exp_avg, exp_avg_sq} from megatron-core's optimizer (DP = 1), and the step."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    (opt,) = getattr(objs.optimizer, "chained_optimizers", [objs.optimizer])
    masters = {}
    if isinstance(opt, Float16OptimizerWithFloat16Params):
        for model_group, main_group in zip(opt.float16_groups, opt.fp32_from_float16_groups):
            masters.update({id(p): m for p, m in zip(model_group, main_group)})
    out = {}
    for chunk in objs.module:
        for name, param in chunk.named_parameters():
            if isinstance(opt, DistributedOptimizer):
                entry = opt._get_main_param_and_optimizer_states(param)  # noqa: SLF001
                main = entry["param"]
            else:
                main = masters.get(id(param), param)
                entry = opt.optimizer.state[main]
            tensors = {"main": main, "exp_avg": entry["exp_avg"], "exp_avg_sq": entry["exp_avg_sq"]}
            out[name] = {k: v.detach().float().reshape(param.shape).clone()
                         for k, v in tensors.items()}  # fmt: skip
    steps = {float(entry["step"]) for entry in opt.optimizer.state.values()}
    (step,) = steps
    return out, step


def _dump(spec: dict) -> None:
    import torch

    run, _, objs, state = _build_and_load(spec["flags"])
    params, step = _param_states(objs)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in objs.optimizer.param_groups]
    os.makedirs(spec["out"], exist_ok=True)
    torch.save({
        "params": params, "step": step, "groups": groups,
        "scheduler": objs.scheduler.state_dict(),
        "progress": [state.iteration, state.consumed_samples, state.valid_consumed_samples],
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                "torch_cpu": torch.get_rng_state()},
        "model_config": run.model.to_dict(),
    }, os.path.join(spec["out"], "state.pt"))  # fmt: skip


def megatron_lm_args(run, rt, state, ckpt_format="torch_dist") -> argparse.Namespace:  # noqa: ANN001
    """The ``args`` Megatron-LM would have parsed for this run (the fields its load reads).

    Megatron-LM stores its whole argparse namespace; these are the model, parallel, tokenizer
    and progress fields that ``load_checkpoint``, ``check_checkpoint_args`` and
    ``load_args_from_checkpoint`` read, named and valued as Megatron-LM's parser gives them (the
    tokenizer's vocabulary size only as ``padded_vocab_size``).
    """
    import torch

    m, p, t = run.model, run.parallel, run.training
    return argparse.Namespace(
        num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads, num_query_groups=m.num_query_groups,
        group_query_attention=m.num_query_groups != m.num_attention_heads,
        kv_channels=m.kv_channels or m.hidden_size // m.num_attention_heads,
        seq_length=m.seq_length,
        max_position_embeddings=m.max_position_embeddings, position_embedding_type="rope",
        add_position_embedding=True, use_rotary_position_embeddings=True,
        rotary_base=int(m.rotary_base), rotary_percent=m.rotary_percent,
        rotary_interleaved=m.rotary_interleaved, normalization=m.normalization,
        norm_epsilon=m.norm_epsilon, swiglu=m.swiglu, squared_relu=False,
        add_bias_linear=m.add_bias_linear, add_qkv_bias=False, apply_layernorm_1p=False,
        untie_embeddings_and_output_weights=m.untie_embeddings_and_output_weights,
        attention_dropout=m.attention_dropout, hidden_dropout=m.hidden_dropout,
        init_method_std=m.init_method_std,
        make_vocab_size_divisible_by=m.make_vocab_size_divisible_by,
        padded_vocab_size=m.padded_vocab_size(p.tensor_model_parallel_size), vocab_size=None,
        tokenizer_type=run.data.tokenizer_type, tokenizer_model=None, vocab_file=None,
        transformer_impl="transformer_engine", bf16=t.bf16, fp16=False,
        params_dtype=torch.bfloat16 if t.bf16 else torch.float32,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        context_parallel_size=p.context_parallel_size, expert_model_parallel_size=1,
        use_distributed_optimizer=p.use_distributed_optimizer, world_size=rt.world_size,
        data_parallel_size=rt.dp_size, micro_batch_size=t.micro_batch_size,
        global_batch_size=t.global_batch_size, train_iters=run.train_iters, lr=t.lr,
        min_lr=t.min_lr, seed=t.seed, ckpt_format=ckpt_format,
        use_dist_ckpt=ckpt_format == "torch_dist",
        dist_ckpt_optim_fully_reshardable=run.checkpoint.dist_ckpt_optim_fully_reshardable,
        no_save_optim=None, no_save_rng=None, data_parallel_random_init=False,
        consumed_train_samples=state.consumed_samples, skipped_train_samples=0,
        consumed_valid_samples=state.valid_consumed_samples,
    )  # fmt: skip


def megatron_lm_state_dict(run, rt, objs, state) -> tuple[dict, dict]:  # noqa: ANN001
    """(sharded state dict, content metadata) as Megatron-LM's ``save_checkpoint`` builds them.

    ``generate_state_dict``: args, checkpoint_version 3.0, iteration, ``model`` (or ``model%d``)
    = each chunk's ``sharded_state_dict(metadata=...)``, ``optimizer`` =
    ``optimizer.sharded_state_dict(state_dict, metadata=...)``, ``opt_param_scheduler``,
    ``rng_state`` = ``ShardedObject('rng_state', [rng dict], (pp, tp), (pp_rank, tp_rank),
    replica_id=DP x CP rank)`` (``get_rng_state``), then
    ``num_floating_point_operations_so_far``. The metadata: ``_build_sharded_state_dict_metadata``.
    Transformer Engine layers add ``core_attention._extra_state`` objects the local spec lacks.
    """
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    metadata = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    if run.parallel.use_distributed_optimizer:
        full = run.checkpoint.dist_ckpt_optim_fully_reshardable
        metadata["distrib_optim_sharding_type"] = "fully_reshardable" if full else "dp_reshardable"
        if full:
            metadata["distrib_optim_fully_reshardable_mem_efficient"] = False
    live = {**metadata, "dp_cp_group": ps.get_data_parallel_group(with_context_parallel=True)}
    sd = {"args": megatron_lm_args(run, rt, state), "checkpoint_version": CHECKPOINT_VERSION,
          "iteration": state.iteration}  # fmt: skip
    keys = ["model"] if len(objs.module) == 1 else [f"model{i}" for i in range(len(objs.module))]
    for key, chunk in zip(keys, objs.module):
        sd[key] = chunk.sharded_state_dict(metadata=live)
    sd["optimizer"] = objs.optimizer.sharded_state_dict(sd, metadata=live)
    sd["opt_param_scheduler"] = objs.scheduler.state_dict()
    (rng,) = _megatron_lm_rng_state()
    dp_cp = ps.get_data_parallel_rank(with_context_parallel=True)
    grid = (rt.pp_size, rt.tp_size), (rt.pp_rank, rt.tp_rank)
    sd["rng_state"] = ShardedObject("rng_state", [rng], *grid, replica_id=dp_cp)
    layers = run.model.num_layers
    if rt.pp_size == 1 and len(objs.module) == 1:  # TE's core attention carries FP8 metadata
        sd["model"].update({
            f"decoder.layers.{i}.self_attention.core_attention._extra_state": ShardedObject(
                "decoder.layers.self_attention.core_attention._extra_state",
                torch.empty(0, dtype=torch.uint8), (layers,), (i,),
                replica_id=(0, rt.tp_rank, dp_cp))
            for i in range(layers)
        })  # fmt: skip
    sd["num_floating_point_operations_so_far"] = 0.0
    return sd, metadata


def _megatron_lm_rng_state() -> list[dict]:
    """``get_rng_state`` for ``torch`` (no data-parallel random init): a list of one dict."""
    import torch
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker().get_states()
    return [{"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
             "torch_rng_state": torch.get_rng_state(),
             "cuda_rng_state": torch.zeros(16, dtype=torch.uint8),
             "rng_tracker_states": tracker}]  # fmt: skip


def megatron_lm_legacy_save(run, rt, objs, state, save: str) -> None:  # noqa: ANN001
    """What Megatron-LM's ``save_checkpoint`` does with ``--ckpt-format torch`` (legacy branch).

    ``get_checkpoint_name``: ``iter_%07d/mp_rank_%02d`` (+ ``_%03d`` with PP > 1)
    ``/model_optim_rng.pt``; with the distributed optimizer every rank calls
    ``optimizer.save_parameter_state(<its folder>/distrib_optim.pt)`` first
    (``get_distributed_optimizer_checkpoint_name``); then DP rank 0 (expert-DP, here DP x CP)
    ``torch.save``s ``generate_state_dict``: args, checkpoint_version, iteration, ``model`` (or
    ``model%d``) = ``state_dict_for_save_checkpoint()``, ``optimizer.state_dict()``,
    ``opt_param_scheduler``, ``rng_state``, then ``num_floating_point_operations_so_far``;
    barrier; rank 0 writes the tracker.
    """
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    sub = f"mp_rank_{rt.tp_rank:02d}" + (f"_{rt.pp_rank:03d}" if rt.pp_size > 1 else "")
    name = os.path.join(save, f"iter_{state.iteration:07d}", sub, "model_optim_rng.pt")
    rng_state = _megatron_lm_rng_state()
    if run.parallel.use_distributed_optimizer:
        os.makedirs(os.path.dirname(name), exist_ok=True)
        objs.optimizer.save_parameter_state(os.path.join(os.path.dirname(name), "distrib_optim.pt"))
    if ps.get_data_parallel_rank(with_context_parallel=True) == 0:
        sd = {"args": megatron_lm_args(run, rt, state, "torch"),
              "checkpoint_version": CHECKPOINT_VERSION, "iteration": state.iteration}  # fmt: skip
        n = len(objs.module)
        keys = ["model"] if n == 1 else [f"model{i}" for i in range(n)]
        for key, chunk in zip(keys, objs.module):
            sd[key] = chunk.state_dict_for_save_checkpoint()
        sd["optimizer"] = objs.optimizer.state_dict()
        sd["opt_param_scheduler"] = objs.scheduler.state_dict()
        sd["rng_state"] = rng_state
        sd["num_floating_point_operations_so_far"] = 0.0
        os.makedirs(os.path.dirname(name), exist_ok=True)
        torch.save(sd, name)
    dist.barrier()
    if dist.get_rank() == 0:
        with open(os.path.join(save, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(str(state.iteration))
    dist.barrier()


def _megatron_lm_legacy_save(spec: dict) -> None:
    run, rt, objs, state = _build_and_load(spec["flags"])
    megatron_lm_legacy_save(run, rt, objs, state, spec["save"])


def _megatron_lm_save(spec: dict) -> None:
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    run, rt, objs, state = _build_and_load(spec["flags"])
    sd, metadata = megatron_lm_state_dict(run, rt, objs, state)
    path = os.path.join(spec["save"], f"iter_{state.iteration:07d}")  # get_checkpoint_name
    if dist.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(sd, path, content_metadata=metadata)
    dist.barrier()
    if dist.get_rank() == 0:  # the tracker Megatron-LM writes after a save
        with open(os.path.join(spec["save"], "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(str(state.iteration))
    dist.barrier()


ACTIONS = {"dump": _dump, "megatron_lm_save": _megatron_lm_save,
           "megatron_lm_legacy_save": _megatron_lm_legacy_save}  # fmt: skip


def main(argv: list[str]) -> int:
    plan = read_plan(argv[0])
    from megatron.core import parallel_state as ps

    from megatron_endprompt.training.runtime import teardown_runtime

    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    with cuda_emulation():
        for spec in plan["runs"]:
            action = spec.get("action", "train")
            try:
                if action == "train":
                    _run_one(spec, world, rank)
                    continue
                ACTIONS[action](spec)
            except BaseException as err:
                raise RuntimeError(f"emulated run {spec['name']!r} failed on rank {rank}") from err
            if ps.model_parallel_is_initialized():
                ps.destroy_model_parallel()
        teardown_runtime()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
