"""Layer specs: Transformer Engine (``te``) or megatron-core modules + torch SDPA (``local``).

The spec is the only place the two backends differ (megatron-core's ModuleSpec pattern): the model
code is the same for both. Parameter names differ, though: TE fuses the pre-attention and pre-MLP
norms into ``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight``, while the local spec
has ``input_layernorm.weight`` / ``pre_mlp_layernorm.weight`` (see ``convert/hf_llama.py``).

RoPE fusion (``TransformerConfig.apply_rope_fusion``, TE only) needs a batch-shared rotary tensor
[s, 1, 1, d]; ``EndPromptGPTModel`` switches it per forward (see ``gpt.py``).
"""

from __future__ import annotations

import copy

from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_endprompt.config import TRANSFORMER_IMPLS
from megatron_endprompt.model.attention import SDPACoreAttention
from megatron_endprompt.model.norms import LocalNorm

TE_MISSING = (
    "--transformer-impl te needs NVIDIA Transformer Engine; install the te extra: "
    "pip install megatron_endprompt[te] (or use --transformer-impl local)"
)


def _require_transformer_engine() -> None:
    try:
        import transformer_engine  # noqa: F401
    except ImportError as err:
        raise ImportError(TE_MISSING) from err


def get_local_layer_spec(normalization: str = "RMSNorm") -> ModuleSpec:
    """megatron-core's local GPT layer spec with core attention replaced by torch SDPA.

    Args:
        normalization: "RMSNorm" or "LayerNorm" (torch norms via megatron's WrappedTorchNorm).
    """
    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization=normalization))
    spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    return spec


def get_te_layer_spec() -> ModuleSpec:
    """megatron-core's Transformer Engine GPT layer spec (fused norm+linear, TE attention, FP8).

    Raises:
        ImportError: If Transformer Engine is not installed, saying how to install it.
    """
    _require_transformer_engine()
    return get_gpt_layer_with_transformer_engine_spec()


def get_layer_spec(transformer_impl: str, normalization: str = "RMSNorm") -> ModuleSpec:
    """The transformer layer spec of a backend.

    Args:
        transformer_impl: "te" (Transformer Engine, GPU) or "local" (megatron-core + SDPA).
        normalization: "RMSNorm" or "LayerNorm" (the te spec reads it from the config instead).

    Returns:
        A ModuleSpec for megatron-core's TransformerBlock.

    Raises:
        ValueError: If ``transformer_impl`` is unknown.
        ImportError: If "te" is requested without Transformer Engine.
    """
    if transformer_impl == "te":
        return get_te_layer_spec()
    if transformer_impl == "local":
        return get_local_layer_spec(normalization)
    raise ValueError(
        f"--transformer-impl={transformer_impl!r}: must be one of {', '.join(TRANSFORMER_IMPLS)}"
    )


def zero_centered_block_spec(
    layer_spec: ModuleSpec, config: TransformerConfig, vp_stage: int | None, pp_rank: int
) -> TransformerBlockSubmodules:
    """The local spec's block with :class:`LocalNorm` everywhere (``--apply-layernorm-1p``).

    megatron-core builds the final norm of a block from a layer spec with its WrappedTorchNorm,
    which refuses zero-centred gamma; a block spec names the norm itself.
    """
    layer = copy.deepcopy(layer_spec)
    layer.submodules.input_layernorm = LocalNorm
    layer.submodules.pre_mlp_layernorm = LocalNorm
    n = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=[layer] * n, layer_norm=LocalNorm)
