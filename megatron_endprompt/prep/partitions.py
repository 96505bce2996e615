"""``--partitions N``: Megatron-LM's document order, without its intermediate files.

Megatron-LM's ``tools/preprocess_data.py`` (``main``) writes the input lines into N partition
files, round robin (line ``g`` -> partition ``g % N``), or, with ``--keep-sequential-samples``,
in N consecutive blocks of ``ceil(lines / N)``; encodes each partition into its own pair and
merges the pairs in partition order (``IndexedDatasetBuilder.add_index``). We route each
document to its partition's staged pair in a temporary directory and merge the same way, so the
output is byte-identical to Megatron-LM's: with ``--keep-sequential-samples`` (or ``N == 1``)
it is the same as one partition; round robin reorders the documents. Line numbers count every
input line, skipped ones included, across all input files in order.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Sequence

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from megatron_endprompt.prep.indexed_output import StagedIndexedDataset, publish_all


def count_lines(paths: Sequence[str]) -> int:
    """Lines in all files (a last line without newline counts)."""
    total = 0
    for path in paths:
        with open(path, "rb") as f:
            total += sum(1 for _ in f)
    return total


class PartitionRouter:
    """Partition of the ``g``-th input line (0-based, across files)."""

    def __init__(self, partitions: int, sequential: bool, total_lines: int) -> None:
        self.partitions = partitions
        self.block = math.ceil(total_lines / partitions) if sequential else 0

    def __call__(self, g: int) -> int:
        if self.partitions == 1:
            return 0
        if self.block:
            return min(g // self.block, self.partitions - 1)
        return g % self.partitions


class StagedOutputs:
    """One staged pair per key; documents routed to partitions, merged in partition order."""

    def __init__(self, prefixes: dict[str, str], dtype: type, partitions: int) -> None:
        self.prefixes, self.dtype, self.partitions = prefixes, dtype, partitions
        self.staged: list[StagedIndexedDataset] = []
        self.tmpdir: str | None = None
        self.parts: list[list[IndexedDatasetBuilder]] = []
        try:
            for prefix in prefixes.values():
                self.staged.append(StagedIndexedDataset(prefix, dtype))
            if partitions > 1:
                first = next(iter(prefixes.values()))
                self.tmpdir = tempfile.mkdtemp(
                    prefix=os.path.basename(first) + ".partitions-",
                    dir=os.path.dirname(os.path.abspath(first)),
                )
                self.parts = [
                    [IndexedDatasetBuilder(self._part(k, p) + ".bin", dtype=dtype)
                     for p in range(partitions)]
                    for k in range(len(prefixes))
                ]  # fmt: skip
        except BaseException:
            self.abort()
            raise

    def _part(self, key_i: int, p: int) -> str:
        return os.path.join(self.tmpdir, f"k{key_i}_p{p}")

    def add(self, docs: list[tuple[np.ndarray, list[int]]], partition: int = 0) -> None:
        """One document per key: its ids and its sentence lengths."""
        for k, (staged, (ids, lengths)) in enumerate(zip(self.staged, docs)):
            if self.partitions == 1:
                staged.add_document(ids, lengths)
            else:
                self.parts[k][partition].add_document(ids, lengths)

    def publish(self) -> None:
        """Merge the partitions, then publish every key's pair (all or nothing)."""
        for k, staged in enumerate(self.staged[: len(self.parts)]):
            for p, builder in enumerate(self.parts[k]):
                builder.finalize(self._part(k, p) + ".idx")
                staged.add_index(self._part(k, p))
        publish_all(self.staged)
        self._remove_tmpdir()

    def abort(self) -> None:
        for row in self.parts:
            for builder in row:
                try:
                    builder.data_file.close()
                except OSError:
                    pass
        for staged in self.staged:
            staged.abort()
        self._remove_tmpdir()

    def _remove_tmpdir(self) -> None:
        if self.tmpdir and os.path.isdir(self.tmpdir):
            shutil.rmtree(self.tmpdir, ignore_errors=True)
