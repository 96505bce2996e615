"""The CPU (local) backend --load's a torch_dist checkpoint written by the CUDA path (the full
resume of every optimizer format: test_cpu_resumes_torch_dist.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "emulated"))

from dist_checkpoints import _flags, dist_checkpoint  # noqa: E402

from megatron_endprompt import checkpoint as ckpt  # noqa: E402
from megatron_endprompt.checkpoint.resume import resume_local  # noqa: E402
from megatron_endprompt.checkpoint.stored import open_checkpoint, rank_state_dict  # noqa: E402
from megatron_endprompt.cli import parse_run_config  # noqa: E402
from megatron_endprompt.model.gpt import build_model  # noqa: E402
from megatron_endprompt.training.loop import train  # noqa: E402
from megatron_endprompt.training.optim import build_adamw  # noqa: E402
from megatron_endprompt.training.state import build_scheduler_for_run  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_process_parallel_state")]


def _run_flags(tmp_path_factory, save: str, *extra: str) -> list[str]:
    root = tmp_path_factory.getbasetemp() / "dist_checkpoints"
    return [*_flags(root), "--device", "cpu", "--load", save, "--eval-iters", "0",
            *extra]  # fmt: skip


def test_local_backend_takes_torch_dist_weights_and_progress(tmp_path_factory):
    save = dist_checkpoint(tmp_path_factory, "tp1")
    run = parse_run_config(_run_flags(tmp_path_factory, save, "--train-iters", "3",
                                      "--no-load-optim"))  # fmt: skip
    run.model.vocab_size = 259  # ByteTokenizer (the backend sets it from the tokenizer)
    module = build_model(run.model, seed=0)
    optimizer = build_adamw(module, 1e-3, 0.0, (0.9, 0.95), 1e-8)
    got = resume_local(run, ckpt.ShardRank(), 1, module, optimizer, None, print)
    assert got[:2] == (1, 4)  # iteration 1, one global batch of 4 samples consumed
    expected = rank_state_dict(open_checkpoint(save), run.model)
    for key, value in expected.items():
        assert torch.equal(module.state_dict()[key], value), key
    assert not optimizer.state  # --no-load-optim: fresh moments
    # Without it the optimizer's sharded state is mapped too (test_cpu_resumes_torch_dist.py).
    # A longer run than the saved one changes the weight-decay horizon (train_iters x batch),
    # which Megatron-LM refuses unless the flags' schedule overrides the checkpoint's.
    longer = parse_run_config(_run_flags(tmp_path_factory, save, "--train-iters", "3"))
    longer.model.vocab_size = 259
    spare = build_adamw(module, 1e-3, 0.0, (0.9, 0.95), 1e-8)
    with pytest.raises(ValueError, match="--override-opt_param-scheduler"):
        scheduler = build_scheduler_for_run(longer, spare)
        resume_local(longer, ckpt.ShardRank(), 1, module, spare, scheduler, print)
    flags = _run_flags(tmp_path_factory, save, "--train-iters", "3")
    full = parse_run_config([*flags, "--override-opt_param-scheduler"])
    full.model.vocab_size = 259
    scheduler = build_scheduler_for_run(full, optimizer)
    got = resume_local(full, ckpt.ShardRank(), 1, module, optimizer, scheduler, print)
    assert got[:2] == (1, 4)
    assert {float(s["step"]) for s in optimizer.state.values()} == {1.0}
    assert len(optimizer.state) == len(list(module.parameters()))


def test_cpu_training_resumes_from_torch_dist(tmp_path_factory):
    save = dist_checkpoint(tmp_path_factory, "tp1")
    result = train(parse_run_config(_run_flags(tmp_path_factory, save, "--train-iters", "3",
                                               "--no-load-optim")))  # fmt: skip
    assert result.iterations == 3 and len(result.losses) == 2
