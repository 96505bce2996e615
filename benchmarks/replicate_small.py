"""The paper's comparison at CPU scale: short-context bases, nine ways to extend them 8x.

A small Llama-style model (4 layers, hidden 128, 2 heads of 64 by default; every size is a flag)
is pretrained at S0 = 128 on the embedded corpus (the Python standard library's source,
SentencePiece tokenizer trained on it) blended with passkey episodes, so that retrieval is
learnable. It is then extended to L = 8 x S0 = 1024 with YaRN x8 and the SAME token budget
(iterations x tokens per iteration) by:

    pi_only                no training, linear PI x8 at evaluation (the issue's "PI only")
    scaling_only           no training, the extension's scaling (YaRN x8) at evaluation
    full_length            contiguous positions at physical length L (the positive control)
    short_contiguous       the scaling + ordinary contiguous training at S0 (the control that
                           separates the terminal segment from adapting to the scaling)
    pose                   PoSE, 2 chunks, physical S0 (the PoSE paper's chunk sampler)
    pose_reference         PoSE with the reference code's sampler (l0 <= S/2)
    endprompt_cue_fixed    EndPrompt, appended cue at the end of the window
    endprompt_cue_random   EndPrompt, appended cue at a random terminal position
    endprompt_tail_fixed   EndPrompt, the sample's own last tokens (question + key) as terminal
    endprompt_tail_random  the same at a random terminal position (the reference's own mode)
    endprompt_pose         PoSE chunks + the tail terminal at the end of the window

Bases and seeds (``--base-seeds``, ``--seeds``): every base is pretrained and evaluated; a base
below the S0 bar (``--base-bar``, default 0.95 passkey exact match at S0, REPLICATION_NOTES) is
reported and not extended, since an extension of a base that cannot retrieve within its own
window measures nothing. The first base at the bar is extended with every extension seed
(default 3: the table's mean ± sd is extension-to-extension variance); every further base at the
bar with the first seed only (the base-to-base table). The report then checks the full-length
bar (full_length >= 0.80 at L) and says so when it is not met: then the table ranks nothing.

Why YaRN and not linear PI (measured while choosing the settings, REPLICATION_NOTES item 6):
linear PI x8 compresses the high-frequency RoPE dimensions this small model copies with; after
800K tokens of full-length fine-tuning under PI the key's first digit was retrieved 30% of the
time at L and even the short-range copy inside the needle had collapsed to 10%, so the positive
control failed. Under YaRN x8 (high frequencies kept) the same run retrieved it 97% of the time.

Every model (the base without scaling too) is evaluated at 1x, 2x, 4x and 8x S0: passkey exact
match (greedy) and teacher-forced digit accuracy over a length x depth grid with bootstrap
intervals, each length counting the answer too (``--passkey-answer-in-length``: at 1x the key
ends at position S0 - 1, inside the base's trained window, as in its training documents), and
perplexity by position on held-out standard-library text (``tools/evaluate.py``, whose
report.json each step reads back). Training tokens/s and peak memory come from each run's
TrainResult (one process per run: its peak memory is its own). The markdown table (the
library's ``format_table``), JSON (settings, seeds, every number) and PNG plots (the library's
plots) are written to --output; the numbers are whatever comes out (no method is tuned).

Data, matching the methods (REPLICATION_NOTES items 3 and 4):
    S0-token passkey documents, each holding complete episodes of random lengths (a needle at a
    random depth, then the question and key) drawn from the document's end backwards, after a
    filler lead-in of random length, so that episode starts, needles and questions land at every
    position and retrieval has to work by content: samples are whole documents, so the tail terminal
    is exactly the last episode's question + key and its needle is in the kept head; PoSE chunks
    keep needle and question; cue terminals replace the last question + key (earlier complete
    episodes still teach retrieval). full_length trains on L-token documents built the same way.
    On whole-document samples ``--endprompt-terminal-source document_end`` always falls back to
    the contiguous tail (the document ends inside the sample), so this corpus cannot separate the
    two terminal sources; it is not a row.

    python benchmarks/replicate_small.py                  # ~90+ minutes on 2 CPU cores
    python benchmarks/replicate_small.py --seeds 1,2      # two extension seeds per method
    python benchmarks/replicate_small.py --quick          # a few minutes: the tests run this
    python benchmarks/replicate_small.py --resume         # reuse finished steps in --output

Ends with RESULT lines: base passkey at S0, whether each bar is met, each method's mean passkey
exact match over 2x-8x and at 8x, and the EndPrompt / full-length training tokens/s and peak
memory ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any

from megatron_endprompt.cli_utils import parse_csv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = ["--tokenizer-type", "SentencePieceTokenizer"]


@dataclass(frozen=True)
class Method:
    """One way to extend the base to L; ``flags`` are the training flags besides the common ones."""

    name: str
    description: str
    flags: tuple[str, ...] = ()
    trains: bool = True
    full_length: bool = False
    scaling: str | None = None
    """RoPE scaling of an evaluation-only method (None: ``Settings.rope_scaling``)."""


METHODS = (
    Method("pi_only", "linear PI at evaluation, no training", trains=False, scaling="linear"),
    Method("scaling_only", "the extension's RoPE scaling at evaluation, no training", trains=False),
    Method("full_length", "contiguous positions at physical length L (the positive control)",
           ("--position-mode", "contiguous"), full_length=True),
    Method("short_contiguous", "the extension's RoPE scaling + ordinary contiguous training at "
           "S0 (the control: adapting to the scaling without any terminal segment)",
           ("--position-mode", "contiguous")),
    Method("pose", "PoSE, 2 chunks (chunk sampler of the PoSE paper, l0 ~ U{1..S-1})",
           ("--position-mode", "pose", "--pose-num-chunks", "2", "--pose-chunk-sampler", "paper")),
    Method("pose_reference", "PoSE, 2 chunks, the reference code's sampler (l0 ~ U{1..(S+1)//2})",
           ("--position-mode", "pose", "--pose-num-chunks", "2",
            "--pose-chunk-sampler", "reference")),
    Method("endprompt_cue_fixed", "EndPrompt, appended cue ending at L-1",
           ("--position-mode", "endprompt", "--endprompt-terminal", "cue",
            "--endprompt-placement", "fixed")),
    Method("endprompt_cue_random", "EndPrompt, appended cue at a random terminal position",
           ("--position-mode", "endprompt", "--endprompt-terminal", "cue",
            "--endprompt-placement", "random")),
    Method("endprompt_tail_fixed", "EndPrompt, own last tokens (question + key) ending at L-1",
           ("--position-mode", "endprompt", "--endprompt-terminal", "tail",
            "--endprompt-placement", "fixed")),
    Method("endprompt_tail_random", "EndPrompt, own last tokens (question + key) at a random "
           "terminal position (the reference code's recommended mode)",
           ("--position-mode", "endprompt", "--endprompt-terminal", "tail",
            "--endprompt-placement", "random")),
    Method("endprompt_pose", "PoSE chunks (the PoSE paper's sampler) + tail terminal ending at "
           "L-1",
           ("--position-mode", "endprompt_pose", "--pose-num-chunks", "2",
            "--pose-chunk-sampler", "paper",
            "--endprompt-terminal", "tail", "--endprompt-placement", "fixed")),
)  # fmt: skip
METHOD_NAMES = tuple(m.name for m in METHODS)
RESUMABLE = ("seeds", "methods", "base_seeds", "base_bar")
"""Settings that --resume may change: finished runs of other seeds, methods and bases stay
valid (the base bar only decides which bases are extended)."""


@dataclass
class Settings:
    """Everything that decides the numbers; written to settings.json and the report."""

    s0: int = 128
    factor: int = 8
    vocab_size: int = 1024
    corpus_docs: int = 800
    corpus_doc_bytes: int = 100_000
    corpus_weight: float = 0.2
    """Share of standard-library samples in every blend (the rest: passkey documents)."""
    passkey_docs_s0: int = 30_000
    passkey_docs_l: int = 3_000
    min_episode_tokens: int = 56
    digits: int = 5
    """Pass key digits, in the training documents and the evaluation alike."""
    num_layers: int = 4
    hidden_size: int = 128
    ffn_hidden_size: int = 344
    num_attention_heads: int = 2
    rotary_base: float = 10000.0
    rope_scaling: str = "yarn"
    """RoPE scaling of every trained extension (linear = PI, ntk, yarn, llama3), factor x8."""
    tokens_per_iter: int = 4096
    """Global batch in tokens: S0-methods 32 x 128, full_length 4 x 1024."""
    tokens_per_micro_batch: int = 4096
    base_iters: int = 1000
    base_lr: float = 1e-3
    base_min_lr: float = 1e-4
    """Base LR (cosine to ``base_min_lr``). At 2e-3 / 2e-4 only 1 of 6 base seeds reached the
    S0 bar (the others confused the key's digit order with the needle mid-prompt); at 1e-3 / 1e-4
    base seed 2, one of the five that had failed, scored 1.00."""
    extend_iters: int = 400
    extend_lr: float = 5e-4
    warmup_iters: int = 10
    base_seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    """Base pretraining seeds. The first base at ``base_bar`` is extended with every seed of
    ``seeds``; every further base at the bar with the first of them only (the table's
    base-to-base variance)."""
    base_bar: float = 0.95
    """A base whose passkey exact match at S0 is below this is reported and not extended."""
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    """Extension seeds (data order and layout draws of the extension runs)."""
    eval_depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    eval_trials: int = 4
    eval_seed: int = 0
    ppl_windows: int = 8
    methods: list[str] = field(default_factory=lambda: list(METHOD_NAMES))

    @property
    def length(self) -> int:
        return self.s0 * self.factor

    @property
    def eval_lengths(self) -> list[int]:
        """1x, 2x, 4x, ... up to the factor, times S0."""
        out, k = [], 1
        while k <= self.factor:
            out.append(self.s0 * k)
            k *= 2
        if out[-1] != self.length:
            out.append(self.length)
        return out


QUICK = dict(
    corpus_docs=60, corpus_doc_bytes=20_000, vocab_size=512, min_episode_tokens=80,
    passkey_docs_s0=200, passkey_docs_l=40, num_layers=2, hidden_size=64, ffn_hidden_size=176,
    num_attention_heads=2, factor=4, tokens_per_iter=1024, tokens_per_micro_batch=512,
    base_iters=4, extend_iters=2, eval_depths=[0.5], eval_trials=1, ppl_windows=1,
    base_seeds=[1], seeds=[1], base_bar=0.0,
)  # fmt: skip


def check_settings(s: Settings) -> None:
    """Raise ValueError naming the flag when the settings cannot run."""
    for name in s.methods:
        if name not in METHOD_NAMES:
            raise ValueError(f"--methods: unknown method {name!r} (choose from {METHOD_NAMES})")
    if not s.methods:
        raise ValueError("--methods must name at least one method")
    for flag, seeds in (("--seeds", s.seeds), ("--base-seeds", s.base_seeds)):
        if not seeds or any(x < 0 for x in seeds) or len(set(seeds)) != len(seeds):
            raise ValueError(f"{flag} must be distinct integers >= 0, got {seeds}")
    for flag, value in (("--eval-trials", s.eval_trials), ("--ppl-windows", s.ppl_windows),
                        ("--num-layers", s.num_layers), ("--s0", s.s0)):  # fmt: skip
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if not 0.0 <= s.base_bar <= 1.0:
        raise ValueError(f"--base-bar must be in [0, 1], got {s.base_bar}")
    if not 0.0 < s.corpus_weight < 1.0:
        raise ValueError(f"--corpus-weight must be in (0, 1), got {s.corpus_weight}")
    if s.hidden_size % s.num_attention_heads:
        raise ValueError(
            f"--hidden-size {s.hidden_size} must be divisible by --num-attention-heads "
            f"{s.num_attention_heads}"
        )
    if s.rope_scaling not in ("linear", "ntk", "yarn", "llama3"):
        raise ValueError(
            f"--rope-scaling must be linear, ntk, yarn or llama3, got {s.rope_scaling!r}"
        )
    if s.factor < 2:
        raise ValueError(f"--factor must be >= 2, got {s.factor}")
    for flag, value in (("--base-iters", s.base_iters), ("--extend-iters", s.extend_iters)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if s.tokens_per_iter % s.length or s.tokens_per_micro_batch % s.length:
        raise ValueError(
            f"tokens per iteration ({s.tokens_per_iter}) and per micro-batch "
            f"({s.tokens_per_micro_batch}) must be multiples of L = {s.length}"
        )


# --------------------------------------------------------------------------------- steps


class StepFailed(RuntimeError):
    """A subprocess step exited non-zero; the message names its log."""


def run_step(name: str, cmd: list[str], log_path: str) -> str:
    """Run ``cmd`` with output to ``log_path``; returns the log text. Prints one line per step."""
    start = time.perf_counter()
    print(f"[replicate] {name} ...", flush=True)
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=os.environ.get(
        "OMP_NUM_THREADS", str(os.cpu_count() or 1)))  # fmt: skip
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    with open(log_path, encoding="utf-8") as log:
        text = log.read()
    if proc.returncode != 0:
        tail = "\n".join(text.splitlines()[-15:])
        raise StepFailed(f"{name} failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    print(f"[replicate] {name} done in {time.perf_counter() - start:.0f}s", flush=True)
    return text


def _tool(script: str) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "tools", script)]


def prepare_data(s: Settings, out: str, logs: str, resume: bool) -> dict[str, Any]:
    """Corpus, tokenizer, indexed corpus and the two passkey corpora; returns their paths."""
    data = os.path.join(out, "data")
    if not resume:
        shutil.rmtree(data, ignore_errors=True)
    os.makedirs(data, exist_ok=True)
    paths = {
        "tokenizer": os.path.join(data, "tok.model"),
        "corpus": os.path.join(data, "stdlib_text_document"),
        "passkey_s0": os.path.join(data, f"passkey{s.s0}_text_document"),
        "passkey_l": os.path.join(data, f"passkey{s.length}_text_document"),
    }
    done = os.path.join(data, "done.json")
    if resume and os.path.isfile(done):
        return _read_json(done)
    jsonl = os.path.join(data, "corpus.jsonl")
    run_step("corpus", _tool("prepare_corpus.py") + [
        "--output", jsonl, "--max-docs", str(s.corpus_docs),
        "--max-bytes-per-doc", str(s.corpus_doc_bytes)],
        os.path.join(logs, "corpus.log"))  # fmt: skip
    run_step("tokenizer", _tool("train_tokenizer.py") + [
        "--input", jsonl, "--vocab-size", str(s.vocab_size),
        "--output-prefix", os.path.join(data, "tok")],
        os.path.join(logs, "tokenizer.log"))  # fmt: skip
    tok = TOKENIZER + ["--tokenizer-model", paths["tokenizer"]]
    run_step("preprocess", _tool("preprocess_data.py") + [
        "--input", jsonl, "--output-prefix", os.path.join(data, "stdlib"), *tok,
        "--append-eod", "--workers", "2", "--log-interval", "1000000"],
        os.path.join(logs, "preprocess.log"))  # fmt: skip
    for key, doc_tokens, num_docs, seed in (
        ("passkey_s0", s.s0, s.passkey_docs_s0, 1),
        ("passkey_l", s.length, s.passkey_docs_l, 2),
    ):
        run_step(f"passkey corpus ({doc_tokens}-token documents)", _tool(
            "make_passkey_corpus.py") + [
            "--output-prefix", paths[key][: -len("_text_document")], *tok,
            "--num-docs", str(num_docs), "--doc-tokens", str(doc_tokens),
            "--min-episode-tokens", str(s.min_episode_tokens), "--seed", str(seed),
            "--digits", str(s.digits)],
            os.path.join(logs, f"{key}.log"))  # fmt: skip
    paths["tail_tokens"] = passkey_tail_tokens(paths["tokenizer"], s.digits)
    _write_json(done, paths)
    return paths


def passkey_tail_tokens(tokenizer_model: str, digits: int) -> int:
    """Question + key tokens of a passkey episode (``--endprompt-tail-length`` of tail runs),
    from the library (the corpus tool prints the same number)."""
    from megatron_endprompt.data.tokenizers import build_tokenizer
    from megatron_endprompt.prep.passkey_corpus import tail_tokens

    return tail_tokens(build_tokenizer(TOKENIZER[1], tokenizer_model), digits)


def _model_flags(s: Settings) -> list[str]:
    return [
        "--num-layers", str(s.num_layers), "--hidden-size", str(s.hidden_size),
        "--ffn-hidden-size", str(s.ffn_hidden_size),
        "--num-attention-heads", str(s.num_attention_heads),
        "--num-query-groups", str(s.num_attention_heads), "--swiglu",
        "--normalization", "RMSNorm", "--disable-bias-linear",
        "--untie-embeddings-and-output-weights", "--rotary-base", str(s.rotary_base),
    ]  # fmt: skip


def _train_flags(s: Settings, paths: dict, seq: int, passkey: str, seed: int) -> list[str]:
    """The flags every training run shares. The CLI's defaults are Megatron-LM's; these keep the
    settings the numbers were measured with: the tiny preset as the base of the shape flags
    (dropout 0), AdamW beta2 0.95 and samples read in the training process (no loader worker:
    at this model size a worker process only competes for the 2 cores)."""
    return [
        "--device", "cpu", "--model-preset", "tiny", *_model_flags(s),
        *TOKENIZER, "--tokenizer-model", paths["tokenizer"],
        "--data-path", str(s.corpus_weight), paths["corpus"], str(1 - s.corpus_weight), passkey,
        "--split", "98,2,0", "--data-cache-path", os.path.join(os.path.dirname(paths["corpus"]),
                                                            "cache"),
        "--seq-length", str(seq), "--micro-batch-size", str(s.tokens_per_micro_batch // seq),
        "--global-batch-size", str(s.tokens_per_iter // seq), "--eval-iters", "0",
        "--seed", str(seed), "--log-interval", "20", "--adam-beta2", "0.95", "--num-workers", "0",
    ]  # fmt: skip


def rope_flags(s: Settings, kind: str) -> list[str]:
    """The RoPE scaling flags of ``kind`` at factor ``s.factor`` from S0 (train and evaluate)."""
    flags = ["--rope-scaling-type", kind, "--rope-scaling-factor", str(s.factor)]
    if kind in ("yarn", "llama3"):
        flags += ["--rope-original-max-position-embeddings", str(s.s0)]
    return flags


SUMMARY_KEYS = ("iterations", "consumed_samples", "final_loss", "valid_loss", "tokens_per_s",
                "checkpoint", "interrupted", "peak_memory_gib", "peak_memory_kind")  # fmt: skip
"""TrainResult fields in train_summary.json (TRAIN_SUMMARY's keys: --resume reads old ones)."""


def train_in_process(argv: list[str]) -> dict[str, Any]:
    """One training run in this process, as ``megatron_endprompt.train`` runs it; returns the
    :class:`TrainResult`'s ``SUMMARY_KEYS``. Raises what parsing or training raises."""
    warnings.simplefilter("ignore")  # megatron-core's import-time notices, as before
    from megatron_endprompt.cli import parse_run_config
    from megatron_endprompt.training.loop import train
    from megatron_endprompt.training.runtime import teardown_runtime

    run = parse_run_config(argv, world_size=1, cuda_available=False)
    for notice in run.notices:
        print(f"note: {notice}", flush=True)
    try:
        result = train(run)
    finally:  # process group and megatron parallel state: the next run sets them up again
        teardown_runtime()
    summary = {k: getattr(result, k) for k in SUMMARY_KEYS}
    print("TRAIN_SUMMARY " + json.dumps(summary), flush=True)  # for the log's reader
    return summary


def _train_child(argv: list[str], log_path: str, conn: Any) -> None:
    """Spawned process: :func:`train_in_process` with all output (C level too) to ``log_path``;
    sends ``(True, summary)`` or ``(False, "ExcType: message")``."""
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    os.environ["PYTHONWARNINGS"] = "ignore"  # data-loader workers too, as before
    with open(log_path, "w", encoding="utf-8", buffering=1) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                outcome = (True, train_in_process(argv))
        except BaseException as err:  # noqa: BLE001 - reported to the parent, which raises
            if isinstance(err, (ValueError, FileNotFoundError)):  # bad flags or data: one line
                print(f"error: {err}", file=log)
            else:
                traceback.print_exc(file=log)
            outcome = (False, f"{type(err).__name__}: {err}")
    conn.send(outcome)


def train_step(name: str, argv: list[str], log_path: str) -> dict[str, Any]:
    """Train in a fresh process (a CPU run's peak memory is its process's peak RSS, so runs
    sharing one process would report the largest so far); returns the summary. One progress
    line per step; raises StepFailed naming the log."""
    start, tail = time.perf_counter(), "(no log)"
    print(f"[replicate] {name} ...", flush=True)
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_train_child, args=(argv, log_path, send), name=name)
    proc.start()
    send.close()
    try:
        ok, payload = receive.recv()
    except EOFError:  # died without a word (killed, crashed)
        ok, payload = False, "no result"
    finally:
        proc.join()
        receive.close()
    if not ok or proc.exitcode != 0:
        with contextlib.suppress(OSError), open(log_path, encoding="utf-8", errors="replace") as f:
            tail = "\n".join(f.read().splitlines()[-15:])
        why = payload if not ok else f"exit {proc.exitcode}"
        raise StepFailed(f"{name} failed ({why}); log {log_path}:\n{tail}")
    print(f"[replicate] {name} done in {time.perf_counter() - start:.0f}s", flush=True)
    return payload


def train_run(name: str, argv: list[str], ckpt: str, logs: str, resume: bool) -> dict[str, Any]:
    """Train (or, with ``resume``, reuse a finished run); returns its summary."""
    done = os.path.join(ckpt, "train_summary.json")
    if resume and os.path.isfile(done):
        print(f"[replicate] {name}: reusing {ckpt}", flush=True)
        return _read_json(done)
    shutil.rmtree(ckpt, ignore_errors=True)
    summary = train_step(name, argv + ["--save", ckpt], os.path.join(logs, f"{name}.log"))
    _write_json(done, summary)
    return summary


def base_dir(out: str, base_seed: int) -> str:
    """Checkpoint directory of the base pretrained with ``base_seed``."""
    return os.path.join(out, "ckpt", f"base_seed{base_seed}")


def train_base(
    s: Settings, base_seed: int, paths: dict, out: str, logs: str, resume: bool
) -> dict[str, Any]:
    """Pretrain at S0 with contiguous positions and no RoPE scaling; returns its summary."""
    argv = _train_flags(s, paths, s.s0, paths["passkey_s0"], base_seed) + [
        "--max-position-embeddings", str(s.s0), "--position-mode", "contiguous",
        "--train-iters", str(s.base_iters), "--lr", str(s.base_lr), "--min-lr", str(s.base_min_lr),
        "--lr-decay-style", "cosine", "--lr-warmup-iters", str(min(50, s.base_iters // 4)),
    ]  # fmt: skip
    name = f"base_seed{base_seed}"
    return train_run(name, argv, base_dir(out, base_seed), logs, resume)


def run_name(method: str, base_seed: int, seed: int | None = None) -> str:
    """``METHOD_base<b>`` (evaluation-only methods) or ``METHOD_base<b>_seed<s>``."""
    return f"{method}_base{base_seed}" + ("" if seed is None else f"_seed{seed}")


def extend(
    s: Settings, m: Method, base_seed: int, seed: int, paths: dict, out: str, logs: str,
    resume: bool,
) -> dict[str, Any]:  # fmt: skip
    """Fine-tune base ``base_seed`` with method ``m`` at the same token budget; its summary."""
    seq = s.length if m.full_length else s.s0
    passkey = paths["passkey_l"] if m.full_length else paths["passkey_s0"]
    flags = list(m.flags)
    if "tail" in flags:  # the question + key: the terminal segment of every passkey sample
        flags += ["--endprompt-tail-length", str(paths["tail_tokens"])]
    argv = _train_flags(s, paths, seq, passkey, seed) + flags + [
        "--max-position-embeddings", str(s.length), "--target-length", str(s.length),
        *rope_flags(s, s.rope_scaling),
        "--load", base_dir(out, base_seed), "--finetune",
        "--train-iters", str(s.extend_iters), "--lr", str(s.extend_lr),
        # megatron-core's schedule needs warm-up shorter than the decay (--train-iters here)
        "--lr-warmup-iters", str(max(0, min(s.warmup_iters, s.extend_iters - 1))),
        "--lr-decay-style", "constant",
    ]  # fmt: skip
    run = run_name(m.name, base_seed, seed)
    return train_run(run, argv, os.path.join(out, "ckpt", run), logs, resume)


def evaluate(
    s: Settings, paths: dict, ckpt: str, name: str, out: str, logs: str, resume: bool,
    scaling: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Passkey and perplexity by position at 1x..8x S0; returns the library's report.json."""
    report_dir = os.path.join(out, "eval", name)
    report = os.path.join(report_dir, "report.json")
    if not (resume and os.path.isfile(report)):
        shutil.rmtree(report_dir, ignore_errors=True)
        cmd = _tool("evaluate.py") + [
            "--load", ckpt, *TOKENIZER, "--tokenizer-model", paths["tokenizer"],
            "--tasks", "passkey,perplexity",
            "--lengths", ",".join(map(str, s.eval_lengths)),
            "--depths", ",".join(f"{d:g}" for d in s.eval_depths),
            "--trials", str(s.eval_trials), "--seed", str(s.eval_seed),
            "--passkey-digits", str(s.digits), "--passkey-answer-in-length",
            "--ppl-data", paths["corpus"], "--ppl-from-end", "--ppl-length", str(s.length),
            "--ppl-max-windows", str(s.ppl_windows), "--max-position-embeddings", str(s.length),
            "--device", "cpu", "--no-progress", "--output", report_dir, "--name", name,
        ]  # fmt: skip
        if scaling:
            cmd += rope_flags(s, scaling)
        run_step(f"evaluate {name}", cmd, os.path.join(logs, f"eval_{name}.log"))
    from megatron_endprompt.eval.summary import read_report

    return read_report(report_dir)


# ------------------------------------------------------------------------------- results


def _by_length(report: dict, metric: str) -> dict[int, float]:
    passkey = report["results"]["passkey"]
    return {int(k): float(v) for k, v in passkey[f"mean_{metric}_by_length"].items()}


def _interval_by_length(report: dict, metric: str) -> dict[int, list[float]] | None:
    """The report's bootstrap interval per length (None: the report has none)."""
    got = report["results"]["passkey"].get(f"{metric}_interval_by_length")
    return {int(k): [float(v[0]), float(v[1])] for k, v in got.items()} if got else None


def _mean(xs: list) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def _sd(xs: list[float]) -> float | None:
    """Sample standard deviation (None for fewer than two values)."""
    if len(xs) < 2:
        return None
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def row_for(
    name: str, description: str, reports: list[dict], summaries: list[dict | None]
) -> dict[str, Any]:
    """One method's numbers on one base: means and standard deviations over its extension
    seeds, each seed's values, and (one seed) the evaluation's bootstrap interval."""
    exact = [_by_length(r, "exact_match") for r in reports]
    digits = [_by_length(r, "token_accuracy") for r in reports]
    lengths = sorted(exact[0])
    ppl = [r["results"]["perplexity"] for r in reports]
    trained = [x for x in summaries if x]
    return {
        "method": name,
        "description": description,
        "seeds": len(reports),
        "exact_match": {n: _mean([e[n] for e in exact]) for n in lengths},
        "exact_match_sd": {n: _sd([e[n] for e in exact]) for n in lengths},
        "exact_match_per_seed": [{n: e[n] for n in lengths} for e in exact],
        "exact_match_interval": _interval_by_length(reports[0], "exact_match")
        if len(reports) == 1 else None,
        "digit_accuracy": {n: _mean([d[n] for d in digits]) for n in lengths},
        "digit_accuracy_sd": {n: _sd([d[n] for d in digits]) for n in lengths},
        "bucket_edges": ppl[0]["bucket_edges"],
        "perplexity": [
            _mean([p["perplexity"][i] for p in ppl]) for i in range(len(ppl[0]["perplexity"]))
        ],
        "tokens_per_s": _mean([x["tokens_per_s"] for x in trained]) if trained else None,
        "peak_memory_gib": _mean([x["peak_memory_gib"] for x in trained]) if trained else None,
        "final_loss": _mean([x["final_loss"] for x in trained]) if trained else None,
    }  # fmt: skip


def _fmt(x: Any, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _cell(row: dict, metric: str, n: int) -> str:
    """``mean ± sd`` over seeds, ``value [lo, hi]`` for one seed with an interval, else value."""
    value, sd = row[metric][n], row.get(f"{metric}_sd", {}).get(n)
    if sd is not None:
        return f"{_fmt(value)} ± {_fmt(sd)}"
    interval = row.get(f"{metric}_interval")
    if interval and n in interval:
        return f"{_fmt(value)} [{_fmt(interval[n][0])}, {_fmt(interval[n][1])}]"
    return _fmt(value)


def long_mean(s: Settings, exact: dict[int, float]) -> float:
    """Mean exact match over the lengths beyond S0 (2x .. L)."""
    longer = [n for n in s.eval_lengths if n > s.s0]
    return sum(exact[n] for n in longer) / len(longer)


def base_at_bar(s: Settings, base_row: dict) -> bool:
    """Whether a base's passkey exact match at S0 reaches ``s.base_bar`` (then it is extended)."""
    return bool(base_row["exact_match"][s.s0] >= s.base_bar)


def bars(s: Settings, rows: list[dict]) -> list[dict[str, Any]]:
    """REPLICATION_NOTES' bars, checked on the first base: a base at >= 95% passkey exact match
    at S0 and a full-length control at >= 80% at L. Without both the table ranks nothing."""
    by = {r["method"]: r for r in rows}
    out = [{"bar": f"base passkey exact match at S0 = {s.s0}", "threshold": 0.95,
            "value": by["base"]["exact_match"][s.s0]}]  # fmt: skip
    if "full_length" in by:
        value = by["full_length"]["exact_match"][s.length]
        out.append({"bar": f"full_length passkey exact match at L = {s.length}",
                    "threshold": 0.80, "value": value})  # fmt: skip
    for b in out:
        b["met"] = bool(b["value"] >= b["threshold"])
    return out


def markdown(
    s: Settings, rows: list[dict], base_rows: dict[int, list[dict]], bases: dict[int, dict],
    first: int, elapsed: float,
) -> str:  # fmt: skip
    """The report: settings, the bars, the table (base ``first``, the first at the S0 bar), the
    base-to-base table and how to read them. ``base_rows``: every further base at the bar's
    rows (first extension seed); ``bases``: every base's summary (``at_bar`` among them)."""
    from megatron_endprompt.eval.report import format_table

    lengths = sorted(rows[0]["exact_match"])
    edges = rows[0]["bucket_edges"]
    head = ["method", "seeds"] + [f"passkey@{n}" for n in lengths]
    head += [f"digit acc@{n}" for n in lengths]
    head += [f"ppl[{a},{b})" for a, b in zip(edges, edges[1:])]
    head += ["train tok/s", "peak mem GiB", "final loss"]
    table = []
    for r in rows:
        cells = [r["method"], str(r["seeds"])]
        cells += [_cell(r, "exact_match", n) for n in lengths]
        cells += [_cell(r, "digit_accuracy", n) for n in lengths]
        cells += [_fmt(p, 1) for p in r["perplexity"]]
        cells += [_fmt(r["tokens_per_s"], 0), _fmt(r["peak_memory_gib"]), _fmt(r["final_loss"], 3)]
        table.append(cells)
    checks = bars(s, rows)
    bar_lines = [f"- Bases (passkey exact match at S0 = {s.s0}, --base-bar {s.base_bar:g}): "
                 + "; ".join(f"seed {b} {x['exact_match_at_s0']:.2f} "
                             f"({'extended' if x['at_bar'] else 'below the bar, not extended'})"
                             for b, x in bases.items())]  # fmt: skip
    bar_lines += [f"- {'MET' if b['met'] else 'NOT MET'}: {b['bar']} = {b['value']:.2f} "
                 f"(bar {b['threshold']:.2f})" for b in checks]  # fmt: skip
    if not all(b["met"] for b in checks):
        bar_lines.append("- The bars are not met: these numbers do not rank the methods.")
    variance = ""
    if base_rows:
        seed = s.seeds[0]
        vhead = ["method"] + [f"base {b}: passkey@{s.length}" for b in [first, *base_rows]]
        vhead += [f"base {b}: mean 2x-{s.factor}x" for b in [first, *base_rows]]
        vrows = []
        for r in rows:
            others = [next((x for x in base_rows[b] if x["method"] == r["method"]), None)
                      for b in base_rows]  # fmt: skip
            per_base = [_first_seed(r)] + [_first_seed(x) if x else None for x in others]
            cells = [r["method"]]
            cells += [_fmt(e[s.length]) if e else "-" for e in per_base]
            cells += [_fmt(long_mean(s, e)) if e else "-" for e in per_base]
            vrows.append(cells)
        variance = (
            f"Base-to-base variance: every method from each base, extension seed {seed} (the "
            "main table's seed spread is the extension-to-extension variance).\n\n"
            + format_table(vrows, vhead)
        )
    methods = "\n".join(f"- `{r['method']}`: {r['description']}" for r in rows)
    budget = s.extend_iters * s.tokens_per_iter
    base = bases[first]
    setup = [
        f"- Model: {s.num_layers} layers, hidden {s.hidden_size}, {s.num_attention_heads} heads, "
        f"SwiGLU {s.ffn_hidden_size}, RMSNorm, RoPE base {s.rotary_base:g}, SentencePiece "
        f"vocabulary {s.vocab_size}.",
        f"- Base: {s.base_iters} iterations x {s.tokens_per_iter} tokens at S0 = {s.s0}, "
        f"contiguous positions, no RoPE scaling, base seeds {s.base_seeds} (seed {first}: final "
        f"loss {_fmt(base['final_loss'], 3)}, {_fmt(base['tokens_per_s'], 0)} tokens/s).",
        f"- Extension: from the base with {s.rope_scaling} RoPE scaling x{s.factor}, lr "
        f"{s.extend_lr:g} constant ({s.warmup_iters} warm-up iterations), the same budget for "
        f"every method: {s.extend_iters} iterations x {s.tokens_per_iter} tokens = {budget} "
        f"tokens; extension seeds {s.seeds} on base {first}.",
        f"- Data: {s.corpus_weight:g} standard library / {1 - s.corpus_weight:g} passkey "
        f"documents of {s.s0} tokens ({s.length} for full_length), episodes of at least "
        f"{s.min_episode_tokens} tokens drawn from each document's end, the rest a filler "
        "lead-in (prep/passkey_corpus.make_passkey_window).",
        f"- Evaluation: {s.digits}-digit pass keys (first digit never 0), exact match (greedy) "
        f"and digit accuracy (teacher-forced) at depths {s.eval_depths} x {s.eval_trials} "
        f"trials per length (prompt + answer = the length), seed {s.eval_seed}; perplexity by "
        f"position on {s.ppl_windows} "
        f"held-out standard-library windows of {s.length} tokens. base, pi_only and "
        f"scaling_only evaluate the base checkpoint without scaling / with linear PI "
        f"x{s.factor} / with {s.rope_scaling} x{s.factor}.",
        "- Cells: mean ± standard deviation over the extension seeds; a single run shows its "
        "95% bootstrap interval over trials (stratified by depth). replicate.json holds every "
        f"seed. Wall time of this invocation {elapsed / 60:.1f} min (--resume reuses finished "
        "steps).",
    ]
    title = f"# Small-scale replication: extending S0 = {s.s0} to L = {s.length} (x{s.factor})"
    memory = ("Train tok/s is each run's own average; the runs ran one after another on a "
              "shared machine, so the column is not a side-by-side comparison "
              "(benchmarks/bench_train.py measures EndPrompt against full-length training side "
              "by side). Peak memory is the training process's peak RSS on CPU (interpreter "
              "and libraries included), the allocator's peak on CUDA. Every method processes "
              f"{s.tokens_per_micro_batch} tokens per micro-batch, so memory differs only by the "
              "attention over the longer sequence.\n")  # fmt: skip
    parts = [title, "\n".join(setup), "## Bars\n\n" + "\n".join(bar_lines),
             f"## Methods from base {first}\n\n" + format_table(table, head)]  # fmt: skip
    if variance:
        parts.append("## " + variance)
    parts += [methods, memory]
    return "\n\n".join(parts)


def _first_seed(row: dict) -> dict[int, float]:
    """Exact match by length of a row's first extension seed (the base-to-base comparison)."""
    return row["exact_match_per_seed"][0]


def plot(rows: list[dict], path_passkey: str, path_ppl: str) -> list[str]:
    """Passkey exact match / digit accuracy vs length, and perplexity by position, as PNGs
    (the library's plots: error bars are the seeds' standard deviation)."""
    from megatron_endprompt.eval.report import plot_accuracy_by_length, plot_perplexity_by_position
    from megatron_endprompt.eval.summary import perplexity_result

    series = {
        title: {
            r["method"]: {n: (r[metric][n], r[f"{metric}_sd"].get(n)) for n in r[metric]}
            for r in rows
        }
        for metric, title in (("exact_match", "passkey exact match (greedy)"),
                              ("digit_accuracy", "digit accuracy (teacher-forced)"))
    }  # fmt: skip
    plot_accuracy_by_length(series, path_passkey)
    ppl = {}
    for r in rows:
        edges = r["bucket_edges"]
        ppl[r["method"]] = perplexity_result({
            "length": edges[-1], "bucket_edges": edges, "num_windows": 0,
            "mean_loss": [math.log(p) for p in r["perplexity"]], "perplexity": r["perplexity"],
            "token_count": [0] * len(r["perplexity"]), "overall_mean_loss": float("nan"),
        })  # fmt: skip
    plot_perplexity_by_position(ppl, path_ppl)
    return [path_passkey, path_ppl]


def result_lines(s: Settings, rows: list[dict], bases: dict[int, dict]) -> list[str]:
    """The RESULT lines (one per headline figure); ``rows``: the first base at the bar."""
    by = {r["method"]: r for r in rows}
    out = [f"RESULT bases_trained {len(bases)}",
           f"RESULT bases_at_bar {sum(1 for x in bases.values() if x['at_bar'])}",
           f"RESULT base_passkey_exact_at_s0 {by['base']['exact_match'][s.s0]:.4f}"]  # fmt: skip
    for b in bars(s, rows):
        key = "base_bar_met" if b["bar"].startswith("base") else "full_length_bar_met"
        out.append(f"RESULT {key} {int(b['met'])}")
    for r in rows:
        if r["method"] == "base":
            continue
        mean_long = long_mean(s, r["exact_match"])
        out.append(f"RESULT {r['method']}_passkey_exact_mean_2x_to_{s.factor}x {mean_long:.4f}")
        out.append(f"RESULT {r['method']}_passkey_exact_at_L {r['exact_match'][s.length]:.4f}")
    full = by.get("full_length")
    for name in ("endprompt_tail_fixed", "endprompt_cue_fixed"):
        # Peak memory only: the runs' tokens/s come from different times on a shared machine
        # (bench_train.py measures the throughput ratio side by side).
        if full and name in by and full["peak_memory_gib"] and by[name]["peak_memory_gib"]:
            mem = by[name]["peak_memory_gib"] / full["peak_memory_gib"]
            out.append(f"RESULT {name}_vs_full_length_peak_memory_ratio {mem:.3f}")
            break
    return out


def _write(path: str, text: str) -> None:
    """Write ``text`` atomically: a marker or report is complete or absent, never half-written."""
    from megatron_endprompt.atomic_io import atomic_write_text

    atomic_write_text(path, text)


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _write_json(path: str, payload: Any) -> None:
    _write(path, json.dumps(payload, indent=2) + "\n")


def _check_resume(s: Settings, settings_path: str, out: str) -> None:
    """More seeds, methods or bases reuse what is done; any other change would mix settings."""
    before = _read_json(settings_path)
    settings = dataclasses.asdict(s)
    changed = sorted(k for k in set(before) | set(settings)
                     if k not in RESUMABLE and before.get(k) != settings.get(k))  # fmt: skip
    if changed:
        raise ValueError(
            f"--resume: {out} was made with other settings ({', '.join(changed)}; see "
            f"{settings_path})"
        )


def base_rows_for(
    s: Settings, base_seed: int, seeds: list[int], paths: dict, out: str, logs: str,
    resume: bool,
) -> tuple[dict[str, Any], list[dict]]:  # fmt: skip
    """Train and evaluate base ``base_seed``, and, when it is at ``s.base_bar``, every method
    from it with ``seeds``; returns ``(the base's training summary with its exact match at S0
    and whether it is at the bar, one row per method, the base first)``."""
    summary = dict(train_base(s, base_seed, paths, out, logs, resume))
    ckpt = base_dir(out, base_seed)
    report = evaluate(s, paths, ckpt, run_name("base", base_seed), out, logs, resume)
    rows = [row_for("base", "the S0 model, no scaling (extrapolates past S0)", [report], [None])]
    summary["seed"] = base_seed
    summary["exact_match_at_s0"] = rows[0]["exact_match"][s.s0]
    summary["at_bar"] = base_at_bar(s, rows[0])
    if not summary["at_bar"]:
        print(f"[replicate] base seed {base_seed}: passkey exact match at S0 "
              f"{summary['exact_match_at_s0']:.2f} < --base-bar {s.base_bar:g}: reported, not "
              "extended", flush=True)  # fmt: skip
        return summary, rows
    for m in (x for x in METHODS if x.name in s.methods):
        reports, summaries = [], []
        if not m.trains:
            name = run_name(m.name, base_seed)
            scaling = m.scaling or s.rope_scaling
            reports.append(evaluate(s, paths, ckpt, name, out, logs, resume, scaling))
            summaries.append(None)
        for seed in seeds if m.trains else ():
            summaries.append(extend(s, m, base_seed, seed, paths, out, logs, resume))
            run = run_name(m.name, base_seed, seed)
            reports.append(evaluate(s, paths, os.path.join(out, "ckpt", run), run, out, logs,
                                    resume))  # fmt: skip
        rows.append(row_for(m.name, m.description, reports, summaries))
    return summary, rows


def replicate(s: Settings, out: str, resume: bool) -> list[str]:
    """Run every step; returns the RESULT lines."""
    start = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    settings_path = os.path.join(out, "settings.json")
    if resume and os.path.isfile(settings_path):
        _check_resume(s, settings_path, out)
    _write_json(settings_path, dataclasses.asdict(s))
    logs = os.path.join(out, "logs")
    os.makedirs(logs, exist_ok=True)
    paths = prepare_data(s, out, logs, resume)
    bases, rows, base_rows, first = {}, None, {}, None
    for b in s.base_seeds:  # every extension seed on the first base at the bar, one on the rest
        seeds = s.seeds if first is None else s.seeds[:1]
        bases[b], got = base_rows_for(s, b, seeds, paths, out, logs, resume)
        if not bases[b]["at_bar"]:
            continue
        if first is None:
            first, rows = b, got
        else:
            base_rows[b] = got
    if first is None:
        values = ", ".join(f"seed {b}: {x['exact_match_at_s0']:.2f}" for b, x in bases.items())
        raise ValueError(
            f"no base reached --base-bar {s.base_bar:g} passkey exact match at S0 = {s.s0} "
            f"({values}); nothing was extended (train longer: --base-iters, or more --base-seeds)"
        )
    others = list(base_rows)
    elapsed = time.perf_counter() - start
    md = markdown(s, rows, base_rows, bases, first, elapsed)
    _write(os.path.join(out, "replicate.md"), md)
    payload = {"settings": dataclasses.asdict(s), "base_seed": first,
               "base_train": bases[first], "rows": rows, "bars": bars(s, rows),
               "bases": {str(b): x for b, x in bases.items()},
               "other_bases": {str(b): {"base_train": bases[b], "rows": base_rows[b]}
                               for b in others},
               "tail_tokens": paths["tail_tokens"], "elapsed_s": elapsed}  # fmt: skip
    _write_json(os.path.join(out, "replicate.json"), payload)
    pngs = plot(rows, os.path.join(out, "replicate_passkey.png"),
                os.path.join(out, "replicate_perplexity.png"))  # fmt: skip
    print(md)
    print("wrote " + ", ".join([os.path.join(out, "replicate.md"),
                                os.path.join(out, "replicate.json"), *pngs]))  # fmt: skip
    return result_lines(s, rows, bases)


SETTING_FLAGS = (
    "s0", "factor", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
    "rotary_base", "rope_scaling", "tokens_per_iter", "base_iters", "base_lr", "base_min_lr",
    "extend_iters",
    "extend_lr", "eval_trials", "ppl_windows", "corpus_weight", "base_bar",
)  # fmt: skip
"""Settings with a flag of their own (``--base-iters`` for ``base_iters``)."""


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--output", default=os.path.join(ROOT, "outputs", "replicate_small"))
    p.add_argument("--quick", action="store_true", help="Tiny sizes (a smoke run, for tests).")
    p.add_argument("--resume", action="store_true", help="Reuse finished steps in --output.")
    p.add_argument("--seeds", help="Extension seeds, comma-separated (default 1,2,3).")
    p.add_argument(
        "--base-seeds",
        help="Base seeds, comma-separated (default 1,2,3): the first base at --base-bar gets "
        "every extension seed, the others at the bar the first one (base-to-base variance); a "
        "base below the bar is reported, not extended.",
    )
    p.add_argument("--methods", help=f"Comma-separated subset of {','.join(METHOD_NAMES)}.")
    defaults = Settings()
    for name in SETTING_FLAGS:
        value = getattr(defaults, name)
        p.add_argument(f"--{name.replace('_', '-')}", type=type(value),
                       help=f"Setting {name} (default {value}; --quick has its own).")  # fmt: skip
    return p


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings: defaults, then --quick, then explicit flags."""
    s = Settings(**(QUICK if args.quick else {}))
    if args.seeds:
        s.seeds = parse_csv(args.seeds, "--seeds", int)
    if args.base_seeds:
        s.base_seeds = parse_csv(args.base_seeds, "--base-seeds", int)
    if args.methods:
        s.methods = parse_csv(args.methods, "--methods", str)
    for name in SETTING_FLAGS:
        if getattr(args, name) is not None:
            setattr(s, name, getattr(args, name))
    check_settings(s)
    return s


def main(argv: list[str] | None = None) -> int:
    """Run the replication; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        s = settings_from_args(args)
        lines = replicate(s, os.path.abspath(args.output), args.resume)
    except (ValueError, FileNotFoundError, StepFailed) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted (rerun with --resume to continue)", file=sys.stderr)
        return 130
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
