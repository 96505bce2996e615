"""The bugs a first GPU run would have hit on the CUDA path, each pinned by a test.

(The virtual-pipeline p2p pairing, the distributed-optimizer save and resume and the SIGTERM
save are proven end to end in test_parallel_parity.py.)
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from emulated_run import run_flags

from megatron_endprompt.checkpoint import dist as dist_checkpoint
from megatron_endprompt.cli import parse_run_config
from megatron_endprompt.data.tokenizers import build_tokenizer
from megatron_endprompt.training import megatron_step
from megatron_endprompt.training.state import build_datasets_for_run


def _run(emu_data, *extra, world_size=1):
    data, cache = emu_data
    flags = run_flags(data, cache, "--train-iters", "4", *extra)
    argv = ["--device", "cuda", *flags]
    return parse_run_config(argv, world_size=world_size, cuda_available=True)


@pytest.mark.usefixtures("single_process_parallel_state")
def test_model_chunks_are_moved_to_the_runtime_device(emu_data):
    """megatron-core builds parallel linears on the GPU, torch norms on CPU: move every chunk."""
    run = _run(emu_data)
    rt = types.SimpleNamespace(device=torch.device("meta"))
    chunks = megatron_step.build_model_chunks(run, rt)
    tensors = [t for c in chunks for t in [*c.parameters(), *c.buffers()]]
    assert tensors and all(t.device.type == "meta" for t in tensors)


LAYOUTS = {
    "contiguous": ["--position-mode", "contiguous"],
    "endprompt_tail_fixed": ["--position-mode", "endprompt", "--endprompt-terminal", "tail",
                             "--endprompt-tail-length", "5"],
    "endprompt_cue_fixed": ["--position-mode", "endprompt", "--endprompt-terminal", "cue"],
    "endprompt_tail_random": ["--position-mode", "endprompt", "--endprompt-terminal", "tail",
                              "--endprompt-tail-length", "5", "--endprompt-placement", "random"],
    "pose": ["--position-mode", "pose"],
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_batch_shared_layout_is_a_fact_of_the_data(emu_data, name):
    """The RoPE-fusion decision, made once from the flags, holds for every micro-batch read."""
    data, cache = emu_data
    flags = run_flags(data, cache, "--train-iters", "4", *LAYOUTS[name])  # 2 cues of 2 lengths
    run = parse_run_config(["--device", "cuda", *flags], world_size=1, cuda_available=True)
    train, _ = build_datasets_for_run(
        run, types.SimpleNamespace(is_data_reader=True), build_tokenizer("ByteTokenizer", None)
    )
    mbs = run.training.micro_batch_size
    rows = np.stack([train[i]["position_ids"].numpy() for i in range(32)])
    shared_everywhere = all((rows[k : k + mbs] == rows[k]).all() for k in range(0, len(rows), mbs))
    assert megatron_step.batch_shared_layout(run) == shared_everywhere, name


@pytest.mark.usefixtures("single_process_parallel_state")
def test_model_keeps_its_rope_fusion_flag_and_checks_declared_layouts(emu_data):
    from megatron_endprompt.model.gpt import build_model

    run = _run(emu_data)
    model = build_model(run.model, seed=1, batch_shared_positions=True)
    before = model.config.apply_rope_fusion
    tokens = torch.zeros(2, 32, dtype=torch.long)
    same = torch.arange(32).expand(2, 32)
    model(tokens, same)
    assert model.config.apply_rope_fusion == before
    differ = torch.stack([torch.arange(32), torch.arange(32) + 7])
    with pytest.raises(ValueError, match="declared a batch-shared layout"):
        model(tokens, differ)


def test_interleaved_schedule_uses_megatron_lm_p2p_settings(emu_data):
    run = _run(emu_data, "--pipeline-model-parallel-size", "2",
               "--num-layers-per-virtual-pipeline-stage", "1", world_size=2)  # fmt: skip
    overrides = megatron_step.transformer_overrides(run)
    assert overrides["overlap_p2p_comm"] is True and overrides["batch_p2p_comm"] is False
    plain = megatron_step.transformer_overrides(_run(emu_data))
    assert "overlap_p2p_comm" not in plain and "batch_p2p_comm" not in plain


def test_interleaved_schedule_micro_batch_rule_is_checked_before_compute(emu_data):
    with pytest.raises(ValueError, match="multiple of --pipeline-model-parallel-size=2"):
        _run(emu_data, "--pipeline-model-parallel-size", "2", "--global-batch-size", "6",
             "--num-layers-per-virtual-pipeline-stage", "1", world_size=2)  # fmt: skip


def test_distributed_optimizer_sharding_metadata(emu_data):
    run = _run(emu_data, "--use-distributed-optimizer")
    md = dist_checkpoint.sharding_metadata(run)
    assert md == {
        "singleton_local_shards": False,
        "chained_optim_avoid_prefix": True,
        "distrib_optim_sharding_type": "dp_reshardable",
    }
    run = _run(emu_data, "--use-distributed-optimizer", "--dist-ckpt-optim-fully-reshardable")
    assert dist_checkpoint.sharding_metadata(run)["distrib_optim_sharding_type"] == (
        "fully_reshardable"
    )


def test_dp_reshardable_optimizer_state_refuses_another_layout(emu_data):
    run = _run(emu_data, "--use-distributed-optimizer", "--load", "/ckpt")
    rt = types.SimpleNamespace(pp_size=1, tp_size=2)
    md = {"distrib_optim_sharding_type": "dp_reshardable"}
    with pytest.raises(ValueError, match="--dist-ckpt-optim-fully-reshardable"):
        dist_checkpoint._check_layout_change(run, rt, [2, 1], md, "/ckpt/iter_0000002")
    dist_checkpoint._check_layout_change(run, rt, [1, 2], md, "p")  # same layout
    full = {"distrib_optim_sharding_type": "fully_reshardable"}
    dist_checkpoint._check_layout_change(run, rt, [2, 1], full, "p")
    weights_only = _run(emu_data, "--use-distributed-optimizer", "--load", "/c", "--no-load-optim")
    dist_checkpoint._check_layout_change(weights_only, rt, [2, 1], md, "p")


def test_fp16_overflow_skips_steps_without_advancing_the_schedule(one_rank, emu_dir):
    """fp16 starts at loss scale 2**32: overflowing steps are skipped, not fatal (DDP NaN check)."""
    result = one_rank["fp16"]
    assert result["iterations"] == 3 and all(np.isfinite(result["losses"]))
    assert all(np.isnan(result["grad_norms"]))  # every step overflowed: no norm
    common = torch.load(emu_dir / "fp16_ckpt" / "iter_0000003" / "common.pt", weights_only=False)
    # As Megatron-LM: the LR schedule advances only on successful updates...
    assert common["opt_param_scheduler"]["num_steps"] == 0
    assert common["consumed_samples"] == 3 * 8  # ... the data does on every iteration
    scale = float(common["optimizer"]["grad_scaler"]["scale"])
    assert scale < 2.0**32  # backed off after the overflows


def test_parallel_state_is_rebuilt_when_only_the_virtual_pipeline_changes(monkeypatch):
    """Same TP/PP/CP, another VPP: megatron's state must be re-created, not reused."""
    from megatron.core import parallel_state as ps

    from megatron_endprompt import device

    calls = []
    monkeypatch.setattr(ps, "model_parallel_is_initialized", lambda: True)
    monkeypatch.setattr(ps, "get_tensor_model_parallel_world_size", lambda: 1)
    monkeypatch.setattr(ps, "get_pipeline_model_parallel_world_size", lambda: 2)
    monkeypatch.setattr(ps, "get_context_parallel_world_size", lambda: 1)
    monkeypatch.setattr(ps, "get_virtual_pipeline_model_parallel_world_size", lambda: None)
    monkeypatch.setattr(ps, "destroy_model_parallel", lambda: calls.append("destroy"))
    monkeypatch.setattr(ps, "initialize_model_parallel", lambda **kw: calls.append(kw))
    device.initialize_model_parallel(1, 2, None, 1)
    assert calls == []  # unchanged layout: kept
    device.initialize_model_parallel(1, 2, 2, 1)
    assert calls[0] == "destroy" and calls[1]["virtual_pipeline_model_parallel_size"] == 2
