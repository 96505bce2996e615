"""Atomic checkpoints: model, optimizer, LR schedule, RNG states, consumed samples, iteration.

Layout (Megatron-LM's legacy names, so its tools recognise the directory)::

    SAVE/latest_checkpointed_iteration.txt     tracker: the newest COMPLETE iteration
    SAVE/iter_0000100/mp_rank_TT_PPP/model_optim_rng.pt

Every rank of the first data-parallel replica writes its (TP, PP) shard into ``iter_N.tmp``; after
a barrier rank 0 renames the directory to ``iter_N`` and then rewrites the tracker (itself through a
temporary file and ``os.replace``). A crash at any point leaves the previous checkpoint and tracker
intact: ``iter_N`` exists only when every shard was written, and the tracker only ever names such
a directory. ``keep_last`` prunes older complete checkpoints after the tracker moved on.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_endprompt.atomic_io import atomic_write_text

TRACKER = "latest_checkpointed_iteration.txt"
MODEL_CONFIG_JSON = "model_config.json"
SHARD_FILE = "model_optim_rng.pt"
# Fields that must agree between a checkpoint and the model loading it. RoPE scaling, sequence and
# window lengths may change on purpose (that is context extension); these may not.
MUST_MATCH = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "kv_channels", "normalization", "norm_epsilon", "swiglu", "add_bias_linear",
    "untie_embeddings_and_output_weights", "rotary_base", "rotary_percent", "rotary_interleaved",
)  # fmt: skip
_ITER_RE = re.compile(r"^iter_(\d{7})$")


@dataclass(frozen=True)
class ShardRank:
    """Where this process sits: which shard it writes and whether it writes at all."""

    tp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0

    @property
    def shard_name(self) -> str:
        """Megatron's shard folder name, ``mp_rank_TT_PPP``."""
        return f"mp_rank_{self.tp_rank:02d}_{self.pp_rank:03d}"


def iteration_dir(save_dir: str, iteration: int) -> str:
    """``SAVE/iter_0000123``."""
    return os.path.join(save_dir, f"iter_{iteration:07d}")


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _is_rank0() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def get_rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU (and CUDA when present) generator states."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch_cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda"])


def save_checkpoint(
    save_dir: str,
    iteration: int,
    state: dict[str, Any],
    rank: ShardRank,
    keep_last: int | None = None,
) -> str:
    """Write this rank's shard of iteration ``iteration`` and publish it atomically.

    Must be called on every rank (it synchronises). Ranks with ``dp_rank > 0`` hold a replica and
    write nothing.

    Args:
        save_dir: the ``--save`` directory.
        iteration: completed training iterations.
        state: this shard's state (model, optimizer, scheduler, consumed samples, ...).
        rank: the caller's (TP, PP, DP) coordinates.
        keep_last: keep only this many newest complete checkpoints (None keeps all).

    Returns:
        The final checkpoint directory.
    """
    final = iteration_dir(save_dir, iteration)
    tmp = final + ".tmp"
    if _is_rank0():
        os.makedirs(save_dir, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crashed save
        os.makedirs(tmp)
    _barrier()
    if rank.dp_rank == 0:
        shard_dir = os.path.join(tmp, rank.shard_name)
        os.makedirs(shard_dir, exist_ok=True)
        path = os.path.join(shard_dir, SHARD_FILE)
        torch.save({**state, "iteration": iteration}, path + ".part")
        os.replace(path + ".part", path)
    _barrier()
    if _is_rank0():
        publish_iteration(save_dir, iteration, tmp, keep_last)
    _barrier()
    return final


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
    os.replace(tmp, final)
    atomic_write_text(os.path.join(save_dir, TRACKER), f"{iteration}\n", fsync=True)
    shutil.rmtree(old, ignore_errors=True)
    if keep_last is not None:
        prune_checkpoints(save_dir, keep_last)
    return final


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


def stored_iteration_dir(load_dir: str, iteration: int) -> str:
    """``iter_NNNNNNN`` of ``load_dir``, or Megatron-LM's ``release`` folder for iteration 0."""
    base = iteration_dir(load_dir, iteration)
    release = os.path.join(load_dir, "release")
    if iteration == 0 and not os.path.isdir(base) and os.path.isdir(release):
        return release
    if not os.path.isdir(base) and os.path.isdir(base + ".old"):
        return base + ".old"  # killed while re-saving this iteration (see publish_iteration)
    return base


def checkpoint_path(load_dir: str, rank: ShardRank, iteration: int | None = None) -> str | None:
    """Path of this rank's shard file of ``iteration`` (the tracker's when None)."""
    if iteration is None:
        iteration = read_tracker(load_dir)
        if iteration is None:
            return None
    path = os.path.join(stored_iteration_dir(load_dir, iteration), rank.shard_name, SHARD_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"--load: checkpoint shard {path} is missing (was it saved with a different "
            "--tensor-model-parallel-size / --pipeline-model-parallel-size?)"
        )
    return path


def load_checkpoint(
    load_dir: str, rank: ShardRank, iteration: int | None = None
) -> dict[str, Any] | None:
    """Load this rank's shard (the latest complete checkpoint by default); None if there is none."""
    path = checkpoint_path(load_dir, rank, iteration)
    if path is None:
        return None
    # The state holds numpy / python RNG states, so a weights-only load cannot read it.
    return torch.load(path, map_location="cpu", weights_only=False)


def recorded_model_config(
    shard: Mapping[str, Any], search_dirs: Sequence[str] = ()
) -> dict[str, Any] | None:
    """The model config a checkpoint recorded, as a dict, or None.

    Looked up in order: the shard's ``run_config["model"]`` (training checkpoints), its
    ``model_config`` (converted checkpoints), then ``model_config.json`` in ``search_dirs``.
    """
    run_config = shard.get("run_config")
    if isinstance(run_config, Mapping) and isinstance(run_config.get("model"), Mapping):
        return dict(run_config["model"])
    if isinstance(shard.get("model_config"), Mapping):
        return dict(shard["model_config"])
    for directory in search_dirs:
        path = os.path.join(directory, MODEL_CONFIG_JSON)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return json.load(f)
    return None


def check_checkpoint_model(model_config: Any, shard: Mapping[str, Any], load_dir: str) -> None:
    """Fail when the checkpoint's recorded model config disagrees with ``model_config``.

    A shape mismatch would fail at load anyway; numerics such as --norm-epsilon or
    --rotary-base would load silently and give a different model.
    """
    saved = recorded_model_config(shard)
    if not saved:
        return
    bad = [
        f"--{name.replace('_', '-')}: checkpoint {saved[name]!r}, run "
        f"{getattr(model_config, name)!r}"
        for name in MUST_MATCH
        if name in saved and saved[name] != getattr(model_config, name)
    ]
    if bad:
        raise ValueError(
            f"--load={load_dir}: the model flags disagree with the checkpoint: " + "; ".join(bad)
        )


def load_model_weights(
    module: torch.nn.Module, shard: Mapping[str, Any], load_dir: str, model_config: Any
) -> None:
    """Load a shard's weights into ``module`` after checking its recorded model config.

    Raises:
        ValueError: naming --load, on a config disagreement or missing / unexpected keys.
    """
    from megatron_endprompt.convert.hf_llama import load_megatron_state_dict

    check_checkpoint_model(model_config, shard, load_dir)
    try:
        load_megatron_state_dict(module, shard["model"])
    except ValueError as err:
        raise ValueError(f"--load={load_dir}: {err}") from err
