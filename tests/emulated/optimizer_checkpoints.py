"""torch_dist checkpoints of every optimizer format, saved mid-run by the emulated CUDA path.

Each run trains ``ITERS`` iterations with ``--exit-interval SAVED_AT``: it saves at iteration
``SAVED_AT`` and stops, as a preempted job would. Then, in one-process launches of
``megatron_state_worker.py``:

* ``dump``: megatron-core's own loader reads each checkpoint and the state it then holds is
  written out (``state.pt``), the reference for the CPU path's reading of the same files;
* ``cuda``: the emulated CUDA path resumes each fp32 checkpoint to ``ITERS``;
* ``megatron_lm``: the bf16 distributed-optimizer checkpoint loaded and saved again exactly as
  Megatron-LM core_v0.16.1's ``save_checkpoint`` writes ``torch_dist``; resumed by the CUDA path
  beside our own checkpoint (both at DP = 1) and dumped.

Made once per session under pytest's base temporary directory, shared by every test module.

    from optimizer_checkpoints import optimizer_runs
    runs = optimizer_runs(tmp_path_factory)
    runs["fp32"]["save"], runs["fp32"]["state"], runs["fp32"]["cuda"]["losses"]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from dist_checkpoints import _flags  # noqa: E402
from emulated_run import _read, launch_plan  # noqa: E402

ITERS, SAVED_AT = 4, 2
DISTOPT = ["--use-distributed-optimizer"]
SAVES = {
    # name -> (processes, flags): the optimizer format each one writes
    "fp32": (1, []),  # FP32Optimizer: optimizer.state.exp_avg.KEY, ...
    "bf16": (1, ["--bf16"]),  # Float16Optimizer: the same plus optimizer.state.fp32_param.KEY
    "full": (1, [*DISTOPT, "--dist-ckpt-optim-fully-reshardable"]),  # model space, fp32 masters
    "bf16_dp2": (2, ["--bf16", *DISTOPT]),  # dp_reshardable buckets (Megatron-LM's default)
    "tp2": (2, [*DISTOPT, "--tensor-model-parallel-size", "2"]),  # dp_reshardable at TP = 2
}
WORKER = str(HERE / "megatron_state_worker.py")


def run_flags(root: Path, *extra: str) -> list[str]:
    """The runs' flags without ``--device`` (the corpus of dist_checkpoints.py, 4 layers)."""
    return [*_flags(root), *extra, "--train-iters", str(ITERS), "--eval-iters", "0"]


def _plan(root: Path) -> tuple[list[dict], list[dict]]:
    """(the 2-process launch, the 1-process launch)."""
    two, one = [], []
    for name, (nproc, flags) in SAVES.items():
        save = ["--exit-interval", str(SAVED_AT), "--save", str(_save_dir(root, name))]
        (two if nproc == 2 else one).append(
            {"name": name, "flags": run_flags(root, *flags, *save), "action": "train"}
        )
    for name in ("fp32", "full"):
        load = run_flags(root, *SAVES[name][1], "--load", str(_save_dir(root, name)))
        one.append({"name": f"{name}_cuda", "flags": load, "action": "train"})
    for name in ("fp32", "bf16", "full", "bf16_dp2"):
        load = run_flags(root, *SAVES[name][1], "--load", str(_save_dir(root, name)))
        one.append({"name": f"{name}_dump", "flags": load, "action": "dump"})
    bf16 = SAVES["bf16_dp2"][1]
    mlm = str(_save_dir(root, "megatron_lm"))
    one += [
        {"name": "megatron_lm", "action": "megatron_lm_save", "save": mlm,
         "flags": run_flags(root, *bf16, "--load", str(_save_dir(root, "bf16_dp2")))},
        {"name": "megatron_lm_dump", "action": "dump",
         "flags": run_flags(root, *bf16, "--load", mlm)},
        {"name": "megatron_lm_cuda", "action": "train",
         "flags": run_flags(root, *bf16, "--load", mlm)},
        {"name": "bf16_dp2_cuda_dp1", "action": "train",
         "flags": run_flags(root, *bf16, "--load", str(_save_dir(root, "bf16_dp2")))},
    ]  # fmt: skip
    return two, one


def _save_dir(root: Path, name: str) -> Path:
    """Where run ``name`` saves: apart from dist_checkpoints.py's layouts in the same root (the
    two share the corpus), whose ``tp2`` must stay the 1-iteration checkpoint."""
    return root / f"optimizer_{name}"


def optimizer_runs(tmp_path_factory) -> dict[str, dict]:  # noqa: ANN001
    """name -> ``save`` (the checkpoint), ``state`` (megatron-core's loaded state, where
    dumped), ``cuda`` (the emulated continuation's TrainResult, where run); plus
    ``megatron_lm``'s and ``root`` (the corpus's directory, for :func:`run_flags`)."""
    root = tmp_path_factory.getbasetemp() / "dist_checkpoints"
    done = root / "optimizer_runs.json"
    if not done.is_file():
        _flags(root)  # the corpus
        two, one = _plan(root)
        launch_plan(2, two, root / "optimizer_launch2", worker=WORKER)
        launch_plan(1, one, root / "optimizer_launch1", worker=WORKER)
        runs = {name: {"save": str(_save_dir(root, name))} for name in [*SAVES, "megatron_lm"]}
        for name in runs:
            state = root / "optimizer_launch1" / f"{name}_dump" / "state.pt"
            if state.is_file():
                runs[name]["state"] = str(state)
        for name in ("fp32_cuda", "full_cuda", "megatron_lm_cuda", "bf16_dp2_cuda_dp1"):
            runs[name] = _read(1, root / "optimizer_launch1" / name)
        done.write_text(json.dumps(runs))
    runs = json.loads(done.read_text())
    runs["root"] = str(root)
    return runs
