"""JSONL -> Megatron indexed binary (``PREFIX_<key>_<level>.{bin,idx}``).

The output is what Megatron-LM core_v0.16.1's ``tools/preprocess_data.py`` writes for the same
flags: level ``document`` (one sequence per document) or, with ``split_sentences``, ``sentence``
(one sequence per sentence, ``prep.sentences``), written with megatron-core's
``IndexedDatasetBuilder`` in ``DType.optimal_dtype(vocab_size)``, the EOD token (optionally)
closing the last sentence; ``partitions`` reproduces its document order (``prep.partitions``).
The tokenizer follows the same flags (``data.tokenizers.build_tokenizer``). Megatron-LM reads
the output unchanged, and this package reads Megatron-LM's.

Each JSONL line is one document. A line is written only if every ``--json-keys`` value is usable,
so all outputs of one run have the same document count. Bad lines are counted skips (reasons in
``SKIP_REASONS``) with a ``file:line`` warning, or with ``strict`` an error. Files are read as
bytes and decoded per line, so invalid UTF-8 costs one line, not the run.

Outputs are written under temporary names and renamed only when every output is complete: the
``.bin`` first, then the ``.idx`` (readers open the ``.idx`` first, so a pair only looks valid
once both parts are final). Any failure, ``KeyboardInterrupt`` included, deletes the temporaries.
"""

from __future__ import annotations

import collections
import json
import multiprocessing
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from megatron.core.datasets.indexed_dataset import DType
from tqdm import tqdm

from megatron_endprompt.data.tokenizers import build_tokenizer
from megatron_endprompt.prep.files import expand_inputs, require_output_dir
from megatron_endprompt.prep.partitions import PartitionRouter, StagedOutputs, count_lines
from megatron_endprompt.prep.sentences import SentenceSplitter

SKIP_REASONS = (
    "malformed_json",
    "missing_key",
    "not_string",
    "empty_text",
    "invalid_utf8",
    "empty_after_tokenize",
    "invalid_ids",
)
MAX_WARNINGS = 20
"""Skip warnings printed per run; the rest are counted in one closing line."""


class PreprocessError(ValueError):
    """Bad input or settings: the message names the flag or ``file:line``."""


@dataclass
class PreprocessStats:
    """What a preprocessing run read and wrote."""

    documents: int = 0
    """Documents written (per output; every output has the same count)."""
    tokens: int = 0
    """Tokens written, all outputs together, EOD tokens included."""
    tokens_per_key: dict[str, int] = field(default_factory=dict)
    """Tokens written per JSON key."""
    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))
    """Skipped lines per reason."""
    outputs: dict[str, str] = field(default_factory=dict)
    """Output path prefix (``PREFIX_<key>_<level>``) per JSON key."""
    notes: list[str] = field(default_factory=list)
    """One-line remarks on the tokenizer and flags (printed to stderr by the run)."""
    warnings: list[str] = field(default_factory=list)
    """The first ``MAX_WARNINGS`` skip warnings."""
    elapsed_s: float = 0.0
    """Wall time of the run."""

    @property
    def total_skipped(self) -> int:
        """Skipped lines, all reasons."""
        return sum(self.skipped.values())

    def summary(self) -> str:
        """One line: documents, tokens, rates, outputs, skips by reason."""
        rate = self.documents / self.elapsed_s if self.elapsed_s > 0 else 0.0
        outs = ", ".join(f"{p}.{{bin,idx}}" for p in self.outputs.values())
        reasons = ", ".join(f"{k}={v}" for k, v in self.skipped.items() if v)
        return (
            f"wrote {self.documents} documents, {self.tokens} tokens in {self.elapsed_s:.1f}s "
            f"({rate:.0f} docs/s) to {outs}; skipped {self.total_skipped}"
            + (f" ({reasons})" if reasons else "")
        )


def output_prefix_for(output_prefix: str, key: str, level: str = "document") -> str:
    """Megatron-LM's output naming: ``PREFIX_<key>_<level>``, level ``document``/``sentence``."""
    return f"{output_prefix}_{key}_{level}"


# Per-process encoder state, built once per worker by ``_init_encoder`` (and once in-process
# when ``workers == 1``): the tokenizer is never pickled.
_ENCODER: dict = {}


def _init_encoder(tokenizer_type: str, tokenizer_model, tokenizer_options: dict, json_keys,
                  append_eod: bool, splitter_options: dict | None) -> None:  # fmt: skip
    tok = build_tokenizer(tokenizer_type, tokenizer_model, **tokenizer_options)
    _ENCODER.update(
        tokenizer=tok,
        keys=tuple(json_keys),
        eod=tok.eod if append_eod else None,
        dtype=DType.optimal_dtype(tok.vocab_size),
        splitter=SentenceSplitter(**splitter_options) if splitter_options else None,
    )


def _init_worker(*init_args) -> None:
    # Ctrl-C reaches the whole process group; only the parent should react (it terminates the
    # pool and deletes the temporaries), so workers do not each print a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _init_encoder(*init_args)


def _encode_text(key: str, text: str) -> tuple[str, str] | tuple[np.ndarray, list[int]]:
    """Ids and sentence lengths of one text (EOD closing the last sentence), or a skip."""
    splitter = _ENCODER["splitter"]
    sentences = splitter.split(text) if splitter is not None else [text]
    ids: list[int] = []
    lengths: list[int] = []
    try:
        for sentence in sentences:
            sentence_ids = _ENCODER["tokenizer"].tokenize(sentence)
            if len(sentence_ids) > 0:  # Megatron-LM drops sentences without tokens
                ids.extend(sentence_ids)
                lengths.append(len(sentence_ids))
    except UnicodeEncodeError as err:  # JSON "\ud800" escapes decode to lone surrogates
        return "invalid_utf8", f"{key!r}: {err}"
    except ValueError as err:  # NullTokenizer: text that is not ids
        return "invalid_ids", f"{key!r}: {err}"
    if not ids:
        return "empty_after_tokenize", f"{key!r} has no tokens"
    if _ENCODER["eod"] is not None:
        ids.append(_ENCODER["eod"])
        lengths[-1] += 1
    return np.asarray(ids, dtype=_ENCODER["dtype"]), lengths


def _encode_line(raw: bytes) -> tuple[str, str] | list[tuple[np.ndarray, list[int]]]:
    """``(ids, sentence lengths)`` per key of one JSONL line, or ``(skip reason, detail)``."""
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        return "invalid_utf8", str(err)
    except json.JSONDecodeError as err:
        return "malformed_json", err.msg
    except RecursionError:  # arrays/objects nested deeper than the interpreter's stack
        return "malformed_json", "nested too deeply"
    except ValueError as err:  # e.g. an integer over Python's int string conversion limit
        return "malformed_json", str(err).split(";")[0]
    if not isinstance(record, dict):
        return "malformed_json", f"expected a JSON object, got {type(record).__name__}"
    docs = []
    for key in _ENCODER["keys"]:
        if key not in record:
            return "missing_key", f"no key {key!r}"
        text = record[key]
        if not isinstance(text, str):
            return "not_string", f"{key!r} is {type(text).__name__}, not a string"
        if not text:
            return "empty_text", f"{key!r} is empty"
        encoded = _encode_text(key, text)
        if isinstance(encoded[0], str):
            return encoded
        docs.append(encoded)
    return docs


def _encode_chunk(chunk: list[tuple[int, int, bytes]]) -> list[tuple[int, int, object]]:
    return [(file_i, lineno, _encode_line(raw)) for file_i, lineno, raw in chunk]


_UTF8_BOM = b"\xef\xbb\xbf"


def _read_chunks(paths: Sequence[str], chunk_size: int) -> Iterator[list[tuple[int, int, bytes]]]:
    """Lists of ``(file index, 1-based line number, raw line)`` across all files, in order."""
    chunk: list[tuple[int, int, bytes]] = []
    for file_i, path in enumerate(paths):
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                if lineno == 1 and raw.startswith(_UTF8_BOM):  # files saved by some editors
                    raw = raw[len(_UTF8_BOM) :]
                chunk.append((file_i, lineno, raw))
                if len(chunk) == chunk_size:
                    yield chunk
                    chunk = []
    if chunk:
        yield chunk


def _encoded(chunks: Iterator, workers: int, init_args: tuple) -> Iterator[list]:
    """Encoded chunks in input order; a pool of ``workers`` processes when more than one."""
    if workers == 1:
        _init_encoder(*init_args)
        for chunk in chunks:
            yield _encode_chunk(chunk)
        return
    # apply_async with a bounded window instead of Pool.imap: imap's feeder thread would read
    # the whole corpus into memory ahead of the workers.
    with multiprocessing.Pool(workers, initializer=_init_worker, initargs=init_args) as pool:
        pending: collections.deque = collections.deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_encode_chunk, (chunk,)))
            if len(pending) >= 4 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _validate(output_prefix: str, json_keys: Sequence[str], ints: dict[str, int]) -> None:
    if not json_keys or len(set(json_keys)) != len(json_keys) or not all(json_keys):
        raise PreprocessError(f"--json-keys must be distinct non-empty keys, got {json_keys}")
    for flag, value in ints.items():
        if value < 1:
            raise PreprocessError(f"{flag} must be >= 1, got {value}")
    if ints["--workers"] % ints["--partitions"]:
        raise PreprocessError(
            f"--workers ({ints['--workers']}) must be a multiple of --partitions "
            f"({ints['--partitions']}), as in Megatron-LM"
        )
    require_output_dir(output_prefix, "--output-prefix", PreprocessError)


def _flag_notes(options: dict, split_sentences: bool, keep_newlines: bool, partitions: int,
                keep_sequential_samples: bool) -> list[str]:  # fmt: skip
    """Flags that, as in Megatron-LM, do nothing in this combination."""
    notes = []
    if keep_newlines and not split_sentences:
        notes.append("--keep-newlines has no effect without --split-sentences")
    if keep_sequential_samples and partitions == 1:
        notes.append("--keep-sequential-samples has no effect with --partitions 1")
    if options.get("vocab_extra_ids"):
        notes.append("--vocab-extra-ids is ignored: Megatron-LM's preprocess_data.py sets it to 0")
        options["vocab_extra_ids"] = 0
    return notes


class _Reporter:
    """Skip counting, capped warnings and the progress bar."""

    def __init__(self, stats: PreprocessStats, strict: bool, progress: bool, log_interval: int):
        self.stats, self.strict, self.log_interval = stats, strict, log_interval
        self.bar = tqdm(unit="doc", file=sys.stderr, disable=not progress, dynamic_ncols=True)
        self.start = time.perf_counter()

    def skip(self, where: str, reason: str, detail: str) -> None:
        message = f"{where}: {reason}: {detail}"
        if self.strict:
            raise PreprocessError(f"{message} (--strict: nothing written)")
        self.stats.skipped[reason] += 1
        if len(self.stats.warnings) < MAX_WARNINGS:
            self.stats.warnings.append(message)
            tqdm.write(f"warning: skipped {message}", file=sys.stderr)

    def written(self) -> None:
        self.bar.update(1)
        if self.stats.documents % self.log_interval == 0:
            elapsed = max(time.perf_counter() - self.start, 1e-9)
            self.bar.set_postfix(tokens_per_s=f"{self.stats.tokens / elapsed:.0f}", refresh=False)

    def close(self) -> None:
        self.bar.close()
        self.stats.elapsed_s = time.perf_counter() - self.start
        extra = self.stats.total_skipped - len(self.stats.warnings)
        if extra > 0:
            print(f"warning: ... {extra} more skipped lines", file=sys.stderr)


def preprocess_jsonl(
    inputs: Sequence[str],
    output_prefix: str,
    tokenizer_type: str,
    tokenizer_model: str | None = None,
    json_keys: Sequence[str] = ("text",),
    append_eod: bool = False,
    workers: int = 1,
    log_interval: int = 1000,
    strict: bool = False,
    chunk_size: int = 64,
    progress: bool = True,
    tokenizer_options: dict | None = None,
    split_sentences: bool = False,
    keep_newlines: bool = False,
    lang: str = "english",
    partitions: int = 1,
    keep_sequential_samples: bool = False,
) -> PreprocessStats:
    """Tokenize JSONL files into Megatron ``PREFIX_<key>_<level>.{bin,idx}`` pairs.

    Args:
        inputs: JSONL files or globs (``--input``).
        output_prefix: Output path prefix (``--output-prefix``).
        tokenizer_type: ``--tokenizer-type`` (see ``data.tokenizers.TOKENIZER_TYPES``).
        tokenizer_model: ``--tokenizer-model``.
        json_keys: Keys to tokenize, one output pair each (``--json-keys``).
        append_eod: End every document with the EOD token (``--append-eod``).
        workers: Tokenizer processes (``--workers``); output is identical for any count.
        log_interval: Documents between tokens/s updates of the progress bar.
        strict: Fail on the first bad line instead of skipping it (``--strict``).
        chunk_size: Lines per task sent to a worker (``--chunk-size``).
        progress: Show the progress bar on stderr.
        tokenizer_options: Keyword arguments of ``build_tokenizer`` (``legacy``,
            ``vocab_file``, ...); ``vocab_extra_ids`` is ignored, as in Megatron-LM.
        split_sentences: One sequence per sentence, outputs ``PREFIX_<key>_sentence``.
        keep_newlines: Sentences keep the newlines after them (with ``split_sentences``).
        lang: punkt language for ``split_sentences`` (``--lang``).
        partitions: Megatron-LM's ``--partitions`` (its document order; ``prep.partitions``).
        keep_sequential_samples: Partitions are consecutive blocks (input order kept).

    Returns:
        Counts, per-key output prefixes, notes and elapsed time.

    Raises:
        PreprocessError: Bad settings, a bad line under ``strict``, or no documents written.
        FileNotFoundError: A missing input or tokenizer model.
    """
    ints = {"--workers": workers, "--chunk-size": chunk_size, "--log-interval": log_interval,
            "--partitions": partitions}  # fmt: skip
    _validate(output_prefix, json_keys, ints)
    options = dict(tokenizer_options or {})
    notes = _flag_notes(options, split_sentences, keep_newlines, partitions,
                        keep_sequential_samples)  # fmt: skip
    paths = expand_inputs(inputs)
    tokenizer = build_tokenizer(tokenizer_type, tokenizer_model, **options)  # fail fast
    splitter_options = dict(lang=lang, keep_newlines=keep_newlines) if split_sentences else None
    if splitter_options:
        SentenceSplitter(**splitter_options)  # missing nltk / punkt data: fail before any work
    stats = PreprocessStats(tokens_per_key=dict.fromkeys(json_keys, 0))
    stats.notes = [*tokenizer.notes, *notes]
    for note in stats.notes:
        print(f"note: {note}", file=sys.stderr)
    level = "sentence" if split_sentences else "document"
    prefixes = {k: output_prefix_for(output_prefix, k, level) for k in json_keys}
    route = PartitionRouter(partitions, keep_sequential_samples,
                            count_lines(paths) if keep_sequential_samples else 0)  # fmt: skip
    outputs = StagedOutputs(prefixes, DType.optimal_dtype(tokenizer.vocab_size), partitions)
    init_args = (tokenizer_type, tokenizer_model, options, tuple(json_keys), append_eod,
                 splitter_options)  # fmt: skip
    try:
        _run(paths, chunk_size, workers, init_args, route, outputs, stats, strict, progress,
             log_interval)  # fmt: skip
    except BaseException:
        outputs.abort()
        raise
    stats.outputs = dict(prefixes)
    return stats


def _run(paths, chunk_size, workers, init_args, route, outputs, stats, strict, progress,
         log_interval) -> None:  # fmt: skip
    """Encode every line, write the documents, publish (the caller aborts on failure)."""
    reporter = _Reporter(stats, strict, progress, log_interval)
    line = 0
    try:
        for results in _encoded(_read_chunks(paths, chunk_size), workers, init_args):
            for file_i, lineno, result in results:
                partition, line = route(line), line + 1
                if isinstance(result, tuple):
                    reporter.skip(f"{paths[file_i]}:{lineno}", *result)
                    continue
                outputs.add(result, partition)
                stats.documents += 1
                for key, (ids, _) in zip(stats.tokens_per_key, result):
                    stats.tokens_per_key[key] += len(ids)
                    stats.tokens += len(ids)
                reporter.written()
        if stats.documents == 0:
            raise PreprocessError(
                f"no documents written: all {stats.total_skipped} lines of --input were skipped"
            )
        outputs.publish()
    finally:
        reporter.close()
