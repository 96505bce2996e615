"""The CUDA path's legacy-format loader (``checkpoint/legacy_cuda.py``) on hand-written shards.

What a resume can take and what it refuses, checked without a launch: shards written here as
Megatron-LM core_v0.16.1's legacy ``save_checkpoint`` lays them out (``iter_%07d/mp_rank_%02d``,
``model_optim_rng.pt`` with ``args``, ``optimizer``, ``opt_param_scheduler``, ``rng_state``, ...)
and as our CPU path writes them (its extra ``format`` key; torch AdamW state). The full CUDA-path
round trips (megatron-core optimizers, ``distrib_optim.pt``) are in
tests/emulated/test_legacy_cuda.py.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))

from model_fixtures import tiny_model_config  # noqa: E402

from megatron_endprompt import checkpoint as ckpt  # noqa: E402
from megatron_endprompt.checkpoint import legacy_cuda  # noqa: E402
from megatron_endprompt.model.gpt import build_model  # noqa: E402
from megatron_endprompt.training.runtime import Runtime  # noqa: E402
from megatron_endprompt.training.state import TrainState  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_process_parallel_state")
ITERATION = 3


class FakeOptimizer:
    """Records what the loader hands a megatron-core optimizer."""

    def __init__(self) -> None:
        self.loaded, self.reloaded, self.parameter_state = None, 0, None

    def load_state_dict(self, sd) -> None:  # noqa: ANN001
        self.loaded = sd

    def reload_model_params(self) -> None:
        self.reloaded += 1

    def load_parameter_state(self, path: str) -> None:
        self.parameter_state = path


class FakeScheduler:
    loaded = None

    def load_state_dict(self, sd) -> None:  # noqa: ANN001
        self.loaded = sd


def _runtime(pp_size: int = 1) -> Runtime:
    return Runtime(device=torch.device("cpu"), rank=0, world_size=1, tp_rank=0, tp_size=1,
                   pp_rank=0, pp_size=pp_size, cp_rank=0, cp_size=1, dp_rank=0, dp_size=1,
                   tp_group=None, tp_src_rank=0, cp_group=None, dp_group=None,
                   dp_cp_group=None, model_parallel_group=None)  # fmt: skip


def _run(load: str, distributed: bool = False, **checkpoint) -> types.SimpleNamespace:
    flags = dict(load=load, finetune=False, no_load_optim=False, no_load_rng=False)
    flags.update(checkpoint)
    return types.SimpleNamespace(
        checkpoint=types.SimpleNamespace(**flags),
        parallel=types.SimpleNamespace(use_distributed_optimizer=distributed),
        model=tiny_model_config(),
    )


def _objs(seed: int) -> types.SimpleNamespace:
    module = build_model(tiny_model_config(), seed=seed)
    optimizer, scheduler = FakeOptimizer(), FakeScheduler()
    return types.SimpleNamespace(module=[module], optimizer=optimizer, scheduler=scheduler)


def _megatron_lm_shard(model: torch.nn.Module, pp: int = 1) -> dict:
    """A shard with Megatron-LM's keys (consumed samples in ``args``, as its load reads them)."""
    args = argparse.Namespace(tensor_model_parallel_size=1, pipeline_model_parallel_size=pp,
                              num_layers=2, hidden_size=64, ffn_hidden_size=96,
                              num_attention_heads=4, group_query_attention=True,
                              num_query_groups=2, consumed_train_samples=24,
                              consumed_valid_samples=8)  # fmt: skip
    rng = {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
           "torch_rng_state": torch.get_rng_state(), "cuda_rng_state": torch.zeros(16).byte(),
           "rng_tracker_states": {}}  # fmt: skip
    return {"args": args, "checkpoint_version": 3.0, "iteration": ITERATION,
            "model": model.state_dict(), "optimizer": {"state": {}, "param_groups": []},
            "opt_param_scheduler": {"num_steps": 24}, "rng_state": [rng],
            "num_floating_point_operations_so_far": 0}  # fmt: skip


def _write(save: Path, shard: dict, files: tuple[str, ...] = ()) -> Path:
    folder = Path(ckpt.iteration_dir(str(save), ITERATION)) / "mp_rank_00"
    folder.mkdir(parents=True)
    torch.save(shard, folder / ckpt.SHARD_FILE)
    for name in files:
        (folder / name).write_bytes(b"")
    (save / ckpt.TRACKER).write_text(f"{ITERATION}\n")
    return folder


def test_megatron_lm_shard_loads_fully(tmp_path):
    src = build_model(tiny_model_config(), seed=1)
    shard = _megatron_lm_shard(src)
    _write(tmp_path, shard)
    assert legacy_cuda.is_legacy_checkpoint(ckpt.iteration_dir(str(tmp_path), ITERATION))
    random.random(), np.random.rand(), torch.rand(3)  # the saved states are not the current ones
    objs, state = _objs(seed=2), TrainState()
    assert legacy_cuda.load(_run(str(tmp_path)), _runtime(), objs, state, ITERATION)
    for key, value in src.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(objs.module[0].state_dict()[key], value), key
    assert objs.optimizer.loaded == shard["optimizer"] and objs.optimizer.reloaded == 0
    assert objs.optimizer.parameter_state is None  # no distrib_optim.pt, no distributed optimizer
    assert objs.scheduler.loaded == {"num_steps": 24}
    assert torch.equal(torch.get_rng_state(), shard["rng_state"][0]["torch_rng_state"])
    assert random.getstate() == shard["rng_state"][0]["random_rng_state"]
    assert (state.iteration, state.consumed_samples, state.valid_consumed_samples) == (3, 24, 8)


def test_distributed_optimizer_state_is_read_from_distrib_optim_pt(tmp_path):
    folder = _write(tmp_path, _megatron_lm_shard(build_model(tiny_model_config(), seed=1)),
                    files=("distrib_optim.pt",))  # fmt: skip
    objs = _objs(seed=2)
    legacy_cuda.load(_run(str(tmp_path), distributed=True), _runtime(), objs, TrainState(), 3)
    assert objs.optimizer.parameter_state == str(folder / "distrib_optim.pt")
    with pytest.raises(ValueError, match="saved with --use-distributed-optimizer, this run is"):
        legacy_cuda.load(_run(str(tmp_path)), _runtime(), _objs(seed=2), TrainState(), 3)


def test_cpu_written_shard_gives_its_weights_only(tmp_path):
    """Our CPU path's shard (``format``: torch AdamW state) is refused as a resume on CUDA,
    naming the flags; with --no-load-optim its weights and progress load."""
    src = build_model(tiny_model_config(), seed=1)
    shard = {**_megatron_lm_shard(src), "format": "megatron_endprompt/v2"}
    _write(tmp_path, shard)
    with pytest.raises(ValueError, match="written by a CPU run .* --finetune or --no-load-optim"):
        legacy_cuda.load(_run(str(tmp_path)), _runtime(), _objs(seed=2), TrainState(), 3)
    objs, state = _objs(seed=2), TrainState()
    legacy_cuda.load(_run(str(tmp_path), no_load_optim=True), _runtime(), objs, state, 3)
    assert objs.optimizer.loaded is None and objs.optimizer.reloaded == 1
    assert objs.scheduler.loaded is None and state.iteration == ITERATION
    weight = "embedding.word_embeddings.weight"
    assert torch.equal(objs.module[0].state_dict()[weight], src.state_dict()[weight])


@pytest.mark.parametrize("change,message", [
    (lambda s: s.pop("optimizer"), "holds no optimizer state or LR schedule"),
    (lambda s: setattr(s["args"], "pipeline_model_parallel_size", 2),
     r"saved at \(TP, PP\) = \(1, 2\), this run has \(1, 1\)"),
    (lambda s: s.update(model0=s.pop("model"), model1={}),
     "--num-layers-per-virtual-pipeline-stage must be the checkpoint's"),
], ids=["no_optimizer", "other_layout", "virtual_pipeline"])  # fmt: skip
def test_what_cannot_resume_is_refused_by_name(tmp_path, change, message):
    shard = _megatron_lm_shard(build_model(tiny_model_config(), seed=1))
    change(shard)
    _write(tmp_path, shard)
    with pytest.raises(ValueError, match=message):
        legacy_cuda.load(_run(str(tmp_path)), _runtime(), _objs(seed=2), TrainState(), 3)
    assert os.path.isdir(ckpt.iteration_dir(str(tmp_path), ITERATION))
