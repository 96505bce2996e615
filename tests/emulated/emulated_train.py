"""The ranks of emulated ``--device cuda`` training runs (launched by torchrun in the tests).

    python -m torch.distributed.run --nproc-per-node N tests/emulated/emulated_train.py PLAN.json

``PLAN.json`` lists runs, executed one after the other by the same N processes (megatron-core
and torch are imported once; the process group stays, megatron's parallel state is rebuilt per
run)::

    {"runs": [{"name": "pp2", "out": "DIR", "flags": [...], "sigterm": "0:2"}, ...]}

Each run parses its flags exactly as ``python -m megatron_endprompt.train`` does on a CUDA machine
(``--device cuda`` is added here) and calls the same ``training.loop.train`` inside
:func:`cuda_emulation.cuda_emulation`. Every rank writes ``DIR/rank{R}.json`` (the TrainResult:
losses, grad norms, iterations, ...), so the tests read typed results, not console lines. Any
exception aborts the launch (its traceback names the run).

``"sigterm": "R:K"`` makes rank R send itself a real SIGTERM just before the loop's K-th
exit-signal poll (preemption: one rank signalled, every rank must save and exit cleanly).

``"enospc": "R:K"`` makes rank R's writes into ``iter_K.tmp`` (the checkpoint of iteration K)
fail with ENOSPC, a full disk seen by one rank; such a run is expected to end with a
``ValueError`` (the CLI's one-line error) on every rank, recorded as ``{"error": ...}``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cuda_emulation import cuda_emulation, read_plan  # noqa: E402


@contextlib.contextmanager
def _sigterm_at(spec: str | None):
    """Patch the exit-signal poll to raise SIGTERM on rank R at poll K (``"R:K"``)."""
    from megatron_endprompt.training.signals import ExitSignalHandler

    if not spec:
        yield
        return
    rank, at = (int(x) for x in spec.split(":"))
    real = ExitSignalHandler.should_exit
    calls = {"n": 0}

    def should_exit(self, device):  # noqa: ANN001, ANN202
        calls["n"] += 1
        if calls["n"] == at and int(os.environ.get("RANK", "0")) == rank:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, device)

    ExitSignalHandler.should_exit = should_exit
    try:
        yield
    finally:
        ExitSignalHandler.should_exit = real


@contextlib.contextmanager
def _enospc_at(spec: str | None):
    """Rank R's writes of files under ``iter_K.tmp`` fail with ENOSPC (``"R:K"``); megatron-core's
    writer forks its workers, which inherit the patched ``open``."""
    import builtins
    import errno

    if not spec or int(os.environ.get("RANK", "0")) != int(spec.split(":")[0]):
        yield
        return
    target = f"iter_{int(spec.split(':')[1]):07d}.tmp"
    real = builtins.open

    def full_open(file, mode="r", *args, **kwargs):  # noqa: ANN001, ANN202
        if target in str(file) and any(c in mode for c in "wax"):
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        return real(file, mode, *args, **kwargs)

    builtins.open = full_open
    try:
        yield
    finally:
        builtins.open = real


def _run_one(spec: dict, world: int, rank: int) -> None:
    from megatron.core import parallel_state as ps

    from megatron_endprompt.cli import parse_run_config
    from megatron_endprompt.training.loop import train

    flags = spec["flags"]
    if "--device" in flags:
        raise SystemExit(f"run {spec['name']}: drop --device (emulated_train.py sets cuda)")
    run = parse_run_config(["--device", "cuda", *flags], world_size=world, cuda_available=True)
    report: dict
    with _sigterm_at(spec.get("sigterm")), _enospc_at(spec.get("enospc")):
        try:
            report = dataclasses.asdict(train(run))
        except ValueError as err:
            if not spec.get("enospc"):
                raise RuntimeError(f"emulated run {spec['name']!r} failed on rank {rank}") from err
            report = {"error": str(err), "reporting": rank == 0}
        except BaseException as err:
            raise RuntimeError(f"emulated run {spec['name']!r} failed on rank {rank}") from err
    os.makedirs(spec["out"], exist_ok=True)
    with open(os.path.join(spec["out"], f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()


def main(argv: list[str]) -> int:
    plan = read_plan(argv[0])
    from megatron_endprompt.training.runtime import teardown_runtime

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    with cuda_emulation():
        for spec in plan["runs"]:
            _run_one(spec, world, rank)
        teardown_runtime()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
