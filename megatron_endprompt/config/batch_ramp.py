"""Megatron-LM's ``--rampup-batch-size START INCREMENT SAMPLES``: the global batch per iteration.

megatron-core's ``RampupBatchsizeNumMicroBatchesCalculator`` decides, from the samples consumed
so far ``c``, the global batch of the next iteration: ``START + INCREMENT * int(c / per_step)``
while ``c <= SAMPLES``, with ``per_step = SAMPLES / ((G - START) / INCREMENT)``, then
``--global-batch-size`` G. Megatron-LM asks it at the start of every iteration; here
:class:`BatchSchedule` does the same for the training loop.

How long such a run is (Megatron-LM's ``update_train_iters``): the ramp is walked batch by batch
while the consumed samples are at most SAMPLES and at most ``--train-samples``; the samples left
then make whole global batches of G (a partial last one is dropped). A ``--train-samples`` inside
the ramp can thus be overshot by up to one batch, as there. :func:`compute_ramp_plan` counts it.

The calculator is imported only when a ramp is asked for: the config layer stays torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: imported at run time inside ramp_calculator
    from megatron.core.num_microbatches_calculator import RampupBatchsizeNumMicroBatchesCalculator


def ramp_flag(ramp: tuple[int, ...] | list[int]) -> str:
    """``--rampup-batch-size=16 16 5859375``: the flag as given, for error messages."""
    return "--rampup-batch-size=" + " ".join(str(v) for v in ramp)


def check_rampup(ramp: list[int], global_batch_size: int) -> None:
    """megatron-core's conditions on a ramp (ValueError naming the flags instead of an assert).

    Raises:
        ValueError: A ramp that megatron-core's calculator refuses, or cannot build (START equal
            to G divides the ramp samples by zero increments).
    """
    start, increment, samples = ramp
    if start < 1 or increment < 1 or samples < 0:
        raise ValueError(
            f"{ramp_flag(ramp)}: START and INCREMENT must be >= 1 and SAMPLES >= 0 "
            "(megatron-core's calculator asserts it)"
        )
    if global_batch_size < start or (global_batch_size - start) % increment:
        raise ValueError(
            f"{ramp_flag(ramp)}: --global-batch-size={global_batch_size} must be START plus a "
            f"multiple of INCREMENT (megatron-core's calculator asserts it)"
        )
    if global_batch_size == start:
        raise ValueError(
            f"{ramp_flag(ramp)}: START equals --global-batch-size={global_batch_size}, a ramp of "
            "no increments (megatron-core's calculator divides by zero): drop --rampup-batch-size"
        )


def ramp_calculator(
    ramp: tuple[int, int, int] | list[int],
    global_batch_size: int,
    micro_batch_size: int,
    data_parallel_size: int,
) -> RampupBatchsizeNumMicroBatchesCalculator:
    """megatron-core's ``RampupBatchsizeNumMicroBatchesCalculator`` for the ramp (no logging)."""
    from megatron.core.num_microbatches_calculator import RampupBatchsizeNumMicroBatchesCalculator

    start, increment, samples = (int(v) for v in ramp)
    # rank != 0: the calculator logs nothing; the training loop prints the changes.
    return RampupBatchsizeNumMicroBatchesCalculator(
        global_batch_size, micro_batch_size, data_parallel_size, False, 1,
        start, increment, samples,
    )  # fmt: skip


@dataclass(frozen=True)
class RampPlan:
    """A ramped run's length and the global batch of each of its ramp iterations."""

    ramp_batches: tuple[int, ...]
    """The global batch of each iteration of the ramp phase, in order."""
    constant_iterations: int
    """Iterations at the full --global-batch-size after the ramp phase."""
    global_batch_size: int

    @property
    def iterations(self) -> int:
        """All iterations of the run (Megatron-LM's ``train_iters``)."""
        return len(self.ramp_batches) + self.constant_iterations

    @property
    def consumed_samples(self) -> int:
        """Samples the whole run reads."""
        return sum(self.ramp_batches) + self.constant_iterations * self.global_batch_size

    def first_iterations(self) -> dict[int, int]:
        """Each global batch size the run uses -> the first iteration (1-based) using it."""
        first: dict[int, int] = {}
        for i, size in enumerate(self.ramp_batches, 1):
            first.setdefault(size, i)
        if self.constant_iterations:
            first.setdefault(self.global_batch_size, len(self.ramp_batches) + 1)
        return first


@lru_cache(maxsize=8)
def compute_ramp_plan(
    ramp: tuple[int, int, int],
    global_batch_size: int,
    micro_batch_size: int,
    data_parallel_size: int,
    train_samples: int,
) -> RampPlan:
    """The iterations of a ramped ``--train-samples`` run, as Megatron-LM counts them."""
    calc = ramp_calculator(ramp, global_batch_size, micro_batch_size, data_parallel_size)
    ramp_samples, consumed, batches = ramp[2], 0, []
    while consumed <= min(ramp_samples, train_samples):
        calc.update(consumed, consistency_check=False)
        batches.append(calc.get_current_global_batch_size())
        consumed += batches[-1]
    left = max(train_samples - consumed, 0)
    return RampPlan(tuple(batches), left // global_batch_size, global_batch_size)


class BatchSchedule:
    """The global batch of each iteration: --global-batch-size, or the ramp's calculator."""

    def __init__(
        self,
        global_batch_size: int,
        micro_batch_size: int,
        data_parallel_size: int,
        rampup: list[int] | None = None,
    ) -> None:
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.data_parallel_size = data_parallel_size
        self._calc = None
        if rampup is not None:
            self._calc = ramp_calculator(
                rampup, global_batch_size, micro_batch_size, data_parallel_size
            )

    @property
    def ramps(self) -> bool:
        """Whether the global batch changes during the run."""
        return self._calc is not None

    def global_batch_at(self, consumed_samples: int) -> int:
        """The global batch of the iteration that starts after ``consumed_samples`` samples."""
        if self._calc is None:
            return self.global_batch_size
        self._calc.update(consumed_samples, consistency_check=True)
        return self._calc.get_current_global_batch_size()

    def num_microbatches(self, global_batch: int) -> int:
        """Micro-batches per data-parallel rank of an iteration of ``global_batch`` samples."""
        return global_batch // (self.micro_batch_size * self.data_parallel_size)
