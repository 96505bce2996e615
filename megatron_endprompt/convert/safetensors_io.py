"""Streaming safetensors reading and size-capped sharded writing for checkpoint conversion."""

from __future__ import annotations

import json
import os
import re
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from megatron_endprompt.atomic_io import writing

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30}  # fmt: skip


def parse_size(text: str) -> int:
    """Bytes of ``"5GB"`` (10**9), ``"500MiB"`` (2**20) or a plain integer."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"--max-shard-size={text!r}: expected e.g. 5GB, 500MB, 2GiB or bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


# ---------------------------------------------------------------- expected shapes


class SafetensorsReader:
    """Lazy name -> tensor access to a Hugging Face directory (one file or an index)."""

    def __init__(self, directory: str) -> None:
        index = os.path.join(directory, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f).get("weight_map", {})
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
        if not files:
            raise FileNotFoundError(
                f"--input={directory}: no *.safetensors files (nor model.safetensors.index.json)"
            )
        self._handles: dict[str, Any] = {}
        self.location: dict[str, str] = {}
        for name in files:
            path = os.path.join(directory, name)
            try:
                self._handles[path] = handle = safe_open(path, framework="pt")
            except (SafetensorError, OSError) as err:
                raise ValueError(f"--input: cannot read {path}: {err}") from err
            self.location.update({key: path for key in handle.keys()})

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, from the file headers only."""
        return {
            k: tuple(self._handles[p].get_slice(k).get_shape()) for k, p in self.location.items()
        }

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor."""
        path = self.location[name]
        try:
            return self._handles[path].get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as err:
            raise ValueError(f"--input: cannot read tensor {name} from {path}: {err}") from err


class SafetensorsWriter:
    """Appends tensors to ``model-*.safetensors`` files of at most ``max_bytes`` each."""

    def __init__(self, directory: str, max_bytes: int) -> None:
        self.directory, self.max_bytes = directory, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes, self.total_bytes = 0, 0
        self.files: list[tuple[str, list[str]]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue one tensor (copied: slices of one storage cannot share a file)."""
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.detach().clone().contiguous()
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        path = os.path.join(self.directory, f"part-{len(self.files):05d}.safetensors")
        with writing(path):
            save_file(self.pending, path, metadata={"format": "pt"})
        self.files.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        """Write the last file; name them as Hugging Face does (plus the index when > 1)."""
        self._flush()
        n, weight_map = len(self.files), {}
        for i, (path, names) in enumerate(self.files):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            with writing(os.path.join(self.directory, final)):
                os.replace(path, os.path.join(self.directory, final))
            weight_map.update({name: final for name in names})
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            write_json(os.path.join(self.directory, "model.safetensors.index.json"), index)


def write_json(path: str, obj: Any) -> None:
    """Write ``obj`` as sorted, indented JSON (WriteError naming ``path`` when refused)."""
    with writing(path), open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
