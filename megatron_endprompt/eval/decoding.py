"""Model wrappers for evaluation: full-sequence logits plus KV-cached incremental decoding.

Both classes are :class:`~megatron_endprompt.eval.scoring.CachedLogitsFn`: ``fn(input_ids,
position_ids)`` runs the whole sequence, ``prefill`` / ``extend`` decode one sequence with a KV
cache, so a greedy answer costs one long forward pass of the prompt and one short step per token.

- :class:`MegatronLogitsFn` (an EndPromptGPTModel, one pipeline stage, any TP) uses megatron-core's
  own static KV cache (``StaticInferenceContext``): every attention layer appends the step's keys
  and values to its buffers and attends to all cached positions (no mask for a single query
  token; our SDPA core attention also aligns a causal mask bottom-right). GPTModel's inference
  forward cannot be used as is: it insists on megatron's vocab gather (which allocates on CUDA)
  and allocates the cache on the current CUDA device unconditionally. So the buffers are allocated
  here, on the model's device, and the model's own pieces run in order: ``_preprocess``
  (embedding + our position-driven rotary tensor), the decoder, the output layer, a TP gather.
  megatron keeps keys un-rotated and rotates the whole cache each step with the rotary rows of
  positions 0..n, so each step passes the position ids of the whole sequence so far: prompt
  positions as given (EndPrompt layouts jump), then one more per generated token.
- :class:`HFLogitsFn` (a transformers causal LM) uses transformers' ``DynamicCache``, with an
  all-ones attention mask so a jump in ``position_ids`` is not read as a packed-sequence start.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
import torch.distributed as dist
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.transformer.attention import SelfAttention

# Free cache rows allocated beyond the prompt: the generated answer (a few tokens) fits.
_HEADROOM = 64


def _gather_last_dim(tensor: torch.Tensor, group) -> torch.Tensor:  # noqa: ANN001
    """Concatenate vocab-parallel logits over the tensor-parallel group (no autograd)."""
    if group is None or group.size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(group.size())]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


class _Prefix:
    """The last prefill's ids, positions and logits, so a repeat prefill rewinds to it."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.logits: torch.Tensor | None = None

    def hit(self, ids: Sequence[int], positions: Sequence[int]) -> bool:
        return self.key == (tuple(ids), tuple(positions))

    def store(self, ids: Sequence[int], positions: Sequence[int], logits: torch.Tensor) -> None:
        self.key, self.logits = (tuple(ids), tuple(positions)), logits


class MegatronLogitsFn:
    """Logits and KV-cached decoding of an EndPromptGPTModel (eval mode, one pipeline stage).

    Args:
        model: the model (pre- and post-process on this rank; any tensor-parallel size, every
            TP rank calls the same methods in the same order).
        device: where the inputs go.
        vocab_size: the real vocabulary; Megatron's padded rows are dropped so they can neither
            win an argmax nor take probability mass.

    Raises:
        ValueError: for a pipeline-parallel stage.
    """

    def __init__(self, model: torch.nn.Module, device: str | torch.device, vocab_size: int):
        if not (model.pre_process and model.post_process):
            raise ValueError("evaluation needs the whole model on one pipeline stage (PP = 1)")
        self.model, self.device, self.vocab_size = model, torch.device(device), vocab_size
        self._layers = [m for m in model.modules() if isinstance(m, SelfAttention)]
        self._context = StaticInferenceContext(max_batch_size=1, max_sequence_length=0)
        self._positions: list[int] = []
        self._prefix = _Prefix()

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Float32 logits [b, s, vocab_size] of whole sequences (no cache)."""
        logits = self.model(input_ids.to(self.device), position_ids.to(self.device))
        return logits[..., : self.vocab_size].float()

    def prefill(self, ids: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
        """Start a sequence (or rewind to the last prefill's); float32 logits [V] after it."""
        if self._prefix.hit(ids, positions):
            self._positions = list(positions)
            return self._prefix.logits.clone()
        self._positions = []
        logits = self._run(list(ids), list(positions))
        self._prefix.store(ids, positions, logits)
        return logits.clone()

    def extend(self, token: int, position: int) -> torch.Tensor:
        """Append one token at ``position``; float32 logits [V] after it."""
        if not self._positions:
            raise ValueError("extend() needs a prefill() first")
        return self._run([int(token)], [int(position)])

    def reset(self) -> None:
        """Forget the cached sequence (the next prefill runs the prompt again)."""
        self._positions, self._prefix = [], _Prefix()

    def _reserve(self, length: int) -> None:
        """Cache buffers for ``length`` tokens; grown buffers keep the rows already filled."""
        ctx, keep = self._context, len(self._positions)
        if length <= ctx.max_sequence_length:
            return
        capacity = length + _HEADROOM
        dtype = next(self.model.parameters()).dtype
        buffers = {}
        for layer in self._layers:
            shape = (capacity, 1, layer.num_query_groups_per_partition)
            k = torch.empty(*shape, layer.key_hidden_size, dtype=dtype, device=self.device)
            v = torch.empty(*shape, layer.val_hidden_size, dtype=dtype, device=self.device)
            old = ctx.key_value_memory_dict.get(layer.layer_number)
            if old is not None and keep:
                k[:keep], v[:keep] = old[0][:keep], old[1][:keep]
            buffers[layer.layer_number] = (k, v)
        ctx.key_value_memory_dict, ctx.max_sequence_length = buffers, capacity

    @torch.no_grad()
    def _run(self, ids: list[int], positions: list[int]) -> torch.Tensor:
        """Append ``ids`` at ``positions`` to the cached sequence; logits [V] after the last."""
        start = len(self._positions)
        self._reserve(start + len(ids))
        self._positions += positions
        ctx, model = self._context, self.model
        ctx.sequence_len_offset = start
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        # The rotary rows of the WHOLE sequence: megatron rotates the cached keys every step.
        position_ids = torch.tensor([self._positions], dtype=torch.long, device=self.device)
        decoder_input, rotary, *_ = model._preprocess(
            input_ids, position_ids, inference_context=ctx
        )
        hidden = model.decoder(
            hidden_states=decoder_input,
            attention_mask=None,
            inference_context=ctx,
            rotary_pos_emb=rotary,
        )
        weight = None
        if model.share_embeddings_and_output_weights:
            weight = model.shared_embedding_or_output_weight()
        logits, _ = model.output_layer(hidden[-1:], weight=weight)  # [1, 1, V / tp]
        logits = _gather_last_dim(logits[0, 0], model.pg_collection.tp)
        return logits[: self.vocab_size].float()


class HFLogitsFn:
    """Logits and KV-cached decoding of a Hugging Face causal LM (eval mode).

    ``position_ids`` are passed explicitly, with an all-ones ``attention_mask``: without a mask
    and a cache, transformers reads a jump in ``position_ids`` (such as EndPrompt's
    ``0..a-1, L-t..L-1``) as the start of another packed sequence and masks attention across it;
    the mask keeps plain causal attention.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        params = inspect.signature(model.forward).parameters
        self._last_only = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self._cache = None
        self._length = 0
        self._prefix = _Prefix()

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Float32 logits [b, s, V] of whole sequences (no cache)."""
        input_ids = input_ids.to(self.device)
        out = self.model(
            input_ids=input_ids,
            position_ids=position_ids.to(self.device),
            attention_mask=torch.ones_like(input_ids),
            use_cache=False,
        )
        return out.logits.float()

    def prefill(self, ids: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
        """Start a sequence (or rewind to the last prefill's); float32 logits [V] after it."""
        if self._prefix.hit(ids, positions) and self._cache is not None:
            if self._length > len(ids):
                self._cache.crop(len(ids) - self._length)  # negative: drop that many tokens
            self._length = len(ids)
            return self._prefix.logits.clone()
        from transformers import DynamicCache

        self._cache, self._length = DynamicCache(), 0
        logits = self._run(list(ids), list(positions))
        self._prefix.store(ids, positions, logits)
        return logits.clone()

    def extend(self, token: int, position: int) -> torch.Tensor:
        """Append one token at ``position``; float32 logits [V] after it."""
        if self._cache is None:
            raise ValueError("extend() needs a prefill() first")
        return self._run([int(token)], [int(position)])

    def reset(self) -> None:
        """Forget the cached sequence (the next prefill runs the prompt again)."""
        self._cache, self._length, self._prefix = None, 0, _Prefix()

    @torch.no_grad()
    def _run(self, ids: list[int], positions: list[int]) -> torch.Tensor:
        self._length += len(ids)
        out = self.model(
            input_ids=torch.tensor([ids], dtype=torch.long, device=self.device),
            position_ids=torch.tensor([positions], dtype=torch.long, device=self.device),
            attention_mask=torch.ones(1, self._length, dtype=torch.long, device=self.device),
            past_key_values=self._cache,
            use_cache=True,
            **(self._last_only if len(ids) > 1 else {}),
        )
        return out.logits[0, -1].float()
