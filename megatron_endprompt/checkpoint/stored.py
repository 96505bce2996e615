"""A saved Megatron checkpoint, any format and layout, as full (TP = PP = 1) tensors.

:func:`open_checkpoint` reads one iteration of a ``--save`` directory in either format:

- ``torch``: this package's per-shard format (``iter_N/mp_rank_TT_PPP/model_optim_rng.pt``, see
  ``checkpoint/shards.py``), written by CPU training and by ``tools/convert_checkpoint.py``.
  Shards are memory-mapped; a layer is gathered over its TP slices (``merge_tensor_parallel``).
  Stages number their layers locally, so stage p holds global layers p * n/PP .. (p+1) * n/PP - 1.
- ``torch_dist``: megatron-core dist_checkpointing, written by CUDA training (any TP/PP/VPP):
  read by :class:`~.dist_reader.DistCheckpointReader`, no process group, no CUDA.

Either way the checkpoint answers with global names (``decoder.layers.{i}.…``, i the global
layer) and full tensors, one layer at a time; :func:`rank_state_dict` reshards them for any
(TP, PP) rank of any layer spec. The model config is the one the checkpoint recorded: the shard's
or ``common.pt``'s ``run_config["model"]``, a shard's ``model_config``, or ``model_config.json``
in the iteration or ``--save`` directory (dist checkpoints of older runs record none; write it
there).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from typing import Any

import torch

from megatron_endprompt.checkpoint import (
    MODEL_CONFIG_JSON,
    SHARD_FILE,
    TRACKER,
    read_tracker,
    recorded_model_config,
    stored_iteration_dir,
)
from megatron_endprompt.checkpoint.dist_reader import DistCheckpointReader, is_dist_checkpoint
from megatron_endprompt.checkpoint.layout import verify_checksum
from megatron_endprompt.checkpoint.megatron_lm import saved_layout
from megatron_endprompt.checkpoint.shards import safe_load
from megatron_endprompt.checkpoint.weights import (
    check_shapes,
    megatron_shard_shapes,
    norm_keys,
    shard_for_tensor_parallel,
)
from megatron_endprompt.checkpoint.weights import merge_tensor_parallel as _merge_tp
from megatron_endprompt.config import ModelConfig, ParallelConfig, model_config_from_dict

EMBEDDING = "embedding.word_embeddings.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
OUTPUT = "output_layer.weight"
_SHARD_DIR_RE = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")


def _spec_of(keys) -> str:  # noqa: ANN001
    """Layer spec whose norm names ``keys`` use (te: fused ``layer_norm_weight``)."""
    return "te" if any(k.endswith("layer_norm_weight") for k in keys) else "local"


class StoredCheckpoint:
    """One saved iteration; subclasses read the tensors.

    Attributes:
        load_dir, iteration, path: the ``--save`` directory, the iteration, its directory.
        format: ``"torch"`` (per-shard) or ``"torch_dist"`` (dist_checkpointing).
        layout: (TP, PP) it was saved with, None when not recorded.
        virtual_pipeline: its virtual pipeline size (``torch_dist``), None without.
        record: the shard (rank 0) or common state holding ``run_config`` / ``model_config``.
        model_config: the recorded config, ``transformer_impl`` set to the spec of the stored
            norm names (so :func:`norm_keys` of it names the stored tensors).
        where: the prefix of every error message.
    """

    format = ""

    def __init__(self, load_dir: str, iteration: int, path: str, where: str) -> None:
        self.load_dir, self.iteration, self.path, self.where = load_dir, iteration, path, where
        self.layout: tuple[int, int] | None = None
        self.virtual_pipeline: int | None = None
        self.record: Mapping[str, Any] = {}
        self.model_config: ModelConfig | None = None

    def _set_config(self, record: Mapping[str, Any], spec: str) -> ModelConfig:
        saved = recorded_model_config(record, (self.path, self.load_dir))
        if saved is None:
            raise ValueError(
                f"{self.where}: {self.path} carries no model config (no run_config or "
                f"model_config entry, no {MODEL_CONFIG_JSON} beside it)"
            )
        try:
            m = model_config_from_dict(saved)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{self.where}: the recorded model config is invalid: {err}") from err
        self.record, self.model_config = record, dataclasses.replace(m, transformer_impl=spec)
        return self.model_config

    def target_length(self) -> int:
        """The run's ``--target-length`` when recorded, else ``max_position_embeddings``."""
        run = self.record.get("run_config")
        length = None
        if isinstance(run, Mapping) and isinstance(run.get("endprompt"), Mapping):
            length = run["endprompt"].get("target_length")
        return int(length or self.model_config.max_position_embeddings)

    def embedding(self) -> torch.Tensor:
        """``embedding.word_embeddings.weight`` [padded vocabulary, h]."""
        raise NotImplementedError

    def layer(self, i: int) -> dict[str, torch.Tensor]:
        """Global layer ``i``: ``decoder.layers.{i}.*`` (stored norm names)."""
        raise NotImplementedError

    def final_norm(self) -> torch.Tensor:
        """``decoder.final_layernorm.weight``."""
        raise NotImplementedError

    def output_layer(self) -> torch.Tensor:
        """``output_layer.weight`` (the embedding when tied)."""
        raise NotImplementedError


class ShardedTorchCheckpoint(StoredCheckpoint):
    """This package's per-shard format: one ``model_optim_rng.pt`` per (TP, PP) rank."""

    format = "torch"

    def __init__(self, load_dir: str, iteration: int, path: str, where: str) -> None:
        super().__init__(load_dir, iteration, path, where)
        self.files = self._find_shards()
        self.layout = (max(t for t, _ in self.files) + 1, max(p for _, p in self.files) + 1)
        self.shards = {key: self._load_shard(p) for key, p in self.files.items()}
        m = self._set_config(self.shards[0, 0], _spec_of(self.shards[0, 0]["model"]))
        tp, pp = self.layout
        try:
            m.validate_against(ParallelConfig(tensor_model_parallel_size=tp,
                                              pipeline_model_parallel_size=pp))  # fmt: skip
        except ValueError as err:
            raise ValueError(f"{where}: saved as TP={tp} x PP={pp}: {err}") from err
        for (t, p), shard in self.shards.items():
            found = {k: tuple(v.shape) for k, v in shard["model"].items()
                     if v is not None and not k.endswith("_extra_state")}  # fmt: skip
            check_shapes(found, megatron_shard_shapes(m, tp, pp, p), f"{where}: {self.files[t, p]}")

    def _find_shards(self) -> dict[tuple[int, int], str]:
        names = sorted(os.listdir(self.path))
        matches = [(_SHARD_DIR_RE.match(n), n) for n in names]
        files = {(int(m[1]), int(m[2] or 0)): os.path.join(self.path, n, SHARD_FILE)
                 for m, n in matches if m}  # fmt: skip
        if not files:
            raise FileNotFoundError(f"{self.where}: {self.path} holds no mp_rank_TT_PPP shards")
        tp, pp = max(t for t, _ in files) + 1, max(p for _, p in files) + 1
        for key in ((t, p) for p in range(pp) for t in range(tp)):
            if not os.path.isfile(files.get(key, "")):
                raise FileNotFoundError(
                    f"{self.where}: shard {key} of TP={tp} x PP={pp} is missing in {self.path}"
                )
        return files

    def _load_shard(self, path: str) -> dict[str, Any]:
        # Checksum first (when the save wrote one), then a load that never executes code; mmap:
        # tensors stay on disk until read (training shards also hold optimizer states).
        verify_checksum(path)
        shard = safe_load(path, self.where, mmap=True)
        if not isinstance(shard, Mapping) or not isinstance(shard.get("model"), Mapping):
            raise ValueError(f"{self.where}: {path} holds no 'model' state dict")
        return shard

    def _merged(self, pp_rank: int, keys) -> dict[str, torch.Tensor]:  # noqa: ANN001
        parts = [{k: self.shards[t, pp_rank]["model"][k] for k in keys}
                 for t in range(self.layout[0])]  # fmt: skip
        return _merge_tp(parts, self.model_config)

    def embedding(self) -> torch.Tensor:
        return self._merged(0, [EMBEDDING])[EMBEDDING]

    def layer(self, i: int) -> dict[str, torch.Tensor]:
        pp_rank, local = divmod(i, self.model_config.num_layers // self.layout[1])
        prefix = f"decoder.layers.{local}."
        keys = [k for k in self.shards[0, pp_rank]["model"] if k.startswith(prefix)]
        merged = self._merged(pp_rank, keys)
        return {f"decoder.layers.{i}.{k[len(prefix) :]}": v for k, v in merged.items()}

    def final_norm(self) -> torch.Tensor:
        return self.shards[0, self.layout[1] - 1]["model"][FINAL_NORM]

    def output_layer(self) -> torch.Tensor:
        last = self.layout[1] - 1
        if OUTPUT in self.shards[0, last]["model"]:
            return self._merged(last, [OUTPUT])[OUTPUT]
        return self.embedding()  # tied, one stage


class DistCheckpoint(StoredCheckpoint):
    """megatron-core dist_checkpointing (``torch_dist``): global tensors, layers stacked."""

    format = "torch_dist"

    def __init__(self, load_dir: str, iteration: int, path: str, where: str) -> None:
        super().__init__(load_dir, iteration, path, where)
        self.reader = DistCheckpointReader(path, where)
        saved = saved_layout(self.reader.common)  # ours or Megatron-LM's args
        self.layout = None if saved is None else saved[:2]
        self.virtual_pipeline = None if saved is None else saved[2]
        self.suffixes = self.reader.layer_keys()
        m = self._set_config(self.reader.common, _spec_of(self.suffixes))
        self._check_shapes(m)

    def _check_shapes(self, m: ModelConfig) -> None:
        """Global shapes against the model config; vocabulary rows as padded by the saving run."""
        n = self.reader.num_stacked_layers()
        if n != m.num_layers:
            raise ValueError(
                f"{self.where}: {self.path} stores {n} layers, the model config has {m.num_layers}"
            )
        expected = {}
        for key, shape in megatron_shard_shapes(m, 1, 1, 0).items():
            if key.startswith("decoder.layers.0."):
                expected["decoder.layers." + key[len("decoder.layers.0.") :]] = (n, *shape)
            elif not key.startswith("decoder.layers."):
                expected[key] = shape
        found = dict(self.reader.shapes)
        for key in (EMBEDDING, OUTPUT):
            rows = found.get(key, (0,))[0]
            if key in expected and rows >= m.vocab_size:
                expected[key] = (rows, *expected[key][1:])
        check_shapes(found, expected, f"{self.where}: {self.path}")

    def embedding(self) -> torch.Tensor:
        return self.reader.read({EMBEDDING: (EMBEDDING, None)})[EMBEDDING]

    def layer(self, i: int) -> dict[str, torch.Tensor]:
        requests = {f"decoder.layers.{i}.{s}": (key, i) for s, key in self.suffixes.items()}
        return self.reader.read(requests)

    def final_norm(self) -> torch.Tensor:
        return self.reader.read({FINAL_NORM: (FINAL_NORM, None)})[FINAL_NORM]

    def output_layer(self) -> torch.Tensor:
        if OUTPUT in self.reader.shapes:
            return self.reader.read({OUTPUT: (OUTPUT, None)})[OUTPUT]
        return self.embedding()  # tied: megatron stores the embedding only


def open_checkpoint(
    load_dir: str, iteration: int | None = None, where: str | None = None
) -> StoredCheckpoint:
    """Open iteration ``iteration`` (None: the tracker's) of a checkpoint directory.

    Args:
        load_dir: the ``--save`` directory (holding ``latest_checkpointed_iteration.txt``).
        iteration: which iteration; None reads the tracker.
        where: prefix of error messages (default ``"--load={load_dir}"``).

    Raises:
        FileNotFoundError: no directory, tracker, iteration or shard.
        ValueError: unreadable files, a missing or mismatched model config.
    """
    where = where or f"--load={load_dir}"
    if not os.path.isdir(load_dir):
        raise FileNotFoundError(f"{where}: no such directory")
    if iteration is None:
        iteration = read_tracker(load_dir)
        if iteration is None:
            raise FileNotFoundError(f"{where}: no checkpoint ({TRACKER} is missing)")
    path = stored_iteration_dir(load_dir, iteration)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{where}: checkpoint directory {path} is missing")
    cls = DistCheckpoint if is_dist_checkpoint(path) else ShardedTorchCheckpoint
    return cls(load_dir, iteration, path, where)


def _renamed(
    layer: Mapping[str, torch.Tensor], src: ModelConfig, dst: ModelConfig, i: int, local: int
) -> dict[str, torch.Tensor]:
    """Layer ``i`` under the names of stage-local layer ``local`` of ``dst``'s spec."""
    old, new = f"decoder.layers.{i}.", f"decoder.layers.{local}."
    norms = dict(zip(norm_keys(src, old), norm_keys(dst, new)))
    return {norms.get(k, new + k[len(old) :]): v for k, v in layer.items()}


def rank_state_dict(
    ckpt: StoredCheckpoint,
    model_config: ModelConfig,
    tp: tuple[int, int] = (1, 0),
    pp: tuple[int, int] = (1, 0),
) -> dict[str, torch.Tensor]:
    """The state dict of one (TP, PP) rank of ``model_config``'s spec, from any saved layout.

    Args:
        ckpt: the checkpoint.
        model_config: the model to load into (its ``transformer_impl`` names the norms; its
            vocabulary is re-padded to ``padded_vocab_size(tp size)``).
        tp: (size, rank) of tensor parallelism.
        pp: (size, rank) of pipeline parallelism (layers split evenly, numbered per stage).
    """
    (tp_size, tp_rank), (pp_size, pp_rank) = tp, pp
    src = ckpt.model_config

    def shard(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return shard_for_tensor_parallel(sd, model_config, tp_size, tp_rank)

    out: dict[str, torch.Tensor] = {}
    if pp_rank == 0:
        out |= shard({EMBEDDING: ckpt.embedding()})
    per_stage = src.num_layers // pp_size
    for local in range(per_stage):
        i = pp_rank * per_stage + local
        out |= shard(_renamed(ckpt.layer(i), src, model_config, i, local))
    if pp_rank == pp_size - 1:
        out[FINAL_NORM] = ckpt.final_norm().clone()
        if model_config.untie_embeddings_and_output_weights or pp_size > 1:
            out |= shard({OUTPUT: ckpt.output_layer()})
    return out
