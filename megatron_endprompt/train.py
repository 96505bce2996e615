"""Entry point: ``python -m megatron_endprompt.train [flags]`` or under ``torchrun ... -m``.

parse -> validate -> train -> report. Bad flags exit with status 2 and one ``error:`` line.
"""

from __future__ import annotations

import json
import os
import sys
import warnings


def main(argv: list[str] | None = None) -> int:
    """Parse flags, train, print a summary. Returns the process exit status."""
    # megatron-core's import-time notices about optional accelerators, repeated per module.
    for notice in (
        ".*Transformer Engine and Apex are not installed.*",
        ".*Apex is not installed.*",
        ".*full scope is deprecated.*",
    ):
        warnings.filterwarnings("ignore", message=notice)
    from megatron_endprompt.cli import parse_run_config
    from megatron_endprompt.device import cuda_available
    from megatron_endprompt.training.loop import train
    from megatron_endprompt.training.runtime import teardown_runtime

    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        run = parse_run_config(argv, world_size=world, cuda_available=cuda_available())
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        for notice in run.notices:
            print(f"note: {notice}", flush=True)
    try:
        result = train(run)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        teardown_runtime()
        return 2
    if result.reporting:  # the last pipeline stage holds the loss
        summary = {
            "iterations": result.iterations,
            "consumed_samples": result.consumed_samples,
            "final_loss": result.final_loss,
            "valid_loss": result.valid_loss,
            "tokens_per_s": result.tokens_per_s,
            "checkpoint": result.checkpoint,
            "interrupted": result.interrupted,
            "peak_memory_gib": result.peak_memory_gib,
            "peak_memory_kind": result.peak_memory_kind,
        }
        print("TRAIN_SUMMARY " + json.dumps(summary), flush=True)
    teardown_runtime()
    return 0


if __name__ == "__main__":
    sys.exit(main())
