"""A Megatron indexed dataset (``PREFIX.bin`` / ``PREFIX.idx``) published only when complete.

The builder writes to temporary names beside the prefix. Publishing has two steps:
:meth:`~StagedIndexedDataset.finalize` writes the index and closes the data file (where a full
disk shows up), :meth:`~StagedIndexedDataset.commit` renames (the old ``.idx`` removed first, then
``.bin``, then ``.idx``, so an old index is never paired with new data and readers, which open the
``.idx`` first, see either nothing or a whole pair). :func:`publish_all` finalizes every staged
pair before committing any, so several outputs of one run are published all or nothing;
:meth:`~StagedIndexedDataset.abort` removes the temporaries. Used by JSONL preprocessing and the
passkey corpus.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from megatron_endprompt.atomic_io import writing


class StagedIndexedDataset:
    """An ``IndexedDatasetBuilder`` on temporary paths until :meth:`publish`."""

    def __init__(self, prefix: str, dtype: type) -> None:
        suffix = f".tmp-{os.getpid()}"
        self.prefix = prefix
        self.tmp_bin, self.tmp_idx = prefix + ".bin" + suffix, prefix + ".idx" + suffix
        self.builder = IndexedDatasetBuilder(self.tmp_bin, dtype=dtype)
        self.finalized = False

    def add_document(self, ids: np.ndarray, lengths: list[int] | None = None) -> None:
        """One document: one sequence (``add_item`` + ``end_document``, as Megatron-LM), or
        one sequence per entry of ``lengths`` (``add_document``, Megatron-LM's sentences)."""
        if lengths is None or len(lengths) == 1:
            _naming_path(self.tmp_bin, lambda: self.builder.add_item(torch.from_numpy(ids)))
            self.builder.end_document()
        else:
            _naming_path(self.tmp_bin, lambda: self.builder.add_document(ids, lengths))

    def add_index(self, prefix: str) -> None:
        """Append a finished ``prefix.{bin,idx}`` pair (Megatron-LM's partition merge)."""
        _naming_path(self.tmp_bin, lambda: self.builder.add_index(prefix))

    def finalize(self) -> None:
        """Write the index and close the data file, still under the temporary names."""
        _naming_path(self.tmp_idx, lambda: self.builder.finalize(self.tmp_idx))
        self.finalized = True

    def commit(self) -> None:
        """Move a finalized pair into place."""
        if os.path.exists(self.prefix + ".idx"):
            os.remove(self.prefix + ".idx")
        os.replace(self.tmp_bin, self.prefix + ".bin")
        os.replace(self.tmp_idx, self.prefix + ".idx")

    def publish(self) -> None:
        """Finalize the index and move both files into place."""
        self.finalize()
        self.commit()

    def abort(self) -> None:
        """Close and delete the temporaries (nothing is published)."""
        try:
            self.builder.data_file.close()
        except OSError:  # flushing the buffer can fail again on a full disk; the file goes anyway
            pass
        for path in (self.tmp_bin, self.tmp_idx):
            if os.path.exists(path):
                os.remove(path)


def publish_all(staged: Sequence[StagedIndexedDataset]) -> None:
    """Publish several staged pairs all or nothing: every one is finalized before any is renamed.

    A failure while finalizing (a full disk, say) publishes nothing and leaves every old pair in
    place; the caller then aborts them all.
    """
    for output in staged:
        output.finalize()
    for output in staged:
        output.commit()


def _naming_path(path: str, write: Callable[[], object]) -> None:
    """Run ``write``; a failed write is re-raised as :class:`WriteError` naming ``path``."""
    with writing(path):
        write()
