"""Build EndPromptDataset splits with megatron-core's BlendedMegatronDatasetBuilder.

Blends (``--data-path 0.3 A 0.7 B``), the train/valid/test ``--split`` and the index cache
(``path_to_cache``) are megatron-core's own machinery; this module only wires it up and adds a
rank predicate suited to tensor/pipeline parallelism.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.utils import get_blend_from_list

from megatron_endprompt.data.dataset import EndPromptDataset, EndPromptDatasetConfig


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
    from megatron.core import parallel_state

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
    or this rank does not build.

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
    builder = BlendedMegatronDatasetBuilder(EndPromptDataset, sizes, predicate, config)
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
