"""The CPU path resumes a ``torch_dist`` checkpoint fully: weights, optimizer, schedule, RNG.

The checkpoints are saved mid-run by the emulated CUDA path (megatron-core DDP and optimizers,
``dist_checkpointing``) in each optimizer format megatron-core 0.16.1 writes
(``optimizer_checkpoints.py``): FP32Optimizer, Float16Optimizer (bf16), the distributed
optimizer's ``fully_reshardable`` state, its ``dp_reshardable`` buckets (bf16, saved at DP = 2),
and the last re-saved as Megatron-LM's ``save_checkpoint`` writes it. The reference for what a
checkpoint holds is megatron-core's own loader: the state it holds after loading (``state.pt``,
dumped per parameter name), never this package's reader.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "emulated"))

from optimizer_checkpoints import ITERS, SAVED_AT, optimizer_runs, run_flags  # noqa: E402

from megatron_endprompt import checkpoint as ckpt  # noqa: E402
from megatron_endprompt.checkpoint.dist_optim import (  # noqa: E402
    bucket_layout,
    read_optimizer_state,
)
from megatron_endprompt.checkpoint.optim_state import check_masters  # noqa: E402
from megatron_endprompt.checkpoint.resume import resume_local  # noqa: E402
from megatron_endprompt.checkpoint.stored import open_checkpoint, rank_state_dict  # noqa: E402
from megatron_endprompt.cli import parse_run_config  # noqa: E402
from megatron_endprompt.model.gpt import build_model  # noqa: E402
from megatron_endprompt.training.loop import train  # noqa: E402
from megatron_endprompt.training.optim import build_adamw  # noqa: E402
from megatron_endprompt.training.state import build_scheduler_for_run  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_process_parallel_state")]
FORMATS = ["fp32", "bf16", "full", "bf16_dp2", "megatron_lm"]
HYPER = ("lr", "weight_decay", "betas", "eps")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return optimizer_runs(tmp_path_factory)


def _cpu_run(runs, *extra: str):
    run = parse_run_config([*run_flags(Path(runs["root"]), *extra), "--device", "cpu"])
    run.model.vocab_size = 259  # ByteTokenizer (the backend sets it from the tokenizer)
    return run


def _fresh(run):
    """The CPU path's module, torch AdamW and LR schedule, as its backend builds them."""
    module = build_model(run.model, seed=run.training.seed)
    t = run.training
    optimizer = build_adamw(module, t.lr, t.weight_decay, (t.adam_beta1, t.adam_beta2), t.adam_eps)
    return module, optimizer, build_scheduler_for_run(run, optimizer)


def _resume(runs, name: str, *flags: str):
    run = _cpu_run(runs, "--load", runs[name]["save"], *flags)
    module, optimizer, scheduler = _fresh(run)
    notes: list[str] = []
    got = resume_local(run, ckpt.ShardRank(), 1, module, optimizer, scheduler, notes.append)
    return got, module, optimizer, scheduler, notes


def _saved_group(groups: list[dict], wd_mult: float) -> dict:
    (group,) = [g for g in groups if g["wd_mult"] == wd_mult]
    return group


@pytest.mark.parametrize("name", FORMATS)
def test_state_equals_what_megatron_core_loads(runs, name):
    """Every parameter's value, exp_avg, exp_avg_sq and step, the groups' hyperparameters, the
    LR schedule, iteration / consumed samples and the host RNG states: bit for bit what
    megatron-core's loader holds after reading the same checkpoint (bf16 runs: the fp32
    master weights become the CPU path's fp32 parameters)."""
    ref = torch.load(runs[name]["state"], weights_only=False)
    got, module, optimizer, scheduler, notes = _resume(runs, name)
    assert got == tuple(ref["progress"]) == (SAVED_AT, SAVED_AT * 4, 0)  # global batch 4
    assert random.getstate() == ref["rng"]["python"]
    assert torch.equal(torch.get_rng_state(), ref["rng"]["torch_cpu"])
    assert scheduler.state_dict() == ref["scheduler"]
    steps = set()
    for pname, param in module.named_parameters():
        want, state = ref["params"][pname], optimizer.state[param]
        assert torch.equal(param.detach(), want["main"]), pname
        assert torch.equal(state["exp_avg"], want["exp_avg"]), pname
        assert torch.equal(state["exp_avg_sq"], want["exp_avg_sq"]), pname
        assert float(state["step"]) == ref["step"] == SAVED_AT
        steps.add(id(state["step"]))  # torch AdamW increments each parameter's own tensor
    assert len(steps) == len(list(module.parameters()))
    for group in optimizer.param_groups:
        saved = _saved_group(ref["groups"], group["wd_mult"])
        assert {k: group[k] for k in HYPER} == {k: saved[k] for k in HYPER}
    assert not notes  # nothing skipped


def _same_state_checkpoint(ref: dict, run, out: str) -> None:
    """A CPU-format checkpoint of megatron-core's loaded state, set through torch's own API."""
    module, optimizer, _ = _fresh(run)
    names = {id(p): n for n, p in module.named_parameters()}
    with torch.no_grad():
        for n, p in module.named_parameters():
            p.copy_(ref["params"][n]["main"])
    for group in optimizer.param_groups:
        saved = _saved_group(ref["groups"], group["wd_mult"])
        group.update({k: saved[k] for k in HYPER})
        for p in group["params"]:
            want = ref["params"][names[id(p)]]
            optimizer.state[p] = {"step": torch.tensor(ref["step"]),
                                  "exp_avg": want["exp_avg"].clone(),
                                  "exp_avg_sq": want["exp_avg_sq"].clone()}  # fmt: skip
    iteration, consumed, valid = ref["progress"]
    shard = {"model": module.state_dict(), "optimizer": optimizer.state_dict(),
             "opt_param_scheduler": ref["scheduler"], "rng": ref["rng"],
             "consumed_samples": consumed, "valid_consumed_samples": valid}  # fmt: skip
    ckpt.save_checkpoint(out, iteration, shard, ckpt.ShardRank())


def test_cpu_continuation_equals_a_cpu_run_from_the_same_state(runs, tmp_path):
    """bf16 + distributed optimizer at DP = 2 (dp_reshardable), resumed on the CPU path: the
    same losses, bit for bit, as the CPU path continuing from megatron-core's loaded state
    written as a CPU-format checkpoint. (The CUDA run itself continues in bf16, so its losses
    are not the reference for an fp32 CPU continuation.)"""
    ref = torch.load(runs["bf16_dp2"]["state"], weights_only=False)
    same = str(tmp_path / "same_state")
    _same_state_checkpoint(ref, _cpu_run(runs), same)
    resumed = train(_cpu_run(runs, "--load", runs["bf16_dp2"]["save"]))
    reference = train(_cpu_run(runs, "--load", same))
    assert resumed.iterations == reference.iterations == ITERS
    assert len(resumed.losses) == ITERS - SAVED_AT
    assert resumed.losses == reference.losses
    assert resumed.grad_norms == reference.grad_norms


@pytest.mark.parametrize("name", ["fp32", "full"])
def test_cpu_continuation_matches_the_cuda_paths(runs, name):
    """fp32 checkpoints: the CPU path's continuation against the CUDA path's own (megatron-core
    loader, DDP, optimizer). The first resumed iteration is a forward from the same weights and
    batch: the same loss bit for bit. Later ones follow an update whose clipping coefficient
    comes from a gradient norm reduced differently (float64 on the CPU path, megatron-core's
    float32 multi-tensor norm), so they agree to float32 precision, not bit for bit."""
    cpu = train(_cpu_run(runs, "--load", runs[name]["save"]))
    cuda = runs[f"{name}_cuda"]
    assert cpu.iterations == cuda["iterations"] == ITERS
    assert cpu.losses[0] == cuda["losses"][0]
    assert cpu.losses[1:] == pytest.approx(cuda["losses"][1:], rel=1e-6)
    assert cpu.grad_norms == pytest.approx(cuda["grad_norms"], rel=1e-6)


def test_dp_reshardable_at_another_layout_is_refused(runs):
    """dp_reshardable buckets saved at TP = 2 hold the TP ranks' own parameter orders: refused
    at TP = 1 naming --no-load-optim; with it the weights, progress and a note come through."""
    refused = r"'dp_reshardable'.*\(TP, PP\) = \(2, 1\).*--no-load-optim"
    with pytest.raises(ValueError, match=refused):
        _resume(runs, "tp2")
    got, module, _, _, notes = _resume(runs, "tp2", "--no-load-optim")
    assert got == (SAVED_AT, SAVED_AT * 4, 0)
    assert any("its RNG states are not loaded" in n and "(1, 2)" in n for n in notes)
    assert any("start afresh" in n for n in notes)


def test_a_wrongly_mapped_bucket_layout_is_refused(runs):
    """Two same-shaped parameters named in swapped order (layers 0 and 1's QKV): the buckets'
    offsets are the same, so only the master-weight check can tell; it refuses instead of
    loading swapped moments."""
    run = _cpu_run(runs)
    module, _, _ = _fresh(run)
    params = [(n, p.shape) for n, p in module.named_parameters()]
    names = [n for n, _ in params]
    a = names.index("decoder.layers.0.self_attention.linear_qkv.weight")
    b = names.index("decoder.layers.1.self_attention.linear_qkv.weight")
    swapped = list(params)
    swapped[a], swapped[b] = params[b], params[a]
    stored = open_checkpoint(runs["bf16_dp2"]["save"])
    weights = rank_state_dict(stored, run.model)
    good = read_optimizer_state(stored, run.model, params, (1, 0), "--load x")
    check_masters(good, weights, "--load x")
    bad = read_optimizer_state(stored, run.model, swapped, (1, 0), "--load x")
    with pytest.raises(ValueError, match="master weight of decoder.layers.1.*--no-load-optim"):
        check_masters(bad, weights, "--load x")


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda c: c.pop("optimizer"), "no optimizer state"),
        (lambda c: c.update(optimizer={0: {}, 1: {}}), "2 chained optimizer states"),
        (lambda c: c["optimizer"].update(param_state_sharding_type="dp_zero_gather_scatter"),
         "'dp_zero_gather_scatter' checkpoint format cannot be mapped"),
    ],
    ids=["none", "chained", "dp_zero_gather_scatter"],
)  # fmt: skip
def test_unmappable_optimizer_formats_name_no_load_optim(runs, change, message):
    run = _cpu_run(runs)
    module, _, _ = _fresh(run)
    stored = open_checkpoint(runs["full"]["save"])
    stored.record = {**stored.record, "optimizer": dict(stored.record["optimizer"])}
    change(stored.record)
    params = [(n, p.shape) for n, p in module.named_parameters()]
    with pytest.raises(ValueError, match=f"{message}.*--no-load-optim"):
        read_optimizer_state(stored, run.model, params, (1, 0), "--load x")


@pytest.mark.parametrize(
    "numels,sizes,want",
    [
        # reversed: 5 at 0, 64 at 64 (start padded to 64), 3 at 128; one bucket of 131
        ([3, 64, 5], [131], [(0, 128), (0, 64), (0, 0)]),
        # the first bucket closes after 64 + 64 = 128 elements, the 3 open the next
        ([3, 64, 5], [128, 3], [(1, 0), (0, 64), (0, 0)]),
        # a bucket closed at a padded start (megatron's shared-embedding rule)
        ([3, 64, 5], [64, 64, 3], [(2, 0), (1, 0), (0, 0)]),
    ],
)
def test_bucket_layout_hand_worked(numels, sizes, want):
    assert bucket_layout(numels, sizes) == want


@pytest.mark.parametrize("sizes", [[130], [131, 5], [100, 31]])
def test_bucket_layout_refuses_sizes_the_parameters_do_not_fill(sizes):
    with pytest.raises(ValueError, match="do not fill the recorded buckets"):
        bucket_layout([3, 64, 5], sizes)
