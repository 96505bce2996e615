"""Megatron-LM's legacy ``torch`` checkpoints on the CUDA path (megatron-core optimizers).

``--ckpt-format torch`` saves what Megatron-LM core_v0.16.1's ``save_checkpoint`` writes for that
format (``megatron/training/checkpointing.py``: ``get_checkpoint_name``, ``generate_state_dict``,
``get_distributed_optimizer_checkpoint_name``)::

    SAVE/iter_0000100/mp_rank_TT[_PPP]/model_optim_rng.pt   DP rank 0 of each (TP, PP)
    SAVE/iter_0000100/mp_rank_TT[_PPP]/distrib_optim.pt     with --use-distributed-optimizer

``model_optim_rng.pt`` holds Megatron-LM's keys in its order (:data:`LEGACY_KEYS`): ``args``,
``checkpoint_version`` 3.0, ``iteration``, ``model`` (``model0``, ``model1``, ... with virtual
pipeline stages: the unwrapped chunks' ``state_dict_for_save_checkpoint()``), ``optimizer`` (the
megatron-core optimizer's ``state_dict()``), ``opt_param_scheduler``, ``rng_state`` (its list of
one dict) and ``num_floating_point_operations_so_far``; then ``run_config``, our run's record,
which Megatron-LM's load never reads (as in our ``torch_dist`` ``common.pt``): its ``args`` cannot
carry the EndPrompt target length or a YaRN / NTK RoPE scaling, which evaluation and export need.
Unlike our CPU path's shards, no ``format`` key. ``distrib_optim.pt`` is written by
megatron-core's ``save_parameter_state`` (the parameter shards gathered over DP x CP onto its rank
0). The save is published like every other (:mod:`.layout`): written under ``iter_N.tmp``, each
file beside its ``.sha256``, a refused write on any rank one error on every rank.

Loading takes such a checkpoint, ours or Megatron-LM's, fully (weights under either layer spec's
names, optimizer, ``distrib_optim.pt``, schedule, RNG, progress), at the (TP, PP) layout it was
saved with, as Megatron-LM does. The per-shard checkpoints of our CPU path and of conversions
(a ``format`` key: torch AdamW state, or none) give their weights only, with ``--finetune`` or
``--no-load-optim``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
from collections.abc import Callable, Mapping
from typing import IO, Any

import torch
from megatron.core import tensor_parallel

from megatron_endprompt.atomic_io import writing
from megatron_endprompt.checkpoint import megatron_lm
from megatron_endprompt.checkpoint.adam_fallback import (
    keep_own_adam_steps,
    restore_torch_adam_steps,
)
from megatron_endprompt.checkpoint.layout import (
    SHARD_FILE,
    ShardRank,
    agree_on_write,
    fresh_tmp_dir,
    iteration_dir,
    publish_iteration,
    save_torch,
    shard_dir_name,
    verify_checksum,
    write_checksum,
)
from megatron_endprompt.checkpoint.optim_state import DISTRIB_OPTIM_FILE
from megatron_endprompt.checkpoint.shards import (
    checkpoint_path,
    load_checkpoint,
    load_model_weights,
)
from megatron_endprompt.device import synchronize

LEGACY_KEYS = (
    "args", "checkpoint_version", "iteration", "model", "optimizer", "opt_param_scheduler",
    "rng_state", "num_floating_point_operations_so_far",
)  # fmt: skip
"""Megatron-LM's keys, in its order (``model`` becomes ``model0``, ... with virtual stages)."""
RUN_CONFIG = "run_config"
"""Our one key after Megatron-LM's: the run's recorded config (``RunConfig.to_dict()``)."""
_CHUNK_KEY = re.compile(r"^model\d*$")


def model_keys(num_chunks: int) -> list[str]:
    """``["model"]``, or ``["model0", "model1", ...]`` with virtual pipeline stages."""
    return ["model"] if num_chunks == 1 else [f"model{i}" for i in range(num_chunks)]


def is_legacy_checkpoint(path: str) -> bool:
    """Whether the iteration folder ``path`` holds per-shard ``mp_rank_*`` folders."""
    return any(
        name.startswith("mp_rank_") and os.path.isdir(os.path.join(path, name))
        for name in os.listdir(path)
    )


def legacy_state_dict(run: Any, rt: Any, objs: Any, state: Any) -> dict[str, Any]:
    """This rank's ``model_optim_rng.pt``: Megatron-LM's ``generate_state_dict``, then
    ``run_config``."""
    t = run.training
    sd: dict[str, Any] = {
        "args": megatron_lm.megatron_args(
            run, state.consumed_samples, state.valid_consumed_samples, state.iteration, "torch"
        ),
        "checkpoint_version": megatron_lm.CHECKPOINT_VERSION,
        "iteration": state.iteration,
    }
    for key, chunk in zip(model_keys(len(objs.module)), objs.module):
        sd[key] = chunk.state_dict_for_save_checkpoint()  # unwrapped: no "module." prefix
    sd["optimizer"] = objs.optimizer.state_dict()
    sd["opt_param_scheduler"] = objs.scheduler.state_dict()
    sd["rng_state"] = megatron_lm.rng_state_list(t.seed, rt.tp_rank, rt.pp_rank)
    sd["num_floating_point_operations_so_far"] = 0
    sd[RUN_CONFIG] = run.to_dict()
    return sd


def save(run: Any, rt: Any, objs: Any, state: Any) -> str:
    """Save iteration ``state.iteration`` in Megatron-LM's legacy format; publish atomically.

    Every rank must call it. Three agreed steps: rank 0 makes ``iter_N.tmp``; DP rank 0 of each
    (TP, PP) makes its shard folder (and opens ``distrib_optim.pt``, so that no write can fail
    before the gather below); every rank joins the distributed optimizer's gather, DP rank 0
    writes. Then rank 0 publishes.
    """
    save_dir = run.checkpoint.save
    final = iteration_dir(save_dir, state.iteration)
    tmp = final + ".tmp"
    fresh = functools.partial(fresh_tmp_dir, save_dir, tmp)
    agree_on_write(fresh if rt.rank == 0 else None, tmp, cleanup=tmp)
    writer = rt.dp_rank == 0 and rt.cp_rank == 0  # Megatron-LM: expert-DP rank 0 (DP x CP)
    shard_dir = os.path.join(tmp, shard_dir_name(rt.tp_rank, rt.pp_rank, rt.pp_size))
    distrib = os.path.join(shard_dir, DISTRIB_OPTIM_FILE)
    with contextlib.ExitStack() as files:
        opened: list[IO[bytes]] = []

        def prepare() -> None:
            with writing(shard_dir):
                os.makedirs(shard_dir, exist_ok=True)
            if run.parallel.use_distributed_optimizer:
                with writing(distrib):
                    opened.append(files.enter_context(open(distrib + ".part", "wb")))

        agree_on_write(prepare if writer else None, tmp, cleanup=tmp)
        shard = legacy_state_dict(run, rt, objs, state) if writer else None

        def write() -> None:
            if run.parallel.use_distributed_optimizer:
                _save_parameter_state(objs.optimizer, distrib, opened[0] if writer else None)
            if writer:
                path = os.path.join(shard_dir, SHARD_FILE)
                _write_file(functools.partial(save_torch, shard), path)

        agree_on_write(write, tmp, cleanup=tmp)

    def publish() -> None:
        publish_iteration(save_dir, state.iteration, tmp, keep_last=run.checkpoint.keep_last)

    agree_on_write(publish if rt.rank == 0 else None, final, cleanup=None)
    return final


def _save_parameter_state(optimizer: Any, path: str, handle: IO[bytes] | None) -> None:
    """megatron-core's ``save_parameter_state``: a gather over DP x CP, then DP rank 0 writes.

    Rank 0 hands it the file opened in the save's previous step (a Python file, so that a refused
    write is an OSError with its errno, see ``layout.save_torch``); the others only take part in
    the gather (megatron-core writes on DP rank 0 alone).
    """
    if handle is None:
        optimizer.save_parameter_state(path)
        return
    with writing(path):
        optimizer.save_parameter_state(handle)
        handle.close()
    _write_file(None, path)


def _write_file(write: Callable[[str], None] | None, path: str) -> None:
    """``write(path + ".part")`` (None: already written there), rename, record its checksum."""
    if write is not None:
        write(path + ".part")
    with writing(path):
        os.replace(path + ".part", path)
    write_checksum(path)  # inside iter_N.tmp: published together with the file


# ---------------------------------------------------------------- load


def load(run: Any, rt: Any, objs: Any, state: Any, iteration: int) -> bool:
    """Load this rank's legacy shard of ``iteration`` into ``objs``/``state`` (Megatron-LM's order:
    weights, optimizer, ``distrib_optim.pt``, schedule, RNG, progress).

    Raises:
        FileNotFoundError: this rank's shard is missing (another TP/PP layout).
        ValueError: naming --load, on another layout, a model-config disagreement, or an
            optimizer state this run cannot take (see :func:`_check_optimizer_state`).
    """
    c = run.checkpoint
    rank = ShardRank(rt.tp_rank, rt.pp_rank, 0, rt.pp_size)
    path = checkpoint_path(c.load, rank, iteration)
    shard = load_checkpoint(c.load, rank, iteration)
    keys = model_keys(len(objs.module))
    _check_layout(run, rt, shard, keys, path)
    for key, chunk in zip(keys, objs.module):
        load_model_weights(chunk, {**shard, "model": shard[key]}, c.load, run.model)
    if c.finetune or c.no_load_optim:
        # The optimizer's fp32 main params (bf16/fp16) were copied from the initial weights.
        objs.optimizer.reload_model_params()
    else:
        _load_optimizer(run, rt, objs, shard, path)
    if not (c.finetune or c.no_load_rng):
        _restore_rng(shard)
    if not c.finetune:
        state.iteration, state.consumed_samples, state.valid_consumed_samples = (
            megatron_lm.progress(shard)
        )
    synchronize(rt.device)
    return True


def _check_layout(run: Any, rt: Any, shard: Mapping[str, Any], keys: list[str], path: str) -> None:
    """The shard's (TP, PP) and model chunks must be this run's: the format does not reshard."""
    where = f"--load={run.checkpoint.load}"
    saved = megatron_lm.saved_layout(shard)
    if saved is not None and tuple(saved[:2]) != (rt.tp_size, rt.pp_size):
        raise ValueError(
            f"{where}: {path} is a legacy (torch) checkpoint saved at (TP, PP) = "
            f"{tuple(saved[:2])}, this run has {(rt.tp_size, rt.pp_size)}: the format loads only "
            "at its own --tensor-model-parallel-size / --pipeline-model-parallel-size (as in "
            "Megatron-LM); save with --ckpt-format torch_dist to change the layout"
        )
    chunks = sorted(k for k in shard if _CHUNK_KEY.match(k))
    if chunks != sorted(keys):
        raise ValueError(
            f"{where}: {path} holds the model chunks {chunks}, this run builds {keys}: "
            "--num-layers-per-virtual-pipeline-stage must be the checkpoint's"
        )


def _check_optimizer_state(run: Any, shard: Mapping[str, Any], path: str) -> bool:
    """Refuse an optimizer state this run cannot resume; True when it is in ``distrib_optim.pt``.

    Raises:
        ValueError: naming --load and --finetune / --no-load-optim: a shard of our CPU path
            (torch AdamW state) or a conversion, a shard without optimizer state, or a
            distributed-optimizer choice other than the checkpoint's.
    """
    where = f"--load={run.checkpoint.load}"
    if "format" in shard:  # our CPU path's shards and conversions; Megatron-LM's have none
        raise ValueError(
            f"{where}: this checkpoint was written by a CPU run or a conversion (torch AdamW "
            "state, or none); pass --finetune or --no-load-optim to take its weights on CUDA"
        )
    if "optimizer" not in shard or megatron_lm.scheduler_state(shard) is None:
        raise ValueError(
            f"{where}: {path} holds no optimizer state or LR schedule (saved with "
            "--no-save-optim?); pass --finetune or --no-load-optim to take its weights"
        )
    distrib = os.path.isfile(os.path.join(os.path.dirname(path), DISTRIB_OPTIM_FILE))
    if distrib != bool(run.parallel.use_distributed_optimizer):
        saved = "with" if distrib else "without"
        raise ValueError(
            f"{where}: {path} was saved {saved} --use-distributed-optimizer, this run is not: "
            "resume with the checkpoint's choice, or pass --no-load-optim"
        )
    return distrib


def _load_optimizer(run: Any, rt: Any, objs: Any, shard: Mapping[str, Any], path: str) -> None:
    """megatron-core's ``load_state_dict``, then ``load_parameter_state`` (distributed optimizer),
    then the LR schedule, as Megatron-LM's ``load_checkpoint`` does."""
    where = f"--load={run.checkpoint.load}"
    distrib = _check_optimizer_state(run, shard, path)
    try:
        with torch.no_grad():
            objs.optimizer.load_state_dict(shard["optimizer"])
    except (KeyError, IndexError, ValueError, RuntimeError) as err:
        raise ValueError(
            f"{where}: the optimizer state of {path} does not fit this run's optimizer ({err!r}): "
            "--bf16 / --fp16 and the model must be the checkpoint's, or pass --no-load-optim"
        ) from err
    restore_torch_adam_steps(objs.optimizer)
    if distrib:
        file = os.path.join(os.path.dirname(path), DISTRIB_OPTIM_FILE)
        if rt.dp_rank == 0 and rt.cp_rank == 0:  # the rank that reads it (megatron-core's DP 0)
            verify_checksum(file)
        # The file carries no Adam step (torch Adam's fallback keeps its own: adam_fallback.py).
        with torch.no_grad(), keep_own_adam_steps(objs.optimizer):
            objs.optimizer.load_parameter_state(file)
    megatron_lm.load_scheduler_state(objs.scheduler, megatron_lm.scheduler_state(shard), where)


def _restore_rng(shard: Mapping[str, Any]) -> None:
    """Host (and CUDA) generators, then megatron's CUDA RNG tracker, from the shard."""
    megatron_lm.restore_rng(shard)
    states = shard.get("rng_state")
    first = states[0] if isinstance(states, (list, tuple)) and states else states
    tracker = first.get("rng_tracker_states") if isinstance(first, Mapping) else None
    if tracker:
        tensor_parallel.get_cuda_rng_tracker().set_states(tracker)
