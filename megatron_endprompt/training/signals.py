"""SIGTERM -> finish the current iteration, save a checkpoint, exit 0 (cluster preemption)."""

from __future__ import annotations

import signal
import types

import torch
import torch.distributed as dist

from megatron_endprompt.device import all_reduce


class ExitSignalHandler:
    """Records SIGTERM (and SIGINT if asked) instead of dying mid-step.

    The loop polls :meth:`should_exit` once per iteration; it is a collective so every rank
    agrees, even when the scheduler signalled only some of them.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)) -> None:
        self.received: int | None = None
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        self.received = signum

    def should_exit(self, device: torch.device) -> bool:
        """True on every rank when any rank received a signal."""
        flag = torch.tensor(1 if self.received is not None else 0, device=device)
        world = dist.group.WORLD if dist.is_initialized() else None
        return bool(all_reduce(flag, world, op=dist.ReduceOp.MAX).item())

    def restore(self) -> None:
        """Reinstall the previous handlers."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
