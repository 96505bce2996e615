"""Atomic checkpoint save/load, tracker, pruning and crash safety (single process)."""

import os

import numpy as np
import pytest
import torch

from megatron_endprompt import checkpoint as ckpt
from megatron_endprompt.checkpoint import ShardRank


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"model": {"w": torch.randn(3, 4, generator=g)}, "consumed_samples": seed * 8}


def test_save_load_roundtrip_and_tracker(tmp_path):
    save = str(tmp_path / "ckpt")
    ckpt.save_checkpoint(save, 10, _state(1), ShardRank())
    ckpt.save_checkpoint(save, 20, _state(2), ShardRank())
    assert ckpt.read_tracker(save) == 20
    loaded = ckpt.load_checkpoint(save, ShardRank())
    assert loaded["iteration"] == 20 and loaded["consumed_samples"] == 16
    torch.testing.assert_close(loaded["model"]["w"], _state(2)["model"]["w"], rtol=0, atol=0)
    older = ckpt.load_checkpoint(save, ShardRank(), iteration=10)
    torch.testing.assert_close(older["model"]["w"], _state(1)["model"]["w"], rtol=0, atol=0)
    assert os.path.isfile(
        # Megatron-LM names the PP = 1 shard folder mp_rank_TT
        os.path.join(save, "iter_0000020", "mp_rank_00", "model_optim_rng.pt")
    )


def test_no_checkpoint_returns_none(tmp_path):
    assert ckpt.load_checkpoint(str(tmp_path), ShardRank()) is None


def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    save = str(tmp_path / "ckpt")
    ckpt.save_checkpoint(save, 5, _state(5), ShardRank())

    def exploding_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", exploding_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(save, 6, _state(6), ShardRank())
    monkeypatch.undo()
    assert ckpt.read_tracker(save) == 5
    assert ckpt.list_checkpoints(save) == [5]  # the half-written iter_0000006.tmp is not listed
    assert ckpt.load_checkpoint(save, ShardRank())["iteration"] == 5
    # The next save cleans the leftover temporary directory.
    ckpt.save_checkpoint(save, 6, _state(6), ShardRank())
    assert not os.path.exists(os.path.join(save, "iter_0000006.tmp"))


def test_keep_last_prunes_old(tmp_path):
    save = str(tmp_path / "ckpt")
    for it in (1, 2, 3, 4):
        ckpt.save_checkpoint(save, it, _state(it), ShardRank(), keep_last=2)
    assert ckpt.list_checkpoints(save) == [3, 4]
    with pytest.raises(ValueError, match="keep_last"):
        ckpt.prune_checkpoints(save, 0)


def test_dp_replicas_do_not_write(tmp_path):
    save = str(tmp_path / "ckpt")
    ckpt.save_checkpoint(save, 1, _state(1), ShardRank(dp_rank=1))
    assert not os.listdir(os.path.join(save, "iter_0000001"))


def test_missing_shard_names_the_parallel_flags(tmp_path):
    save = str(tmp_path / "ckpt")
    ckpt.save_checkpoint(save, 1, _state(1), ShardRank())
    with pytest.raises(FileNotFoundError, match="tensor-model-parallel-size"):
        ckpt.load_checkpoint(save, ShardRank(tp_rank=1))


def test_bad_tracker_is_a_clear_error(tmp_path):
    (tmp_path / ckpt.TRACKER).write_text("garbage\n")
    with pytest.raises(ValueError, match="tracker"):
        ckpt.read_tracker(str(tmp_path))


def test_rng_state_roundtrip():
    state = ckpt.get_rng_state()
    a = (np.random.rand(), torch.rand(1).item())
    ckpt.set_rng_state(state)
    b = (np.random.rand(), torch.rand(1).item())
    assert a == b


def test_killed_while_resaving_an_iteration_leaves_it_loadable(tmp_path, monkeypatch):
    """Re-saving the iteration the tracker names: the old copy is moved aside, never deleted
    first; a crash between the two renames still loads (from ``iter_N.old``)."""
    from megatron_endprompt.checkpoint import layout

    save = str(tmp_path / "ckpt")
    ckpt.save_checkpoint(save, 7, _state(1), ShardRank())
    real_replace, calls = os.replace, []

    def crash_on_publish(src, dst):
        calls.append((src, dst))
        if str(src).endswith("iter_0000007.tmp"):  # iter_7 moved aside; tmp -> iter_7: killed
            raise KeyboardInterrupt("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(layout.os, "replace", crash_on_publish)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(save, 7, _state(2), ShardRank())
    monkeypatch.undo()
    moved = [dst for _, dst in calls if str(dst).endswith("iter_0000007.old")]
    assert moved and os.path.isdir(moved[0])  # the old copy was moved aside, not removed
    assert ckpt.read_tracker(save) == 7
    loaded = ckpt.load_checkpoint(save, ShardRank())
    torch.testing.assert_close(loaded["model"]["w"], _state(1)["model"]["w"], rtol=0, atol=0)
    # The next complete save of iteration 7 publishes the new copy and drops the old one.
    ckpt.save_checkpoint(save, 7, _state(3), ShardRank())
    assert not os.path.exists(os.path.join(save, "iter_0000007.old"))
    loaded = ckpt.load_checkpoint(save, ShardRank())
    torch.testing.assert_close(loaded["model"]["w"], _state(3)["model"]["w"], rtol=0, atol=0)
