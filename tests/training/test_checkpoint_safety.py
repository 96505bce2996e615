"""Loading a checkpoint is safe: no code runs, damaged shards fail clearly, a missing --load is
never silently taken for a fresh start when that cannot be what was meant."""

import argparse
import os

import pytest
import torch
from train_fixtures import make_corpus, train_flags

from megatron_endprompt import checkpoint as ckpt
from megatron_endprompt.checkpoint.layout import CHECKSUM_SUFFIX, check_load_dir
from megatron_endprompt.checkpoint.shards import safe_load
from megatron_endprompt.cli import parse_run_config
from megatron_endprompt.train import main
from megatron_endprompt.training import backend as backend_module
from megatron_endprompt.training.loop import train


class Payload:
    """Unpickling this calls ``open(marker, "w")``: harmless, but it leaves a file behind."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _saved(tmp_path, state=None) -> tuple[str, str]:
    """A published one-shard checkpoint; returns (save dir, shard file)."""
    save = str(tmp_path / "ckpt")
    state = state or {"model": {"w": torch.arange(6.0)}, "rng": ckpt.get_rng_state()}
    ckpt.save_checkpoint(save, 2, state, ckpt.ShardRank())
    return save, ckpt.checkpoint_path(save, ckpt.ShardRank())


# --- 1. loading never executes code ------------------------------------------------------------


def test_planted_payload_is_refused_and_never_runs(tmp_path):
    save, shard = _saved(tmp_path)
    marker = str(tmp_path / "pwned")
    torch.save({"model": {}, "evil": Payload(marker)}, shard)
    ckpt.layout.write_checksum(shard)  # a matching checksum: the allowlist alone must refuse
    with pytest.raises(ValueError, match="holds an object outside the checkpoint allowlist"):
        ckpt.load_checkpoint(save, ckpt.ShardRank())
    assert not os.path.exists(marker)
    # The payload is real: an unrestricted load would have run it.
    torch.load(shard, weights_only=False)
    assert os.path.exists(marker)


def test_error_names_the_load_dir_file_and_global(tmp_path):
    save, shard = _saved(tmp_path)
    torch.save({"evil": Payload(str(tmp_path / "m"))}, shard)
    os.remove(shard + CHECKSUM_SUFFIX)
    with pytest.raises(ValueError) as err:
        ckpt.load_checkpoint(save, ckpt.ShardRank())
    msg = str(err.value)
    assert msg.startswith(f"--load={save}: {shard} holds an object outside") and "open" in msg


def test_rng_states_and_megatron_args_load(tmp_path):
    state = {
        "model": {"w": torch.ones(2)},
        "rng": ckpt.get_rng_state(),
        "args": argparse.Namespace(num_layers=2, params_dtype=torch.bfloat16, lr=1e-4),
        "optimizer": {"state": {}, "param_groups": [{"betas": (0.9, 0.95), "lr": 1e-3}]},
    }
    save, _ = _saved(tmp_path, state)
    loaded = ckpt.load_checkpoint(save, ckpt.ShardRank())
    assert loaded["args"].num_layers == 2 and loaded["args"].params_dtype == torch.bfloat16
    assert loaded["rng"]["numpy"][0] == "MT19937"
    assert (loaded["rng"]["numpy"][1] == state["rng"]["numpy"][1]).all()
    assert loaded["rng"]["python"] == state["rng"]["python"]
    ckpt.set_rng_state(loaded["rng"])


def test_allowlist_alone_reads_our_shards(tmp_path):
    """Without the globals megatron.core registers at import, our own list is enough."""
    save, shard = _saved(tmp_path, {"rng": ckpt.get_rng_state(), "args": argparse.Namespace(a=1)})
    before = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        assert safe_load(shard, "x")["args"].a == 1
    finally:
        torch.serialization.add_safe_globals(before)


def test_safe_load_leaves_the_process_allowlist_as_it_was(tmp_path):
    """torch's safe_globals context unregisters its classes on exit, even ones registered
    before: megatron-core's own dist-checkpoint loads (args in common.pt) must still work."""
    _, shard = _saved(tmp_path, {"args": argparse.Namespace(a=1)})
    torch.serialization.add_safe_globals([argparse.Namespace])
    before = set(map(id, torch.serialization.get_safe_globals()))
    safe_load(shard, "x")
    assert set(map(id, torch.serialization.get_safe_globals())) == before


# --- 2. checksums --------------------------------------------------------------------------------


def test_checksum_written_beside_each_shard(tmp_path):
    _, shard = _saved(tmp_path)
    digest, name = open(shard + CHECKSUM_SUFFIX).read().split()
    assert name == ckpt.SHARD_FILE and digest == ckpt.layout.file_sha256(shard)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_shard_gives_clear_error(tmp_path, damage):
    save, shard = _saved(tmp_path)
    data = bytearray(open(shard, "rb").read())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        data = data[: len(data) // 2]
    open(shard, "wb").write(bytes(data))
    with pytest.raises(ValueError, match=f"checkpoint shard {shard} is corrupt: sha256 mismatch"):
        ckpt.load_checkpoint(save, ckpt.ShardRank())


def test_shard_without_checksum_loads_unchecked(tmp_path):
    save, shard = _saved(tmp_path)
    os.remove(shard + CHECKSUM_SUFFIX)  # as older checkpoints and conversions
    assert torch.equal(
        ckpt.load_checkpoint(save, ckpt.ShardRank())["model"]["w"], torch.arange(6.0)
    )
    open(shard, "wb").write(open(shard, "rb").read()[:100])
    with pytest.raises(ValueError, match=f"--load={save}: cannot read checkpoint shard {shard}"):
        ckpt.load_checkpoint(save, ckpt.ShardRank())


# --- 3. a missing --load -------------------------------------------------------------------------


def test_check_load_dir(tmp_path):
    save, shard = _saved(tmp_path)
    missing, empty = str(tmp_path / "missing"), str(tmp_path / "empty")
    os.makedirs(empty)
    assert check_load_dir(save, finetune=True, exit_on_missing=True)
    for finetune, exit_on_missing in [(False, False), (True, False), (False, True)]:
        with pytest.raises(ValueError, match="is a file, not a checkpoint directory"):
            check_load_dir(shard, finetune, exit_on_missing)
    for where in (missing, empty):
        assert not check_load_dir(where, finetune=False, exit_on_missing=False)
        with pytest.raises(ValueError, match="nothing to --finetune"):
            check_load_dir(where, finetune=True, exit_on_missing=False)
        with pytest.raises(ValueError, match="--exit-on-missing-checkpoint"):
            check_load_dir(where, finetune=False, exit_on_missing=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    return make_corpus(str(d)), str(d / "cache")


@pytest.mark.parametrize(
    "target, extra, expected",
    [
        ("file", [], "is a file, not a checkpoint directory"),
        ("missing", ["--finetune"], "does not exist), nothing to --finetune"),
        ("empty", ["--finetune"], "holds no latest_checkpointed_iteration.txt), nothing to"),
        ("missing", ["--exit-on-missing-checkpoint"], "and --exit-on-missing-checkpoint"),
        ("empty", ["--exit-on-missing-checkpoint"], "and --exit-on-missing-checkpoint"),
    ],
)
def test_missing_load_fails_before_the_model_is_built(
    corpus, tmp_path, capsys, monkeypatch, target, extra, expected
):
    data, cache = corpus
    load = str(tmp_path / target)
    if target == "file":
        open(load, "w").write("not a checkpoint\n")
    elif target == "empty":
        os.makedirs(load)

    def no_build(self):
        raise AssertionError("the model was built before --load was checked")

    monkeypatch.setattr(backend_module.LocalBackend, "build", no_build)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    status = main(train_flags(data, cache, "--train-iters", "2", "--load", load, *extra))
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    first = err.strip().splitlines()[0]
    assert first.startswith(f"error: --load={load}: ") and expected in first, first


@pytest.mark.parametrize("target", ["missing", "empty"])
def test_missing_load_warns_once_and_trains_from_scratch(corpus, tmp_path, capsys, target):
    data, cache = corpus
    load = str(tmp_path / target)
    if target == "empty":
        os.makedirs(load)
    result = train(parse_run_config(train_flags(data, cache, "--train-iters", "2", "--load", load)))
    out = capsys.readouterr().out
    assert result.iterations == 2 and not result.interrupted
    assert out.count("no checkpoint found, starting from scratch") == 1
