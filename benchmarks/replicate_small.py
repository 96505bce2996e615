"""The paper's comparison at CPU scale: one short-context base, seven ways to extend it 8x.

A small Llama-style model (4 layers, hidden 128, 2 heads of 64) is pretrained at S0 = 128 on the
embedded corpus (the Python standard library's source, SentencePiece tokenizer trained on it)
blended with passkey episodes, so that retrieval is learnable. It is then extended to
L = 8 x S0 = 1024 with YaRN x8 and the SAME token budget (iterations x tokens per iteration) by:

    pi_only                no training, linear PI x8 at evaluation (the issue's "PI only")
    scaling_only           no training, the extension's scaling (YaRN x8) at evaluation
    full_length            contiguous positions at physical length L (the positive control)
    pose                   PoSE, 2 chunks, physical S0
    endprompt_cue_fixed    EndPrompt, appended cue at the end of the window
    endprompt_cue_random   EndPrompt, appended cue at a random terminal position
    endprompt_tail_fixed   EndPrompt, the sample's own last tokens (question + key) as terminal
    endprompt_pose         PoSE chunks + the tail terminal at the end of the window

Why YaRN and not linear PI (measured while choosing the settings, REPLICATION_NOTES item 6):
linear PI x8 compresses the high-frequency RoPE dimensions this small model copies with; after
800K tokens of full-length fine-tuning under PI the key's first digit was retrieved 30% of the
time at L and even the short-range copy inside the needle had collapsed to 10%, so the positive
control failed. Under YaRN x8 (high frequencies kept) the same run retrieved it 97% of the time.

Every model (the base without scaling too) is evaluated at 1x, 2x, 4x and 8x S0: passkey exact
match (greedy) and teacher-forced digit accuracy over a length x depth grid, and perplexity by
position on held-out standard-library text. Training tokens/s and peak memory come from each
run's TrainResult (one process per run: its peak memory is its own). The markdown table, JSON
(settings, seeds, every number) and PNG plots are written to --output; the numbers are whatever
comes out (no method is tuned).

Data, matching the methods (REPLICATION_NOTES items 3 and 4):
    S0-token passkey documents, each holding complete episodes of random lengths (a needle at a
    random depth, then the question and key): samples are whole documents, so the tail terminal
    is exactly the last episode's question + key and its needle is in the kept head; PoSE chunks
    keep needle and question; cue terminals replace the last question + key (earlier complete
    episodes still teach retrieval). full_length trains on L-token documents built the same way.

    python benchmarks/replicate_small.py                  # ~30 minutes on 2 CPU cores
    python benchmarks/replicate_small.py --seeds 1,2      # two extension seeds per method
    python benchmarks/replicate_small.py --quick          # about a minute: the tests run this
    python benchmarks/replicate_small.py --resume         # reuse finished steps in --output

Ends with RESULT lines: base passkey at S0, each method's mean passkey exact match over 2x-8x
and at 8x, and the EndPrompt / full-length training tokens/s and peak memory ratios.
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
    Method("full_length", "contiguous positions at physical length L",
           ("--position-mode", "contiguous"), full_length=True),
    Method("pose", "PoSE, 2 chunks", ("--position-mode", "pose", "--pose-num-chunks", "2")),
    Method("endprompt_cue_fixed", "EndPrompt, appended cue ending at L-1",
           ("--position-mode", "endprompt", "--endprompt-terminal", "cue",
            "--endprompt-placement", "fixed")),
    Method("endprompt_cue_random", "EndPrompt, appended cue at a random terminal position",
           ("--position-mode", "endprompt", "--endprompt-terminal", "cue",
            "--endprompt-placement", "random")),
    Method("endprompt_tail_fixed", "EndPrompt, own last tokens (question + key) ending at L-1",
           ("--position-mode", "endprompt", "--endprompt-terminal", "tail",
            "--endprompt-placement", "fixed")),
    Method("endprompt_pose", "PoSE chunks + tail terminal ending at L-1",
           ("--position-mode", "endprompt_pose", "--pose-num-chunks", "2",
            "--endprompt-terminal", "tail", "--endprompt-placement", "fixed")),
)  # fmt: skip
METHOD_NAMES = tuple(m.name for m in METHODS)
RESUMABLE = ("seeds", "methods")
"""Settings that --resume may change: finished runs of other seeds and methods stay valid."""


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
    tokens_per_micro_batch: int = 1024
    base_iters: int = 3000
    base_lr: float = 2e-3
    base_min_lr: float = 2e-4
    extend_iters: int = 200
    extend_lr: float = 5e-4
    warmup_iters: int = 10
    base_seed: int = 1
    seeds: list[int] = field(default_factory=lambda: [1])
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
)  # fmt: skip


def check_settings(s: Settings) -> None:
    """Raise ValueError naming the flag when the settings cannot run."""
    for name in s.methods:
        if name not in METHOD_NAMES:
            raise ValueError(f"--methods: unknown method {name!r} (choose from {METHOD_NAMES})")
    if not s.methods:
        raise ValueError("--methods must name at least one method")
    if not s.seeds or any(x < 0 for x in s.seeds) or len(set(s.seeds)) != len(s.seeds):
        raise ValueError(f"--seeds must be distinct integers >= 0, got {s.seeds}")
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
        text = run_step(f"passkey corpus ({doc_tokens}-token documents)", _tool(
            "make_passkey_corpus.py") + [
            "--output-prefix", paths[key][: -len("_text_document")], *tok,
            "--num-docs", str(num_docs), "--doc-tokens", str(doc_tokens),
            "--min-episode-tokens", str(s.min_episode_tokens), "--seed", str(seed),
            "--digits", str(s.digits)],
            os.path.join(logs, f"{key}.log"))  # fmt: skip
    # Both corpora print the same tail length (it depends on the tokenizer and digits only).
    paths["tail_tokens"] = int(text.rsplit("--endprompt-tail-length) = ", 1)[1].split()[0])
    _write_json(done, paths)
    return paths


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
    (dropout 0), AdamW beta2 0.95 and one data-loader worker."""
    return [
        "--device", "cpu", "--model-preset", "tiny", *_model_flags(s),
        *TOKENIZER, "--tokenizer-model", paths["tokenizer"],
        "--data-path", str(s.corpus_weight), paths["corpus"], str(1 - s.corpus_weight), passkey,
        "--split", "98,2,0", "--data-cache-path", os.path.join(os.path.dirname(paths["corpus"]),
                                                            "cache"),
        "--seq-length", str(seq), "--micro-batch-size", str(s.tokens_per_micro_batch // seq),
        "--global-batch-size", str(s.tokens_per_iter // seq), "--eval-iters", "0",
        "--seed", str(seed), "--log-interval", "20", "--adam-beta2", "0.95", "--num-workers", "1",
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


def train_base(s: Settings, paths: dict, out: str, logs: str, resume: bool) -> dict[str, Any]:
    """Pretrain at S0 with contiguous positions and no RoPE scaling."""
    argv = _train_flags(s, paths, s.s0, paths["passkey_s0"], s.base_seed) + [
        "--max-position-embeddings", str(s.s0), "--position-mode", "contiguous",
        "--train-iters", str(s.base_iters), "--lr", str(s.base_lr), "--min-lr", str(s.base_min_lr),
        "--lr-decay-style", "cosine", "--lr-warmup-iters", str(min(50, s.base_iters // 4)),
    ]  # fmt: skip
    return train_run("base", argv, os.path.join(out, "ckpt", "base"), logs, resume)


def extend(
    s: Settings, m: Method, seed: int, paths: dict, out: str, logs: str, resume: bool
) -> dict[str, Any]:
    """Fine-tune the base with method ``m`` at the same token budget; returns its summary."""
    seq = s.length if m.full_length else s.s0
    passkey = paths["passkey_l"] if m.full_length else paths["passkey_s0"]
    flags = list(m.flags)
    if "tail" in flags:  # the question + key: the terminal segment of every passkey sample
        flags += ["--endprompt-tail-length", str(paths["tail_tokens"])]
    argv = _train_flags(s, paths, seq, passkey, seed) + flags + [
        "--max-position-embeddings", str(s.length), "--target-length", str(s.length),
        *rope_flags(s, s.rope_scaling),
        "--load", os.path.join(out, "ckpt", "base"), "--finetune",
        "--train-iters", str(s.extend_iters), "--lr", str(s.extend_lr),
        # megatron-core's schedule needs warm-up shorter than the decay (--train-iters here)
        "--lr-warmup-iters", str(max(0, min(s.warmup_iters, s.extend_iters - 1))),
        "--lr-decay-style", "constant",
    ]  # fmt: skip
    run = f"{m.name}_seed{seed}"
    return train_run(run, argv, os.path.join(out, "ckpt", run), logs, resume)


def evaluate(
    s: Settings, paths: dict, ckpt: str, name: str, out: str, logs: str, resume: bool,
    scaling: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Passkey and perplexity by position at 1x..8x S0; returns report.json's payload."""
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
            "--passkey-digits", str(s.digits),
            "--ppl-data", paths["corpus"], "--ppl-from-end", "--ppl-length", str(s.length),
            "--ppl-max-windows", str(s.ppl_windows), "--max-position-embeddings", str(s.length),
            "--device", "cpu", "--no-progress", "--output", report_dir, "--name", name,
        ]  # fmt: skip
        if scaling:
            cmd += rope_flags(s, scaling)
        run_step(f"evaluate {name}", cmd, os.path.join(logs, f"eval_{name}.log"))
    return _read_json(report)


# ------------------------------------------------------------------------------- results


def _by_length(report: dict, metric: str) -> dict[int, float]:
    passkey = report["results"]["passkey"]
    return {int(k): float(v) for k, v in passkey[f"mean_{metric}_by_length"].items()}


def row_for(
    name: str, description: str, reports: list[dict], summaries: list[dict | None]
) -> dict[str, Any]:
    """One method's numbers, averaged over its seeds (per-seed values kept)."""
    exact = [_by_length(r, "exact_match") for r in reports]
    digits = [_by_length(r, "token_accuracy") for r in reports]
    lengths = sorted(exact[0])
    ppl = [r["results"]["perplexity"] for r in reports]

    def mean(xs):
        xs = [x for x in xs if x is not None and not math.isnan(x)]
        return sum(xs) / len(xs) if xs else float("nan")

    trained = [x for x in summaries if x]
    return {
        "method": name,
        "description": description,
        "seeds": len(reports),
        "exact_match": {n: mean([e[n] for e in exact]) for n in lengths},
        "exact_match_per_seed": [{n: e[n] for n in lengths} for e in exact],
        "digit_accuracy": {n: mean([d[n] for d in digits]) for n in lengths},
        "bucket_edges": ppl[0]["bucket_edges"],
        "perplexity": [
            mean([p["perplexity"][i] for p in ppl]) for i in range(len(ppl[0]["perplexity"]))
        ],  # fmt: skip
        "tokens_per_s": mean([x["tokens_per_s"] for x in trained]) if trained else None,
        "peak_memory_gib": mean([x["peak_memory_gib"] for x in trained]) if trained else None,
        "final_loss": mean([x["final_loss"] for x in trained]) if trained else None,
    }


def _fmt(x: Any, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def markdown(s: Settings, rows: list[dict], base_summary: dict, elapsed: float) -> str:
    """The report: settings, the table and how to read it."""
    lengths = sorted(rows[0]["exact_match"])
    head = ["method", "seeds"] + [f"passkey@{n}" for n in lengths]
    head += [f"digit acc@{n}" for n in lengths]
    head += [f"ppl[{a},{b})" for a, b in zip(rows[0]["bucket_edges"], rows[0]["bucket_edges"][1:])]
    head += ["train tok/s", "peak mem GiB", "final loss"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], str(r["seeds"])]
        cells += [_fmt(r["exact_match"][n]) for n in lengths]
        cells += [_fmt(r["digit_accuracy"][n]) for n in lengths]
        cells += [_fmt(p, 1) for p in r["perplexity"]]
        cells += [_fmt(r["tokens_per_s"], 0), _fmt(r["peak_memory_gib"]), _fmt(r["final_loss"], 3)]
        lines.append("| " + " | ".join(cells) + " |")
    methods = "\n".join(f"- `{r['method']}`: {r['description']}" for r in rows)
    budget = s.extend_iters * s.tokens_per_iter
    setup = [
        f"- Model: {s.num_layers} layers, hidden {s.hidden_size}, {s.num_attention_heads} heads, "
        f"SwiGLU {s.ffn_hidden_size}, RMSNorm, RoPE base {s.rotary_base:g}, SentencePiece "
        f"vocabulary {s.vocab_size}.",
        f"- Base: {s.base_iters} iterations x {s.tokens_per_iter} tokens at S0 = {s.s0}, "
        f"contiguous positions, no RoPE scaling, seed {s.base_seed} (final loss "
        f"{_fmt(base_summary['final_loss'], 3)}, {_fmt(base_summary['tokens_per_s'], 0)} "
        "tokens/s).",
        f"- Extension: from the base with {s.rope_scaling} RoPE scaling x{s.factor}, lr "
        f"{s.extend_lr:g} constant "
        f"({s.warmup_iters} warm-up iterations), the same budget for every method: "
        f"{s.extend_iters} iterations x {s.tokens_per_iter} tokens = {budget} tokens; seeds "
        f"{s.seeds}.",
        f"- Data: {s.corpus_weight:g} standard library / {1 - s.corpus_weight:g} passkey "
        f"documents of {s.s0} tokens ({s.length} for full_length), episodes of at least "
        f"{s.min_episode_tokens} tokens.",
        f"- Evaluation: {s.digits}-digit pass keys (first digit never 0), exact match (greedy) "
        f"and digit accuracy (teacher-forced) at "
        f"depths {s.eval_depths} x {s.eval_trials} trials per length, seed {s.eval_seed}; "
        f"perplexity by position on {s.ppl_windows} held-out standard-library windows of "
        f"{s.length} tokens. base, pi_only and scaling_only evaluate the base checkpoint without "
        f"scaling / with linear PI x{s.factor} / with {s.rope_scaling} x{s.factor}.",
        f"- Values are means over the seeds (replicate.json holds each seed). Wall time "
        f"{elapsed / 60:.1f} min.",
    ]
    title = f"# Small-scale replication: extending S0 = {s.s0} to L = {s.length} (x{s.factor})"
    memory = ("Peak memory is the training process's peak RSS on CPU (interpreter and libraries "
              "included), the allocator's peak on CUDA. Every method processes "
              f"{s.tokens_per_micro_batch} tokens per micro-batch, so memory differs only by the "
              "attention over the longer sequence.\n")  # fmt: skip
    return "\n\n".join([title, "\n".join(setup), "\n".join(lines), methods, memory])


def plot(rows: list[dict], path_passkey: str, path_ppl: str) -> list[str]:
    """Passkey exact match / digit accuracy vs length, and perplexity by position, as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in rows:
        lengths = sorted(r["exact_match"])
        axes[0].plot(lengths, [r["exact_match"][n] for n in lengths], marker="o", label=r["method"])
        axes[1].plot(lengths, [r["digit_accuracy"][n] for n in lengths], marker="o")
    for ax, title in zip(axes, ("passkey exact match (greedy)", "digit accuracy (teacher-forced)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path_passkey, dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        edges = r["bucket_edges"]
        mids = [(a + b) / 2 for a, b in zip(edges, edges[1:])]
        ax.plot(mids, r["perplexity"], marker="o", label=r["method"])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("position (bucket middle)")
    ax.set_ylabel("perplexity")
    ax.set_title("perplexity by position, held-out text")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path_ppl, dpi=120)
    plt.close(fig)
    return [path_passkey, path_ppl]


def result_lines(s: Settings, rows: list[dict]) -> list[str]:
    """The RESULT lines (one per headline figure)."""
    by = {r["method"]: r for r in rows}
    longer = [n for n in s.eval_lengths if n > s.s0]
    out = [f"RESULT base_passkey_exact_at_s0 {by['base']['exact_match'][s.s0]:.4f}"]
    for r in rows:
        if r["method"] == "base":
            continue
        mean_long = sum(r["exact_match"][n] for n in longer) / len(longer)
        out.append(f"RESULT {r['method']}_passkey_exact_mean_2x_to_{s.factor}x {mean_long:.4f}")
        out.append(f"RESULT {r['method']}_passkey_exact_at_L {r['exact_match'][s.length]:.4f}")
    full = by.get("full_length")
    for name in ("endprompt_tail_fixed", "endprompt_cue_fixed"):
        if full and name in by and full["tokens_per_s"] and by[name]["tokens_per_s"]:
            tps = by[name]["tokens_per_s"] / full["tokens_per_s"]
            mem = by[name]["peak_memory_gib"] / full["peak_memory_gib"]
            out.append(f"RESULT {name}_vs_full_length_tokens_per_s_ratio {tps:.3f}")
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


def replicate(s: Settings, out: str, resume: bool) -> list[str]:
    """Run every step; returns the RESULT lines."""
    start = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    settings_path = os.path.join(out, "settings.json")
    settings = dataclasses.asdict(s)
    if resume and os.path.isfile(settings_path):
        before = _read_json(settings_path)
        # More seeds or methods reuse what is done; any other change would mix settings.
        changed = sorted(k for k in set(before) | set(settings)
                         if k not in RESUMABLE and before.get(k) != settings.get(k))  # fmt: skip
        if changed:
            raise ValueError(
                f"--resume: {out} was made with other settings ({', '.join(changed)}; see "
                f"{settings_path})"
            )
    _write_json(settings_path, settings)
    logs = os.path.join(out, "logs")
    os.makedirs(logs, exist_ok=True)
    paths = prepare_data(s, out, logs, resume)
    base = train_base(s, paths, out, logs, resume)
    base_ckpt = os.path.join(out, "ckpt", "base")
    base_report = evaluate(s, paths, base_ckpt, "base", out, logs, resume)
    rows = [
        row_for("base", "the S0 model, no scaling (extrapolates past S0)", [base_report], [None])
    ]
    for m in (x for x in METHODS if x.name in s.methods):
        reports, summaries = [], []
        if not m.trains:
            scaling = m.scaling or s.rope_scaling
            reports.append(evaluate(s, paths, base_ckpt, m.name, out, logs, resume, scaling))
            summaries.append(None)
        for seed in s.seeds if m.trains else ():
            summaries.append(extend(s, m, seed, paths, out, logs, resume))
            run = f"{m.name}_seed{seed}"
            ckpt = os.path.join(out, "ckpt", run)
            reports.append(evaluate(s, paths, ckpt, run, out, logs, resume))
        rows.append(row_for(m.name, m.description, reports, summaries))
    elapsed = time.perf_counter() - start
    md = markdown(s, rows, base, elapsed)
    _write(os.path.join(out, "replicate.md"), md)
    payload = {"settings": dataclasses.asdict(s), "base_train": base, "rows": rows,
               "tail_tokens": paths["tail_tokens"], "elapsed_s": elapsed}  # fmt: skip
    _write_json(os.path.join(out, "replicate.json"), payload)
    pngs = plot(rows, os.path.join(out, "replicate_passkey.png"),
                os.path.join(out, "replicate_perplexity.png"))  # fmt: skip
    print(md)
    print("wrote " + ", ".join([os.path.join(out, "replicate.md"),
                                os.path.join(out, "replicate.json"), *pngs]))  # fmt: skip
    return result_lines(s, rows)


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", default=os.path.join(ROOT, "outputs", "replicate_small"))
    p.add_argument("--quick", action="store_true", help="Tiny sizes (a smoke run, for tests).")
    p.add_argument("--resume", action="store_true", help="Reuse finished steps in --output.")
    p.add_argument("--seeds", help="Extension seeds, comma-separated (default 1).")
    p.add_argument("--methods", help=f"Comma-separated subset of {','.join(METHOD_NAMES)}.")
    p.add_argument("--base-iters", type=int, help="Base pretraining iterations.")
    p.add_argument("--extend-iters", type=int, help="Extension iterations (every method).")
    p.add_argument("--eval-trials", type=int, help="Passkey trials per (length, depth) cell.")
    return p


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings: defaults, then --quick, then explicit flags."""
    s = Settings(**(QUICK if args.quick else {}))
    if args.seeds:
        s.seeds = parse_csv(args.seeds, "--seeds", int)
    if args.methods:
        s.methods = parse_csv(args.methods, "--methods", str)
    for flag in ("base_iters", "extend_iters", "eval_trials"):
        if getattr(args, flag) is not None:
            setattr(s, flag, getattr(args, flag))
    check_settings(s)
    return s


def main(argv: list[str] | None = None) -> int:
    """Run the replication; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        s = settings_from_args(args)
        lines = replicate(s, os.path.abspath(args.output), args.resume)
    except (ValueError, StepFailed) as err:
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
