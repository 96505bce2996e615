"""Read megatron-core ``dist_checkpointing`` (``torch_dist``) checkpoints on any machine.

A CUDA training run saves ``iter_N/`` with ``metadata.json`` (the backend: ``torch_dist``),
``.metadata`` and ``__R_I.distcp`` (torch.distributed.checkpoint), and ``common.pt`` (the
non-sharded state: iteration, scheduler, ``run_config``, ...). The files describe GLOBAL tensors,
whatever TP/PP/VPP layout wrote them: every rank wrote the chunks it owned, with their offsets.

megatron-core's keys are spec-independent: the local spec saves its norms under the Transformer
Engine names (``self_attention.linear_qkv.layer_norm_weight``, ``mlp.linear_fc1.layer_norm_weight``;
its layer spec's ``sharded_state_dict_keys_map``), and ``decoder.layers`` is ONE stacked tensor per
parameter with a leading layer axis of ``num_layers`` (TransformerBlock prepends the global layer
index; virtual pipeline chunks ``model0``, ``model1``, ... add their own layers to the same
tensors). SwiGLU's ``linear_fc1`` is stored as [gate; up] over the full FFN width, ``linear_qkv``
grouped per query group, vocabulary tensors with the padded rows of the saving TP size: each
global tensor is exactly the TP = 1 megatron tensor.

megatron-core's own ``dist_checkpointing.load`` needs a process group and a model built at some
layout; this reader needs neither. It reads chunks with torch.distributed.checkpoint's file reader
and a load planner that asks for one region per request (a layer's slice of a stacked tensor, a
parameter's range of a distributed-optimizer bucket), so a layer at a time is in memory, never the
whole model. No CUDA call is made.

Besides tensors the files hold ``ShardedObject`` s (RNG states, the distributed optimizer's param
groups and bucket sizes, TE's ``_extra_state``), stored as ``KEY/shard_OFFSETS_SHAPE`` (e.g.
``rng_state/shard_0.1_1.2``: PP rank 0, TP rank 1 of a PP = 1 x TP = 2 grid), each the pickle of
a one-element list. :meth:`DistCheckpointReader.read_objects` unpickles them like every other
checkpoint file here: ``weights_only`` with the allowlist, never executing code.
"""

from __future__ import annotations

import io
import json
import os
import re
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch.distributed.checkpoint import (
    CheckpointException,
    DefaultLoadPlanner,
    FileSystemReader,
    LoadPlan,
)
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_endprompt.checkpoint.shards import safe_load

MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")
STACKED_LAYERS = "decoder.layers."
METADATA_JSON = "metadata.json"
COMMON_FILE = "common.pt"
_LAYER_KEY_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def is_dist_checkpoint(iteration_dir: str) -> bool:
    """Whether ``iteration_dir`` holds a dist_checkpointing checkpoint (``metadata.json``)."""
    return os.path.isfile(os.path.join(iteration_dir, METADATA_JSON))


def _checkpoint_planner(requests: Mapping[str, tuple[str, tuple[int, ...], torch.Tensor]]):
    """A load planner filling ``dest`` tensors from regions of stored tensors.

    ``requests``: name -> (stored key, global offsets, destination tensor of the region's shape).
    """

    class RegionPlanner(DefaultLoadPlanner):
        def create_local_plan(self) -> LoadPlan:
            by_key: dict[str, list[tuple[tuple[int, ...], torch.Tensor]]] = {}
            for key, offsets, dest in requests.values():
                by_key.setdefault(key, []).append((offsets, dest))
            items, self.regions = [], {}
            for key, regions in by_key.items():
                chunks = [
                    ChunkStorageMetadata(torch.Size(off), dest.shape) for off, dest in regions
                ]
                items += create_read_items_for_chunk_list(
                    key, self.metadata.state_dict_metadata[key], chunks
                )
                self.regions.update({(key, tuple(off)): dest for off, dest in regions})
            self.covered = sum(_volume(item.lengths) for item in items)
            return LoadPlan(items)

        def lookup_tensor(self, index):  # noqa: ANN001, ANN202 - planner interface
            return self.regions[(index.fqn, tuple(index.offset))]

    return RegionPlanner()


class _RawBytesPlanner(DefaultLoadPlanner):
    """Collects the raw bytes of ``ShardedObject`` entries (unpickled later, safely)."""

    def __init__(self) -> None:
        super().__init__()
        self.raw: dict[str, bytes] = {}

    def load_bytes(self, read_item, value) -> None:  # noqa: ANN001 - planner interface
        self.raw[read_item.dest_index.fqn] = value.read()


class _NamedBytes(io.BytesIO):
    """Bytes whose ``str`` names their entry, so ``safe_load``'s errors name it too."""

    def __init__(self, data: bytes, name: str) -> None:
        super().__init__(data)
        self.name = name

    def __str__(self) -> str:
        return self.name


def _cause(err: BaseException) -> str:
    """The first rank's error of a CheckpointException (its text is a whole traceback)."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        err = first[0] if isinstance(first, tuple) else first  # (exception, traceback)
    return f"{type(err).__name__}: {err}"


def _volume(lengths) -> int:  # noqa: ANN001
    n = 1
    for length in lengths:
        n *= int(length)
    return n


class DistCheckpointReader:
    """Global tensors of one dist_checkpointing iteration directory, read region by region.

    Args:
        iteration_dir: ``iter_N`` (holding ``metadata.json``, ``.metadata``, ``common.pt``).
        where: prefix of every error message (e.g. ``"--load ckpt"``).

    Raises:
        ValueError: another sharded backend, or unreadable / missing metadata or common state.
    """

    def __init__(self, iteration_dir: str, where: str) -> None:
        self.path, self.where = iteration_dir, where
        backend = self._read_backend()
        if backend != "torch_dist":
            raise ValueError(
                f"{where}: {iteration_dir} uses the sharded backend {backend!r}; only "
                "megatron-core's 'torch_dist' format can be read"
            )
        self._reader = FileSystemReader(iteration_dir)
        try:
            self.metadata = self._reader.read_metadata()
        except Exception as err:  # noqa: BLE001 - a missing or corrupt .metadata file
            raise ValueError(f"{where}: cannot read {iteration_dir}/.metadata: {err}") from err
        self.common = self._read_common()
        entries = self.metadata.state_dict_metadata
        self.tensors: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
            key: (tuple(md.size), md.properties.dtype)
            for key, md in entries.items()
            if isinstance(md, TensorStorageMetadata)
        }
        """Every stored tensor (model, optimizer): key -> (global shape, dtype)."""
        self.objects = sorted(
            key for key, md in entries.items() if isinstance(md, BytesStorageMetadata)
        )
        """The ``ShardedObject`` entries' stored names (``KEY/shard_OFFSETS_SHAPE``)."""
        self.shapes: dict[str, tuple[int, ...]] = {
            key: shape for key, (shape, _) in self.tensors.items() if key.startswith(MODEL_PREFIXES)
        }
        """The model's tensors: key -> global shape."""

    def _read_backend(self) -> str:
        path = os.path.join(self.path, METADATA_JSON)
        try:
            with open(path, encoding="utf-8") as f:
                return str(json.load(f)["sharded_backend"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(
                f"{self.where}: {path} is not a dist_checkpointing metadata file"
            ) from err

    def _read_common(self) -> dict[str, Any]:
        path = os.path.join(self.path, COMMON_FILE)
        if not os.path.isfile(path):
            return {}
        # Plain containers (scheduler, run config, progress) plus megatron-core's registered safe
        # globals: never executes code (shards.safe_load).
        common = safe_load(path, self.where)
        return common if isinstance(common, dict) else {}

    def num_stacked_layers(self) -> int | None:
        """The leading (layer) axis of the stacked ``decoder.layers.*`` tensors, if any."""
        sizes = {s[0] for k, s in self.shapes.items() if k.startswith(STACKED_LAYERS)
                 and not _LAYER_KEY_RE.match(k)}  # fmt: skip
        if len(sizes) > 1:
            raise ValueError(f"{self.where}: stacked layer tensors disagree on the layer count")
        return sizes.pop() if sizes else None

    def layer_keys(self) -> dict[str, str]:
        """Name within a layer -> stacked key, e.g. ``"mlp.linear_fc2.weight"`` ->
        ``"decoder.layers.mlp.linear_fc2.weight"`` (per-layer keys such as
        ``decoder.layers.3.X``, which megatron-core does not write, are left out).
        """
        out = {}
        for key in self.shapes:
            if key.startswith(STACKED_LAYERS) and not _LAYER_KEY_RE.match(key):
                out[key[len(STACKED_LAYERS) :]] = key
        return out

    def read(self, requests: Mapping[str, tuple[str, int | None]]) -> dict[str, torch.Tensor]:
        """Read tensors: name -> (stored key, index along the leading axis or None for all).

        Returns:
            name -> tensor (the stored dtype; a leading index drops that axis).

        Raises:
            ValueError: naming the key when it is missing or its chunks do not cover the region.
        """
        regions: dict[str, tuple[str, tuple[int, ...], tuple[int, ...]]] = {}
        for name, (key, index) in requests.items():
            shape = self._shape(key)
            offsets = (0,) * len(shape)
            if index is not None:
                if not 0 <= index < shape[0]:
                    raise ValueError(f"{self.where}: {key} has {shape[0]} rows, asked for {index}")
                offsets, shape = (index,) + offsets[1:], (1,) + shape[1:]
            regions[name] = (key, offsets, shape)
        out = self.read_regions(regions)
        return {name: out[name][0] if index is not None else out[name]
                for name, (_, index) in requests.items()}  # fmt: skip

    def read_regions(
        self, requests: Mapping[str, tuple[str, tuple[int, ...], tuple[int, ...]]]
    ) -> dict[str, torch.Tensor]:
        """Read boxes of stored tensors: name -> (stored key, offsets, shape of the box).

        E.g. ``("optimizer...bucket_idx_0.exp_avg", (640,), (4096,))``: elements 640..4735 of
        a distributed-optimizer bucket.

        Raises:
            ValueError: naming the key when it is missing, the box leaves the tensor, or the
                stored chunks do not cover it.
        """
        regions: dict[str, tuple[str, tuple[int, ...], torch.Tensor]] = {}
        for name, (key, offsets, shape) in requests.items():
            full = self._shape(key)
            if (
                len(offsets) != len(full)
                or len(shape) != len(full)
                or any(o < 0 or o + n > f for o, n, f in zip(offsets, shape, full))
            ):
                raise ValueError(
                    f"{self.where}: {key} has shape {full}, asked for {tuple(shape)} at "
                    f"{tuple(offsets)}"
                )
            dest = torch.empty(tuple(shape), dtype=self.tensors[key][1])
            regions[name] = (key, tuple(offsets), dest)
        planner = _checkpoint_planner(regions)
        self._load({n: r[2] for n, r in regions.items()}, planner)
        if planner.covered != sum(r[2].numel() for r in regions.values()):
            raise ValueError(
                f"{self.where}: {self.path} is incomplete: its chunks do not cover "
                f"{sorted({r[0] for r in regions.values()})[:3]}"
            )
        return {name: dest for name, (_, _, dest) in regions.items()}

    def read_objects(self, names: list[str]) -> dict[str, Any]:
        """Unpickle ``ShardedObject`` entries (``KEY/shard_...`` names of :attr:`objects`).

        Returns:
            name -> the object as saved (megatron-core's one-element list unwrapped).

        Raises:
            ValueError: naming the entry when it is missing or holds anything outside the
                checkpoint allowlist (nothing is executed).
        """
        missing = [n for n in names if n not in self.objects]
        if missing:
            raise ValueError(f"{self.where}: {self.path} holds no object {missing[0]!r}")
        planner = _RawBytesPlanner()
        self._load(dict.fromkeys(names), planner)
        out = {}
        for name in names:
            data = safe_load(_NamedBytes(planner.raw[name], f"{self.path}/{name}"), self.where)
            out[name] = data[0] if isinstance(data, list) and len(data) == 1 else data
        return out

    def _shape(self, key: str) -> tuple[int, ...]:
        if key not in self.tensors:
            raise ValueError(f"{self.where}: {self.path} holds no tensor {key!r}")
        return self.tensors[key][0]

    def _load(self, state_dict: dict[str, Any], planner: DefaultLoadPlanner) -> None:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
            warnings.simplefilter("ignore")
            try:
                dcp_load(state_dict, storage_reader=self._reader, planner=planner, no_dist=True)
            except (Exception, CheckpointException) as err:  # noqa: BLE001 - any read failure
                raise ValueError(f"{self.where}: cannot read {self.path}: {_cause(err)}") from err
