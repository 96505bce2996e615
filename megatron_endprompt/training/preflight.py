"""Output paths checked before anything is built: a run that cannot write fails in a second.

``--save``, ``--tensorboard-dir`` and the index cache (``--data-cache-path``, or megatron-core's
default ``<data prefix>/cache`` beside each corpus) must be writable directories or creatable
below one. A read-only cache directory is accepted when it already holds built index files
(a shared, prebuilt cache): megatron-core then only reads it.
"""

from __future__ import annotations

import os

from megatron.core.datasets.object_storage_utils import is_object_storage_path

from megatron_endprompt.atomic_io import check_writable_dir
from megatron_endprompt.config import RunConfig
from megatron_endprompt.data.builder import parse_blend


def has_index_cache(path: str) -> bool:
    """Whether a cache directory already holds built index files (``*.npy``)."""
    return any(name.endswith(".npy") for _, _, names in os.walk(path) for name in names)


def check_output_paths(run: RunConfig) -> None:
    """Refuse output directories the run could not write, naming the flag.

    Raises:
        ValueError: ``--save``, ``--tensorboard-dir`` or ``--data-cache-path`` is a file, lies
            below a file or is not writable; or, without ``--data-cache-path``, a corpus's
            default cache beside it (``--data-path``) cannot be written and holds no index.
    """
    for flag, path, prebuilt in (
        ("--save", run.checkpoint.save, None),
        ("--tensorboard-dir", run.logging.tensorboard_dir, None),
        ("--data-cache-path", run.data.data_cache_path, has_index_cache),
    ):
        if path:
            check_writable_dir(path, flag, prebuilt)
    if run.data.data_cache_path or not run.data.data_path:
        return
    prefixes, _ = parse_blend(run.data.data_path)
    for prefix in prefixes:
        if is_object_storage_path(prefix) or not os.path.isfile(prefix + ".idx"):
            continue  # a missing corpus is reported by the data checks, naming the file
        try:
            check_writable_dir(os.path.join(prefix, "cache"), "--data-path", has_index_cache)
        except ValueError as err:
            raise ValueError(
                f"{err} (without --data-cache-path, megatron-core writes the index cache beside "
                "the data: give a writable --data-cache-path)"
            ) from err
