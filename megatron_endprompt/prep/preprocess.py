"""JSONL -> Megatron indexed binary (``PREFIX_<key>_document.{bin,idx}``).

The output is what Megatron-LM's ``tools/preprocess_data.py`` writes without
``--split-sentences``: one sequence per document, written with megatron-core's
``IndexedDatasetBuilder`` in ``DType.optimal_dtype(vocab_size)``, optionally ending in the EOD
token. Megatron-LM reads it unchanged, and this package reads Megatron-LM's.

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
import os
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from megatron.core.datasets.indexed_dataset import DType
from tqdm import tqdm

from megatron_endprompt.data.tokenizers import build_tokenizer
from megatron_endprompt.prep.files import expand_inputs
from megatron_endprompt.prep.indexed_output import StagedIndexedDataset, publish_all

SKIP_REASONS = (
    "malformed_json",
    "missing_key",
    "not_string",
    "empty_text",
    "invalid_utf8",
    "empty_after_tokenize",
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
    """Output path prefix (``PREFIX_<key>_document``) per JSON key."""
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


def output_prefix_for(output_prefix: str, key: str) -> str:
    """Megatron-LM's output naming: ``PREFIX_<key>_document``."""
    return f"{output_prefix}_{key}_document"


# Per-process encoder state, built once per worker by ``_init_encoder`` (and once in-process
# when ``workers == 1``): the tokenizer is never pickled.
_ENCODER: dict = {}


def _init_encoder(tokenizer_type: str, tokenizer_model, json_keys, append_eod: bool) -> None:
    tok = build_tokenizer(tokenizer_type, tokenizer_model)
    _ENCODER.update(
        tokenizer=tok,
        keys=tuple(json_keys),
        eod=tok.eod if append_eod else None,
        dtype=DType.optimal_dtype(tok.vocab_size),
    )


def _init_worker(*init_args) -> None:
    # Ctrl-C reaches the whole process group; only the parent should react (it terminates the
    # pool and deletes the temporaries), so workers do not each print a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _init_encoder(*init_args)


def _encode_line(raw: bytes) -> tuple[str, str] | list[np.ndarray]:
    """Token arrays (one per key) of one JSONL line, or ``(skip reason, detail)``."""
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
        try:
            ids = _ENCODER["tokenizer"].tokenize(text)
        except UnicodeEncodeError as err:  # JSON "\ud800" escapes decode to lone surrogates
            return "invalid_utf8", f"{key!r}: {err}"
        if len(ids) == 0:
            return "empty_after_tokenize", f"{key!r} has no tokens"
        if _ENCODER["eod"] is not None:
            ids = [*ids, _ENCODER["eod"]]
        docs.append(np.asarray(ids, dtype=_ENCODER["dtype"]))
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


class _Outputs:
    """One staged indexed dataset per key; all published together, or all aborted."""

    def __init__(self, output_prefix: str, keys: Sequence[str], dtype: type) -> None:
        self.prefixes = {k: output_prefix_for(output_prefix, k) for k in keys}
        self.staged: list[StagedIndexedDataset] = []
        try:
            for prefix in self.prefixes.values():
                self.staged.append(StagedIndexedDataset(prefix, dtype))
        except BaseException:
            self.abort()
            raise

    def add(self, docs: list[np.ndarray]) -> None:
        for staged, ids in zip(self.staged, docs):
            staged.add_document(ids)

    def publish(self) -> None:
        publish_all(self.staged)  # every key's pair is complete before any is renamed

    def abort(self) -> None:
        for staged in self.staged:
            staged.abort()


def _validate(
    output_prefix: str, json_keys: Sequence[str], workers: int, chunk_size: int, log_interval: int
) -> None:
    if not json_keys or len(set(json_keys)) != len(json_keys) or not all(json_keys):
        raise PreprocessError(f"--json-keys must be distinct non-empty keys, got {json_keys}")
    for flag, value in (
        ("--workers", workers),
        ("--chunk-size", chunk_size),
        ("--log-interval", log_interval),
    ):
        if value < 1:
            raise PreprocessError(f"{flag} must be >= 1, got {value}")
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    if not os.path.isdir(out_dir):
        raise PreprocessError(f"--output-prefix {output_prefix}: directory {out_dir} not found")


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
) -> PreprocessStats:
    """Tokenize JSONL files into Megatron ``PREFIX_<key>_document.{bin,idx}`` pairs.

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

    Returns:
        Counts, per-key output prefixes and elapsed time.

    Raises:
        PreprocessError: Bad settings, a bad line under ``strict``, or no documents written.
        FileNotFoundError: A missing input or tokenizer model.
    """
    _validate(output_prefix, json_keys, workers, chunk_size, log_interval)
    paths = expand_inputs(inputs)
    tokenizer = build_tokenizer(tokenizer_type, tokenizer_model)  # fail fast, before any worker
    stats = PreprocessStats(tokens_per_key=dict.fromkeys(json_keys, 0))
    outputs = _Outputs(output_prefix, json_keys, DType.optimal_dtype(tokenizer.vocab_size))
    reporter = _Reporter(stats, strict, progress, log_interval)
    init_args = (tokenizer_type, tokenizer_model, tuple(json_keys), append_eod)
    try:
        for results in _encoded(_read_chunks(paths, chunk_size), workers, init_args):
            for file_i, lineno, result in results:
                if isinstance(result, tuple):
                    reporter.skip(f"{paths[file_i]}:{lineno}", *result)
                    continue
                outputs.add(result)
                stats.documents += 1
                for key, ids in zip(json_keys, result):
                    stats.tokens_per_key[key] += len(ids)
                    stats.tokens += len(ids)
                reporter.written()
        if stats.documents == 0:
            raise PreprocessError(
                f"no documents written: all {stats.total_skipped} lines of --input were skipped"
            )
        outputs.publish()
    except BaseException:
        outputs.abort()
        raise
    finally:
        reporter.close()
    stats.outputs = dict(outputs.prefixes)
    return stats
