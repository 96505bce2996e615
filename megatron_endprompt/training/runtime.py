"""Process groups and ranks of a run, set up once (torchrun or a single process).

Reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) through
``device``, initialises torch.distributed (NCCL on CUDA, gloo on CPU) and megatron-core's
parallel state, and exposes the groups the loop needs in one object instead of global getters
spread through the code.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_endprompt import device as _device
from megatron_endprompt.device import (
    destroy_distributed,
    init_distributed,
    initialize_model_parallel,
    model_parallel_seed,
)


@dataclass
class Runtime:
    """This process's place in the (TP, PP, CP, DP) grid and its process groups."""

    device: torch.device
    rank: int
    world_size: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    cp_rank: int
    cp_size: int
    dp_rank: int
    dp_size: int
    tp_group: dist.ProcessGroup | None
    tp_src_rank: int
    cp_group: dist.ProcessGroup | None
    dp_group: dist.ProcessGroup | None
    dp_cp_group: dist.ProcessGroup | None
    model_parallel_group: dist.ProcessGroup | None

    @property
    def is_last_stage(self) -> bool:
        """Last pipeline stage (holds the output layer and sees the loss)."""
        return self.pp_rank == self.pp_size - 1

    @property
    def is_data_reader(self) -> bool:
        """Tensor-parallel rank 0 of every stage reads data (every stage needs position_ids)."""
        return self.tp_rank == 0

    @property
    def is_logging_rank(self) -> bool:
        """The one rank that prints metrics and writes TensorBoard."""
        return self.is_last_stage and self.tp_rank == 0 and self.dp_rank == 0 and self.cp_rank == 0


def setup_runtime(
    device_type: str,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: int | None = None,
    context_parallel_size: int = 1,
    timeout_minutes: float | None = None,
) -> Runtime:
    """Initialise distributed + megatron parallel state; returns the run's :class:`Runtime`."""
    device, backend = _device.accelerator(device_type)
    rank, world = init_distributed(backend, timeout_minutes=timeout_minutes)
    model_parallel = tensor_model_parallel_size * pipeline_model_parallel_size
    if world % (model_parallel * context_parallel_size):
        raise ValueError(
            f"world size {world} is not divisible by --tensor-model-parallel-size="
            f"{tensor_model_parallel_size} x --pipeline-model-parallel-size="
            f"{pipeline_model_parallel_size} x --context-parallel-size={context_parallel_size}"
        )
    initialize_model_parallel(
        tensor_model_parallel_size,
        pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size,
        context_parallel_size,
    )
    return Runtime(
        device=device,
        rank=rank,
        world_size=world,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=tensor_model_parallel_size,
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        pp_size=pipeline_model_parallel_size,
        cp_rank=ps.get_context_parallel_rank(),
        cp_size=context_parallel_size,
        dp_rank=ps.get_data_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        tp_group=ps.get_tensor_model_parallel_group(),
        tp_src_rank=ps.get_tensor_model_parallel_src_rank(),
        cp_group=ps.get_context_parallel_group() if context_parallel_size > 1 else None,
        dp_group=ps.get_data_parallel_group(),
        dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True),
        model_parallel_group=ps.get_model_parallel_group(),
    )


def teardown_runtime() -> None:
    """Destroy megatron's parallel state and the process group."""
    destroy_distributed()


def seed_everything(seed: int) -> None:
    """Seed python, numpy, torch and megatron's model-parallel RNG (same seed on every rank)."""
    random.seed(seed)
    np.random.seed(seed)
    model_parallel_seed(seed)
