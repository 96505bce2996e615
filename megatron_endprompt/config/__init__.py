"""Configuration: one package, each dataclass validating itself in ``__post_init__``.

* :mod:`.model`: model shape and numerics, RoPE scaling, parallel layout.
* :mod:`.training`: batch sizes, schedule, optimizer and numerics (``TrainingConfig``).
* :mod:`.megatron_flags`: Megatron-LM flags without effect here, or refused, with the reasons.
* :mod:`.sections`: the rest of a run, one dataclass per concern (data, EndPrompt layout,
  checkpoints, logging).
* :mod:`.run`: :class:`RunConfig`, the whole run, and the rules that need several sections.
* :mod:`.fp8`: Transformer Engine's FP8 shape rules.
* :mod:`.batch_ramp`: Megatron-LM's ``--rampup-batch-size`` (megatron-core's calculator).

Errors are ``ValueError`` naming the command-line flag and the offending value, so a bad run fails
before any compute whether it was built from flags or in Python. The names below are the
package's public API.
"""

from megatron_endprompt.config.model import (
    NORMALIZATIONS,
    PARAMS_DTYPES,
    ROPE_SCALING_TYPES,
    TRANSFORMER_IMPLS,
    ModelConfig,
    ParallelConfig,
    RopeScalingConfig,
    model_config_from_dict,
)
from megatron_endprompt.config.run import RunConfig
from megatron_endprompt.config.sections import (
    CheckpointConfig,
    DataConfig,
    EndPromptConfig,
    LoggingConfig,
)
from megatron_endprompt.config.training import TrainingConfig

__all__ = [
    "NORMALIZATIONS", "PARAMS_DTYPES", "ROPE_SCALING_TYPES", "TRANSFORMER_IMPLS",
    "CheckpointConfig", "DataConfig", "EndPromptConfig", "LoggingConfig",
    "ModelConfig", "ParallelConfig", "RopeScalingConfig", "RunConfig", "TrainingConfig",
    "model_config_from_dict",
]  # fmt: skip
