"""Checkpoint directory layout, shared by every format (Megatron-LM's legacy names)::

    SAVE/latest_checkpointed_iteration.txt     tracker: the newest COMPLETE iteration ("release")
    SAVE/iter_0000100/                         one iteration (Megatron-LM also has SAVE/release/)
    SAVE/iter_0000100/mp_rank_TT[_PPP]/model_optim_rng.pt  per-shard format (shards.py)
    SAVE/iter_0000100/mp_rank_TT[_PPP]/model_optim_rng.pt.sha256  its checksum (sha256sum)
    SAVE/iter_0000100/{metadata.json,common.pt,*.distcp}   dist_checkpointing format (dist.py)

A save is written under ``iter_N.tmp`` and published by :func:`publish_iteration` (rename, then
the tracker, then pruning), so the tracker only ever names a complete directory. A write the
system refuses (full disk, quota, permission) on any rank removes ``iter_N.tmp``, puts back what
publishing had moved, and raises :class:`~megatron_endprompt.atomic_io.WriteError` on every rank
(:func:`agree_on_write`), so the tracker keeps naming the previous loadable checkpoint. A shard's
checksum file is written inside ``iter_N.tmp`` and checked on load; shards without one (older
checkpoints, conversions) load unchecked.

Shard folders are named as Megatron-LM core_v0.16.1 names them
(``megatron/training/checkpointing.py: get_checkpoint_name``): ``mp_rank_TT`` when the run has
one pipeline stage, ``mp_rank_TT_PPP`` with PP > 1 (Megatron-LM appends ``_EEE`` with expert
parallelism, which this package does not use). Readers accept both forms at any PP size, so the
``mp_rank_TT_000`` folders of our older single-stage checkpoints still load.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from megatron_endprompt.atomic_io import WriteError, atomic_write_text, file_digest, writing
from megatron_endprompt.device import largest_over_ranks

TRACKER = "latest_checkpointed_iteration.txt"
MODEL_CONFIG_JSON = "model_config.json"
SHARD_FILE = "model_optim_rng.pt"
CHECKSUM_SUFFIX = ".sha256"
_ITER_RE = re.compile(r"^iter_(\d{7})$")


@dataclass(frozen=True)
class ShardRank:
    """Where this process sits: which shard it writes and whether it writes at all."""

    tp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0
    pp_size: int = 1

    @property
    def shard_name(self) -> str:
        """Megatron-LM's shard folder name: ``mp_rank_TT`` (PP = 1) or ``mp_rank_TT_PPP``."""
        return shard_dir_name(self.tp_rank, self.pp_rank, self.pp_size)

    @property
    def shard_names(self) -> tuple[str, ...]:
        """Names to look for on load: Megatron-LM's first, then (stage 0) the other form."""
        short = f"mp_rank_{self.tp_rank:02d}"
        long = f"{short}_{self.pp_rank:03d}"
        if self.pp_rank > 0:
            return (long,)
        return (short, long) if self.shard_name == short else (long, short)


def shard_dir_name(tp_rank: int, pp_rank: int, pp_size: int) -> str:
    """``mp_rank_TT`` when ``pp_size`` is 1, else ``mp_rank_TT_PPP`` (Megatron-LM's rule)."""
    if pp_size > 1 or pp_rank > 0:
        return f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    return f"mp_rank_{tp_rank:02d}"


def iteration_dir(save_dir: str, iteration: int) -> str:
    """``SAVE/iter_0000123``."""
    return os.path.join(save_dir, f"iter_{iteration:07d}")


def publish_iteration(save_dir: str, iteration: int, tmp: str, keep_last: int | None) -> str:
    """Rename the complete ``tmp`` directory to ``iter_N``, move the tracker, prune (rank 0).

    Shared by both checkpoint formats. An older save of the same iteration is first moved
    aside and deleted only after the new one is in place and the tracker names it.
    """
    final = iteration_dir(save_dir, iteration)
    old = final + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.isdir(final):
        os.replace(final, old)
    moved = False
    try:
        with writing(final):
            os.replace(tmp, final)
        moved = True
        atomic_write_text(os.path.join(save_dir, TRACKER), f"{iteration}\n", fsync=True)
    except WriteError:
        # The tracker still names the previous checkpoint: put back what it may name.
        shutil.rmtree(final if moved else tmp, ignore_errors=True)
        if os.path.isdir(old):
            os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if keep_last is not None:
        prune_checkpoints(save_dir, keep_last)
    return final


def recover_interrupted(save_dir: str) -> None:
    """Clean up after saves that were killed (rank 0, before a new save writes anything).

    ``iter_N.tmp`` directories and temporary tracker files are partial writes and go;
    ``iter_N.old`` (a re-save killed between moving the old copy aside and publishing the new
    one) is renamed back when ``iter_N`` is missing (it may be the tracker's checkpoint), else
    it goes.
    """
    if not os.path.isdir(save_dir):
        return
    for name in os.listdir(save_dir):
        path = os.path.join(save_dir, name)
        if name.startswith(f".{TRACKER}") and name.endswith(".tmp"):  # atomic_write's temporary
            os.remove(path)
            continue
        stem, _, suffix = name.rpartition(".")
        if not (_ITER_RE.match(stem) and suffix in ("tmp", "old") and os.path.isdir(path)):
            continue
        if suffix == "old" and not os.path.isdir(os.path.join(save_dir, stem)):
            os.replace(path, os.path.join(save_dir, stem))
        else:
            shutil.rmtree(path, ignore_errors=True)


def fresh_tmp_dir(save_dir: str, tmp: str) -> None:
    """Rank 0's first step of every save: ``save_dir`` cleared of what killed saves left
    (:func:`recover_interrupted`) and an empty ``tmp`` (``iter_N.tmp``) created in it."""
    with writing(tmp):
        os.makedirs(save_dir, exist_ok=True)
        recover_interrupted(save_dir)
        os.makedirs(tmp)


def save_torch(obj: Any, path: str) -> None:
    """``torch.save`` through a Python file, so that a refused write is an OSError with its
    errno (torch's own file writer reports a full disk as ``unexpected pos ...``), raised as
    :class:`WriteError` naming ``path``."""
    with writing(path), open(path, "wb") as f:
        torch.save(obj, f)


def agree_on_write(step: Callable[[], object] | None, path: str, cleanup: str | None) -> None:
    """Run this rank's part of a save (``step``, None for nothing), then agree over all ranks.

    Every rank must call it. When any rank's step failed, rank 0 removes ``cleanup`` (the
    partial ``iter_N.tmp``) and every rank raises (instead of waiting at a barrier forever):
    its own :class:`WriteError`; else, when some rank's write was refused, a WriteError naming
    ``path`` with that errno (megatron-core's writer reports the cause on one rank only); else
    its own exception, or a RuntimeError saying another rank failed.
    """
    error: BaseException | None = None
    try:
        if step is not None:
            step()
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as err:  # noqa: BLE001 - shared with the other ranks, then re-raised
        error = err
    if not largest_over_ranks(int(error is not None)):
        return
    code = largest_over_ranks(error.errno if isinstance(error, WriteError) else 0)
    if cleanup and _rank() == 0:  # every rank has reached the reduction: none is writing
        shutil.rmtree(cleanup, ignore_errors=True)
    if isinstance(error, WriteError):
        raise error
    if code:
        raise WriteError(path, code) from error
    if error is not None:
        raise error
    raise RuntimeError(f"writing {path} failed on another rank (see its error)")


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def list_checkpoints(save_dir: str) -> list[int]:
    """Iterations of the complete checkpoints in ``save_dir``, oldest first."""
    if not os.path.isdir(save_dir):
        return []
    found = (_ITER_RE.match(name) for name in os.listdir(save_dir))
    return sorted(int(m.group(1)) for m in found if m)


def prune_checkpoints(save_dir: str, keep_last: int) -> list[int]:
    """Delete all but the ``keep_last`` newest complete checkpoints; returns the deleted ones.

    The checkpoint named by the tracker is never deleted.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    latest = read_tracker(save_dir)
    iters = list_checkpoints(save_dir)
    doomed = [i for i in iters[:-keep_last] if i != latest]
    for it in doomed:
        shutil.rmtree(iteration_dir(save_dir, it), ignore_errors=True)
    return doomed


def read_tracker(load_dir: str) -> int | None:
    """The iteration named by the tracker file, or None when there is no checkpoint."""
    path = os.path.join(load_dir, TRACKER)
    if not os.path.isfile(path):
        return None
    text = open(path, encoding="utf-8").read().strip()
    if text == "release":  # Megatron-LM's name for converted (iteration-less) checkpoints
        return 0
    if not text.isdigit():
        raise ValueError(f"--load: tracker file {path} holds {text!r}, not an iteration number")
    return int(text)


def check_load_dir(load_dir: str, finetune: bool, exit_on_missing: bool) -> bool:
    """Whether ``load_dir`` holds a checkpoint (a tracker file); refuses what cannot be meant.

    Raises:
        ValueError: ``load_dir`` is a file, or holds no checkpoint while ``finetune`` (nothing
            to fine-tune) or ``exit_on_missing`` (--exit-on-missing-checkpoint) is set.
    """
    if os.path.exists(load_dir) and not os.path.isdir(load_dir):
        raise ValueError(f"--load={load_dir}: is a file, not a checkpoint directory")
    if read_tracker(load_dir) is not None:
        return True
    why = "does not exist" if not os.path.isdir(load_dir) else f"holds no {TRACKER}"
    if finetune:
        raise ValueError(f"--load={load_dir}: no checkpoint ({why}), nothing to --finetune")
    if exit_on_missing:
        raise ValueError(
            f"--load={load_dir}: no checkpoint ({why}) and --exit-on-missing-checkpoint"
        )
    return False


def stored_iteration_dir(load_dir: str, iteration: int) -> str:
    """``iter_NNNNNNN`` of ``load_dir``, or Megatron-LM's ``release`` folder for iteration 0."""
    base = iteration_dir(load_dir, iteration)
    release = os.path.join(load_dir, "release")
    if iteration == 0 and not os.path.isdir(base) and os.path.isdir(release):
        return release
    if not os.path.isdir(base) and os.path.isdir(base + ".old"):
        return base + ".old"  # killed while re-saving this iteration (see publish_iteration)
    return base


def file_sha256(path: str) -> str:
    """Hex sha256 of a file's bytes (shards can be many GiB: read in chunks)."""
    return file_digest(path, "sha256")


def write_checksum(path: str) -> str:
    """Record ``path``'s sha256 in ``path.sha256`` (``sha256sum -c`` reads it); returns it."""
    value = file_sha256(path)
    text = f"{value}  {os.path.basename(path)}\n"
    atomic_write_text(path + CHECKSUM_SUFFIX, text, fsync=True)
    return value


def verify_checksum(path: str) -> bool:
    """Check ``path`` against its ``.sha256`` file; False when it has none (older checkpoints).

    Raises:
        ValueError: naming the file, when the bytes do not match (bit rot, truncation).
    """
    record = path + CHECKSUM_SUFFIX
    if not os.path.isfile(record):
        return False
    with open(record, encoding="utf-8") as f:
        fields = f.read().split()
    if not fields:
        raise ValueError(f"checkpoint shard {path} is corrupt: {record} is empty")
    if file_sha256(path) != fields[0].lower():
        raise ValueError(f"checkpoint shard {path} is corrupt: sha256 mismatch with {record}")
    return True
