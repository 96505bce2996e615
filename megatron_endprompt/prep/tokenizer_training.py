"""Train a SentencePiece BPE tokenizer on JSONL and/or plain-text files.

The model keeps every byte of the input: byte fallback on, identity normalization, no whitespace
collapsing and no dummy prefix, so ``detokenize(tokenize(text)) == text`` for any text (source
code included). Pieces: ``<unk>`` = 0, ``<s>`` = 1, ``</s>`` = 2 (EOD), ``<pad>`` = 3, and the
user-defined ``<|eot_id|>`` (the paper's EP_2 cue needs an end-of-turn token).

Documents are split into lines and streamed to SentencePiece from an iterator (no temporary
copy of the corpus); ``max_sentences`` caps how many lines are read so training stays fast.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from megatron_endprompt.prep.files import expand_inputs, require_output_dir

SPECIAL_PIECES = ("<unk>", "<s>", "</s>", "<pad>")
USER_DEFINED_SYMBOLS = ("<|eot_id|>",)
# Byte fallback needs all 256 byte pieces on top of the specials.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_PIECES) + len(USER_DEFINED_SYMBOLS) + 1
JSONL_SUFFIXES = (".jsonl", ".json")


@dataclass
class TokenizerTrainingResult:
    """What ``train_sentencepiece`` wrote and read."""

    model_path: str
    """The ``PREFIX.model`` file."""
    vocab_path: str
    """The ``PREFIX.vocab`` file."""
    sentences: int
    """Lines fed to the trainer."""
    skipped_lines: int
    """JSONL lines skipped (malformed JSON, missing or non-string key)."""


def _documents(path: str, json_keys: Sequence[str], skipped: list[int]) -> Iterator[str]:
    """Texts of one file: one per JSON key per line for JSONL, the whole file otherwise."""
    if not path.endswith(JSONL_SUFFIXES):
        with open(path, encoding="utf-8", errors="replace") as f:
            yield f.read()
        return
    with open(path, "rb") as f:
        for raw in f:
            try:
                record = json.loads(raw.decode("utf-8"))
                texts = [record[k] for k in json_keys]
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
                skipped[0] += 1
                continue
            if not all(isinstance(t, str) for t in texts):
                skipped[0] += 1
                continue
            yield from texts


def iter_sentences(
    paths: Sequence[str], json_keys: Sequence[str], max_sentences: int, skipped: list[int]
) -> Iterator[str]:
    """Non-blank lines of every document, in input order, at most ``max_sentences``."""
    n = 0
    for path in paths:
        for doc in _documents(path, json_keys, skipped):
            for line in doc.split("\n"):
                if not line.strip():
                    continue
                yield line
                n += 1
                if n >= max_sentences:
                    return


def _counted(it: Iterator[str], count: list[int]) -> Iterator[str]:
    for item in it:
        count[0] += 1
        yield item


def _validate(vocab_size: int, max_sentences: int, output_prefix: str) -> None:
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"--vocab-size must be >= {MIN_VOCAB_SIZE} (256 byte pieces + specials), "
            f"got {vocab_size}"
        )
    if max_sentences < 1:
        raise ValueError(f"--max-sentences must be >= 1, got {max_sentences}")
    require_output_dir(output_prefix, "--output-prefix")


def train_sentencepiece(
    inputs: Sequence[str],
    output_prefix: str,
    vocab_size: int,
    json_keys: Sequence[str] = ("text",),
    max_sentences: int = 200_000,
    max_sentence_length: int = 1 << 16,
    num_threads: int = 1,
    character_coverage: float = 0.9995,
) -> TokenizerTrainingResult:
    """Train a byte-fallback SentencePiece BPE model and write ``PREFIX.model``/``PREFIX.vocab``.

    Training happens in a temporary directory; the two files are moved into place only once
    both exist, so a failed run leaves nothing behind.

    Args:
        inputs: Files or globs; ``.jsonl``/``.json`` are read as JSONL, others as plain text.
        output_prefix: Output path without suffix.
        vocab_size: Number of pieces (at least ``MIN_VOCAB_SIZE``).
        json_keys: JSONL keys whose strings are training text.
        max_sentences: Cap on the number of lines read.
        max_sentence_length: Longest line (bytes) the trainer accepts; longer ones are dropped.
        num_threads: Trainer threads.
        character_coverage: Share of characters that get their own piece; the rarest rest
            are spelled as byte pieces.

    Returns:
        Paths written and counts read.

    Raises:
        ValueError: Bad sizes, no training text, or SentencePiece rejecting the settings.
        FileNotFoundError: An input or the output directory is missing.
    """
    import sentencepiece as spm

    _validate(vocab_size, max_sentences, output_prefix)
    paths = expand_inputs(inputs)
    skipped = [0]
    count = [0]
    stream = _counted(iter_sentences(paths, json_keys, max_sentences, skipped), count)
    first = next(stream, None)
    if first is None:
        raise ValueError(f"--input {' '.join(inputs)}: no training text found")
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(output_prefix))) as tmp:
        tmp_prefix = os.path.join(tmp, "spm")
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=itertools.chain([first], stream),
                model_prefix=tmp_prefix,
                vocab_size=vocab_size,
                model_type="bpe",
                byte_fallback=True,
                unk_id=0,
                bos_id=1,
                eos_id=2,
                pad_id=3,
                pad_piece="<pad>",
                user_defined_symbols=list(USER_DEFINED_SYMBOLS),
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                add_dummy_prefix=False,
                allow_whitespace_only_pieces=True,
                split_digits=True,
                character_coverage=character_coverage,
                max_sentence_length=max_sentence_length,
                num_threads=num_threads,
                minloglevel=2,
            )
        except RuntimeError as err:
            raise ValueError(f"SentencePiece training failed (check --vocab-size): {err}") from err
        shutil.move(tmp_prefix + ".vocab", output_prefix + ".vocab")
        # The .model goes last: it is the file readers open.
        shutil.move(tmp_prefix + ".model", output_prefix + ".model")
    return TokenizerTrainingResult(
        output_prefix + ".model", output_prefix + ".vocab", count[0], skipped[0]
    )
