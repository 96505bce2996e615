"""Device and process-group setup: the only module that names CUDA explicitly.

A low layer (above config only): model, checkpoint, training and eval all use it, so everything
device-specific lives here and the model, data and loss code stay device-agnostic:

* ``init_distributed``: torch.distributed with gloo (CPU) or NCCL (CUDA).
* ``initialize_model_parallel``: megatron-core's parallel state (TP/PP/CP/DP groups).
* ``model_parallel_seed``: seeds for weight initialisation. megatron-core's
  ``model_parallel_cuda_manual_seed`` drives CUDA generators only; on CPU the model is built with
  ``use_cpu_initialization=True``, where megatron creates every full weight from torch's default
  CPU generator and keeps this rank's shard, so seeding that generator identically on every rank
  gives consistent shards of one full model, with no per-rank seed and no CUDA RNG tracker. (The
  full model still depends on the TP size: the vocabulary is padded per TP size, which shifts
  later draws. To compare layouts, load the same weights, as tests/model/test_tp.py does.)
* ``accelerator``: the torch device and process-group backend of ``--device``; the one place that
  maps ``cuda`` to a device (the CUDA-emulation tests answer CPU/gloo here).
* ``synchronize``, ``move_to_device``: the few CUDA calls the training path makes itself.
* ``all_reduce``: the one "reduce over a group when it has more than one rank" helper.
* ``largest_over_ranks``: every rank learns the largest of one integer (a failure code).
* ``backend_kind``: which training backend a device gets (chosen once per run).
"""

from __future__ import annotations

import importlib.util
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel

from megatron_endprompt.config import ParallelConfig


def cuda_available() -> bool:
    """True when a CUDA device can be used."""
    return torch.cuda.is_available()


def cuda_rng_state() -> torch.Tensor | None:
    """The CUDA generator's state when CUDA is in use, else None (for checkpoints)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.get_rng_state()
    return None


def set_cuda_rng_state(state: torch.Tensor) -> None:
    """Restore :func:`cuda_rng_state` (ignored without CUDA)."""
    if torch.cuda.is_available():
        torch.cuda.set_rng_state(state)


def peak_allocated_gib(device: torch.device) -> float:
    """The CUDA allocator's peak on ``device`` in GiB."""
    return torch.cuda.max_memory_allocated(device) / 2**30


def transformer_engine_available() -> bool:
    """True when Transformer Engine is importable (without importing it)."""
    return importlib.util.find_spec("transformer_engine") is not None


def default_backend() -> str:
    """``nccl`` on CUDA, else ``gloo``."""
    return "nccl" if cuda_available() else "gloo"


def accelerator(device_type: str) -> tuple[torch.device, str]:
    """(torch device of this process, process-group backend) for ``--device``.

    ``cuda``: the GPU of ``LOCAL_RANK`` (torchrun) and NCCL; ``cpu``: CPU and gloo.
    """
    if device_type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local_rank), "nccl"
    if device_type != "cpu":
        raise ValueError(f"--device={device_type!r}: must be cpu or cuda")
    return torch.device("cpu"), "gloo"


def backend_kind(device_type: str) -> str:
    """``megatron`` (megatron-core DDP, optimizer, schedules, dist checkpoints) on CUDA, else
    ``local`` (gloo, torch DDP, torch AdamW; megatron-core's schedules need CUDA in 0.16.1)."""
    return "megatron" if device_type == "cuda" else "local"


def all_reduce(
    tensor: torch.Tensor,
    group: dist.ProcessGroup | None,
    op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM,
) -> torch.Tensor:
    """Reduce ``tensor`` in place over ``group`` (a no-op for None, one rank, or no dist)."""
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def largest_over_ranks(value: int) -> int:
    """The largest ``value`` over all ranks (this rank's without distributed state).

    Every rank must call it. Ranks use it to agree that one of them failed (an errno, 0 for
    success) instead of waiting at a barrier the failed rank never reaches.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    where = torch.device("cpu")
    if dist.get_backend() == "nccl":  # NCCL reduces device tensors only
        where = torch.device("cuda", torch.cuda.current_device())
    code = torch.tensor([value], dtype=torch.int64, device=where)
    dist.all_reduce(code, op=dist.ReduceOp.MAX)
    return int(code.item())


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def move_to_device(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Move a built model chunk to ``device`` before mixed-precision and DDP wrapping.

    megatron-core creates its parallel linear layers on the current CUDA device, but torch
    modules of the local spec (``torch.nn.RMSNorm``) land on the CPU; Megatron-LM's ``get_model``
    moves every chunk to the current CUDA device before ``Float16Module``/DDP, as here (the
    runtime's device is ``cuda:LOCAL_RANK``, the device ``init_distributed`` made current).
    """
    return module.to(device)


def free_port() -> int:
    """An unused local TCP port (for single-node rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(
    backend: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    port: int | None = None,
    timeout_minutes: float | None = None,
) -> tuple[int, int]:
    """Initialise torch.distributed once (torchrun environment or explicit arguments).

    Args:
        backend: ``gloo`` or ``nccl``; None picks :func:`default_backend`.
        rank: This process's rank; None reads ``RANK`` (default 0).
        world_size: Number of processes; None reads ``WORLD_SIZE`` (default 1).
        port: Rendezvous port on 127.0.0.1; None uses ``MASTER_ADDR``/``MASTER_PORT`` when set
            (torchrun), else a free port (single process).
        timeout_minutes: Collective timeout (--distributed-timeout-minutes); None: torch's.

    Returns:
        (rank, world_size) of the initialised default group.

    Raises:
        ValueError: If ``backend`` is unknown, or nccl is requested without CUDA.
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    backend = backend or default_backend()
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend={backend!r}: must be gloo or nccl")
    if backend == "nccl" and not cuda_available():
        raise ValueError("backend='nccl' needs CUDA; use gloo on CPU")
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    if port is None and "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
        init_method = "env://"  # torchrun / SLURM launchers
    else:
        # Explicit local rendezvous; os.environ is left alone so child processes do not inherit
        # a port this process already holds.
        init_method = f"tcp://127.0.0.1:{port or free_port()}"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
    extra = {} if timeout_minutes is None else {"timeout": timedelta(minutes=timeout_minutes)}
    dist.init_process_group(
        backend=backend, init_method=init_method, rank=rank, world_size=world_size, **extra
    )
    return rank, world_size


def initialize_model_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: int | None = None,
    context_parallel_size: int = 1,
) -> None:
    """Create megatron-core's process groups (re-creating them if the layout changed).

    Requires :func:`init_distributed` first. Works on gloo: megatron-core builds its groups with
    the default backend.
    """
    if ps.model_parallel_is_initialized():
        same = (
            ps.get_tensor_model_parallel_world_size() == tensor_model_parallel_size
            and ps.get_pipeline_model_parallel_world_size() == pipeline_model_parallel_size
            and ps.get_context_parallel_world_size() == context_parallel_size
            and ps.get_virtual_pipeline_model_parallel_world_size()
            == virtual_pipeline_model_parallel_size
        )
        if same:
            return
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
    )


def require_model_parallel(parallel_config: ParallelConfig) -> None:
    """Fail unless megatron's parallel state exists with ``parallel_config``'s layout.

    What model builders call: they never start distributed state themselves (callers do, with
    :func:`ensure_model_parallel` or ``training.runtime.setup_runtime``).

    Raises:
        ValueError: If the state is missing or has another (TP, PP, CP) layout.
    """
    if not ps.model_parallel_is_initialized():
        raise ValueError(
            "megatron's parallel state is not initialised: call "
            "megatron_endprompt.device.ensure_model_parallel(parallel_config) (one process) or "
            "training.runtime.setup_runtime() before building a model"
        )
    _check_layout(parallel_config)


def _check_layout(p: ParallelConfig) -> None:
    layout = (
        ps.get_tensor_model_parallel_world_size(),
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_context_parallel_world_size(),
    )
    wanted = (p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size)
    if layout != wanted:
        raise ValueError(
            f"megatron parallel state has (TP, PP, CP) = {layout}, but the config asks for "
            f"{wanted} (--tensor-model-parallel-size, --pipeline-model-parallel-size, "
            "--context-parallel-size)"
        )


def ensure_model_parallel(parallel_config: ParallelConfig) -> None:
    """Make sure megatron's parallel state exists and matches ``parallel_config``.

    A single process without torch.distributed (tools, tests, quickstart) gets a 1-rank group.

    Raises:
        ValueError: If the state is missing in a multi-process run, or has another layout.
    """
    p = parallel_config
    if not ps.model_parallel_is_initialized():
        if not dist.is_initialized() and p.model_parallel_size * p.context_parallel_size == 1:
            init_distributed(rank=0, world_size=1)
        if not dist.is_initialized():
            raise ValueError(
                "torch.distributed is not initialised: call device.init_distributed() "
                "and initialize_model_parallel() before building a model-parallel model"
            )
        initialize_model_parallel(
            p.tensor_model_parallel_size,
            p.pipeline_model_parallel_size,
            p.virtual_pipeline_model_parallel_size,
            p.context_parallel_size,
        )
    _check_layout(p)


def model_parallel_seed(seed: int) -> None:
    """Seed weight initialisation identically on every rank.

    CPU: seeds torch's default generator (used by megatron's ``use_cpu_initialization`` path,
    which draws the full weight and keeps this rank's shard). CUDA: additionally sets up
    megatron's CUDA RNG tracker (per-TP-rank streams for dropout and GPU initialisation).
    """
    torch.manual_seed(seed)
    if cuda_available() and ps.model_parallel_is_initialized():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_distributed() -> None:
    """Tear down megatron's parallel state and the default process group."""
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
