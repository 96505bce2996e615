"""A Megatron indexed dataset (``PREFIX.bin`` / ``PREFIX.idx``) published only when complete.

The builder writes to temporary names beside the prefix; :meth:`publish` finalizes and renames
them (the old ``.idx`` removed first, then ``.bin``, then ``.idx``, so an old index is never
paired with new data and readers, which open the ``.idx`` first, see either nothing or a whole
pair); :meth:`abort` removes the temporaries. Used by JSONL preprocessing and the passkey corpus.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder


class StagedIndexedDataset:
    """An ``IndexedDatasetBuilder`` on temporary paths until :meth:`publish`."""

    def __init__(self, prefix: str, dtype: type) -> None:
        suffix = f".tmp-{os.getpid()}"
        self.prefix = prefix
        self.tmp_bin, self.tmp_idx = prefix + ".bin" + suffix, prefix + ".idx" + suffix
        self.builder = IndexedDatasetBuilder(self.tmp_bin, dtype=dtype)

    def add_document(self, ids: np.ndarray) -> None:
        """One document of one sequence (``add_item`` + ``end_document``, as Megatron-LM)."""
        self.builder.add_item(torch.from_numpy(ids))
        self.builder.end_document()

    def publish(self) -> None:
        """Finalize the index and move both files into place."""
        self.builder.finalize(self.tmp_idx)
        if os.path.exists(self.prefix + ".idx"):
            os.remove(self.prefix + ".idx")
        os.replace(self.tmp_bin, self.prefix + ".bin")
        os.replace(self.tmp_idx, self.prefix + ".idx")

    def abort(self) -> None:
        """Close and delete the temporaries (nothing is published)."""
        self.builder.data_file.close()
        for path in (self.tmp_bin, self.tmp_idx):
            if os.path.exists(path):
                os.remove(path)
