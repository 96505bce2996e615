"""Build EndPromptDataset splits with megatron-core's BlendedMegatronDatasetBuilder.

Blends (``--data-path 0.3 A 0.7 B``), the train/valid/test ``--split`` and the index cache
(``path_to_cache``) are megatron-core's own machinery; this module wires it up, adds a rank
predicate suited to tensor/pipeline parallelism and builds :class:`CheckedEndPromptDataset`: each
``.bin/.idx`` pair is validated (layout, token ids vs the vocabulary) before megatron reads it, and
the pair's fingerprint (``.idx`` MD5, ``.bin`` size) joins the index cache key, so a
re-preprocessed corpus gets new indices.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence

import torch
from megatron.core import parallel_state
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import MockGPTDataset, MockGPTLowLevelDataset
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.object_storage_utils import is_object_storage_path
from megatron.core.datasets.utils import get_blend_from_list

from megatron_endprompt.data.corpus_checks import (
    check_indexed_pair,
    check_token_ids,
    index_fingerprint,
)
from megatron_endprompt.data.dataset import EndPromptDataset, EndPromptDatasetConfig


class CheckedEndPromptDataset(EndPromptDataset):
    """EndPromptDataset whose data files are checked and whose index cache knows the files.

    megatron-core keys its sample/shuffle index cache on the config and the path prefix only;
    re-preprocessing into the same prefix would reuse indices of the old corpus (other samples,
    or an IndexError when it shrank). Here the ``.idx`` content hash and the ``.bin`` size (what
    the indices are computed from) join the key.
    """

    @staticmethod
    def build_low_level_dataset(
        dataset_path: str, config: EndPromptDatasetConfig
    ) -> IndexedDataset:
        """Check the pair's layout and token ids, then EndPromptDataset's low-level dataset."""
        if is_object_storage_path(dataset_path) or not _pair_exists(dataset_path):
            return EndPromptDataset.build_low_level_dataset(dataset_path, config)
        dtype = check_indexed_pair(dataset_path)
        vocab_size = getattr(config.tokenizer, "vocab_size", None)
        if vocab_size is not None:
            check_token_ids(dataset_path, dtype, int(vocab_size), _stats_dir(dataset_path, config))
        return EndPromptDataset.build_low_level_dataset(dataset_path, config)

    def _build_document_sample_shuffle_indices(self):
        """megatron's indices, under a cache key that includes the data files' identity."""
        path = self.dataset_path
        if path is not None and not is_object_storage_path(path) and _pair_exists(path):
            self.unique_identifiers["data_files"] = index_fingerprint(
                path, _stats_dir(path, self.config)
            )
            # As MegatronDataset.__init__ builds them, now with the identity in.
            self.unique_description = json.dumps(
                self.unique_identifiers, indent=4, default=lambda obj: obj.unique_identifiers
            )
            self.unique_description_hash = hashlib.md5(
                self.unique_description.encode("utf-8"), usedforsecurity=False
            ).hexdigest()
        return super()._build_document_sample_shuffle_indices()


class MockEndPromptDataset(EndPromptDataset):
    """Megatron-LM's ``--mock-data``: megatron-core's MockGPTDataset documents, our layouts.

    The text is megatron-core's ``MockGPTLowLevelDataset`` (100,000 documents of 1..4095 tokens,
    ``1, 2, ... % vocab_size`` then EOD, under the run's tokenizer); samples, indices and splits
    are GPTDataset's, so the contiguous layout gives MockGPTDataset's samples exactly and the other
    layouts rearrange them as they do real text. Built when the config has no blend.
    """

    @staticmethod
    def numel_low_level_dataset(low_level_dataset: MockGPTLowLevelDataset) -> int:
        """The number of mock documents."""
        return MockGPTDataset.numel_low_level_dataset(low_level_dataset)

    @staticmethod
    def build_low_level_dataset(
        dataset_path: str | None, config: EndPromptDatasetConfig
    ) -> MockGPTLowLevelDataset:
        """megatron-core's mock documents (``dataset_path`` is None)."""
        return MockGPTDataset.build_low_level_dataset(dataset_path, config)


def _stats_dir(prefix: str, config: EndPromptDatasetConfig) -> str:
    """The index cache directory, or megatron's default beside the data."""
    return config.path_to_cache or os.path.join(prefix, "cache")


def _pair_exists(prefix: str) -> bool:
    return os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")


def parse_blend(data_path: Sequence[str]) -> tuple[list[str], list[float] | None]:
    """Parse a Megatron ``--data-path`` list into megatron-core's blend tuple.

    Args:
        data_path: ``["prefixA"]``, ``["prefixA", "prefixB"]`` or weight/prefix pairs such as
            ``["0.3", "prefixA", "0.7", "prefixB"]``.

    Returns:
        ``(prefixes, weights)``; weights is None when none were given.
    """
    if isinstance(data_path, str) or not data_path:
        raise ValueError(f"data_path must be a non-empty list of strings, got {data_path!r}")
    prefixes, weights = get_blend_from_list([str(p) for p in data_path])
    if weights is not None and (any(w < 0 for w in weights) or sum(weights) <= 0):
        raise ValueError(f"data_path weights must be >= 0 with a positive sum, got {weights}")
    return list(prefixes), weights


def is_dataset_built_on_rank(tensor_rank: int | None = None) -> bool:
    """Whether this rank reads data: tensor-parallel rank 0 of EVERY pipeline stage.

    Unlike megatron's GPT example (first and last stage only), every stage builds its own rotary
    table from ``position_ids``, so every stage reads; TP ranks > 0 receive the batch by
    broadcast (training/batch.py).

    Args:
        tensor_rank: tensor-parallel rank; None reads megatron-core's ``parallel_state`` when it
            is initialised (else 0: a single process builds).

    Returns:
        True where the dataset should be built.
    """
    if tensor_rank is None:
        tensor_rank = _tensor_rank()
    return tensor_rank == 0


def _tensor_rank() -> int:
    """Tensor-parallel rank from parallel_state, or 0 without model parallelism."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 0
    if not parallel_state.model_parallel_is_initialized():
        return 0
    return parallel_state.get_tensor_model_parallel_rank()


def build_datasets(
    config: EndPromptDatasetConfig,
    train_valid_test_num_samples: Sequence[int | None],
    is_built_on_rank: Callable[[], bool] | None = None,
) -> tuple[object | None, object | None, object | None]:
    """Build the train, valid and test datasets.

    A split is an ``EndPromptDataset`` (one prefix) or a megatron-core ``BlendedDataset`` of them
    (several prefixes; its samples also carry ``dataset_id``), or None when the split is empty
    or this rank does not build. A config without a blend (megatron-core then sets ``mock``)
    builds :class:`MockEndPromptDataset` splits.

    Args:
        config: the dataset config (blend or blend_per_split, split, cache path, layout).
        train_valid_test_num_samples: samples wanted per split (None: one epoch).
        is_built_on_rank: predicate choosing the reading ranks; default: every rank builds.

    Returns:
        ``(train, valid, test)``.
    """
    sizes = list(train_valid_test_num_samples)
    if len(sizes) != 3:
        raise ValueError(
            f"train_valid_test_num_samples must have 3 entries (train, valid, test), got {sizes}"
        )
    for size in sizes:
        if size is not None and (isinstance(size, bool) or int(size) != size or size < 0):
            raise ValueError(f"train_valid_test_num_samples entries must be ints >= 0: {sizes}")
    sizes = _sizes_for_megatron(config, sizes)
    predicate = is_built_on_rank if is_built_on_rank is not None else (lambda: True)
    cls = MockEndPromptDataset if config.mock else CheckedEndPromptDataset
    builder = BlendedMegatronDatasetBuilder(cls, sizes, predicate, config)
    with _single_process_is_rank_zero():
        train, valid, test = builder.build()
    return train, valid, test


def _sizes_for_megatron(config: EndPromptDatasetConfig, sizes: list) -> list:
    """0 for splits the split string leaves empty; ints where a weighted blend needs them."""
    if config.blend_per_split is not None or config.split_matrix is None:
        return sizes
    sizes = [0 if bounds is None else n for bounds, n in zip(config.split_matrix, sizes)]
    weighted = config.blend is not None and config.blend[1] is not None
    for name, n in zip(("train", "valid", "test"), sizes):
        if weighted and n is None:
            raise ValueError(
                f"train_valid_test_num_samples: the {name} split of a weighted blend needs a "
                "sample count, got None"
            )
    return sizes


@contextlib.contextmanager
def _single_process_is_rank_zero() -> Iterator[None]:
    """Let megatron-core build blends with an index cache in a single process.

    megatron-core 0.16.1's BlendedDataset calls ``torch.distributed.get_rank()`` on a cache miss
    without checking that torch.distributed is initialised; a lone process is rank 0.
    """
    dist = torch.distributed
    if not dist.is_available() or dist.is_initialized():
        yield
        return
    original = dist.get_rank
    dist.get_rank = lambda *args, **kwargs: 0
    try:
        yield
    finally:
        dist.get_rank = original
