#!/usr/bin/env python3
"""Long-context evaluation: passkey, needle and perplexity by position; ``compare`` merges reports.

    python tools/evaluate.py --load ckpt/endprompt --tokenizer-type SentencePieceTokenizer \
        --tokenizer-model tok.model --tasks passkey,perplexity --lengths 256,512,1024,2048 \
        --ppl-data data/heldout_text_document --output eval/endprompt --name EndPrompt
    torchrun --nproc-per-node 2 tools/evaluate.py --load ckpt/endprompt ...   # TP = 2
    python tools/evaluate.py compare eval/base eval/pi_only eval/endprompt --output eval/all

``--load`` reads per-shard and dist_checkpointing checkpoints at any saved TP/PP/VPP layout.
Accuracies and perplexities come with percentile-bootstrap intervals (``--interval-level``,
default 0.95; ``--bootstrap-resamples``, default 2000, 0 turns them off), shown as
``mean [low, high]`` in report.md, the summary and ``compare``. ``--no-progress`` prints plain
progress lines with an ETA on stderr instead of progress bars.

Exit status: 0 on success, 2 on bad flags or input (one ``error:`` line on stderr), 130 when
interrupted. ``--help`` lists every flag.
"""

from __future__ import annotations

import sys
import warnings

# megatron-core warns on import that its optional fused kernels are missing; evaluation on the
# local layer spec uses none of them.
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
warnings.filterwarnings("ignore", message="Apex is not installed")
warnings.filterwarnings("ignore", message="full scope is deprecated")

from megatron_endprompt.eval.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
