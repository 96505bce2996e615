"""EndPromptDataset: megatron-core's GPTDataset with EndPrompt / PoSE position layouts.

A sample starts as the very sample plain ``GPTDataset`` returns for the same index and seed (S+1
tokens ``x0 .. xS``), so EndPrompt changes positions and the tail, never which text is read:

- ``terminal="cue"`` (the paper): ``y = x[:a] ++ cue ++ [EOD]`` with ``a = S - len(cue)`` context
  inputs; the cue is drawn per sample from the cue set.
- ``terminal="tail"`` (the reference code): ``y = x``; its last ``t`` inputs are the terminal.

``loss_mask`` carries float weights: 1 for context predictions, ``terminal_loss_weight`` for the
boundary prediction (last context input -> first terminal token) and every prediction made from a
terminal input, except the EOD label after a cue (weight 0). Worked example (S = 8, L = 64, cue of
3 tokens, fixed placement)::

    tokens       x0 x1 x2 x3 x4 c0 c1 c2
    labels       x1 x2 x3 x4 c0 c1 c2 EOD
    loss_mask    1  1  1  1  w  w  w  0
    position_ids 0  1  2  3  4  61 62 63

Per-sample randomness comes from a Philox generator keyed by ``(random_seed, sample index)`` only
(``EndPromptDataset.sample_rng``), so a sample is identical on every rank, across builds and after
a resume. Draw order: the cue choice (when the set has several cues), then the position layout.

In contiguous mode a sample is GPTDataset's own. Otherwise it is assembled in numpy from the same
text (``_query_document_sample_shuffle_indices``) with GPTDataset's masking rules (eod_mask_loss,
padding), which is cheaper than post-editing GPTDataset's tensors.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from megatron.core.datasets.gpt_dataset import (
    GPTDataset,
    GPTDatasetConfig,
    _get_ltor_masks_and_position_ids,
)
from megatron.core.datasets.indexed_dataset import IndexedDataset, get_bin_path, get_idx_path
from megatron.core.datasets.object_storage_utils import is_object_storage_path

from megatron_endprompt.positions import (
    PLACEMENTS,
    endprompt_pose_positions,
    endprompt_positions,
    pose_positions,
)

POSITION_MODES = ("contiguous", "endprompt", "pose", "endprompt_pose")
TERMINALS = ("cue", "tail")
ENDPROMPT_MODES = ("endprompt", "endprompt_pose")
EP1_CUE = "This is the end of text, please pay attention here"
"""The paper's EP_1 terminal cue."""
DEFAULT_CUE_STRINGS = (EP1_CUE, "End.")
"""Default text cues; the tokenizer's end-of-document token joins them as a one-token cue."""
DEFAULT_TERMINAL_LOSS_WEIGHT = {"cue": 0.1, "tail": 1.0}

# Third Philox counter word: separates this module's stream from any other (seed, index) user.
_RNG_STREAM = 0x454E4450  # "ENDP"


@dataclass
class EndPromptDatasetConfig(GPTDatasetConfig):
    """GPTDatasetConfig plus the EndPrompt sample layout. Validated in ``__post_init__``."""

    position_mode: str = "endprompt"
    """contiguous | endprompt | pose | endprompt_pose."""

    terminal: str = "cue"
    """cue (append a cue and EOD, the paper) | tail (last t inputs of the text, reference code)."""

    placement: str = "fixed"
    """fixed (last input at L - 1) | random (terminal start drawn per sample)."""

    target_length: int | None = None
    """Target context window L; required unless position_mode is contiguous; must be >= S."""

    tail_length: int | None = None
    """Terminal length t for terminal="tail" (1 <= t < S)."""

    pose_num_chunks: int = 2
    """PoSE chunks (pose and endprompt_pose modes)."""

    cues: list[str | list[int]] | None = None
    """Cue set: strings (tokenized without BOS) or token-id lists; None = the default set."""

    terminal_loss_weight: float | None = None
    """Weight w of terminal predictions; None = 0.1 for cue, 1.0 for tail."""

    cue_token_ids: tuple[tuple[int, ...], ...] = field(init=False, default=())
    """Resolved cue token ids (empty unless the cue terminal is used). Not a constructor arg."""

    def __post_init__(self) -> None:
        """Run megatron-core's checks, then validate and resolve the EndPrompt fields."""
        super().__post_init__()
        if self.mock:
            raise ValueError(
                "blend: EndPromptDataset reads indexed data; pass blend or blend_per_split "
                "(--data-path), mock data is not supported"
            )
        _check_choice("position_mode", self.position_mode, POSITION_MODES)
        _check_choice("terminal", self.terminal, TERMINALS)
        _check_choice("placement", self.placement, PLACEMENTS)
        self._validate_lengths()
        if self.terminal_loss_weight is None:
            self.terminal_loss_weight = DEFAULT_TERMINAL_LOSS_WEIGHT[self.terminal]
        w = float(self.terminal_loss_weight)
        if not np.isfinite(w) or w < 0:
            raise ValueError(f"terminal_loss_weight must be finite and >= 0, got {w}")
        self.terminal_loss_weight = w
        if self.uses_cue:
            self.cues = _normalise_cues(self.cues)
            self.cue_token_ids = resolve_cues(self.cues, self.tokenizer)
            self._validate_cues()

    @property
    def uses_terminal(self) -> bool:
        """Whether samples get a terminal segment (endprompt and endprompt_pose modes)."""
        return self.position_mode in ENDPROMPT_MODES

    @property
    def uses_cue(self) -> bool:
        """Whether samples end with a cue and EOD."""
        return self.uses_terminal and self.terminal == "cue"

    def _validate_lengths(self) -> None:
        S = self.sequence_length
        if self.position_mode != "contiguous" and self.target_length is None:
            raise ValueError(f"target_length is required for position_mode={self.position_mode!r}")
        if self.target_length is not None:
            _check_int("target_length", self.target_length, 1)
            if S > self.target_length:
                raise ValueError(
                    f"target_length must be >= sequence_length ({S}), got {self.target_length}"
                )
        _check_int("pose_num_chunks", self.pose_num_chunks, 1)
        if self.pose_num_chunks > S:
            raise ValueError(
                f"pose_num_chunks must be <= sequence_length ({S}), got {self.pose_num_chunks}"
            )
        if self.uses_terminal and self.terminal == "tail":
            if self.tail_length is None:
                raise ValueError("tail_length is required for terminal='tail'")
            _check_int("tail_length", self.tail_length, 1)
            if self.tail_length >= S:
                raise ValueError(
                    f"tail_length must be < sequence_length ({S}), got {self.tail_length}"
                )
            self._check_pose_context(S - self.tail_length, "tail_length", self.tail_length)
        if self.position_mode != "contiguous":
            # Positions are replaced wholesale; megatron's per-document resets would be dropped.
            for name in ("reset_position_ids", "reset_attention_mask"):
                if getattr(self, name):
                    raise ValueError(
                        f"{name}=True is only supported with position_mode='contiguous', "
                        f"got position_mode={self.position_mode!r}"
                    )

    def _check_pose_context(self, a: int, name: str, value: object) -> None:
        """endprompt_pose splits the a context inputs into pose_num_chunks non-empty chunks."""
        if self.position_mode == "endprompt_pose" and a < self.pose_num_chunks:
            raise ValueError(
                f"{name}={value!r} leaves {a} context inputs, fewer than "
                f"pose_num_chunks={self.pose_num_chunks}"
            )

    def _validate_cues(self) -> None:
        S = self.sequence_length
        vocab = getattr(self.tokenizer, "vocab_size", None)
        shown = self.cues if self.cues is not None else default_cues(self.tokenizer)
        for cue, ids in zip(shown, self.cue_token_ids):
            if len(ids) == 0:
                raise ValueError(f"cues: cue {cue!r} tokenizes to no tokens")
            if len(ids) >= S:
                raise ValueError(
                    f"cues: cue {cue!r} has {len(ids)} tokens, must be < sequence_length ({S})"
                    + ("; the default cue set needs a longer sequence" if self.cues is None else "")
                )
            if vocab is not None and not all(0 <= i < vocab for i in ids):
                raise ValueError(f"cues: cue {cue!r} has token ids outside [0, {vocab})")
            self._check_pose_context(S - len(ids), "cues", cue)


def _check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _normalise_cues(cues: Sequence[str | Sequence[int]] | None) -> list[str | list[int]] | None:
    """Plain JSON-able Python values, so the cue set can join the index cache key."""
    if cues is None:
        return None
    if isinstance(cues, (str, bytes)) or not isinstance(cues, Sequence) or len(cues) == 0:
        raise ValueError(
            f"cues must be a non-empty list of strings or token-id lists, got {cues!r}"
        )
    out: list[str | list[int]] = []
    for cue in cues:
        if isinstance(cue, str):
            out.append(cue)
        elif isinstance(cue, (Sequence, np.ndarray)) and all(
            isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in cue
        ):
            out.append([int(i) for i in cue])
        else:
            raise ValueError(f"cues: each cue must be a string or a list of ints, got {cue!r}")
    return out


def default_cues(tokenizer: object) -> list[str | list[int]]:
    """The paper's EP_1 sentence, "End." and the tokenizer's end-of-document token alone."""
    return [*DEFAULT_CUE_STRINGS, [int(tokenizer.eod)]]


def resolve_cues(
    cues: Sequence[str | Sequence[int]] | None, tokenizer: object
) -> tuple[tuple[int, ...], ...]:
    """Token ids of every cue.

    Args:
        cues: strings (tokenized with ``tokenizer.tokenize``, a leading BOS is dropped) or
            token-id lists; None gives the default set: the paper's EP_1 sentence, "End." and the
            tokenizer's end-of-document token alone.
        tokenizer: a megatron-core tokenizer (``tokenize``, ``eod``, optionally ``bos``).

    Returns:
        One tuple of ids per cue, in order.
    """
    if cues is None:
        cues = default_cues(tokenizer)
    try:
        bos = tokenizer.bos
    except (AttributeError, NotImplementedError):
        bos = None
    resolved = []
    for cue in cues:
        if isinstance(cue, str):
            ids = [int(i) for i in tokenizer.tokenize(cue)]
            if bos is not None and len(ids) > 1 and ids[0] == bos:
                ids = ids[1:]
        else:
            ids = [int(i) for i in cue]
        resolved.append(tuple(ids))
    return tuple(resolved)


def _raise_too_small(dataset_path: str, total: int, need: int) -> None:
    raise ValueError(
        f"data path {dataset_path!r} holds {total} tokens, fewer than one sample needs "
        f"({need} = sequence_length + 1); check the corpus and its preprocessing"
    )


class EndPromptDataset(GPTDataset):
    """GPTDataset whose samples carry EndPrompt / PoSE position ids and loss weights.

    Built by megatron-core's ``BlendedMegatronDatasetBuilder`` exactly like ``GPTDataset`` (same
    constructor); see :mod:`megatron_endprompt.data.builder`. In contiguous mode a sample is
    GPTDataset's own; otherwise it is assembled here in numpy from the same text.
    """

    config: EndPromptDatasetConfig

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        c = self.config
        self._w = float(c.terminal_loss_weight)
        self._eod = int(c.tokenizer.eod)
        # One (ids, loss-weight template) pair per cue or, for tail mode, a single template.
        self._terminals = [self._terminal_template(np.array(ids)) for ids in c.cue_token_ids]
        if c.uses_terminal and c.terminal == "tail":
            self._terminals = [self._terminal_template(None)]
        self._fixed_positions: dict[int, np.ndarray] = {}
        self._causal_mask: torch.Tensor | None = None
        self._needs_rng = c.position_mode in ("pose", "endprompt_pose") or (
            c.uses_terminal and (c.placement == "random" or len(self._terminals) > 1)
        )
        # Re-keyed per sample: same state as a fresh Philox(key, counter), without the setup cost.
        # Not thread-safe; DataLoader workers are processes, each with its own copy.
        self._bit_generator = np.random.Philox(key=[0, 0])
        self._rng = np.random.Generator(self._bit_generator)

    def _terminal_template(self, cue: np.ndarray | None) -> tuple[np.ndarray | None, np.ndarray]:
        """(cue ids or None for tail, loss weights [S] before eod / padding masking)."""
        S = self.config.sequence_length
        t = self.config.tail_length if cue is None else len(cue)
        weights = np.ones(S, dtype=np.float32)
        weights[S - t - 1 :] = self._w  # the boundary prediction and every terminal input
        if cue is not None:
            weights[-1] = 0.0  # the last cue token predicts EOD: no loss, as in the reference code
        return cue, weights

    @staticmethod
    def build_low_level_dataset(dataset_path: str, config: GPTDatasetConfig) -> IndexedDataset:
        """GPTDataset's low-level dataset, refusing a corpus too small for one sample.

        megatron-core's index builder loops forever on a corpus without tokens, so fail early.

        Args:
            dataset_path: the .bin/.idx path prefix.
            config: the dataset config.

        Returns:
            The IndexedDataset.
        """
        need = config.sequence_length + int(config.add_extra_token_to_sequence)
        if not is_object_storage_path(dataset_path):
            for path in (get_idx_path(dataset_path), get_bin_path(dataset_path)):
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"data path {dataset_path!r}: {path} not found")
            if os.path.getsize(get_bin_path(dataset_path)) == 0:  # megatron cannot mmap it
                _raise_too_small(dataset_path, 0, need)
        dataset = GPTDataset.build_low_level_dataset(dataset_path, config)
        total = int(np.sum(dataset.sequence_lengths, dtype=np.int64))
        if total < need:
            _raise_too_small(dataset_path, total, need)
        return dataset

    @staticmethod
    def _key_config_attributes() -> list[str]:
        """Config attributes in the index cache key: megatron's, sample shape and EndPrompt's."""
        return [
            *GPTDataset._key_config_attributes(),
            "add_extra_token_to_sequence",
            "drop_last_partial_validation_sequence",
            "position_mode",
            "terminal",
            "placement",
            "target_length",
            "tail_length",
            "pose_num_chunks",
            "cues",
            "cue_token_ids",
            "terminal_loss_weight",
        ]

    def _build_document_sample_shuffle_indices(self):
        """megatron-core's indices, except for a split without tokens (which would hang it)."""
        if self.indices is not None and not self.config.defer_npy_index_mmap:
            if int(np.sum(self.dataset.sequence_lengths[self.indices], dtype=np.int64)) == 0:
                if self.num_samples:
                    raise ValueError(
                        f"data path {self.dataset_path!r}: the {self.index_split.name} split "
                        f"({len(self.indices)} documents) has no tokens but {self.num_samples} "
                        "samples were requested; check --split and the corpus"
                    )
                # Nothing requested from nothing: an empty dataset (len 0).
                return (
                    np.zeros(0, dtype=np.int32),
                    np.zeros((1, 2), dtype=np.int32),
                    np.zeros(0, dtype=np.uint32),
                )
        return super()._build_document_sample_shuffle_indices()

    def sample_rng(self, idx: int) -> np.random.Generator:
        """A fresh generator for sample ``idx``, keyed by (random_seed, idx) only.

        Philox is counter-based: distinct keys give independent streams, with no seed hashing.
        """
        key = np.array([self.config.random_seed, idx], dtype=np.uint64)
        return np.random.Generator(np.random.Philox(key=key, counter=[0, 0, _RNG_STREAM, 0]))

    def _rekeyed_rng(self, idx: int) -> np.random.Generator:
        """The dataset's generator, reset to the state of ``sample_rng(idx)``."""
        self._bit_generator.state = {
            "bit_generator": "Philox",
            "state": {
                "counter": np.array([0, 0, _RNG_STREAM, 0], dtype=np.uint64),
                "key": np.array([self.config.random_seed, idx], dtype=np.uint64),
            },
            "buffer": np.zeros(4, dtype=np.uint64),
            "buffer_pos": 4,
            "has_uint32": 0,
            "uinteger": 0,
        }
        return self._rng

    def __getitem__(self, idx: int | None) -> dict[str, torch.Tensor]:
        """Sample ``idx`` (None: a padding sample with an all-zero loss mask).

        Returns:
            tokens [S] int64, labels [S] int64, loss_mask [S] float32, position_ids [S] int64,
            and attention_mask when ``config.create_attention_mask``.
        """
        c = self.config
        if c.position_mode == "contiguous":
            return super().__getitem__(idx)
        index = 0 if idx is None else int(idx)
        rng = self._rekeyed_rng(index) if self._needs_rng else None
        y = self._text(index)  # S + 1 tokens: tokens = y[:-1], labels = y[1:]
        S = c.sequence_length
        if c.uses_terminal:
            choice = int(rng.integers(len(self._terminals))) if len(self._terminals) > 1 else 0
            cue, template = self._terminals[choice]
            if cue is not None:
                y[S - len(cue) : S] = cue
                y[S] = self._eod
            t = c.tail_length if cue is None else len(cue)
            positions = self._terminal_positions(S - t, t, rng)
            loss_mask = template.copy()
        else:
            positions = pose_positions(S, c.target_length, c.pose_num_chunks, rng)
            loss_mask = np.ones(S, dtype=np.float32)
        self._mask_loss(y, loss_mask, padding_sample=idx is None)
        sample = {
            "tokens": torch.from_numpy(y[:-1]),
            "labels": torch.from_numpy(y[1:]),
            "loss_mask": torch.from_numpy(loss_mask),
            "position_ids": torch.from_numpy(positions),
        }
        if c.create_attention_mask:
            sample["attention_mask"] = self._attention_mask()
        return sample

    def _text(self, idx: int) -> np.ndarray:
        """GPTDataset's S + 1 tokens of sample idx (a fresh array; one pad appended if needed)."""
        text, _ = self._query_document_sample_shuffle_indices(idx)
        if not self.config.add_extra_token_to_sequence:
            # GPTDataset then predicts a pad after the last token; give y the same shape.
            text = np.append(text, self._pad_token_id)
        return text

    def _mask_loss(self, y: np.ndarray, loss_mask: np.ndarray, padding_sample: bool) -> None:
        """GPTDataset's masking, in place: EOD inputs (eod_mask_loss), pad labels, pad ids -> 0."""
        if self.config.eod_mask_loss:
            loss_mask[y[:-1] == self._eod] = 0.0
        pad = y == self._pad_token_id
        if pad.any():
            loss_mask[pad[1:]] = 0.0
            y[pad] = 0  # so the embedding can map the id, as GPTDataset does
        if padding_sample:
            loss_mask[:] = 0.0

    def _terminal_positions(self, a: int, t: int, rng) -> np.ndarray:
        """Position ids of a context of ``a`` inputs followed by ``t`` terminal inputs."""
        c = self.config
        L = c.target_length
        if c.position_mode == "endprompt_pose":
            return endprompt_pose_positions(a, t, L, c.pose_num_chunks, c.placement, rng)
        if c.placement == "random":
            return endprompt_positions(a, t, L, "random", rng)
        # Fixed EndPrompt layouts depend on a only: build once, hand out copies.
        cached = self._fixed_positions.get(a)
        if cached is None:
            cached = self._fixed_positions[a] = endprompt_positions(a, t, L, "fixed")
        return cached.copy()

    def _attention_mask(self) -> torch.Tensor:
        """GPTDataset's causal mask (resets are refused outside contiguous mode), built once."""
        if self._causal_mask is None:
            S = self.config.sequence_length
            self._causal_mask = _get_ltor_masks_and_position_ids(
                torch.zeros(S, dtype=torch.long), self._eod, False, False, False, True
            )[0]
        return self._causal_mask
