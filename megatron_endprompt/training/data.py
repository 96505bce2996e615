"""Training data for the loop: datasets on the reading ranks, Megatron's sample order, resume.

Samples are consumed in Megatron-LM's order (``MegatronPretrainingSampler``): the global batch of
iteration i holds dataset indices ``[i * G, (i + 1) * G)``; each micro-batch step takes the next
``micro x DP`` indices and data-parallel rank r keeps the r-th slice. Resuming from
``consumed_samples`` therefore continues exactly where the run stopped.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset


class PretrainingSampler:
    """Megatron's pretraining batch sampler (sequential, resumable, DP-sliced)."""

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
    ) -> None:
        if total_samples <= 0:
            raise ValueError(f"no samples to draw from (total_samples={total_samples})")
        if consumed_samples >= total_samples:
            raise ValueError(
                f"consumed_samples={consumed_samples} >= dataset size {total_samples}: the "
                "checkpoint has read the whole dataset (raise --train-iters / --train-samples "
                "only together with more data)"
            )
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank={data_parallel_rank} out of range")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.step = micro_batch_size * data_parallel_size

    def __len__(self) -> int:
        return (self.total_samples - self.consumed_samples) // self.step

    def __iter__(self) -> Iterator[list[int]]:
        lo = self.data_parallel_rank * self.micro_batch_size
        start = self.consumed_samples
        while start + self.step <= self.total_samples:
            yield list(range(start + lo, start + lo + self.micro_batch_size))
            start += self.step


def make_data_iterator(
    dataset: Dataset | None,
    consumed_samples: int,
    micro_batch_size: int,
    data_parallel_rank: int,
    data_parallel_size: int,
    num_workers: int = 0,
) -> Iterator[dict[str, torch.Tensor]] | None:
    """An iterator of collated micro-batches (None when this rank builds no dataset)."""
    if dataset is None:
        return None
    sampler = PretrainingSampler(
        len(dataset), consumed_samples, micro_batch_size, data_parallel_rank, data_parallel_size
    )
    # iter(DataLoader) draws its workers' base seed from ``generator``; by default that is the
    # global torch RNG that dropout uses, so building an iterator (at start, after a resume, or
    # when validation wraps around) would shift the training RNG stream.
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(0),
    )
    return iter(loader)


def cycle_iterator(
    dataset: Dataset | None,
    micro_batch_size: int,
    data_parallel_rank: int,
    data_parallel_size: int,
    consumed_samples: int = 0,
) -> Iterator[dict[str, torch.Tensor]] | None:
    """Validation batches: the same sequential order, restarting at the end of the split.

    ``consumed_samples``: validation samples already read (all DP ranks together), so a resumed
    run continues where the checkpointed one stopped.
    """
    if dataset is None:
        return None
    step = micro_batch_size * data_parallel_size
    per_cycle = len(dataset) // step * step
    if per_cycle == 0:
        raise ValueError(
            f"--eval-iters: the validation split has {len(dataset)} samples, fewer than one "
            f"micro-batch on every data-parallel rank (--micro-batch-size x DP = {step}); give "
            "validation a larger share of --split"
        )

    def gen():
        start = consumed_samples % per_cycle
        while True:
            yield from make_data_iterator(
                dataset, start, micro_batch_size, data_parallel_rank, data_parallel_size
            )
            start = 0

    return gen()
