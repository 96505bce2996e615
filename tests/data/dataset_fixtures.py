"""Tiny tokenizer and .bin/.idx corpora for dataset tests (built with megatron-core directly)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import (
    IndexedDatasetBuilder,
    get_bin_path,
    get_idx_path,
)
from megatron.core.datasets.megatron_tokenizer import MegatronLegacyTokenizer
from megatron.core.datasets.utils import Split

from megatron_endprompt.data.dataset import EndPromptDatasetConfig

BOS, EOD, PAD = 256, 257, 258
VOCAB = 300


class TinyTokenizer(MegatronLegacyTokenizer):
    """Byte-level tokenizer: byte b -> id b; BOS/EOD/PAD are 256/257/258."""

    def __init__(self, add_bos: bool = False) -> None:
        super().__init__("tiny-bytes", add_bos=add_bos)
        self.add_bos = add_bos

    def tokenize(self, text: str) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [BOS, *ids] if self.add_bos else ids

    def detokenize(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")

    @property
    def vocab(self) -> dict:
        return {bytes([i]).decode("latin-1"): i for i in range(256)}

    @property
    def inv_vocab(self) -> dict:
        return {i: t for t, i in self.vocab.items()}

    @property
    def vocab_size(self) -> int:
        return VOCAB

    @property
    def eod(self) -> int:
        return EOD

    @property
    def pad(self) -> int:
        return PAD

    @property
    def bos(self) -> int:
        return BOS


def write_corpus(prefix: str, docs: Sequence[Sequence[int]]) -> str:
    """Write ``docs`` (token-id lists) as a megatron .bin/.idx pair at ``prefix``."""
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    builder = IndexedDatasetBuilder(get_bin_path(prefix), dtype=np.int32)
    for doc in docs:
        builder.add_document(np.asarray(doc, dtype=np.int32), [len(doc)])
    builder.finalize(get_idx_path(prefix))
    return prefix


def distinct_docs(num_docs: int, rng_seed: int = 0, low: int = 0, high: int = 250) -> list:
    """Documents of 5..30 random ids in [low, high), each ending with EOD (megatron style)."""
    rng = np.random.default_rng(rng_seed)
    docs = []
    for _ in range(num_docs):
        n = int(rng.integers(5, 31))
        docs.append([*rng.integers(low, high, size=n - 1).tolist(), EOD])
    return docs


def make_config(prefix_or_blend, tmp_cache: str, **overrides) -> EndPromptDatasetConfig:
    """An EndPromptDatasetConfig over one prefix (or a blend tuple) with small defaults."""
    blend = prefix_or_blend if isinstance(prefix_or_blend, tuple) else ([prefix_or_blend], None)
    kwargs = dict(
        random_seed=1234,
        sequence_length=8,
        blend=blend,
        split="1,0,0",
        path_to_cache=tmp_cache,
        tokenizer=TinyTokenizer(),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        target_length=64,
    )
    kwargs.update(overrides)
    return EndPromptDatasetConfig(**kwargs)


def plain_gpt_dataset(
    config: EndPromptDatasetConfig, prefix: str, num_samples=None, split: Split = Split.train
):
    """megatron-core's GPTDataset over the whole of ``prefix`` with the same GPT settings."""
    gpt_config = GPTDatasetConfig(
        random_seed=config.random_seed,
        sequence_length=config.sequence_length,
        blend=([prefix], None),
        split="1,0,0",
        path_to_cache=config.path_to_cache,
        tokenizer=config.tokenizer,
        reset_position_ids=config.reset_position_ids,
        reset_attention_mask=config.reset_attention_mask,
        eod_mask_loss=config.eod_mask_loss,
        create_attention_mask=config.create_attention_mask,
        add_extra_token_to_sequence=config.add_extra_token_to_sequence,
        drop_last_partial_validation_sequence=config.drop_last_partial_validation_sequence,
    )
    low = GPTDataset.build_low_level_dataset(prefix, gpt_config)
    indices = np.arange(len(low.sequence_lengths), dtype=np.int32)
    return GPTDataset(low, prefix, indices, num_samples, split, gpt_config)
