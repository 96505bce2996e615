#!/usr/bin/env python3
"""Validate a training configuration for a given world size and print the plan (dry run).

python tools/plan.py --world-size 16 --model-preset llama3-8b --seq-length 8192 ...
    [--coverage-samples N] [--coverage-png PATH] [--coverage-cue-lengths 11,3,1]

Besides the plan it prints the relative-distance coverage of the first N samples (default 16).
"""

import sys

from megatron_endprompt.plan import main

if __name__ == "__main__":
    sys.exit(main())
