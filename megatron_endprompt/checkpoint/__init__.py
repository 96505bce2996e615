"""Checkpoints, below training, conversion and evaluation.

* :mod:`.layout`: the directory contract of every format (tracker, ``iter_N``, Megatron-LM's
  ``release`` folder, :func:`publish_iteration`).
* :mod:`.shards`: our per-shard format (CPU runs and conversions): save, load, RNG states, the
  recorded model config and its check.
* :mod:`.dist`: megatron-core ``dist_checkpointing`` (CUDA runs), reshardable across TP/PP.
* :mod:`.legacy_cuda`: Megatron-LM's legacy ``torch`` format with megatron-core's optimizers
  (CUDA runs with ``--ckpt-format torch``; ``distrib_optim.pt``), both ways; :mod:`.adam_fallback`:
  what megatron-core's loaders need over its torch-Adam fallback (no TE/Apex).
* :mod:`.dist_reader`, :mod:`.stored`: :func:`open_checkpoint` reads either format at any layout
  as full tensors, on any machine (what evaluation and export use).
* :mod:`.weights`: megatron's weight layout (norm names, TP split/merge, shapes).
* :mod:`.dist_optim`, :mod:`.optim_state`, :mod:`.resume`: megatron-core's optimizer states
  (either format) onto the CPU path's torch AdamW, and the CPU path's resume.

The names below are the public API of the layout and the per-shard format.
"""

from megatron_endprompt.checkpoint.layout import (
    MODEL_CONFIG_JSON,
    SHARD_FILE,
    TRACKER,
    ShardRank,
    iteration_dir,
    list_checkpoints,
    prune_checkpoints,
    publish_iteration,
    read_tracker,
    stored_iteration_dir,
)
from megatron_endprompt.checkpoint.shards import (
    MUST_MATCH,
    check_checkpoint_model,
    checkpoint_path,
    get_rng_state,
    load_checkpoint,
    load_model_weights,
    recorded_model_config,
    save_checkpoint,
    set_rng_state,
)

__all__ = [
    "MODEL_CONFIG_JSON", "MUST_MATCH", "SHARD_FILE", "TRACKER", "ShardRank",
    "check_checkpoint_model", "checkpoint_path", "get_rng_state", "iteration_dir",
    "list_checkpoints", "load_checkpoint", "load_model_weights", "prune_checkpoints",
    "publish_iteration", "read_tracker", "recorded_model_config", "save_checkpoint",
    "set_rng_state", "stored_iteration_dir",
]  # fmt: skip
