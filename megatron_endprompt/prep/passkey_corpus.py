"""Passkey training documents, written as a Megatron indexed dataset.

Each document is an evaluation passkey prompt (``passkey_text.build_haystack``: BOS when the
tokenizer has one, filler sentences with the needle at a random depth, then the question) followed
by the answer `` {key}`` and optionally EOD, cut to an exact token length. The filler, needle and
question are the evaluation's own constants (both sides take them from ``passkey_text``), so
retrieval learned here is retrieval evaluated there; the answer is tokenized as the evaluation's
``answer_ids``.

Sample alignment (megatron-core 0.16 ``GPTDataset``): the documents are shuffled, concatenated and
cut by ``helpers.build_sample_idx`` into windows of ``S + add_extra_token_to_sequence`` tokens
with a stride of ``S``, so with the default ``add_extra_token_to_sequence=True`` consecutive
samples share one token. Documents of exactly ``S + 1`` tokens therefore do NOT align: sample 1
starts at the last token of document 0 and the offset drifts by one token per sample. Documents
of exactly ``S`` tokens (``doc_tokens = --seq-length``) do align, for any document shuffle, split
or blend: every sample's ``S`` input tokens are one whole document, and the extra label token is
the first token of the next document (BOS when the tokenizer has one, so that last prediction is
learnable). In tail mode the last ``tail_tokens(...)`` inputs are then the question and the key.

Windows (``min_episode_tokens``): a document of ``doc_tokens`` may instead hold several complete
passkey episodes of random lengths, the last one ending at the document end. Contiguous training
then sees questions at many positions (retrieval must work by content, not by absolute position),
every needle stays in the window of its question, and tail mode still finds the last episode's
question and key in the terminal segment.

Which mode: one episode per ``S``-token document puts every question at the same absolute
positions ``S - t .. S - 1``, which a model trained contiguously on them can memorise (the pilot's
failure, REPLICATION_NOTES item 4); prefer windows for base pretraining and full-length
fine-tuning. Either mode suits tail-mode EndPrompt. Cue-mode EndPrompt keeps only ``S - b`` tokens
of a sample and appends a cue, which drops the last episode's question and key; only complete
episodes inside the kept text (windows) still teach retrieval there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from megatron.core.datasets.indexed_dataset import DType

from megatron_endprompt.passkey_text import NEEDLE, QUESTION, Tokenizer, bos_ids, build_haystack
from megatron_endprompt.prep.files import require_output_dir
from megatron_endprompt.prep.indexed_output import StagedIndexedDataset

MAX_EXACT_TAIL_KEYS = 100_000
"""``tail_tokens`` tokenizes every key up to this many keys (5 digits), else refuses."""


@dataclass(frozen=True)
class PasskeyDoc:
    """One passkey episode: its token ids and where its parts start."""

    ids: list[int]
    """Token ids, exactly the requested length; they end with the key (and EOD when asked)."""
    key: str
    """The pass key digits."""
    needle_start: int
    """Index in ``ids`` of the needle's first token."""
    answer_start: int
    """Index in ``ids`` of the answer's first token (the question ends just before it)."""
    depth: float
    """The requested needle depth (a fraction of the filler; realized to a sentence boundary)."""
    lead_in: int = 0
    """Filler tokens (no needle, no BOS) before the episode's own text: a window's first episode
    (``make_passkey_window``); 0 otherwise."""


def _check_args(digits: int, min_depth: float, max_depth: float) -> None:
    if isinstance(digits, bool) or not isinstance(digits, int) or digits < 1:
        raise ValueError(f"--digits must be an integer >= 1, got {digits!r}")
    if not 0.0 <= min_depth <= max_depth <= 1.0:
        raise ValueError(
            f"--min-depth/--max-depth must satisfy 0 <= min <= max <= 1, got {min_depth}, "
            f"{max_depth}"
        )


def _draw_key(rng: np.random.Generator, digits: int) -> str:
    """A ``digits``-digit key whose first digit is never 0 (as in the evaluation)."""
    return str(int(rng.integers(10 ** (digits - 1), 10**digits)))


def _parts(tokenizer: Tokenizer, key: str, append_eod: bool) -> tuple[list, list, list]:
    """``(needle ids, question ids, answer ids + optional EOD)``, tokenized as the evaluation."""
    needle = tokenizer.tokenize(" " + NEEDLE.format(key=key))
    question = tokenizer.tokenize(" " + QUESTION)
    answer = tokenizer.tokenize(" " + key) + ([tokenizer.eod] if append_eod else [])
    return needle, question, answer


def episode_min_tokens(tokenizer: Tokenizer, key: str, append_eod: bool = False) -> int:
    """Fewest tokens an episode with ``key`` can have: BOS, needle, question, answer (, EOD)."""
    needle, question, answer = _parts(tokenizer, key, append_eod)
    return len(bos_ids(tokenizer)) + len(needle) + len(question) + len(answer)


def _build(
    tokenizer: Tokenizer, key: str, length: int, depth: float, append_eod: bool
) -> PasskeyDoc:
    needle, question, answer = _parts(tokenizer, key, append_eod)
    prompt_len = length - len(answer)
    fixed = len(bos_ids(tokenizer)) + len(needle) + len(question)
    if prompt_len < fixed:
        raise ValueError(
            f"--doc-tokens: {length} tokens cannot hold a passkey episode with key {key} "
            f"({fixed + len(answer)} tokens without filler)"
        )
    prompt, starts = build_haystack(tokenizer, prompt_len, [(depth, needle)], question)
    return PasskeyDoc(prompt + answer, key, starts[0], len(prompt), depth)


def make_passkey_document(
    tokenizer: Tokenizer,
    doc_tokens: int,
    rng: np.random.Generator,
    digits: int = 5,
    min_depth: float = 0.0,
    max_depth: float = 1.0,
    append_eod: bool = False,
) -> PasskeyDoc:
    """One passkey document of exactly ``doc_tokens`` tokens.

    Args:
        tokenizer: tokenizer of the model.
        doc_tokens: exact document length in tokens (BOS, answer and EOD included).
        rng: source of the key and the needle depth.
        digits: key digits (>= 1); the first digit is never 0.
        min_depth: smallest needle depth (fraction of the filler, 0 = start).
        max_depth: largest needle depth (1 = just before the question).
        append_eod: end the document with the EOD token after the key.

    Returns:
        The document; ``ids`` end with the key tokens (then EOD when ``append_eod``).

    Raises:
        ValueError: bad digits or depths, or ``doc_tokens`` too short for one episode.
    """
    _check_args(digits, min_depth, max_depth)
    key = _draw_key(rng, digits)
    depth = float(rng.uniform(min_depth, max_depth))
    return _build(tokenizer, key, doc_tokens, depth, append_eod)


def lead_in_filler(tokenizer: Tokenizer, n: int) -> list[int]:
    """``n`` filler tokens (no BOS, no needle) ending with a whole filler sentence."""
    prefix = len(bos_ids(tokenizer))
    return build_haystack(tokenizer, n + prefix, [], [])[0][prefix:] if n > 0 else []


def make_passkey_window(
    tokenizer: Tokenizer,
    doc_tokens: int,
    rng: np.random.Generator,
    min_episode_tokens: int,
    digits: int = 5,
    min_depth: float = 0.0,
    max_depth: float = 1.0,
    append_eod: bool = False,
) -> list[PasskeyDoc]:
    """Complete passkey episodes of random lengths that together hold exactly ``doc_tokens``.

    Episodes are drawn from the document end backwards: the last one ends at the document end and
    its length is uniform in ``[shortest, doc_tokens]`` (shortest: ``min_episode_tokens``, or
    more when its key needs it), the one before it uniform in what is left, and so on until less
    than one episode fits; that remainder becomes a lead-in of filler sentences (no needle, no
    BOS) at the front of the first episode. So questions, needles and episode starts land at
    every position of the document (retrieval must work by content, not by absolute position),
    and the document still ends with a question and its key (tail mode's terminal segment).

    Why not the other way round (the first episode drawn first, the rest absorbed by the last):
    with ``doc_tokens`` under twice the shortest episode, most documents were then one episode
    spanning the whole document, its question always at the same absolute positions, which a
    small model memorises instead of learning retrieval (REPLICATION_NOTES item 4).

    Args:
        tokenizer, digits, min_depth, max_depth, append_eod: as ``make_passkey_document``.
        doc_tokens: total length of the episodes (the document length).
        rng: source of the episode lengths, keys and needle depths.
        min_episode_tokens: shortest episode (>= 1).

    Returns:
        The episodes in order; their ``ids`` concatenate to ``doc_tokens`` tokens. The first
        one's ``ids`` start with the lead-in (``needle_start`` and ``answer_start`` count it).

    Raises:
        ValueError: bad arguments, or ``doc_tokens`` too short for one episode.
    """
    _check_args(digits, min_depth, max_depth)
    if min_episode_tokens < 1 or doc_tokens < min_episode_tokens:
        raise ValueError(
            f"--min-episode-tokens must be in [1, --doc-tokens={doc_tokens}], "
            f"got {min_episode_tokens}"
        )
    planned, remaining = [], doc_tokens  # (key, length, depth), last episode first
    while True:
        key = _draw_key(rng, digits)
        low = max(min_episode_tokens, episode_min_tokens(tokenizer, key, append_eod))
        if remaining < low:
            if not planned:
                raise ValueError(
                    f"--min-episode-tokens/--doc-tokens: a {doc_tokens}-token document cannot "
                    f"hold an episode with key {key} ({low} tokens)"
                )
            break
        length = int(rng.integers(low, remaining + 1))
        planned.append((key, length, float(rng.uniform(min_depth, max_depth))))
        remaining -= length
    episodes = [_build(tokenizer, k, n, d, append_eod) for k, n, d in reversed(planned)]
    if remaining:
        first, lead = episodes[0], lead_in_filler(tokenizer, remaining)
        episodes[0] = PasskeyDoc(
            lead + first.ids, first.key, first.needle_start + remaining,
            first.answer_start + remaining, first.depth, remaining,
        )  # fmt: skip
    return episodes


def tail_tokens(tokenizer: Tokenizer, digits: int = 5, append_eod: bool = False) -> int:
    """Tokens of question + answer (+ EOD) at a document end, the longest over all keys.

    Pass it as ``--endprompt-tail-length`` so tail-mode EndPrompt makes the question and the key
    the terminal segment. For a tokenizer that splits every key alike (bytes) the value is exact
    for every document; otherwise a shorter key leaves a little filler in the tail.

    Raises:
        ValueError: ``digits`` too large to tokenize every key (over ``MAX_EXACT_TAIL_KEYS``).
    """
    _check_args(digits, 0.0, 1.0)
    low, high = 10 ** (digits - 1), 10**digits
    if high - low > MAX_EXACT_TAIL_KEYS:
        raise ValueError(f"--digits: tail_tokens supports up to 5 digits, got {digits}")
    question = tokenizer.tokenize(" " + QUESTION)
    answer = max(len(tokenizer.tokenize(f" {k}")) for k in range(low, high))
    return len(question) + answer + int(append_eod)


def decode_check(tokenizer: Tokenizer, doc: PasskeyDoc) -> str:
    """Decode ``doc`` and check its text; returns the text.

    Raises:
        ValueError: the text lacks the needle with the key, or does not end with the question
            followed by the key.
    """
    text = tokenizer.detokenize([i for i in doc.ids if i not in (tokenizer.eod, _bos(tokenizer))])
    squashed = " ".join(text.split())
    if NEEDLE.format(key=doc.key) not in squashed:
        raise ValueError(f"document text lacks the needle with key {doc.key}: {squashed[-200:]!r}")
    if not squashed.endswith(f"{QUESTION} {doc.key}"):
        raise ValueError(f"document text does not end with the question and key: {squashed!r}")
    return text


def _bos(tokenizer: Tokenizer) -> int | None:
    ids = bos_ids(tokenizer)
    return ids[0] if ids else None


@dataclass
class PasskeyCorpusStats:
    """What ``write_passkey_corpus`` wrote."""

    output_prefix: str
    """The dataset prefix (``PREFIX_text_document``)."""
    documents: int = 0
    """Documents written."""
    episodes: int = 0
    """Passkey episodes written (one per document unless windows hold several)."""
    tokens: int = 0
    """Tokens written."""
    tail_tokens: int = 0
    """``tail_tokens`` for these settings (the ``--endprompt-tail-length`` to use)."""
    elapsed_s: float = 0.0
    """Wall time."""

    def summary(self) -> str:
        """One line: counts, output and the tail length to train with."""
        return (
            f"wrote {self.documents} documents ({self.episodes} passkey episodes, {self.tokens} "
            f"tokens) in {self.elapsed_s:.1f}s to {self.output_prefix}.{{bin,idx}}; "
            f"tail tokens (--endprompt-tail-length) = {self.tail_tokens}"
        )


def document_episodes(
    tokenizer: Tokenizer, index: int, seed: int, doc_tokens: int, **kwargs
) -> list[PasskeyDoc]:
    """The episodes of document ``index``: deterministic in ``(seed, index)`` and the settings.

    ``kwargs``: ``digits``, ``min_depth``, ``max_depth``, ``append_eod`` and
    ``min_episode_tokens`` (None: one episode per document).
    """
    rng = np.random.default_rng([seed, index])
    min_episode = kwargs.pop("min_episode_tokens", None)
    if min_episode is None:
        return [make_passkey_document(tokenizer, doc_tokens, rng, **kwargs)]
    return make_passkey_window(tokenizer, doc_tokens, rng, min_episode, **kwargs)


def output_prefix_for(output_prefix: str) -> str:
    """The dataset prefix written for ``--output-prefix``: ``PREFIX_text_document``."""
    return f"{output_prefix}_text_document"


def _add_document(
    output: StagedIndexedDataset,
    tokenizer: Tokenizer,
    episodes: list[PasskeyDoc],
    dtype: type,
    stats: PasskeyCorpusStats,
) -> None:
    """Append one document (its episodes back to back); the first one is decode-checked."""
    if stats.documents == 0:
        decode_check(tokenizer, episodes[-1])
    ids = np.asarray([t for ep in episodes for t in ep.ids], dtype=dtype)
    output.add_document(ids)
    stats.documents += 1
    stats.episodes += len(episodes)
    stats.tokens += len(ids)


def _check_corpus_args(output_prefix: str, num_docs: int, seed: int) -> None:
    if num_docs < 1:
        raise ValueError(f"--num-docs must be >= 1, got {num_docs}")
    if seed < 0:
        raise ValueError(f"--seed must be >= 0, got {seed}")
    require_output_dir(output_prefix, "--output-prefix", ValueError)


def write_passkey_corpus(
    output_prefix: str,
    tokenizer: Tokenizer,
    num_docs: int,
    doc_tokens: int,
    seed: int,
    **kwargs,
) -> PasskeyCorpusStats:
    """Write ``num_docs`` passkey documents to ``PREFIX_text_document.{bin,idx}``.

    The pair is written with megatron-core's ``IndexedDatasetBuilder`` in
    ``DType.optimal_dtype(vocab_size)`` (as ``preprocess.py``), one sequence per document, under
    temporary names renamed only when complete. Blend it with another corpus as
    ``--data-path 0.5 CORPUS_text_document 0.5 PREFIX_text_document``.

    Args:
        output_prefix: output path prefix; its directory must exist.
        tokenizer: tokenizer of the model (``data.tokenizers.build_tokenizer``).
        num_docs: documents to write (>= 1).
        doc_tokens: exact tokens per document; ``--seq-length`` for samples that are documents.
        seed: corpus seed (>= 0); document ``i`` depends only on it, ``i`` and the settings.
        **kwargs: ``digits``, ``min_depth``, ``max_depth``, ``append_eod``,
            ``min_episode_tokens`` (see ``document_episodes``).

    Returns:
        Counts, the dataset prefix and the tail length to train with.

    Raises:
        ValueError: bad settings (the message names the flag).
    """
    _check_corpus_args(output_prefix, num_docs, seed)
    start = time.perf_counter()
    stats = PasskeyCorpusStats(output_prefix_for(output_prefix))
    stats.tail_tokens = tail_tokens(
        tokenizer, kwargs.get("digits", 5), kwargs.get("append_eod", False)
    )
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    output = StagedIndexedDataset(stats.output_prefix, dtype)
    try:
        for index in range(num_docs):
            episodes = document_episodes(tokenizer, index, seed, doc_tokens, **kwargs)
            _add_document(output, tokenizer, episodes, dtype, stats)
        output.publish()
    except BaseException:
        output.abort()
        raise
    stats.elapsed_s = time.perf_counter() - start
    return stats
