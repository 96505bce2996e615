#!/usr/bin/env python3
"""Convert checkpoints between Hugging Face Llama/Mistral and megatron_endprompt's Megatron format.

    python tools/convert_checkpoint.py --direction hf-to-megatron --input Llama-3-8B \
        --output ckpt/base --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2
    python tools/convert_checkpoint.py --direction megatron-to-hf --input ckpt/endprompt \
        --output Llama-3-8B-64k --target-length 65536 --tokenizer-dir Llama-3-8B

The Megatron side loads with ``--load DIR --finetune`` (here and in Megatron-LM: its folder names,
keys, ``args`` and, by default, Transformer Engine key names). ``megatron-to-hf`` reads either
format at any saved layout: the per-shard files of CPU runs, conversions and Megatron-LM's legacy
``torch`` format (TE or local key names), or ``torch_dist`` checkpoints (ours or Megatron-LM's,
TP/PP/VPP), on a CPU-only machine too. The export's
config.json carries rope_theta, rope_scaling and max_position_embeddings = the target length, and
its vocabulary is the tokenizer's (Megatron's padding rows stripped; Megatron-LM checkpoints
record only the padded size: give --vocab-size or --tokenizer-dir).
Exit status: 0 on success, 2 on bad flags or input (one ``error:`` line on stderr, nothing
written), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import sys

from megatron_endprompt.cli_utils import run_tool
from megatron_endprompt.convert.checkpoint import convert_hf_to_megatron, convert_megatron_to_hf


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--direction", required=True, choices=["hf-to-megatron", "megatron-to-hf"])
    p.add_argument(
        "--input", required=True, help="Source directory (megatron-to-hf: either format)."
    )
    p.add_argument("--output", required=True, help="Directory to create.")
    p.add_argument("--force", action="store_true", help="Replace an existing --output.")
    p.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")
    g = p.add_argument_group("hf-to-megatron")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1, help="Output TP size.")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="Output PP size.")
    g.add_argument(
        "--seq-length", type=int, default=None, help="Training sequence length to record."
    )
    g.add_argument(
        "--transformer-impl",
        choices=["transformer_engine", "local", "te"],
        default="transformer_engine",
        help="Layer spec whose state-dict key names to write: transformer_engine (default, as "
        "Megatron-LM's default: norms fused as linear_qkv/linear_fc1 .layer_norm_weight) or "
        "local (input_layernorm / pre_mlp_layernorm); te is an alias of transformer_engine. "
        "Our --load reads either into either spec.",
    )
    g.add_argument(
        "--make-vocab-size-divisible-by",
        type=int,
        default=128,
        help="Pad the vocabulary to a multiple of this x TP (as the training run's flag).",
    )
    g = p.add_argument_group("megatron-to-hf")
    g.add_argument(
        "--target-length",
        type=int,
        default=None,
        help="max_position_embeddings of the export (default: the run's target length, else "
        "the model's max_position_embeddings).",
    )
    g.add_argument("--max-shard-size", default="5GB", help="Largest safetensors file, e.g. 5GB.")
    g.add_argument(
        "--tokenizer-dir",
        default=None,
        help="Copy tokenizer files from here; its config.json's vocab_size (else the "
        "tokenizer's size) strips the padding rows of a Megatron-LM checkpoint.",
    )
    g.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="Vocabulary size of the export (default: the checkpoint's recorded tokenizer size; "
        "Megatron-LM checkpoints record only the padded size: give this or --tokenizer-dir).",
    )
    return p


def _run(args: argparse.Namespace) -> str:
    """Do the conversion; returns the summary line."""
    progress = not args.no_progress
    if args.direction == "megatron-to-hf":
        config = convert_megatron_to_hf(
            args.input,
            args.output,
            target_length=args.target_length,
            max_shard_size=args.max_shard_size,
            tokenizer_dir=args.tokenizer_dir,
            force=args.force,
            progress=progress,
            vocab_size=args.vocab_size,
        )
        length, scaling = config["max_position_embeddings"], config["rope_scaling"]
        return (f"wrote {args.output}: vocab_size={config['vocab_size']}, "
                f"max_position_embeddings={length}, rope_scaling={scaling}")  # fmt: skip
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    for flag, value in (
        ("--tensor-model-parallel-size", tp),
        ("--pipeline-model-parallel-size", pp),
    ):
        if value < 1:
            raise ValueError(f"{flag}={value}: must be >= 1")
    m = convert_hf_to_megatron(
        args.input,
        args.output,
        tp,
        pp,
        seq_length=args.seq_length,
        force=args.force,
        progress=progress,
        transformer_impl="local" if args.transformer_impl == "local" else "te",
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
    )
    return f"wrote {args.output}: {m.num_layers} layers as TP={tp} x PP={pp} shards"


def main(argv: list[str] | None = None) -> int:
    """Run the conversion; returns the exit status."""
    args = build_parser().parse_args(argv)
    # RuntimeError: torch's I/O failures on unreadable shards.
    return run_tool(lambda: _run(args), errors=(RuntimeError,))


if __name__ == "__main__":
    sys.exit(main())
