"""CPU checks of the CUDA training path against megatron-core 0.16.1's own code.

The CUDA path (megatron_step.py, dist_checkpoint.py) cannot run without a GPU: megatron's DDP
buffers, optimizers and schedules allocate on CUDA. These tests check what can be checked on CPU:
the keyword arguments we pass bind to megatron-core's real signatures, the loss scaling through
the real ``forward_step_calc_loss`` and DDP's gradient scaling gives the global weighted mean, and
the checkpoint state dict uses the unwrapped model's keys.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import types
from functools import partial
from pathlib import Path

import pytest
import torch

from megatron_endprompt.checkpoint import dist as dist_checkpoint
from megatron_endprompt.training import megatron_step
from megatron_endprompt.training.loss import microbatch_objective
from megatron_endprompt.training.runtime import Runtime
from megatron_endprompt.training.state import TrainState
from megatron_endprompt.training.step import StepShape

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from model_fixtures import tiny_model_config  # noqa: E402


@pytest.fixture(scope="module")
def parallel_state_1():
    from megatron_endprompt import device

    device.init_distributed("gloo", rank=0, world_size=1)
    device.initialize_model_parallel()
    yield


def _runtime(dp_size: int = 1) -> Runtime:
    return Runtime(
        device=torch.device("cpu"),
        rank=0,
        world_size=1,
        tp_rank=0,
        tp_size=1,
        pp_rank=0,
        pp_size=1,
        cp_rank=0,
        cp_size=1,
        dp_rank=0,
        dp_size=dp_size,
        tp_group=None,
        tp_src_rank=0,
        cp_group=None,
        dp_group=None,
        dp_cp_group=None,
        model_parallel_group=None,
    )


# --- signatures -----------------------------------------------------------------------------


def test_schedules_accept_our_keywords():
    from megatron.core.pipeline_parallel import schedules

    ours = dict(
        forward_step_func=None,
        data_iterator=None,
        model=None,
        num_microbatches=2,
        seq_length=8,
        micro_batch_size=1,
        forward_only=False,
    )
    for fn in (
        schedules.forward_backward_no_pipelining,
        schedules.forward_backward_pipelining_without_interleaving,
        schedules.forward_backward_pipelining_with_interleaving,
    ):
        inspect.signature(fn).bind(**ours)


def test_schedule_calls_forward_step_with_two_args_and_loss_with_one():
    """forward_step(data_iterator, model) unless partial activation checkpointing is on."""
    from megatron.core.pipeline_parallel import schedules

    src = inspect.getsource(schedules.forward_step)
    assert "forward_step_func(data_iterator, model)" in src
    calc = inspect.getsource(schedules.forward_step_calc_loss)
    assert "outputs = loss_func(output_tensor)" in calc
    # Our forward step passes (iterator, model); the loss function takes the model output.
    batch = {
        "tokens": torch.zeros(1, 4, dtype=torch.long),
        "position_ids": torch.arange(4)[None],
        "labels": torch.zeros(1, 4, dtype=torch.long),
        "loss_mask": torch.ones(1, 4),
    }
    seen = {}

    def model(tokens, position_ids, labels=None):
        seen["args"] = (tokens, position_ids, labels)
        return torch.ones(1, 4)

    out, loss_func = megatron_step._forward_step(iter([batch]), model, lambda m, o: (o, m))
    assert loss_func(out)[1] is batch["loss_mask"]
    assert seen["args"][2] is batch["labels"]


def test_optimizer_and_ddp_configs_take_our_fields():
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=True,
        check_for_nan_in_grad=True,
    )
    OptimizerConfig(
        optimizer="adam",
        lr=1e-3,
        min_lr=1e-5,
        weight_decay=0.1,
        adam_beta1=0.9,
        adam_beta2=0.95,
        adam_eps=1e-8,
        clip_grad=1.0,
        bf16=True,
        fp16=False,
        params_dtype=torch.bfloat16,
        use_distributed_optimizer=False,
    )


def test_megatron_api_signatures():
    from megatron.core import dist_checkpointing, tensor_parallel
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.distributed import DistributedDataParallel, finalize_model_grads
    from megatron.core.optimizer import (
        ChainedOptimizer,
        Float16OptimizerWithFloat16Params,
        FP32Optimizer,
        get_megatron_optimizer,
    )
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.transformer.module import Float16Module

    sig = inspect.signature
    sig(DistributedDataParallel).bind(config=1, ddp_config=2, module=3, disable_bucketing=True)
    sig(Float16Module).bind(1, 2)
    sig(get_megatron_optimizer).bind(1, [2])
    # How the schedules call the hook (schedules.py, end of each schedule).
    sig(finalize_model_grads).bind([1], None, pg_collection=None, force_all_reduce=False)
    for cls in (
        ChainedOptimizer,
        DistributedOptimizer,
        Float16OptimizerWithFloat16Params,
        FP32Optimizer,
    ):
        sig(cls.sharded_state_dict).bind(object(), {}, is_loading=True)
        sig(cls.reload_model_params).bind(object())
        assert hasattr(cls, "get_loss_scale") and hasattr(cls, "scale_loss")
    assert isinstance(inspect.getattr_static(ChainedOptimizer, "param_groups"), property)
    ShardedObject("rng_state", {}, (2, 1), (1, 0), replica_id=3)
    sig(dist_checkpointing.save).bind({}, "dir")
    sig(dist_checkpointing.load).bind({}, "dir")
    sig(dist_checkpointing.load_common_state_dict).bind("dir")
    tracker = tensor_parallel.get_cuda_rng_tracker()
    assert callable(tracker.get_states) and callable(tracker.set_states)


def test_transformer_config_has_the_hooks_we_set():
    import dataclasses

    from megatron.core.transformer import TransformerConfig

    names = {f.name for f in dataclasses.fields(TransformerConfig)}
    hooks = ("no_sync_func", "finalize_model_grads_func", "grad_scale_func")
    assert set(hooks) <= names
    overrides = ("recompute_granularity", "recompute_method", "recompute_num_layers", "fp8")
    assert set(overrides + ("fp8_recipe", "apply_rope_fusion")) <= names


# --- build_megatron_training with recording fakes -------------------------------------------


def _run(bf16: bool, vpp: int | None = None):
    return types.SimpleNamespace(
        training=types.SimpleNamespace(
            bf16=bf16,
            lr=1e-3,
            min_lr=0.0,
            weight_decay=0.1,
            adam_beta1=0.9,
            adam_beta2=0.95,
            adam_eps=1e-8,
            clip_grad=1.0,
            seed=7,
            decoupled_lr=None,
            decoupled_min_lr=None,
        ),
        parallel=types.SimpleNamespace(
            use_distributed_optimizer=False,
            virtual_pipeline_model_parallel_size=vpp,
            overlap_grad_reduce=False,
            overlap_param_gather=False,
            grad_reduce_in_bf16=False,
        ),
    )


def test_build_megatron_training_kwargs_and_hooks(monkeypatch, parallel_state_1):
    import megatron.core.distributed as mcd
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.optimizer import get_megatron_optimizer

    from megatron_endprompt.model.gpt import build_model

    calls = {"ddp": [], "opt": []}

    class FakeDDP(torch.nn.Module):
        def __init__(self, *args, **kwargs):
            super().__init__()
            inspect.signature(DistributedDataParallel).bind(*args, **kwargs)
            calls["ddp"].append(kwargs)
            self.module = kwargs["module"]
            self.config = kwargs["config"]

        def no_sync(self):  # pragma: no cover - identity only
            pass

    class FakeOpt:
        def scale_loss(self, loss):  # pragma: no cover - identity only
            return loss

    def fake_get_opt(*args, **kwargs):
        inspect.signature(get_megatron_optimizer).bind(*args, **kwargs)
        calls["opt"].append(args[0])
        return FakeOpt()

    # megatron_step binds these names at import: patch them where they are looked up.
    monkeypatch.setattr(megatron_step, "DistributedDataParallel", FakeDDP)
    monkeypatch.setattr(megatron_step, "get_megatron_optimizer", fake_get_opt)
    chunk = build_model(tiny_model_config(params_dtype="bfloat16"), seed=1)
    wrapped, opt = megatron_step.build_megatron_training(_run(bf16=True), None, [chunk])
    from megatron.core.transformer.module import Float16Module

    assert isinstance(wrapped[0].module, Float16Module)
    config = chunk.config
    assert config.grad_scale_func == opt.scale_loss
    assert config.no_sync_func == wrapped[0].no_sync
    assert config.finalize_model_grads_func is mcd.finalize_model_grads
    opt_config = calls["opt"][0]
    assert opt_config.bf16 and not opt_config.fp16 and opt_config.params_dtype == torch.bfloat16
    # --params-dtype bfloat16 without --bf16: still mixed precision (fp32 main params).
    calls["opt"].clear()
    chunk = build_model(tiny_model_config(params_dtype="bfloat16"), seed=1)
    wrapped, _ = megatron_step.build_megatron_training(_run(bf16=False), None, [chunk])
    assert isinstance(wrapped[0].module, Float16Module) and calls["opt"][0].bf16
    # fp32 parameters: no Float16Module, no mixed precision.
    calls["opt"].clear()
    chunk = build_model(tiny_model_config(), seed=1)
    wrapped, _ = megatron_step.build_megatron_training(_run(bf16=False), None, [chunk])
    assert wrapped[0].module is chunk and not calls["opt"][0].bf16


# --- loss scaling through megatron-core's own forward_step_calc_loss -------------------------


@pytest.mark.parametrize("dp,cp,m", [(1, 1, 1), (2, 1, 3), (2, 2, 2), (1, 4, 3)])
def test_loss_scaling_matches_global_weighted_mean(dp, cp, m):
    """Per-rank objective -> schedule (x CP / M) -> DDP (x 1/(DP*CP), sum) == sum(w*CE)/W."""
    from megatron.core.pipeline_parallel.schedules import forward_step_calc_loss

    torch.manual_seed(0)
    theta = torch.randn(5, dtype=torch.float64)
    # Per token: CE_i = (x_i . theta)^2, any differentiable function of the parameters.
    xs = torch.randn(dp, cp, m, 2, 3, 5, dtype=torch.float64)  # [dp, cp, mb, b, s_local, 5]
    ws = torch.rand(dp, cp, m, 2, 3, dtype=torch.float64) * (torch.rand(dp, cp, m, 2, 3) > 0.3)
    w_total = ws.sum()
    config = types.SimpleNamespace(
        calculate_per_token_loss=False, timers=None, num_moe_experts=None, mtp_num_layers=None
    )

    reference = torch.zeros_like(theta)
    p = theta.clone().requires_grad_(True)
    ((xs @ p) ** 2 * ws).sum().div(w_total).backward()
    reference = p.grad.clone()

    total = torch.zeros_like(theta)
    for d in range(dp):
        for c in range(cp):
            p = theta.clone().requires_grad_(True)
            for mb in range(m):
                per_token = (xs[d, c, mb] @ p) ** 2

                def loss_fn(mask, out):
                    objective, wsum = microbatch_objective(out, mask, w_total, float(dp * m))
                    return objective, {"weighted_sum": wsum}

                store = []
                out, _ = forward_step_calc_loss(
                    None,
                    per_token,
                    partial(loss_fn, ws[d, c, mb]),
                    config,
                    None,
                    False,
                    m,
                    store,
                    cp_group_size=cp,
                    is_last_stage=True,
                )
                out.backward()
            # megatron DDP, average_in_collective=False: scale by 1/|DP x CP|, then sum.
            total += p.grad / (dp * cp)
    torch.testing.assert_close(total, reference)


# --- train_step_megatron / evaluate_megatron with a simulated schedule ----------------------


def _batches(n: int, b: int = 2, s: int = 4):
    g = torch.Generator().manual_seed(1)
    return [
        {
            "tokens": torch.randint(0, 10, (b, s), generator=g),
            "labels": torch.randint(0, 10, (b, s), generator=g),
            "loss_mask": torch.rand(b, s, generator=g),
            "position_ids": torch.arange(s).expand(b, s),
        }
        for _ in range(n)
    ]


class _Chunk(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5))
        self.zeroed = 0

    def forward(self, tokens, position_ids, labels=None):
        return (tokens.double() - labels.double()).abs() * self.w

    def zero_grad_buffer(self):
        self.zeroed += 1


def _fake_schedule(record):
    from megatron.core.pipeline_parallel.schedules import (
        forward_backward_no_pipelining,
        forward_step_calc_loss,
    )

    config = types.SimpleNamespace(
        calculate_per_token_loss=False, timers=None, num_moe_experts=None, mtp_num_layers=None
    )

    def run(**kwargs):
        inspect.signature(forward_backward_no_pipelining).bind(**kwargs)
        record.append(kwargs)
        store = []
        for _ in range(kwargs["num_microbatches"]):
            out, loss_func = kwargs["forward_step_func"](kwargs["data_iterator"], kwargs["model"])
            loss, _ = forward_step_calc_loss(
                kwargs["model"], out, loss_func, config, None, False,
                kwargs["num_microbatches"], store, cp_group_size=1, is_last_stage=True,
            )  # fmt: skip
            if not kwargs["forward_only"]:
                loss.backward()
        return store

    return lambda: run


def test_train_step_megatron_single_rank(monkeypatch):
    record = []
    monkeypatch.setattr(megatron_step, "get_forward_backward_func", _fake_schedule(record))
    batches = _batches(3)
    chunk = _Chunk()

    class Opt:
        zeroed = 0

        def zero_grad(self):
            self.zeroed += 1

        def step(self):
            return True, 2.5, None

        def get_loss_scale(self):
            return torch.tensor([1.0])

    opt = Opt()
    shape = StepShape(micro_batch_size=2, seq_length=4, num_microbatches=3)
    out = megatron_step.train_step_megatron([chunk], opt, iter(batches), shape, _runtime())
    per_token = [(b["tokens"] - b["labels"]).abs().double() * 0.5 for b in batches]
    weighted = sum((pt * b["loss_mask"].double()).sum() for pt, b in zip(per_token, batches))
    w_total = sum(b["loss_mask"].double().sum() for b in batches)
    assert out["loss"] == pytest.approx(float(weighted / w_total), rel=1e-6)
    assert out["grad_norm"] == 2.5 and out["skipped"] == 0.0 and out["loss_scale"] == 1.0
    assert chunk.zeroed == 1 and opt.zeroed == 1
    # d(loss)/dw with one DP rank: sum(w * |t - l|) / W.
    expected = sum(
        ((b["tokens"] - b["labels"]).abs().double() * b["loss_mask"].double()).sum()
        for b in batches
    )
    assert float(chunk.w.grad) == pytest.approx(float(expected / w_total), rel=1e-5)
    kwargs = record[0]
    assert kwargs["model"] is chunk and kwargs["forward_only"] is False


def test_evaluate_megatron_single_rank(monkeypatch):
    record = []
    monkeypatch.setattr(megatron_step, "get_forward_backward_func", _fake_schedule(record))
    batches = _batches(4)
    chunk = _Chunk()
    shape = StepShape(micro_batch_size=2, seq_length=4, num_microbatches=2)
    loss = megatron_step.evaluate_megatron([chunk], iter(batches), shape, _runtime(), 2)
    weighted = sum(
        ((b["tokens"] - b["labels"]).abs().double() * 0.5 * b["loss_mask"].double()).sum()
        for b in batches
    )
    w_total = sum(b["loss_mask"].double().sum() for b in batches)
    assert loss == pytest.approx(float(weighted / w_total), rel=1e-6)
    assert all(k["forward_only"] for k in record) and chunk.training


# --- checkpoint state dict --------------------------------------------------------------------


def _stub_megatron_args(run, consumed_train, consumed_valid, iteration, ckpt_format="torch"):
    """megatron_lm.megatron_args on the fake run objects (its real output: tests/emulated)."""
    return argparse.Namespace(
        consumed_train_samples=consumed_train, iteration=iteration, ckpt_format=ckpt_format
    )


def test_sharded_state_uses_unwrapped_model_keys(parallel_state_1, monkeypatch):
    monkeypatch.setattr(dist_checkpoint.megatron_lm, "megatron_args", _stub_megatron_args)
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.distributed.data_parallel_base import _BaseDataParallel

    from megatron_endprompt.model.gpt import build_model

    module = build_model(tiny_model_config(), seed=1)
    wrapper = _BaseDataParallel(config=module.config, module=module)
    seen = {}

    class Opt:
        def sharded_state_dict(self, model_sd, is_loading=False, metadata=None):
            seen["model_sd"], seen["is_loading"] = model_sd, is_loading
            seen["metadata"] = metadata
            return {"opt": 1}

    class Sched:
        def state_dict(self):
            return {"num_steps": 3}

    objs = types.SimpleNamespace(
        model=[wrapper], module=[module], optimizer=Opt(), scheduler=Sched()
    )
    run = types.SimpleNamespace(
        checkpoint=types.SimpleNamespace(
            finetune=False,
            no_load_optim=False,
            no_load_rng=False,
            dist_ckpt_optim_fully_reshardable=False,
        ),
        parallel=types.SimpleNamespace(use_distributed_optimizer=False),
        training=types.SimpleNamespace(seed=7),
        to_dict=lambda: {"model": {}},
    )
    state = types.SimpleNamespace(iteration=5, consumed_samples=40, valid_consumed_samples=8)
    rt = _runtime()
    sd = dist_checkpoint.sharded_state(run, rt, objs, state)
    # Megatron-LM's content metadata, plus the live DP x CP group TE layers ask for.
    assert seen["metadata"]["singleton_local_shards"] is False
    assert seen["metadata"]["chained_optim_avoid_prefix"] is True
    assert "distrib_optim_sharding_type" not in seen["metadata"]
    assert seen["metadata"]["dp_cp_group"] is not None
    assert sd["run_config"] == {"model": {}}
    assert (sd["args"].consumed_train_samples, sd["args"].ckpt_format) == (40, "torch_dist")
    keys = list(sd["model"])
    assert keys and not any(k.startswith("module.") for k in keys)
    assert seen["model_sd"] is sd["model"] and seen["is_loading"] is False
    assert isinstance(sd["rng_state"], ShardedObject) and sd["rng_state"].replica_id == 0
    assert sd["rng_layout"] == [1, 1] and sd["iteration"] == 5
    assert sd["valid_consumed_samples"] == 8  # the validation iterator's position
    # What dist_checkpointing.load returns has the same keys: it loads into the bare module.
    plain = {k: v.data for k, v in sd["model"].items() if isinstance(v.data, torch.Tensor)}
    missing, unexpected = module.load_state_dict(plain, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing)
    # Finetune: weights only.
    run.checkpoint.finetune = True
    sd = dist_checkpoint.sharded_state(run, rt, objs, state, for_load=True)
    assert "optimizer" not in sd and "rng_state" not in sd and "rng_layout" not in sd
    run.checkpoint.finetune = False
    sd = dist_checkpoint.sharded_state(run, rt, objs, state, for_load=True, load_rng=False)
    assert "optimizer" in sd and "rng_state" not in sd and seen["is_loading"] is True


def test_build_model_chunks_seeds_once(monkeypatch, parallel_state_1):
    seeds = []

    def fake_build(*a, seed=None, **k):
        seeds.append(seed)
        return torch.nn.Linear(2, 2)

    monkeypatch.setattr(megatron_step, "build_model", fake_build)
    run = types.SimpleNamespace(
        model=types.SimpleNamespace(transformer_impl="local"),
        parallel=types.SimpleNamespace(virtual_pipeline_model_parallel_size=3),
        training=types.SimpleNamespace(
            seed=11, recompute_granularity=None, fp8_format=None, micro_batch_size=1
        ),
        endprompt=types.SimpleNamespace(position_mode="contiguous"),
    )
    megatron_step.build_model_chunks(run, _runtime())
    assert seeds == [11, None, None]


_PSUTIL_STUB = """
class _Mem:
    rss = 0


class Process:
    def __init__(self, pid=None):
        pass

    def memory_info(self):
        return _Mem()
"""


def test_dist_checkpoint_round_trip_on_cpu(tmp_path, monkeypatch, parallel_state_1):
    monkeypatch.setattr(dist_checkpoint.megatron_lm, "megatron_args", _stub_megatron_args)
    """save() then load() through megatron's real dist_checkpointing (CUDA calls stubbed).

    megatron-core 0.16.1's torch_dist writer calls torch.cuda.synchronize/current_device and
    needs psutil (filesystem_async._process_memory), so on CPU those are stubbed; the writer's
    spawned process finds the psutil stub through PYTHONPATH.
    """
    import importlib.util
    import os

    from megatron_endprompt import checkpoint as ckpt
    from megatron_endprompt.model.gpt import build_model

    if importlib.util.find_spec("psutil") is None:
        stub = tmp_path / "stub"
        stub.mkdir()
        (stub / "psutil.py").write_text(_PSUTIL_STUB)
        monkeypatch.syspath_prepend(str(stub))
        path = os.pathsep.join(p for p in (str(stub), os.environ.get("PYTHONPATH")) if p)
        monkeypatch.setenv("PYTHONPATH", path)
        import megatron.core.dist_checkpointing.strategies.filesystem_async as fsa

        monkeypatch.setattr(fsa, "HAVE_PSUTIL", True, raising=False)
        monkeypatch.setattr(fsa, "psutil", __import__("psutil"), raising=False)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")

    class Opt:
        reloaded = 0

        def sharded_state_dict(self, model_sd, is_loading=False, metadata=None):
            return {}

        def load_state_dict(self, sd):
            pass

        def reload_model_params(self):
            self.reloaded += 1

    class Sched:
        loaded = None

        def state_dict(self):
            return {"num_steps": 3}

        def load_state_dict(self, sd):
            self.loaded = sd

    def objs(seed):
        m = build_model(tiny_model_config(), seed=seed)
        return types.SimpleNamespace(
            model=[object()], module=[m], optimizer=Opt(), scheduler=Sched()
        )

    import dataclasses

    save_dir = str(tmp_path / "ckpt")
    model_config = tiny_model_config()
    run = types.SimpleNamespace(
        checkpoint=types.SimpleNamespace(
            save=save_dir,
            load=save_dir,
            keep_last=None,
            finetune=False,
            no_load_optim=False,
            no_load_rng=False,
            dist_ckpt_optim_fully_reshardable=False,
        ),
        parallel=types.SimpleNamespace(use_distributed_optimizer=False),
        model=model_config,
        training=types.SimpleNamespace(seed=7),
        to_dict=lambda: {"model": dataclasses.asdict(model_config)},
    )
    src = objs(1)
    rt = _runtime()
    path = dist_checkpoint.save(run, rt, src, TrainState(3, 12, 8))
    assert path == ckpt.iteration_dir(save_dir, 3) and ckpt.read_tracker(save_dir) == 3

    dst = objs(2)
    state = TrainState()
    assert dist_checkpoint.load(run, rt, dst, state)
    assert (state.iteration, state.consumed_samples, state.valid_consumed_samples) == (3, 12, 8)
    assert dst.scheduler.loaded == {"num_steps": 3} and dst.optimizer.reloaded == 0
    for a, b in zip(src.module[0].state_dict().values(), dst.module[0].state_dict().values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)

    # Weights only (--finetune): the optimizer's main params are refreshed from the model.
    run.checkpoint.finetune = True
    dst = objs(3)
    state = TrainState()
    assert dist_checkpoint.load(run, rt, dst, state)
    assert dst.optimizer.reloaded == 1 and state.iteration == 0 and dst.scheduler.loaded is None

    # Another (PP, TP) grid: the RNG states are skipped instead of failing the load.
    run.checkpoint.finetune = False
    rt_tp2 = _runtime()
    rt_tp2.tp_size = 2
    from megatron.core import dist_checkpointing

    saved = dist_checkpointing.load_common_state_dict(path)["rng_layout"]
    assert list(saved) == [1, 1] != dist_checkpoint._layout(rt_tp2)

    # Megatron-LM's release layout (tracker "release", folder release/) loads like iter_N.
    os.replace(path, os.path.join(save_dir, "release"))
    (tmp_path / "ckpt" / ckpt.TRACKER).write_text("release\n")
    run.checkpoint.finetune = True
    dst = objs(4)
    fresh = TrainState()
    assert dist_checkpoint.load(run, rt, dst, fresh)
    for a, b in zip(src.module[0].state_dict().values(), dst.module[0].state_dict().values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
    # The recorded model config is checked: a flag that disagrees is refused by name.
    run.model = dataclasses.replace(model_config, norm_epsilon=1e-3)
    with pytest.raises(ValueError, match="--norm-epsilon"):
        dist_checkpoint.load(run, rt, objs(5), fresh)
