"""EndPromptDataset: megatron-core's GPTDataset with EndPrompt / PoSE position layouts.

A sample starts as the very sample plain ``GPTDataset`` returns for the same index and seed (S+1
tokens ``x0 .. xS``), so by default EndPrompt changes positions and the tail, never which text is
read:

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

Fidelity options (defaults keep the behaviour above). Text positions below are in GPTDataset's
token stream: the documents of ``document_index`` end to end, sample ``i`` (of ``sample_index``)
starting at stream token ``i * S``; ``a = S - t``.

- ``terminal_source="document_end"`` (terminal="tail", endprompt or endprompt_pose; the
  reference's random mode): the sample belongs to the document D holding its last context input
  ``x[a-1]`` (not its first document: a context that crosses a document boundary continues in
  D). When D has at least ``t + 1`` tokens after ``x[a-1]``, ``y[a:]`` becomes D's last ``t + 1``
  tokens ``e0 .. et`` (the middle of D is dropped; a gap of 0 reads the same text as
  contiguous): the boundary prediction is ``x[a-1] -> e0``, terminal input ``e_i`` predicts
  ``e_(i+1)``, the last label is D's last token (its EOD). Otherwise D ends inside the sample
  (the reference's "document no longer than the physical length", which gets no terminal there):
  the sample keeps the contiguous tail, so positions and weights never depend on the text (a
  fixed layout stays batch-shared). ``EndPromptDataset.document_end_fallbacks()`` counts those
  samples; the count is logged when the dataset is built. Weights as for tail. Example
  (t = 3, documents A = a0..a6 with a6 = EOD and B = b0..b29 with b29 = EOD, in that order)::

    sample at stream 8  (b1 .. b9; context b1..b5 in B):
    tokens       b1 b2 b3 b4 b5 b26 b27 b28
    labels       b2 b3 b4 b5 b26 b27 b28 EOD
    sample at stream 0  (a0 .. a6 b0 b1; A ends 2 tokens after a4, fewer than t + 1):
    tokens       a0 a1 a2 a3 a4 a5 EOD b0        (contiguous tail)
    labels       a1 a2 a3 a4 a5 EOD b0 b1
    loss_mask    1  1  1  1  w  w  w  w   position_ids 0 1 2 3 4 61 62 63 (both samples)

- ``pose_chunk_sampler``: ``paper`` (l0 ~ U{1 .. S-1}) or ``reference`` (l0 ~ U{1 .. (S+1)//2});
  see :func:`megatron_endprompt.positions.pose_chunk_lengths` (endprompt_pose: over the context).
- ``pose_skip_text`` (pose, endprompt_pose): chunk i's text starts ``w_i`` tokens later
  (:func:`~megatron_endprompt.positions.pose_text_offsets`) within ``available`` = the tokens
  of the document holding the sample's last token ``xS`` that follow it, at most ``L - S`` (PoSE's
  reference truncates a document to L tokens: v ~ U{0 .. len - S}). The sample then reads
  ``S + 1 + w_last`` stream tokens; the last label and any terminal follow the last chunk. When
  ``xS`` is its document's last token no text is skipped. Example (pose, S = 8,
  l0 = 3, w1 = 4): tokens ``x0 x1 x2 x7 x8 x9 x10 x11``, labels ``x1 x2 x7 .. x12``.

Per-sample randomness comes from a Philox generator keyed by ``(random_seed, sample index)`` only
(:func:`megatron_endprompt.data.layouts.sample_rng`), so a sample is identical on every rank,
across builds and after a resume. Draw order: the cue choice (when the set has several cues), the
position layout, then the text skips.

In contiguous mode a sample is GPTDataset's own. Otherwise it is assembled in numpy from the same
text (``_query_document_sample_shuffle_indices``) with GPTDataset's masking rules (eod_mask_loss,
padding), which is cheaper than post-editing GPTDataset's tensors.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch
from megatron.core.datasets.gpt_dataset import (
    GPTDataset,
    GPTDatasetConfig,
    _get_ltor_masks_and_position_ids,
)
from megatron.core.datasets.indexed_dataset import IndexedDataset, get_bin_path, get_idx_path
from megatron.core.datasets.object_storage_utils import is_object_storage_path
from megatron.core.utils import log_single_rank

from megatron_endprompt.data.corpus_checks import check_index_cache_file
from megatron_endprompt.data.dataset_config import (  # noqa: F401  (re-exported)
    DEFAULT_CUE_STRINGS,
    DEFAULT_TERMINAL_LOSS_WEIGHT,
    ENDPROMPT_MODES,
    EP1_CUE,
    POSITION_MODES,
    TERMINAL_SOURCES,
    TERMINALS,
    EndPromptDatasetConfig,
    default_cues,
    resolve_cues,
)
from megatron_endprompt.data.layouts import (
    SampleLayout,
    chunk_text_index,
    count_document_end_fallbacks,
    document_end_tail,
    draw_layout,
    sample_rng,
    sample_rng_state,
)
from megatron_endprompt.positions import pose_text_offsets

logger = logging.getLogger(__name__)


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
        self._spec = c.layout_spec()
        self._needs_rng = self._spec.needs_rng or c.pose_skip_text
        self._causal_mask: torch.Tensor | None = None
        self._fallbacks: int | None = None
        # Re-keyed per sample: same state as a fresh Philox(key, counter), without the setup cost.
        # Not thread-safe; DataLoader workers are processes, each with its own copy.
        self._bit_generator = np.random.Philox(key=[0, 0])
        self._rng = np.random.Generator(self._bit_generator)
        if c.terminal_source == "document_end" and self.shuffle_index is not None:
            log_single_rank(
                logger,
                logging.INFO,
                f"{self.dataset_path} {self.index_split.name}: terminal_source=document_end: "
                f"{self.document_end_fallbacks()} of {len(self)} samples end their document "
                "inside the sample and keep the contiguous tail",
            )

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
            "terminal_source",
            "pose_chunk_sampler",
            "pose_skip_text",
        ]

    def _build_document_sample_shuffle_indices(self):
        """megatron-core's indices, except for a split without tokens (which would hang it).

        Cached index files are checked from their headers first (megatron-core loads them with
        ``allow_pickle=True``): see :func:`check_index_cache_file`.
        """
        for path in self._cached_index_files():
            check_index_cache_file(path)
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

    def _cached_index_files(self) -> list[str]:
        """This split's cached index files that exist, named as megatron-core names them."""
        cache = self.config.path_to_cache
        if cache is None and not self.config.mock:
            cache = os.path.join(
                self.dataset.path_prefix, "cache", f"{type(self).__name__}_indices"
            )
        if not cache:
            return []
        base = f"{self.unique_description_hash}-{type(self).__name__}-{self.index_split.name}"
        names = (f"{base}-{affix}_index.npy" for affix in ("document", "sample", "shuffle"))
        return [p for p in (os.path.join(cache, n) for n in names) if os.path.isfile(p)]

    def sample_rng(self, idx: int) -> np.random.Generator:
        """A fresh generator for sample ``idx``, keyed by (random_seed, idx) only."""
        return sample_rng(self.config.random_seed, idx)

    def _rekeyed_rng(self, idx: int) -> np.random.Generator:
        """The dataset's generator, reset to the state of ``sample_rng(idx)``."""
        self._bit_generator.state = sample_rng_state(self.config.random_seed, idx)
        return self._rng

    def document_end_fallbacks(self) -> int:
        """Samples that keep the contiguous tail under terminal_source="document_end" (else 0).

        Computed once from the indices alone (no text is read).
        """
        c = self.config
        if c.terminal_source != "document_end" or len(self) == 0:
            return 0
        if self._fallbacks is None:
            self._load_indices()
            starts = np.asarray(self.sample_index)[np.asarray(self.shuffle_index)]
            self._fallbacks = count_document_end_fallbacks(
                self.dataset.sequence_lengths,
                self.document_index,
                starts,
                c.sequence_length - c.tail_length,
                c.tail_length,
            )
        return self._fallbacks

    def _load_indices(self) -> None:
        """Memory-map the indices when megatron deferred them (defer_npy_index_mmap)."""
        if self.shuffle_index is None:
            self._query_document_sample_shuffle_indices(0)

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
        layout = draw_layout(self._spec, rng)
        y = self._sample_text(index, layout, rng)  # S + 1 tokens: tokens = y[:-1], labels = y[1:]
        S = c.sequence_length
        if c.uses_terminal:
            cue, template = self._terminals[layout.terminal]
            if cue is not None:
                y[S - len(cue) : S] = cue
                y[S] = self._eod
            loss_mask = template.copy()
        else:
            loss_mask = np.ones(S, dtype=np.float32)
        self._mask_loss(y, loss_mask, padding_sample=idx is None)
        sample = {
            "tokens": torch.from_numpy(y[:-1]),
            "labels": torch.from_numpy(y[1:]),
            "loss_mask": torch.from_numpy(loss_mask),
            "position_ids": torch.from_numpy(layout.positions),
        }
        if c.create_attention_mask:
            sample["attention_mask"] = self._attention_mask()
        return sample

    def _sample_text(self, idx: int, layout: SampleLayout, rng) -> np.ndarray:
        """The S + 1 tokens of sample idx: GPTDataset's, then PoSE text skips / document end."""
        c = self.config
        y = self._text(idx)  # also memory-maps deferred indices
        if not (c.pose_skip_text or c.terminal_source == "document_end"):
            return y
        sample = int(self.shuffle_index[idx])
        sizes = self.dataset.sequence_lengths
        if c.pose_skip_text:
            # The sample's last token xS sits at sample_index[sample + 1] (add_extra_token).
            end_pos, end_offset = (int(v) for v in self.sample_index[sample + 1])
            end_doc = int(self.document_index[end_pos])
            available = min(
                c.target_length - c.sequence_length, int(sizes[end_doc]) - end_offset - 1
            )
            offsets = pose_text_offsets(len(layout.chunk_lengths), max(available, 0), rng)
            if offsets[-1] > 0:
                extra = self.dataset.get(end_doc, offset=end_offset + 1, length=int(offsets[-1]))
                full = np.concatenate((y, extra.astype(y.dtype)))
                y = full[chunk_text_index(layout.chunk_lengths, offsets, len(y))]
        else:
            pos, offset = (int(v) for v in self.sample_index[sample])
            a, t = layout.context_length, c.tail_length
            tail = document_end_tail(sizes, self.document_index, pos, offset, a, t)
            if tail is not None:
                y[a:] = self.dataset.get(tail[0], offset=tail[1], length=t + 1)
        return y

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

    def _attention_mask(self) -> torch.Tensor:
        """GPTDataset's causal mask (resets are refused outside contiguous mode), built once."""
        if self._causal_mask is None:
            S = self.config.sequence_length
            self._causal_mask = _get_ltor_masks_and_position_ids(
                torch.zeros(S, dtype=torch.long), self._eod, False, False, False, True
            )[0]
        return self._causal_mask
