"""Model-agnostic scoring primitives shared by the passkey, needle and perplexity evaluations.

Every evaluation talks to the model through a ``LogitsFn``: a callable taking ``input_ids`` [b, s]
and ``position_ids`` [b, s] (both int64, built on the CPU) and returning logits [b, s, V]. The
callable owns device placement: it moves the inputs to wherever its model lives, so this module
never names a device. Logits may come back on any device and in any float dtype; reductions that
must be exact (cross-entropy) are done in float64. A ``CachedLogitsFn`` adds KV-cached incremental
decoding, which greedy decoding and teacher forcing use when it is there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch

# Positions scored per float64 cross-entropy step: bounds the float64 copy of the logits to
# CE_CHUNK * V * 8 bytes per row (1 GiB at V = 128K) whatever the sequence length.
CE_CHUNK = 1024


@runtime_checkable
class LogitsFn(Protocol):
    """``logits_fn(input_ids [b, s], position_ids [b, s]) -> logits [b, s, V]``."""

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Return next-token logits for every input position."""
        ...


def _check_ids(name: str, ids: Sequence[int], allow_empty: bool = False) -> list[int]:
    ids = [int(i) for i in ids]
    if not ids and not allow_empty:
        raise ValueError(f"{name} must not be empty, got {ids!r}")
    if any(i < 0 for i in ids):
        raise ValueError(f"{name} must hold non-negative token ids, got {ids!r}")
    return ids


@runtime_checkable
class CachedLogitsFn(LogitsFn, Protocol):
    """A ``LogitsFn`` that also decodes one sequence incrementally, with a KV cache.

    ``prefill`` starts a sequence (dropping the previous one) and returns the next-token logits
    [V] after its last token; a prefill with exactly the ids and positions of the previous
    prefill rewinds to it instead of recomputing, so several continuations of one prompt cost one
    long forward pass. ``extend`` appends one token at one position and returns the logits [V]
    after it. The logits equal the last row of a full ``logits_fn`` pass over the sequence, up to
    float rounding (a different reduction order).
    """

    def prefill(self, ids: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
        """Start a sequence; logits [V] after its last token."""
        ...

    def extend(self, token: int, position: int) -> torch.Tensor:
        """Append one token; logits [V] after it."""
        ...


def _forward(logits_fn: LogitsFn, ids: list[int], positions: list[int]) -> torch.Tensor:
    """Logits [s, V] of one sequence at the given position ids."""
    input_ids = torch.tensor([ids], dtype=torch.long)
    position_ids = torch.tensor([positions], dtype=torch.long)
    logits = logits_fn(input_ids, position_ids)
    if logits.dim() != 3 or tuple(logits.shape[:2]) != (1, len(ids)):
        raise ValueError(
            f"logits_fn must return logits [1, {len(ids)}, V], got {tuple(logits.shape)}"
        )
    return logits[0]


def _prompt_positions(n: int, offset: int, position_ids: Sequence[int] | None) -> list[int]:
    if position_ids is None:
        if offset < 0:
            raise ValueError(f"position_offset must be >= 0, got {offset}")
        return list(range(offset, offset + n))
    positions = [int(p) for p in position_ids]
    if len(positions) != n or any(p < 0 for p in positions):
        raise ValueError(f"position_ids must hold {n} non-negative ids, got {positions!r}")
    return positions


class _Continuation:
    """Logits after a prompt and after each token appended to it, cached or recomputed."""

    def __init__(self, logits_fn: LogitsFn, ids: list[int], positions: list[int], cache: bool):
        self.fn, self.ids, self.positions = logits_fn, list(ids), list(positions)
        self.cached = cache and isinstance(logits_fn, CachedLogitsFn)

    def first(self) -> torch.Tensor:
        if self.cached:
            return self.fn.prefill(self.ids, self.positions)
        return _forward(self.fn, self.ids, self.positions)[-1]

    def append(self, token: int) -> torch.Tensor:
        """Append ``token`` at the position after the last one (generation is contiguous)."""
        self.ids.append(token)
        self.positions.append(self.positions[-1] + 1)
        if self.cached:
            return self.fn.extend(token, self.positions[-1])
        return _forward(self.fn, self.ids, self.positions)[-1]


@torch.no_grad()
def greedy_decode(
    logits_fn: LogitsFn,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    stop_ids: Sequence[int] = (),
    position_offset: int = 0,
    position_ids: Sequence[int] | None = None,
    use_cache: bool = True,
) -> list[int]:
    """Greedy (argmax) continuation of ``prompt_ids``.

    With a :class:`CachedLogitsFn` (and ``use_cache``) the prompt is run once and every generated
    token costs one short step over the KV cache; otherwise every step re-runs the whole sequence
    (``max_new_tokens`` full forward passes). Generated tokens take the positions after the
    prompt's last one. Ties are broken towards the lowest id (``torch.argmax``).

    Args:
        logits_fn: the model.
        prompt_ids: the prompt (non-empty).
        max_new_tokens: how many tokens to generate at most (>= 0).
        stop_ids: generation stops at the first of these ids; it is not returned.
        position_offset: position id of the first prompt token (contiguous prompt positions).
        position_ids: explicit prompt positions instead (e.g. an EndPrompt layout).
        use_cache: use the KV cache when ``logits_fn`` has one.

    Returns:
        The generated ids (without the prompt and without the stop id).
    """
    ids = _check_ids("prompt_ids", prompt_ids)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise ValueError(f"max_new_tokens must be an int, got {max_new_tokens!r}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    positions = _prompt_positions(len(ids), position_offset, position_ids)
    stops = {int(s) for s in stop_ids}
    generated: list[int] = []
    if max_new_tokens == 0:
        return generated
    run = _Continuation(logits_fn, ids, positions, use_cache)
    logits = run.first()
    while True:
        next_id = int(torch.argmax(logits).item())
        if next_id in stops:
            break
        generated.append(next_id)
        if len(generated) == max_new_tokens:
            break
        logits = run.append(next_id)
    return generated


@torch.no_grad()
def teacher_forced_token_correct(
    logits_fn: LogitsFn,
    prompt_ids: Sequence[int],
    answer_ids: Sequence[int],
    use_cache: bool = True,
) -> list[bool]:
    """Whether each answer token is the argmax given the prompt and the true answer prefix.

    Positions 0..; the prediction for answer token k is read after input
    ``len(prompt) - 1 + k``. Without a cache: one forward pass over ``prompt + answer[:-1]``;
    with one: the prompt (shared with a greedy decode of the same prompt) plus one short step per
    answer token but the last.
    """
    prompt = _check_ids("prompt_ids", prompt_ids)
    answer = _check_ids("answer_ids", answer_ids)
    run = _Continuation(logits_fn, prompt, list(range(len(prompt))), use_cache)
    if run.cached:
        rows = [run.first()] + [run.append(t) for t in answer[:-1]]
        predicted = torch.stack([torch.argmax(r) for r in rows]).cpu()
    else:
        ids = prompt + answer[:-1]
        logits = _forward(logits_fn, ids, list(range(len(ids))))
        predicted = torch.argmax(logits[len(prompt) - 1 :], dim=-1).cpu()
    return (predicted == torch.tensor(answer, dtype=torch.long)).tolist()


def teacher_forced_token_accuracy(
    logits_fn: LogitsFn, prompt_ids: Sequence[int], answer_ids: Sequence[int]
) -> tuple[bool, float]:
    """Argmax accuracy of the answer tokens given the prompt and the true answer prefix.

    One forward pass over ``prompt + answer[:-1]`` at positions 0..; the prediction for answer
    token k is read at input position ``len(prompt) - 1 + k``. This is the soft metric that shows
    partial recovery which greedy exact match hides.

    Args:
        logits_fn: the model.
        prompt_ids: the prompt (non-empty).
        answer_ids: the reference answer (non-empty).

    Returns:
        ``(exact, per_token_accuracy)``: whether every answer token is the argmax, and the
        fraction that are.
    """
    correct = teacher_forced_token_correct(logits_fn, prompt_ids, answer_ids)
    return all(correct), sum(correct) / len(correct)


def _as_2d_long(name: str, value: object) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(value), dtype=torch.long)
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be 2-D [b, s], got shape {tuple(tensor.shape)}")
    return tensor


@torch.no_grad()
def _chunk_losses(logits_bsv: torch.Tensor, labels_bs: torch.Tensor) -> torch.Tensor:
    """Float64 cross-entropy [b, s], CE_CHUNK positions at a time to bound the float64 copy."""
    labels_bs = labels_bs.to(logits_bsv.device)
    out = []
    for start in range(0, logits_bsv.shape[1], CE_CHUNK):
        chunk = logits_bsv[:, start : start + CE_CHUNK].double()
        target = labels_bs[:, start : start + CE_CHUNK].unsqueeze(-1)
        out.append(torch.logsumexp(chunk, dim=-1) - chunk.gather(-1, target).squeeze(-1))
    return torch.cat(out, dim=1).cpu()


@torch.no_grad()
def token_losses(
    logits_fn: LogitsFn,
    ids: object,
    position_ids: object | None = None,
    batch_size: int = 1,
) -> np.ndarray:
    """Per-token next-token cross-entropy (nats, float64).

    The inputs are ``ids[:, :-1]`` and the labels ``ids[:, 1:]``, so a row of ``s`` ids yields
    ``s - 1`` losses; ``loss[r, i]`` is the loss of predicting ``ids[r, i + 1]`` from input
    position ``i``. Rows are run ``batch_size`` at a time to bound activation memory.

    Args:
        logits_fn: the model.
        ids: token ids [b, s] (array-like, s >= 2).
        position_ids: position ids [b, s - 1] or [s - 1] for the inputs; default 0..s-2.
        batch_size: rows per forward pass (>= 1).

    Returns:
        Losses [b, s - 1], float64.
    """
    ids_bs = _as_2d_long("ids", ids)
    if ids_bs.shape[1] < 2:
        raise ValueError(f"ids needs at least 2 tokens per row, got shape {tuple(ids_bs.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    b, s = ids_bs.shape
    if position_ids is None:
        pos_bs = torch.arange(s - 1, dtype=torch.long).expand(b, s - 1)
    else:
        pos = torch.as_tensor(np.asarray(position_ids), dtype=torch.long)
        if tuple(pos.shape) not in ((b, s - 1), (s - 1,)):
            raise ValueError(
                f"position_ids must have shape [{b}, {s - 1}] or [{s - 1}], got {tuple(pos.shape)}"
            )
        pos_bs = pos.expand(b, s - 1)
    losses = []
    for start in range(0, b, batch_size):
        rows = slice(start, start + batch_size)
        inputs = ids_bs[rows, :-1].contiguous()
        logits = logits_fn(inputs, pos_bs[rows].contiguous())
        if tuple(logits.shape[:2]) != tuple(inputs.shape):
            raise ValueError(
                f"logits_fn must return [{inputs.shape[0]}, {s - 1}, V], got {tuple(logits.shape)}"
            )
        losses.append(_chunk_losses(logits, ids_bs[rows, 1:]))
    return torch.cat(losses, dim=0).numpy().astype(np.float64)
