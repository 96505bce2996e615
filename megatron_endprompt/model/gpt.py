"""EndPromptGPTModel: megatron-core's GPTModel with RoPE driven by explicit position ids.

megatron-core 0.16.1's GPTModel computes RoPE for positions 0..s-1 only. EndPrompt and PoSE train
on layouts such as ``[0 .. a-1, L-t .. L-1]``, so this subclass builds the parent with
``position_embedding_type="none"`` (no learned or rotary position embedding at all) and injects the
rotary tensor of :class:`PositionRotaryEmbedding`, computed from ``position_ids``, into the decoder.
It does so in ``_preprocess``, which runs on every pipeline stage, so every stage must receive
``position_ids``. Under context parallelism ``position_ids`` are this rank's (load-balanced) chunks,
so the rotary tensor computed from them is already the local one.
"""

from __future__ import annotations

import torch
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import is_te_min_version

from megatron_endprompt import device
from megatron_endprompt.config import ModelConfig, ParallelConfig
from megatron_endprompt.model.rotary import PositionRotaryEmbedding
from megatron_endprompt.model.specs import get_layer_spec, zero_centered_block_spec

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class EndPromptGPTModel(GPTModel):
    """GPTModel whose rotary embedding follows ``position_ids`` (arange when None).

    Args:
        config: megatron-core transformer config (``softmax_scale`` already carries the YaRN
            temperature, see :func:`transformer_config`).
        rotary: Position-aware rotary embedding matching ``config``.
        batch_shared_positions: Whether every micro-batch of the run has one layout for all its
            rows (a fact of the run's data, decided once). None: decided per batch from the
            values. ``config.apply_rope_fusion`` (TE's fused kernel takes one [s, 1, 1, d]
            tensor) requires True; the config is never changed after construction.
        **kwargs: Forwarded to ``GPTModel`` (layer spec, vocab size, stages, ...).
    """

    def __init__(
        self,
        config: TransformerConfig,
        rotary: PositionRotaryEmbedding,
        batch_shared_positions: bool | None = None,
        **kwargs,
    ) -> None:
        if config.apply_rope_fusion and not batch_shared_positions:
            raise ValueError(
                "apply_rope_fusion needs batch_shared_positions=True: TE's fused RoPE takes one "
                "position layout per micro-batch"
            )
        kwargs["position_embedding_type"] = "none"
        super().__init__(config=config, **kwargs)
        self.position_rotary_emb = rotary
        self.batch_shared_positions = batch_shared_positions

    def _preprocess(self, input_ids, position_ids, *args, **kwargs):  # noqa: ANN001, ANN202
        output = super()._preprocess(input_ids, position_ids, *args, **kwargs)
        rotary_pos_emb = self.position_rotary_emb(position_ids, shared=self.batch_shared_positions)
        return (output[0], rotary_pos_emb) + tuple(output[2:])

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        runtime_gather_output: bool | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Run the model.

        Args:
            input_ids: Token ids [b, s] (ignored on non-first pipeline stages).
            position_ids: Position ids [b, s]; None means 0..s-1 for every row.
            attention_mask: Optional boolean mask [b, 1, s, s], True = masked out; None means
                plain causal attention.
            decoder_input: Hidden states replacing the embedding (megatron-core semantics).
            labels: Target ids [b, s]; when given, the per-token loss is returned.
            loss_mask: Passed through to GPTModel (only used by multi-token prediction); apply
                the weights with :func:`megatron_endprompt.training.loss.masked_loss_sum`.
            runtime_gather_output: Gather vocab-parallel logits; None gathers when no labels.
            **kwargs: Other ``GPTModel.forward`` arguments (inference context, packed params).

        Returns:
            Logits [b, s, padded_vocab] without labels (on the last pipeline stage; hidden states
            [s, b, h] on other stages), else float32 per-token cross entropy [b, s] computed by
            megatron's vocab-parallel cross entropy.
        """
        if position_ids is None:
            if input_ids is None:
                raise ValueError("position_ids are required on pipeline stages without input_ids")
            b, s = input_ids.shape
            position_ids = torch.arange(s, device=input_ids.device).unsqueeze(0).expand(b, s)
        if runtime_gather_output is None:
            # Vocab-parallel cross entropy needs the sharded logits; plain logits are gathered.
            runtime_gather_output = labels is None
        output = super().forward(
            input_ids,
            position_ids,
            attention_mask,
            decoder_input=decoder_input,
            labels=labels,
            loss_mask=loss_mask,
            # megatron-core's gather allocates on CUDA unconditionally; gather below instead.
            runtime_gather_output=False,
            **kwargs,
        )
        if labels is None and runtime_gather_output and self.post_process:
            output = _gather_vocab_parallel(output, self.pg_collection.tp)
        return output


def _gather_vocab_parallel(logits_bsv: torch.Tensor, group) -> torch.Tensor:  # noqa: ANN001
    """Concatenate vocab-parallel logits [b, s, V/tp] over the TP group (autograd-aware)."""
    if group is None or group.size() == 1:
        return logits_bsv
    parts = dist_nn.all_gather(logits_bsv.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def build_rotary(model_config: ModelConfig) -> PositionRotaryEmbedding:
    """The position-aware rotary embedding of a model config."""
    return PositionRotaryEmbedding(
        kv_channels=model_config.kv_channels,
        rotary_percent=model_config.rotary_percent,
        rotary_base=model_config.rotary_base,
        scaling=model_config.rope_scaling,
        rotary_interleaved=model_config.rotary_interleaved,
    )


def _check_backend(
    model_config: ModelConfig,
    parallel_config: ParallelConfig,
    apply_rope_fusion: bool,
    rotary: PositionRotaryEmbedding,
) -> None:
    """Features the chosen layer spec cannot provide fail here, naming the flags."""
    impl = model_config.transformer_impl
    if impl == "local" and parallel_config.sequence_parallel:
        raise ValueError(
            "--sequence-parallel needs --transformer-impl te (megatron-core's torch norms in the "
            "local spec do not support it)"
        )
    if apply_rope_fusion and impl != "te":
        raise ValueError("apply_rope_fusion needs --transformer-impl te")
    if impl == "te" and rotary.attention_scaling != 1.0:
        # Older TE ignores megatron's softmax_scale, which carries the YaRN temperature.
        if not is_te_min_version("1.10.0"):
            raise ValueError("--rope-scaling-type yarn with --transformer-impl te needs TE >= 1.10")


def transformer_config(
    model_config: ModelConfig,
    parallel_config: ParallelConfig | None = None,
    use_cpu_initialization: bool | None = None,
    apply_rope_fusion: bool = False,
    **overrides,
) -> TransformerConfig:
    """megatron-core TransformerConfig for a model and parallel layout.

    Args:
        model_config: Model shape and numerics.
        parallel_config: Parallel layout (TP/PP/VPP/CP/SP); None means no model parallelism.
        use_cpu_initialization: Initialise full weights on CPU and shard them; None means "when
            CUDA is unavailable" (megatron's GPU init path needs CUDA).
        apply_rope_fusion: Use TE's fused RoPE kernel when the layout is batch-shared (te only).
        **overrides: Any other TransformerConfig field (recompute, fp8, ...).

    Raises:
        ValueError: If the model does not split over the layout, or a flag needs TE.
    """
    parallel_config = parallel_config or ParallelConfig()
    model_config.validate_against(parallel_config)
    rotary = build_rotary(model_config)
    _check_backend(model_config, parallel_config, apply_rope_fusion, rotary)
    if use_cpu_initialization is None:
        use_cpu_initialization = not device.cuda_available()
    dtype = _DTYPES[model_config.params_dtype]
    kwargs = dict(
        num_layers=model_config.num_layers,
        hidden_size=model_config.hidden_size,
        ffn_hidden_size=model_config.ffn_hidden_size,
        num_attention_heads=model_config.num_attention_heads,
        num_query_groups=model_config.num_query_groups,
        kv_channels=model_config.kv_channels,
        normalization=model_config.normalization,
        layernorm_epsilon=model_config.norm_epsilon,
        layernorm_zero_centered_gamma=model_config.layernorm_zero_centered_gamma,
        gated_linear_unit=model_config.swiglu,
        activation_func=F.silu if model_config.swiglu else F.gelu,
        add_bias_linear=model_config.add_bias_linear,
        attention_dropout=model_config.attention_dropout,
        hidden_dropout=model_config.hidden_dropout,
        init_method_std=model_config.init_method_std,
        rotary_interleaved=model_config.rotary_interleaved,
        # YaRN temperature m: HF scales cos and sin by m, i.e. every logit by m**2.
        softmax_scale=rotary.softmax_scale(),
        apply_rope_fusion=apply_rope_fusion,
        # The SwiGLU/GeLU fusions are jit kernels without a bias when add_bias_linear is off.
        bias_activation_fusion=model_config.swiglu and model_config.add_bias_linear,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        pipeline_dtype=dtype,
        tensor_model_parallel_size=parallel_config.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel_config.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel_config.virtual_pipeline_model_parallel_size,
        context_parallel_size=parallel_config.context_parallel_size,
        sequence_parallel=parallel_config.sequence_parallel,
        use_cpu_initialization=use_cpu_initialization,
        perform_initialization=True,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build_model(
    model_config: ModelConfig,
    parallel_config: ParallelConfig | None = None,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    vp_stage: int | None = None,
    seed: int | None = None,
    batch_shared_positions: bool | None = None,
    **config_overrides,
) -> EndPromptGPTModel:
    """Build this rank's EndPromptGPTModel (its TP shard and pipeline stage).

    megatron-core's parallel state must be initialised (``device``); a single process
    without torch.distributed gets a 1-rank gloo/NCCL group set up automatically.

    Args:
        model_config: Model shape and numerics.
        parallel_config: Parallel layout; None means no model parallelism.
        pre_process: Holds the embedding; None = first pipeline stage (of ``vp_stage``).
        post_process: Holds the output layer; None = last pipeline stage (of ``vp_stage``).
        vp_stage: Virtual pipeline chunk index (interleaved schedule), else None.
        seed: When given, seeds weight initialisation first (``device.model_parallel_seed``,
            which resets torch's global RNG). None (default) draws from the RNG as it is.
        batch_shared_positions: See :class:`EndPromptGPTModel` (required True with
            ``apply_rope_fusion=True``).
        **config_overrides: Extra TransformerConfig fields (see :func:`transformer_config`).

    Returns:
        The model, in ``model_config.params_dtype``, on CPU (CPU init) or the current CUDA device.

    Raises:
        ValueError: On configs that do not fit the layout; ImportError for te without TE.
    """
    parallel_config = parallel_config or ParallelConfig()
    # The spec first: a missing Transformer Engine gets our install hint, not megatron's error.
    spec = get_layer_spec(model_config.transformer_impl, model_config.normalization)
    config = transformer_config(model_config, parallel_config, **config_overrides)
    device.require_model_parallel(parallel_config)
    if seed is not None:
        device.model_parallel_seed(seed)
    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    if model_config.layernorm_zero_centered_gamma and model_config.transformer_impl == "local":
        pp_rank = ps.get_pipeline_model_parallel_rank()
        spec = zero_centered_block_spec(spec, config, vp_stage, pp_rank)
    tp = parallel_config.tensor_model_parallel_size
    model = EndPromptGPTModel(
        config,
        build_rotary(model_config),
        batch_shared_positions=batch_shared_positions,
        transformer_layer_spec=spec,
        vocab_size=model_config.padded_vocab_size(tp),
        max_sequence_length=model_config.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=not model_config.untie_embeddings_and_output_weights,
        vp_stage=vp_stage,
    )
    return model
