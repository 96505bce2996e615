"""CUDA emulation: run megatron-core's CUDA-only training machinery on CPU over gloo.

megatron-core 0.16.1's pipeline schedules, DDP grad buffers, optimizers, gradient clipping,
loss scaler, rerun state machine and dist-checkpoint writer call CUDA unconditionally. What is
enough to run them on CPU (measured; nothing else is patched):

* ``torch.cuda.current_device()`` -> ``"cpu"`` (DDP buffers, p2p receive buffers, optimizer);
* ``torch.cuda.synchronize()`` / ``empty_cache()`` -> no-ops (p2p, dist-checkpoint load/writer);
* factory calls with ``device="cuda"`` (schedules, optimizer, clip_grads, grad_scaler,
  rerun_state_machine) -> CPU, and ``Tensor.cuda()`` -> the tensor itself, through a
  ``TorchFunctionMode``;
* type-string checks (``clip_grads`` asserts ``torch.cuda.FloatTensor``; the fp16/bf16 optimizers
  sort parameters by ``torch.cuda.*Tensor``): ``Tensor.type()`` answers with the CUDA spelling.

The project's own code gets the emulated device from ``device.accelerator``, the one
place that maps ``--device cuda`` to a torch device and a process-group backend: here it answers
(CPU, gloo). gloo matches point-to-point messages in posting order per peer, as NCCL does, so
schedule bugs (wrong send/recv pairing) reproduce faithfully.

Test-only: library code never imports this module.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")


def _is_cuda(device) -> bool:  # noqa: ANN001
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaOnCpu(TorchFunctionMode):
    """Maps ``device='cuda'`` to CPU, makes ``.cuda()`` a no-op and spells types as CUDA's."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if "cuda" not in name else name
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = _CPU
        if func in (torch.Tensor.to,) and args and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_emulation() -> Iterator[None]:
    """Emulate CUDA on CPU for megatron-core and the project's ``--device cuda`` path."""
    import megatron.core.tensor_parallel.random as mpu_random

    from megatron_endprompt import device

    saved = {
        name: getattr(torch.cuda, name)
        for name in ("current_device", "synchronize", "empty_cache", "set_device")
    }
    saved_accelerator = device.accelerator
    saved_tracker_seed = mpu_random.model_parallel_cuda_manual_seed
    torch.cuda.current_device = lambda: _CPU
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.empty_cache = lambda: None
    torch.cuda.set_device = lambda *a, **k: None
    device.accelerator = lambda device_type: (_CPU, "gloo")
    try:
        with _CudaOnCpu():
            yield
    finally:
        for name, fn in saved.items():
            setattr(torch.cuda, name, fn)
        device.accelerator = saved_accelerator
        mpu_random.model_parallel_cuda_manual_seed = saved_tracker_seed


def read_plan(path: str) -> dict:
    """A worker's plan (``{"runs": [...]}``), megatron-core's import-time notices about optional
    accelerators silenced (they would repeat once per rank and module)."""
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    warnings.filterwarnings("ignore", message=".*Apex is not installed.*")
    with open(path) as f:
        return json.load(f)
