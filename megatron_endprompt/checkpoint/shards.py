"""Our per-shard checkpoint format (CPU runs, conversions): weights, optimizer, LR schedule,
RNG states, consumed samples and iteration of one (TP, PP) shard.

Layout (Megatron-LM's legacy names, so its tools recognise the directory)::

    SAVE/latest_checkpointed_iteration.txt     tracker: the newest COMPLETE iteration
    SAVE/iter_0000100/mp_rank_TT[_PPP]/model_optim_rng.pt

A shard holds what Megatron-LM core_v0.16.1's legacy ``torch`` format holds (see
:mod:`.megatron_lm`): ``model``, ``optimizer``, ``opt_param_scheduler``, ``rng_state``, ``args``,
``checkpoint_version`` and ``iteration``, plus our own keys, which Megatron-LM ignores
(``run_config``, ``consumed_samples``, ``valid_consumed_samples``, ``format``). Loading accepts
that, Megatron-LM's own shards, and our older shards (``scheduler``, ``rng``, no ``args``).

Every rank of the first data-parallel replica writes its (TP, PP) shard into ``iter_N.tmp``; after
a barrier rank 0 renames the directory to ``iter_N`` and then rewrites the tracker (itself through a
temporary file and ``os.replace``). A crash at any point leaves the previous checkpoint and tracker
intact: ``iter_N`` exists only when every shard was written, and the tracker only ever names such
a directory. ``keep_last`` prunes older complete checkpoints after the tracker moved on.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pickle
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_endprompt import device
from megatron_endprompt.atomic_io import writing
from megatron_endprompt.checkpoint.layout import (
    MODEL_CONFIG_JSON,
    SHARD_FILE,
    ShardRank,
    agree_on_write,
    fresh_tmp_dir,
    iteration_dir,
    publish_iteration,
    read_tracker,
    save_torch,
    stored_iteration_dir,
    verify_checksum,
    write_checksum,
)
from megatron_endprompt.checkpoint.megatron_lm import model_config_from_megatron_args
from megatron_endprompt.checkpoint.weights import load_megatron_state_dict, rename_to_model_keys

# Fields that must agree between a checkpoint and the model loading it. RoPE scaling, sequence and
# window lengths may change on purpose (that is context extension); these may not.
MUST_MATCH = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "kv_channels", "normalization", "norm_epsilon", "swiglu", "add_bias_linear",
    "untie_embeddings_and_output_weights", "rotary_base", "rotary_percent", "rotary_interleaved",
)  # fmt: skip


def _numpy_reconstruct() -> Any:
    try:  # numpy >= 2 (numpy.core is a deprecated alias there)
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


# Everything besides tensors, containers and numbers that a shard may hold; any other global
# makes the load fail instead of executing it (``torch.load(weights_only=True)``).
CHECKPOINT_ALLOWLIST = (
    # np.random.get_state(): ('MT19937', uint32 ndarray, int, int, float); the array pickles
    # through numpy's reconstructor, its dtype and dtype class.
    _numpy_reconstruct(),
    np.ndarray,
    np.dtype,
    type(np.dtype(np.uint32)),
    # Megatron-LM's legacy checkpoints store the run's ``args`` namespace.
    argparse.Namespace,
)
_UNSUPPORTED_RE = re.compile(r"Unsupported global: GLOBAL (\S+)")


def safe_load(path: str, where: str, mmap: bool = False) -> Any:
    """``torch.load`` a checkpoint file without executing code: tensors plus the allowlist.

    ``mmap``: leave the tensors on disk until read (readers of whole checkpoints).

    Note that importing megatron.core registers its own safe globals (its enums, configs)
    process-wide; those load too.

    Raises:
        ValueError: ``WHERE: PATH holds an object outside the checkpoint allowlist: NAME`` or
            ``WHERE: cannot read checkpoint shard PATH: ...`` (a damaged file).
    """
    registered = torch.serialization.get_safe_globals()
    try:
        with torch.serialization.safe_globals(list(CHECKPOINT_ALLOWLIST)):
            return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except pickle.UnpicklingError as err:
        found = _UNSUPPORTED_RE.search(str(err))
        name = found.group(1) if found else str(err).splitlines()[0]
        raise ValueError(
            f"{where}: {path} holds an object outside the checkpoint allowlist: {name}"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:  # truncated / not a torch zip file
        raise ValueError(f"{where}: cannot read checkpoint shard {path}: {err}") from err
    finally:
        # Leaving torch's safe_globals context unregisters its classes even where they were
        # registered before (megatron-core registers argparse.Namespace at import for its own
        # dist-checkpoint loads): put the process-wide allowlist back as it was.
        lost = [g for g in registered if g not in torch.serialization.get_safe_globals()]
        torch.serialization.add_safe_globals(lost)


def _is_rank0() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def get_rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU (and CUDA when present) generator states."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch_cpu": torch.get_rng_state(),
    }
    cuda = device.cuda_rng_state()
    if cuda is not None:
        state["torch_cuda"] = cuda
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`get_rng_state` captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch_cpu"])
    if "torch_cuda" in state:
        device.set_cuda_rng_state(state["torch_cuda"])


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
    fresh = functools.partial(fresh_tmp_dir, save_dir, tmp)
    agree_on_write(fresh if _is_rank0() else None, tmp, cleanup=tmp)

    def write_shard() -> None:
        shard_dir = os.path.join(tmp, rank.shard_name)
        path = os.path.join(shard_dir, SHARD_FILE)
        with writing(shard_dir):
            os.makedirs(shard_dir, exist_ok=True)
        save_torch({**state, "iteration": iteration}, path + ".part")
        with writing(path):
            os.replace(path + ".part", path)
        write_checksum(path)  # inside iter_N.tmp: published together with the shard

    agree_on_write(write_shard if rank.dp_rank == 0 else None, tmp, cleanup=tmp)

    def publish() -> None:
        publish_iteration(save_dir, iteration, tmp, keep_last)

    # On failure publish_iteration has already put the previous state back.
    agree_on_write(publish if _is_rank0() else None, final, cleanup=None)
    return final


def checkpoint_path(load_dir: str, rank: ShardRank, iteration: int | None = None) -> str | None:
    """Path of this rank's shard file of ``iteration`` (the tracker's when None)."""
    if iteration is None:
        iteration = read_tracker(load_dir)
        if iteration is None:
            return None
    base = stored_iteration_dir(load_dir, iteration)
    candidates = [os.path.join(base, name, SHARD_FILE) for name in rank.shard_names]
    path = next((p for p in candidates if os.path.isfile(p)), candidates[0])
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
    verify_checksum(path)
    return safe_load(path, f"--load={load_dir}")


def recorded_model_config(
    shard: Mapping[str, Any], search_dirs: Sequence[str] = ()
) -> dict[str, Any] | None:
    """The model config a checkpoint recorded, as a dict, or None.

    Looked up in order: the shard's ``run_config["model"]`` (training checkpoints), its
    ``model_config`` (converted checkpoints), ``model_config.json`` in ``search_dirs``, then
    Megatron-LM's ``args`` namespace (checkpoints written by Megatron-LM), mapped to our fields
    by :func:`.megatron_lm.model_config_from_megatron_args`.
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
    if isinstance(shard.get("args"), argparse.Namespace):
        return model_config_from_megatron_args(shard["args"])
    return None


def _resolved(name: str, values: Mapping[str, Any]) -> Any:
    """A field's effective value (None defaults of kv_channels / num_query_groups resolved)."""
    value = values.get(name)
    if value is None and name == "kv_channels" and values.get("num_attention_heads"):
        return values.get("hidden_size", 0) // values["num_attention_heads"]
    if value is None and name == "num_query_groups":
        return values.get("num_attention_heads")
    return value


def check_checkpoint_model(model_config: Any, shard: Mapping[str, Any], load_dir: str) -> None:
    """Fail when the checkpoint's recorded model config disagrees with ``model_config``.

    A shape mismatch would fail at load anyway; numerics such as --norm-epsilon or
    --rotary-base would load silently and give a different model.
    """
    saved = recorded_model_config(shard)
    if not saved:
        return
    run = {name: getattr(model_config, name) for name in (*MUST_MATCH, "num_attention_heads")}
    bad = [
        f"--{name.replace('_', '-')}: checkpoint {_resolved(name, saved)!r}, run "
        f"{_resolved(name, run)!r}"
        for name in MUST_MATCH
        if name in saved and _resolved(name, saved) != _resolved(name, run)
    ]
    if bad:
        raise ValueError(
            f"--load={load_dir}: the model flags disagree with the checkpoint: " + "; ".join(bad)
        )


def load_model_weights(
    module: torch.nn.Module, shard: Mapping[str, Any], load_dir: str, model_config: Any
) -> None:
    """Load a shard's weights into ``module`` after checking its recorded model config.

    Either layer spec's names load into either spec (``weights.rename_to_model_keys``: TE's
    fused ``linear_qkv.layer_norm_weight`` <-> local ``input_layernorm.weight``, ...).

    Raises:
        ValueError: naming --load, on a config disagreement or missing / unexpected keys.
    """
    check_checkpoint_model(model_config, shard, load_dir)
    try:
        sd = rename_to_model_keys(shard["model"], module.state_dict().keys())
        check_vocabulary(sd, module)
        load_megatron_state_dict(module, sd)
    except ValueError as err:
        raise ValueError(f"--load={load_dir}: {err}") from err


VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


def check_vocabulary(sd: Mapping[str, Any], module: torch.nn.Module) -> None:
    """ValueError naming the tokenizer flags when the checkpoint's vocabulary rows differ from
    the model's (the run's tokenizer, padded by --make-vocab-size-divisible-by x TP); the caller
    names --load."""
    own = module.state_dict()
    for key in VOCAB_KEYS:
        if key in sd and key in own and sd[key].shape[0] != own[key].shape[0]:
            raise ValueError(
                f"its vocabulary has {sd[key].shape[0]} rows per "
                f"tensor-parallel rank ({key}), the run's {own[key].shape[0]}: the tokenizer "
                "(--tokenizer-type / --tokenizer-model / --vocab-size) or "
                "--make-vocab-size-divisible-by differs from the checkpoint's"
            )
