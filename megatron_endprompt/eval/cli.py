"""``tools/evaluate.py``: passkey, needle and perplexity-by-position on one model; ``compare``.

    python tools/evaluate.py --load ckpt/endprompt --tokenizer-type SentencePieceTokenizer \
        --tokenizer-model tok.model --tasks passkey,perplexity --lengths 256,512,1024,2048 \
        --ppl-data data/heldout_text_document --output eval/endprompt --name EndPrompt
    torchrun --nproc-per-node 2 tools/evaluate.py --load ckpt/endprompt ...   # TP = 2
    python tools/evaluate.py compare eval/base eval/pi_only eval/endprompt --output eval/all

``--load`` reads either checkpoint format (per-shard torch files, or dist_checkpointing from CUDA
training) at any saved TP/PP/VPP layout; under torchrun each process is one tensor-parallel rank
and rank 0 writes the reports (``eval/parallel.py``). An evaluation writes ``report.json`` /
``report.md`` (every number, plus the run description: checkpoint, RoPE scaling, seeds,
tokenizer), ``passkey_heatmap.png`` and ``perplexity_by_position.png`` into ``--output`` and
prints a summary table. Every accuracy and perplexity comes with a percentile-bootstrap interval
(``--interval-level``, ``--bootstrap-resamples``; 0 resamples turns them off), shown as
``mean [low, high]``. ``--no-progress`` replaces the progress bars with one plain stderr line per
step with an ETA (for logs). ``compare`` merges several report directories into ``compare.md``
(one row per model) and ``compare_perplexity.png``. Exit status: 0 on success, 2 on bad flags or
input (one ``error:`` line on stderr), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from megatron_endprompt.atomic_io import atomic_write_text
from megatron_endprompt.cli_utils import parse_csv
from megatron_endprompt.eval.intervals import (
    DEFAULT_LEVEL,
    DEFAULT_RESAMPLES,
    check_interval_options,
)

TASKS = ("passkey", "needle", "perplexity")


class UsageError(ValueError):
    """A bad command line; ``main`` prints it as one ``error:`` line and returns 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # noqa: D102 (argparse hook)
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    """The evaluation flags."""
    p = _Parser(prog="tools/evaluate.py", description="Long-context evaluation of one model.")
    p.add_argument("--load", help="Checkpoint directory (either format, any saved TP/PP).")
    p.add_argument("--iteration", type=int, help="Iteration to load (default: the tracker's).")
    p.add_argument("--hf-dir", help="Hugging Face model directory (instead of --load).")
    p.add_argument("--tokenizer-type", required=True, help="Megatron tokenizer type name.")
    p.add_argument("--tokenizer-model", help="SentencePiece .model or tokenizer.json / its dir.")
    p.add_argument("--tasks", default="passkey,needle,perplexity", help=f"Of {','.join(TASKS)}.")
    p.add_argument("--lengths", default="256,512,1024,2048", help="Prompt lengths (tokens).")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="Passkey needle depths.")
    p.add_argument("--trials", type=int, default=5, help="Trials per passkey cell / length.")
    p.add_argument("--passkey-digits", type=int, default=5, help="Digits of a passkey.")
    p.add_argument(
        "--passkey-answer-in-length",
        action="store_true",
        help="Each passkey length counts the answer too (the answer ends at position length-1; "
        "default: the prompt alone is that long, the answer follows it).",
    )
    p.add_argument("--needle-tasks", default="single,multikey,multivalue", help="Needle tasks.")
    p.add_argument("--ppl-data", help="Megatron .bin/.idx prefix of the perplexity corpus.")
    p.add_argument(
        "--ppl-from-end",
        action="store_true",
        help="Read --ppl-data from its last document backwards (held out by --split).",
    )
    p.add_argument("--ppl-jsonl", help="JSONL perplexity corpus (one document per line).")
    p.add_argument("--ppl-json-key", default="text", help="JSON key of --ppl-jsonl documents.")
    p.add_argument("--ppl-length", type=int, help="Perplexity context (default: max --lengths).")
    p.add_argument("--ppl-max-windows", type=int, default=16, help="Perplexity windows scored.")
    p.add_argument("--ppl-batch-size", type=int, default=1, help="Windows per forward pass.")
    p.add_argument("--rope-scaling-type", help="Override the RoPE scaling (e.g. linear: PI).")
    p.add_argument("--rope-scaling-factor", type=float, help="Factor of the override.")
    p.add_argument(
        "--rope-original-max-position-embeddings", type=int, help="yarn/llama3 override: L_orig."
    )
    p.add_argument("--max-position-embeddings", type=int, help="Override the context window.")
    p.add_argument("--seed", type=int, default=0, help="Evaluation seed (prompts, keys).")
    p.add_argument("--output", required=True, help="Report directory.")
    p.add_argument("--name", help="Model name in reports (default: the --output folder name).")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="Device.")
    p.add_argument(
        "--tensor-model-parallel-size", type=int, help="TP size (default: torchrun's processes)."
    )
    p.add_argument(
        "--interval-level",
        type=float,
        default=DEFAULT_LEVEL,
        help="Coverage of the bootstrap intervals, in (0, 1) (default 0.95).",
    )
    p.add_argument(
        "--bootstrap-resamples",
        type=int,
        default=DEFAULT_RESAMPLES,
        help="Bootstrap resamples of the intervals (default 2000; 0: no intervals).",
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="No progress bars: print one plain progress line with an ETA per step instead.",
    )
    return p


def _check_args(args: argparse.Namespace) -> None:
    """Cross-flag rules; fills the parsed lists onto ``args``."""
    if bool(args.load) == bool(args.hf_dir):
        raise UsageError("give exactly one of --load and --hf-dir")
    args.task_list = parse_csv(args.tasks, "--tasks", str)
    for task in args.task_list:
        if task not in TASKS:
            raise UsageError(f"--tasks {args.tasks!r}: {task!r} is not one of {', '.join(TASKS)}")
    args.length_list = parse_csv(args.lengths, "--lengths", int)
    args.depth_list = parse_csv(args.depths, "--depths", float)
    args.needle_list = parse_csv(args.needle_tasks, "--needle-tasks", str)
    if args.ppl_length is None:
        args.ppl_length = max(args.length_list)
    for name in ("trials", "passkey_digits", "ppl_max_windows", "ppl_batch_size", "ppl_length"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')}={getattr(args, name)}: must be >= 1")
    try:
        check_interval_options(
            args.interval_level, args.bootstrap_resamples,
            level_name="--interval-level", resamples_name="--bootstrap-resamples",
        )  # fmt: skip
    except ValueError as err:
        raise UsageError(str(err)) from err
    if min(args.length_list) < 1:
        raise UsageError(f"--lengths {args.lengths!r}: lengths must be >= 1")
    if "perplexity" in args.task_list and bool(args.ppl_data) == bool(args.ppl_jsonl):
        raise UsageError("--tasks perplexity needs exactly one of --ppl-data and --ppl-jsonl")
    if args.hf_dir and args.rope_scaling_type:
        raise UsageError("--rope-scaling-type applies to --load checkpoints only")
    if args.rope_scaling_factor is not None and not args.rope_scaling_type:
        raise UsageError("--rope-scaling-factor needs --rope-scaling-type")
    args.name = args.name or os.path.basename(os.path.normpath(args.output))


def _rope_override(args: argparse.Namespace):
    if not args.rope_scaling_type:
        return None
    from megatron_endprompt.config import RopeScalingConfig

    kwargs: dict[str, Any] = {"rope_type": args.rope_scaling_type}
    if args.rope_scaling_factor is not None:
        kwargs["factor"] = args.rope_scaling_factor
    if args.rope_original_max_position_embeddings is not None:
        kwargs["original_max_position_embeddings"] = args.rope_original_max_position_embeddings
    return RopeScalingConfig(**kwargs)


def load_model(args: argparse.Namespace, device: str) -> tuple[Any, int, int, dict[str, Any]]:
    """``(logits_fn, max position, vocabulary size, meta)`` of the --load / --hf-dir model."""
    from megatron_endprompt.eval import loading

    if args.load:
        model, config, meta = loading.load_megatron_model(
            args.load, args.iteration, device, _rope_override(args), args.max_position_embeddings
        )
        logits_fn = loading.megatron_logits_fn(model, device, config.vocab_size)
        return logits_fn, loading.max_position(config), config.vocab_size, meta
    model, meta = loading.load_hf_model(args.hf_dir, device)
    if args.max_position_embeddings is not None:
        meta["max_position_embeddings"] = args.max_position_embeddings
    return loading.hf_logits_fn(model), meta["max_position_embeddings"], meta["vocab_size"], meta


def _check_lengths(args: argparse.Namespace, max_pos: int | None) -> None:
    """Every evaluated length must fit the model's window (None: the model states none)."""
    if max_pos is None:
        return
    too_long = [n for n in args.length_list if n > max_pos]
    if too_long:
        raise UsageError(
            f"--lengths {too_long} exceed the model's max position {max_pos} "
            "(max_position_embeddings; override with --max-position-embeddings)"
        )
    if "perplexity" in args.task_list and args.ppl_length > max_pos:
        raise UsageError(
            f"--ppl-length {args.ppl_length} exceeds the model's max position {max_pos}"
        )


def check_prompts_fit(args: argparse.Namespace, tokenizer: Any) -> None:
    """Build one prompt per task at the shortest length, so a too-short one fails before compute."""
    from megatron_endprompt.eval.needle import make_needle_prompt
    from megatron_endprompt.eval.passkey import check_depths, make_passkey_prompt

    shortest = min(args.length_list)
    with _flag_errors("--depths"):
        check_depths(args.depth_list)
    if "passkey" in args.task_list:
        with _flag_errors("--lengths (passkey)"):
            make_passkey_prompt(
                tokenizer, shortest, 0.0, args.seed, 0, args.passkey_digits,
                args.passkey_answer_in_length,
            )  # fmt: skip
    for task in args.needle_list if "needle" in args.task_list else ():
        with _flag_errors(f"--lengths / --needle-tasks (needle {task})"):
            make_needle_prompt(tokenizer, task, shortest, args.seed, 0)


@contextlib.contextmanager
def _flag_errors(flags: str) -> Iterator[None]:
    """Re-raise an evaluation's ValueError as a UsageError naming the flags behind it."""
    try:
        yield
    except UsageError:
        raise
    except ValueError as err:
        raise UsageError(f"{flags}: {err}") from err


def run_tasks(args, logits_fn, tokenizer, max_pos, ppl_docs) -> dict[str, Any]:
    """Run the requested tasks; results keyed passkey / needle_<task> / perplexity."""
    from megatron_endprompt.eval.needle import evaluate_needle
    from megatron_endprompt.eval.passkey import evaluate_passkey
    from megatron_endprompt.eval.perplexity import default_bucket_edges, perplexity_by_position

    results: dict[str, Any] = {}
    progress = not args.no_progress
    common = dict(
        interval_level=args.interval_level,
        bootstrap_resamples=args.bootstrap_resamples,
        progress_lines=getattr(args, "progress_lines", False),
    )
    if "passkey" in args.task_list:
        with _flag_errors("--lengths / --depths (passkey)"):
            results["passkey"] = evaluate_passkey(
                logits_fn, tokenizer, args.length_list, args.depth_list, args.trials,
                args.seed, max_pos, args.passkey_digits, progress,
                answer_in_length=args.passkey_answer_in_length, **common,
            )  # fmt: skip
    if "needle" in args.task_list:
        for task in args.needle_list:
            with _flag_errors(f"--lengths / --needle-tasks (needle {task})"):
                results[f"needle_{task}"] = evaluate_needle(
                    logits_fn, tokenizer, task, args.length_list, args.trials, args.seed,
                    max_pos, progress=progress, **common,
                )  # fmt: skip
    if "perplexity" in args.task_list:
        length = args.ppl_length
        # Doubling buckets from L/8 (256 at L = 2048, as the library default), so short
        # contexts get several buckets too.
        edges = default_bucket_edges(length, first=max(1, length // 8))
        results["perplexity"] = perplexity_by_position(
            logits_fn, ppl_docs, length, edges, args.ppl_batch_size, args.ppl_max_windows,
            progress, **common,
        )  # fmt: skip
    return results


def write_outputs(results: dict[str, Any], args: argparse.Namespace, meta: dict) -> list[str]:
    """report.json / report.md and the PNG plots; returns the written paths."""
    from megatron_endprompt.eval import report

    paths = list(report.write_report(results, args.output, meta))
    if "passkey" in results:
        png = os.path.join(args.output, "passkey_heatmap.png")
        paths.append(report.plot_passkey_heatmap(results["passkey"], png))
        png = os.path.join(args.output, "passkey_by_length.png")
        paths.append(report.plot_passkey_by_length(results["passkey"], png))
    if "perplexity" in results:
        png = os.path.join(args.output, "perplexity_by_position.png")
        paths.append(report.plot_perplexity_by_position({args.name: results["perplexity"]}, png))
    return paths


def _resolve_device(device: str) -> str:
    from megatron_endprompt.device import cuda_available  # lazily, like the rest of the stack

    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if device == "cuda" and not cuda_available():
        raise UsageError("--device cuda: CUDA is not available")
    return device


def evaluate(argv: Sequence[str] | None) -> int:
    """Parse, load, evaluate; rank 0 writes the report and prints the summary."""
    args = build_parser().parse_args(argv)
    _check_args(args)
    from megatron_endprompt.data.tokenizers import build_tokenizer
    from megatron_endprompt.eval import parallel

    tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model)
    check_prompts_fit(args, tokenizer)
    device = _resolve_device(args.device)
    if args.hf_dir and parallel.launched_world_size() > 1:
        raise UsageError("--hf-dir evaluates in one process; launch it without torchrun")
    ranks = parallel.start(device, args.tensor_model_parallel_size)
    try:
        # --no-progress swaps the bars for plain lines; other ranks print neither.
        args.progress_lines = args.no_progress and ranks.is_main
        args.no_progress = args.no_progress or not ranks.is_main
        results, meta = _evaluate_model(args, tokenizer, parallel.local_device(device, ranks))
        if ranks.is_main:
            from megatron_endprompt.eval.summary import summary_markdown

            paths = write_outputs(results, args, meta)
            print(f"# {args.name}\n\n{summary_markdown(results)}")
            print("wrote " + ", ".join(paths))
    finally:
        parallel.stop(ranks)
    return 0


def _evaluate_model(args: argparse.Namespace, tokenizer: Any, device: str) -> tuple[dict, dict]:
    """``(results, meta)`` of the --load / --hf-dir model on this rank."""
    logits_fn, max_pos, vocab, meta = load_model(args, device)
    if vocab is not None and tokenizer.vocab_size > vocab:
        raise UsageError(
            f"--tokenizer-model: the tokenizer has {tokenizer.vocab_size} ids but the model's "
            f"vocabulary has {vocab}"
        )
    _check_lengths(args, max_pos)
    ppl_docs = None
    if "perplexity" in args.task_list:
        from megatron_endprompt.eval.loading import load_ppl_documents

        ppl_docs = load_ppl_documents(
            args.ppl_data, args.ppl_jsonl, tokenizer, args.ppl_length, args.ppl_max_windows,
            args.ppl_json_key, args.ppl_from_end,
        )  # fmt: skip
    results = run_tasks(args, logits_fn, tokenizer, max_pos, ppl_docs)
    meta = {
        "name": args.name,
        **meta,
        "seeds": {"eval": args.seed, **meta.get("seeds", {})},
        "tokenizer": {"type": args.tokenizer_type, "model": args.tokenizer_model},
        "device": device,
        "interval_level": args.interval_level,
        "bootstrap_resamples": args.bootstrap_resamples,
        "interval_method": "percentile bootstrap (passkey: trials within depths; "
        "needle: trials; perplexity: windows)",
    }
    return results, meta


def compare(argv: Sequence[str]) -> int:
    """``compare DIR... --output OUT``: compare.md and compare_perplexity.png; prints the table."""
    from megatron_endprompt.eval import report, summary

    p = _Parser(prog="tools/evaluate.py compare", description="Merge evaluation reports.")
    p.add_argument("reports", nargs="+", help="Report directories (holding report.json).")
    p.add_argument("--output", required=True, help="Directory for the merged table and plot.")
    args = p.parse_args(argv)
    reports: dict[str, dict[str, Any]] = {}
    for directory in args.reports:
        payload = summary.read_report(directory)
        name = str(payload["meta"].get("name") or os.path.basename(os.path.normpath(directory)))
        if name in reports:
            name = f"{name} ({directory})"
        reports[name] = payload
    headers, rows = summary.compare_rows(reports)
    table = report.format_table(rows, headers)
    paths = [atomic_write_text(os.path.join(args.output, "compare.md"), table)]
    ppl = {n: summary.perplexity_result(p["results"]["perplexity"])
           for n, p in reports.items() if "perplexity" in p["results"]}  # fmt: skip
    if ppl:
        png = os.path.join(args.output, "compare_perplexity.png")
        paths.append(report.plot_perplexity_by_position(ppl, png))
    print(table)
    print("wrote " + ", ".join(paths))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``tools/evaluate.py`` (``compare`` as first argument merges reports)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["compare"]:
            return compare(argv[1:])
        return evaluate(argv)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
