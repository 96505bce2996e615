"""Tensor-parallel evaluation under torchrun: process groups and who reports.

    torchrun --nproc-per-node 8 tools/evaluate.py --load ckpt/70b --tensor-model-parallel-size 8 ...

Every launched process is one tensor-parallel rank of ONE model replica (PP = 1, no data
parallelism): each builds its shard, loads it from the checkpoint (any saved layout) and runs the
same prompts; the logits are gathered over the TP group, so every rank takes the same greedy
decisions and runs the same forward passes. Rank 0 alone shows progress and writes the reports.
CPU runs use gloo, CUDA runs NCCL with one GPU per local rank.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from megatron_endprompt import device as dev


@dataclass(frozen=True)
class EvalRanks:
    """This process's place in the evaluation launch."""

    world_size: int = 1
    rank: int = 0
    tensor_model_parallel_size: int = 1
    started: bool = False  # process groups were created here (and are destroyed by stop)

    @property
    def is_main(self) -> bool:
        """The rank that prints and writes (rank 0)."""
        return self.rank == 0


def launched_world_size() -> int:
    """Processes of this launch (torchrun's ``WORLD_SIZE``; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def start(device: str, tensor_model_parallel_size: int | None = None) -> EvalRanks:
    """Create the process groups of a tensor-parallel evaluation (nothing for one process).

    Args:
        device: ``"cpu"`` (gloo) or ``"cuda"`` (NCCL, the GPU of ``LOCAL_RANK``).
        tensor_model_parallel_size: must equal the number of processes; None takes it.

    Raises:
        ValueError: naming ``--tensor-model-parallel-size`` when it is not the process count.
    """
    world = launched_world_size()
    tp = world if tensor_model_parallel_size is None else tensor_model_parallel_size
    if tp != world:
        raise ValueError(
            f"--tensor-model-parallel-size {tp}: evaluation runs one model replica, so it must "
            f"equal the number of launched processes ({world}; torchrun --nproc-per-node)"
        )
    if world == 1:
        return EvalRanks()
    _, backend = dev.accelerator(device)
    rank, _ = dev.init_distributed(backend)
    dev.initialize_model_parallel(tensor_model_parallel_size=tp)
    return EvalRanks(world, rank, tp, started=True)


def local_device(device: str, ranks: EvalRanks) -> str:
    """The torch device string of this rank: ``cuda:LOCAL_RANK`` in a multi-process CUDA run."""
    if device == "cuda" and ranks.world_size > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def stop(ranks: EvalRanks) -> None:
    """Destroy the process groups :func:`start` created."""
    if ranks.started:
        dev.destroy_distributed()
