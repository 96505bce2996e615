"""Writes the system refuses (full disk, quota, permission): one error line naming the path and
the errno, the previous good output untouched, no partial files, the tracker on a loadable
checkpoint. Failures are injected as ``OSError(ENOSPC)``; where this machine lets the test mount
a small tmpfs, a real full disk too."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import uuid

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from fs_faults import read_only_view, small_tmpfs, tree
from train_fixtures import make_corpus, train_flags

from megatron_endprompt import checkpoint as ckpt
from megatron_endprompt.atomic_io import WriteError, atomic_write_text, write_errno, writing
from megatron_endprompt.checkpoint import layout
from megatron_endprompt.train import main
from megatron_endprompt.training.logging import MetricsLogger


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


# --- the error itself -----------------------------------------------------------------------


def test_write_error_names_path_and_errno():
    err = WriteError("/data/ckpt/x.pt", errno.ENOSPC)
    assert str(err) == "cannot write /data/ckpt/x.pt: No space left on device (errno 28 ENOSPC)"
    assert err.errno == errno.ENOSPC and err.filename == "/data/ckpt/x.pt"
    assert isinstance(err, ValueError)  # every entry point reports it as one error line


def test_write_errno_reads_causes_and_rust_writers():
    try:
        try:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        except OSError as inner:
            raise RuntimeError("writer failed") from inner
    except RuntimeError as outer:
        assert write_errno(outer) == errno.EDQUOT
    assert write_errno(Exception("I/O error: No space left on device (os error 28)")) == 28
    assert write_errno(RuntimeError("a plain bug")) is None
    with pytest.raises(RuntimeError, match="a plain bug"), writing("/x"):
        raise RuntimeError("a plain bug")  # no errno: not turned into a WriteError


def test_atomic_write_keeps_old_content_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "report.json"
    atomic_write_text(path, "old\n")

    def fail(tmp):
        open(tmp, "w").write("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    from megatron_endprompt.atomic_io import atomic_write

    with pytest.raises(WriteError, match=f"cannot write {path}: No space left on device"):
        atomic_write(path, fail)
    assert os.listdir(tmp_path) == ["report.json"] and path.read_text() == "old\n"


# --- checkpoints -----------------------------------------------------------------------------


def _state(value: float) -> dict:
    return {"model": {"w": torch.full((4,), value)}, "consumed_samples": int(value)}


def _fail_text_write(monkeypatch, suffix: str) -> None:
    """Refuse layout's atomic text writes of files ending in ``suffix`` (checksum, tracker)."""
    real = layout.atomic_write_text

    def refuse(path, *args, **kwargs):
        if str(path).endswith(suffix):
            with writing(path):
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(layout, "atomic_write_text", refuse)


def _loaded_w(save: str) -> torch.Tensor:
    return ckpt.load_checkpoint(save, ckpt.ShardRank())["model"]["w"]


@pytest.mark.parametrize("where", ["shard", "checksum", "tracker"])
def test_failed_save_keeps_tracker_on_previous_checkpoint(tmp_path, monkeypatch, where):
    save = str(tmp_path / "ckpt")
    ckpt.save_checkpoint(save, 2, _state(2.0), ckpt.ShardRank())
    before = tree(save)
    if where == "shard":
        monkeypatch.setattr(layout.torch, "save", _enospc)
    else:
        _fail_text_write(monkeypatch, ".sha256" if where == "checksum" else ckpt.TRACKER)
    with pytest.raises(WriteError, match="No space left on device"):
        ckpt.save_checkpoint(save, 4, _state(4.0), ckpt.ShardRank())
    monkeypatch.undo()
    assert tree(save) == before  # no iter_0000004(.tmp), tracker and iteration 2 untouched
    assert ckpt.read_tracker(save) == 2 and torch.equal(_loaded_w(save), torch.full((4,), 2.0))


def test_failed_resave_of_the_same_iteration_restores_the_old_copy(tmp_path, monkeypatch):
    save = str(tmp_path / "ckpt")
    ckpt.save_checkpoint(save, 2, _state(2.0), ckpt.ShardRank())
    before = tree(save)
    _fail_text_write(monkeypatch, ckpt.TRACKER)
    with pytest.raises(WriteError):
        ckpt.save_checkpoint(save, 2, _state(9.0), ckpt.ShardRank())
    monkeypatch.undo()
    assert tree(save) == before
    assert torch.equal(_loaded_w(save), torch.full((4,), 2.0))


def _bug(*args, **kwargs):
    raise RuntimeError("a bug in the writer")


def _two_rank_save(rank: int, init: str, save: str, failing_rank: int, out: str, bug: bool):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    if rank == failing_rank:
        layout.torch.save = _bug if bug else _enospc  # this process only
    try:
        ckpt.save_checkpoint(save, 4, _state(4.0), ckpt.ShardRank(tp_rank=rank))
        result = "saved"
    except (WriteError, RuntimeError) as err:
        result = f"{type(err).__name__}: {err}"
    with open(f"{out}.{rank}", "w") as f:
        f.write(result)
    dist.destroy_process_group()


def _two_ranks(tmp_path, failing_rank: int, bug: bool) -> tuple[str, list[str]]:
    save = str(tmp_path / "ckpt")
    init = f"file://{tmp_path}/rdzv-{uuid.uuid4().hex}"
    out = str(tmp_path / "result")
    mp.start_processes(_two_rank_save, args=(init, save, failing_rank, out, bug), nprocs=2,
                       start_method="spawn", join=True)  # fmt: skip
    return save, [open(f"{out}.{r}").read() for r in range(2)]


@pytest.mark.parametrize("failing_rank", [0, 1])
def test_refused_write_on_one_rank_fails_every_rank_without_hanging(tmp_path, failing_rank):
    save, results = _two_ranks(tmp_path, failing_rank, bug=False)
    for result in results:
        assert result.startswith("WriteError: cannot write ") and "(errno 28 ENOSPC)" in result
    assert ckpt.SHARD_FILE in results[failing_rank]  # the failed rank names its own file
    assert os.listdir(save) == []  # the partial iter_0000004.tmp is gone, nothing published


def test_any_failure_on_one_rank_reaches_every_rank(tmp_path):
    save, results = _two_ranks(tmp_path, 1, bug=True)
    assert results[1] == "RuntimeError: a bug in the writer"  # its own error, unchanged
    tmp = ckpt.iteration_dir(save, 4) + ".tmp"
    assert results[0] == f"RuntimeError: writing {tmp} failed on another rank (see its error)"
    assert os.listdir(save) == []


# --- training end to end ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    return make_corpus(str(d)), str(d / "cache")


def test_training_on_a_full_disk_exits_2_with_tracker_on_a_loadable_checkpoint(
    corpus, tmp_path, capsys, monkeypatch
):
    data, cache = corpus
    save = str(tmp_path / "ckpt")
    real_save = torch.save
    saves = []

    def second_save_fails(obj, f, *args, **kwargs):
        saves.append(1)
        if len(saves) == 2:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(layout.torch, "save", second_save_fails)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    flags = train_flags(data, cache, "--train-iters", "4", "--save", save, "--save-interval", "2")
    status = main(flags)
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err, err
    first = err.strip().splitlines()[0]
    assert first.startswith(f"error: cannot write {save}/iter_0000004.tmp/") and "ENOSPC" in first
    assert sorted(os.listdir(save)) == ["iter_0000002", ckpt.TRACKER]
    assert ckpt.read_tracker(save) == 2
    assert ckpt.load_checkpoint(save, ckpt.ShardRank())["iteration"] == 2


def test_training_on_a_real_full_tmpfs(corpus, tmp_path):
    """A 2000 KiB tmpfs holds one checkpoint of the tiny model (1340 KiB with Adam), not two."""
    data, cache = corpus
    with small_tmpfs(tmp_path / "disk", "2000k") as disk:
        save = os.path.join(disk, "ckpt")
        flags = train_flags(data, cache, "--train-iters", "4", "--save", save,
                            "--save-interval", "2")  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
        done = subprocess.run([sys.executable, "-m", "megatron_endprompt.train", *flags],
                              capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        first = done.stderr.strip().splitlines()[0]
        assert first.startswith("error: cannot write ") and "(errno 28 ENOSPC)" in first, first
        assert ckpt.read_tracker(save) == 2
        assert sorted(os.listdir(save)) == ["iter_0000002", ckpt.TRACKER]
        assert ckpt.load_checkpoint(save, ckpt.ShardRank())["iteration"] == 2


# --- logs never stop a run -------------------------------------------------------------------


def test_tensorboard_write_failure_warns_once_and_logging_goes_on(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    logger = MetricsLogger(str(tmp_path / "tb"), total_iters=3)

    class Full:
        def add_scalar(self, *args):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            raise OSError(errno.ENOSPC, "No space left on device")

    logger._writer.close()
    logger._writer = Full()
    logger.log(1, {"loss": 2.0}, 1.0)
    logger.log(2, {"loss": 1.5}, 1.0)
    logger.log_eval(2, 1.4)
    logger.close()
    out = capsys.readouterr().out
    assert out.count("warning: TensorBoard logging stopped, training goes on: cannot write") == 1
    assert f"{tmp_path / 'tb'}: No space left on device (errno 28 ENOSPC)" in out
    assert out.count("iter      2/3") == 1 and "validation at iter 2" in out


def test_loss_curve_write_failure_is_a_warning(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    plot = str(tmp_path / "loss.png")
    logger = MetricsLogger(None, total_iters=2, plot_path=plot)
    logger.log(1, {"loss": 2.0}, 1.0)
    monkeypatch.setattr("megatron_endprompt.atomic_io.os.replace", _enospc)
    logger.close()
    out = capsys.readouterr().out
    assert f"warning: loss curve not written: cannot write {plot}: No space left" in out
    assert os.listdir(tmp_path) == []  # no temporary PNG left behind


def _without_cache_flag(flags: list[str]) -> list[str]:
    i = flags.index("--data-cache-path")
    return flags[:i] + flags[i + 2 :]


def test_read_only_data_folder_needs_a_data_cache_path(tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    make_corpus(str(data))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with read_only_view(data, tmp_path / "ro") as ro:
        prefix = os.path.join(ro, "corpus_text_document")
        flags = train_flags(prefix, str(tmp_path / "cache"), "--train-iters", "1")
        assert main(_without_cache_flag(flags)) == 2
        first = capsys.readouterr().err.strip().splitlines()[0]
        assert first.startswith(f"error: --data-path={prefix}/cache: cannot be created, {ro} is")
        assert "give a writable --data-cache-path" in first
        assert main(flags) == 0  # the same read-only corpus with a cache elsewhere trains
