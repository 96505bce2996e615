"""EndPromptDatasetConfig: megatron-core's GPTDatasetConfig plus the EndPrompt sample layout.

Validated in ``__post_init__`` (ValueError naming the field and the value). The sample contract of
every field is documented in :mod:`megatron_endprompt.data.dataset`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

from megatron_endprompt.data.layouts import POSE_MODES, LayoutSpec
from megatron_endprompt.positions import (
    PLACEMENTS,
    POSE_CHUNK_SAMPLERS,
    POSITION_MODES,
    TERMINAL_SOURCES,
    TERMINALS,
    default_pose_chunk_sampler,
)

ENDPROMPT_MODES = ("endprompt", "endprompt_pose")
EP1_CUE = "This is the end of text, please pay attention here"
"""The paper's EP_1 terminal cue."""
DEFAULT_CUE_STRINGS = (EP1_CUE, "End.")
"""Default text cues; the tokenizer's end-of-document token joins them as a one-token cue."""
DEFAULT_TERMINAL_LOSS_WEIGHT = {"cue": 0.1, "tail": 1.0}


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

    terminal_source: str = "contiguous"
    """Tail text: contiguous (the t tokens after the context) | document_end (document's end)."""

    pose_chunk_sampler: str | None = None
    """PoSE chunk lengths: paper (l0 ~ U{1..S-1}) | reference (l0 ~ U{1..(S+1)//2}); None:
    reference in a PoSE mode with <= 2 chunks, else paper (``default_pose_chunk_sampler``)."""

    pose_skip_text: bool = False
    """PoSE: each later chunk reads its text after a random skip (the reference's v)."""

    cue_token_ids: tuple[tuple[int, ...], ...] = field(init=False, default=())
    """Resolved cue token ids (empty unless the cue terminal is used). Not a constructor arg."""

    def __post_init__(self) -> None:
        """Run megatron-core's checks, then validate and resolve the EndPrompt fields."""
        super().__post_init__()  # no blend: megatron-core's mock data (see builder.py)
        _check_choice("position_mode", self.position_mode, POSITION_MODES)
        _check_choice("terminal", self.terminal, TERMINALS)
        _check_choice("placement", self.placement, PLACEMENTS)
        self._validate_lengths()
        self._validate_fidelity_options()
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

    def _validate_fidelity_options(self) -> None:
        """terminal_source, pose_chunk_sampler and pose_skip_text: where each one applies."""
        _check_choice("terminal_source", self.terminal_source, TERMINAL_SOURCES)
        if self.pose_chunk_sampler is None:
            self.pose_chunk_sampler = default_pose_chunk_sampler(
                self.position_mode, self.pose_num_chunks
            )
        _check_choice("pose_chunk_sampler", self.pose_chunk_sampler, POSE_CHUNK_SAMPLERS)
        if not isinstance(self.pose_skip_text, (bool, np.bool_)):
            raise ValueError(f"pose_skip_text must be a bool, got {self.pose_skip_text!r}")
        self.pose_skip_text = bool(self.pose_skip_text)
        is_pose = self.position_mode in POSE_MODES
        if self.pose_chunk_sampler != "paper" and not is_pose:
            raise ValueError(
                f"pose_chunk_sampler={self.pose_chunk_sampler!r} needs position_mode pose or "
                f"endprompt_pose, got {self.position_mode!r}"
            )
        if self.pose_chunk_sampler == "reference" and self.pose_num_chunks > 2:
            raise ValueError(
                "pose_chunk_sampler='reference' draws the reference code's two chunks: "
                f"pose_num_chunks must be <= 2, got {self.pose_num_chunks}"
            )
        if self.pose_skip_text and not is_pose:
            raise ValueError(
                f"pose_skip_text=True needs position_mode pose or endprompt_pose, "
                f"got {self.position_mode!r}"
            )
        if self.terminal_source == "document_end":
            if not (self.uses_terminal and self.terminal == "tail"):
                raise ValueError(
                    "terminal_source='document_end' needs terminal='tail' in an endprompt mode, "
                    f"got position_mode={self.position_mode!r}, terminal={self.terminal!r}"
                )
            if self.pose_skip_text:
                raise ValueError(
                    "terminal_source='document_end' with pose_skip_text=True: two text sources "
                    "for one sample (defined by neither reference); choose one"
                )
        if self.terminal_source == "document_end" or self.pose_skip_text:
            if not self.add_extra_token_to_sequence:
                raise ValueError(
                    "terminal_source='document_end' and pose_skip_text=True read GPTDataset's "
                    "token stream past the sample and need add_extra_token_to_sequence=True"
                )

    def layout_spec(self) -> LayoutSpec:
        """What decides a sample's positions (shared with the distance-coverage report)."""
        lengths: tuple[int, ...] = ()
        if self.uses_cue:
            lengths = tuple(len(ids) for ids in self.cue_token_ids)
        elif self.uses_terminal:
            lengths = (int(self.tail_length),)
        return LayoutSpec(
            position_mode=self.position_mode,
            sequence_length=self.sequence_length,
            target_length=self.target_length,
            placement=self.placement,
            terminal_lengths=lengths,
            pose_num_chunks=self.pose_num_chunks,
            pose_chunk_sampler=self.pose_chunk_sampler,
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
    defaults = cues is None
    if defaults:
        cues = default_cues(tokenizer)
    try:
        bos = tokenizer.bos
    except (AttributeError, NotImplementedError):
        bos = None
    resolved = []
    for cue in cues:
        if isinstance(cue, str):
            try:
                ids = [int(i) for i in tokenizer.tokenize(cue)]
            except ValueError as err:  # NullTokenizer reads text as ids
                given = "the default cue" if defaults else "the cue"
                raise ValueError(
                    f"--endprompt-cues: {given} {cue!r} cannot be tokenized ({err}); give cues as "
                    'token ids (e.g. --endprompt-cues "7 8 9") or use --endprompt-terminal tail'
                ) from err
            if bos is not None and len(ids) > 1 and ids[0] == bos:
                ids = ids[1:]
        else:
            ids = [int(i) for i in cue]
        resolved.append(tuple(ids))
    return tuple(resolved)
