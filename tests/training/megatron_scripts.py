"""Megatron-LM core_v0.16.1's launch-script flag sets, as test data (names and values are facts).

Each function returns the argv the script hands to ``pretrain_gpt.py``, its shell variables
substituted. ``shrink`` replaces flag values (a shrunken copy for CPU tests); nothing else is
changed, so a test that runs these with ``python -m megatron_endprompt.train`` checks that only the
entry point changes.
"""

from __future__ import annotations


def _argv(groups: list[list[str]], shrink: dict[str, str] | None) -> list[str]:
    shrink = dict(shrink or {})
    out: list[str] = []
    for group in groups:
        flag, *values = group
        if flag in shrink:
            values = shrink.pop(flag).split()
        out += [flag, *values]
    assert not shrink, f"not in the script: {sorted(shrink)}"
    return out


def llama3_8b_h100_fp8(
    checkpoint: str,
    tensorboard: str,
    tokenizer: str,
    data: str,
    cache: str,
    dtype: str = "fp8",
    shrink: dict[str, str] | None = None,
) -> list[str]:
    """examples/llama/train_llama3_8b_h100_fp8.sh, real-data branch (TOKENIZER_ARG, DATA_ARG set),
    or its mock-data branch with ``data="MOCK"`` (the script's default).

    ``dtype`` is the script's DTYPE variable ("fp8" adds its FP8 flags).
    """
    seq_length = max_position_embeddings = "8192"
    model = [
        ["--use-mcore-models"],
        ["--num-layers", "32"],
        ["--hidden-size", "4096"],
        ["--ffn-hidden-size", "14336"],
        ["--num-attention-heads", "32"],
        ["--group-query-attention"],
        ["--num-query-groups", "8"],
        ["--kv-channels", "128"],
        ["--seq-length", seq_length],
        ["--max-position-embeddings", max_position_embeddings],
        ["--position-embedding-type", "rope"],
        ["--rotary-base", "1000000"],
        ["--rotary-percent", "1.0"],
        ["--attention-dropout", "0.0"],
        ["--hidden-dropout", "0.0"],
        ["--swiglu"],
        ["--init-method-std", "0.0134"],
        ["--attention-backend", "fused"],
        ["--apply-layernorm-1p"],
        ["--untie-embeddings-and-output-weights"],
        ["--disable-bias-linear"],
    ]
    training = [
        ["--micro-batch-size", "1"],
        ["--global-batch-size", "128"],
        ["--train-samples", "1953125000"],
        ["--lr-decay-samples", "1949218748"],
        ["--lr-warmup-samples", "3906252"],
        ["--lr", "0.00015"],
        ["--min-lr", "0.00001"],
        ["--decoupled-lr", "5.0e-4"],
        ["--decoupled-min-lr", "4.5e-5"],
        ["--lr-decay-style", "cosine"],
        ["--clip-grad", "1.0"],
        ["--weight-decay", "0.1"],
        ["--adam-beta1", "0.9"],
        ["--adam-beta2", "0.95"],
        ["--bf16"],
        ["--grad-reduce-in-bf16"],
        ["--cross-entropy-loss-fusion"],
        ["--calculate-per-token-loss"],
        ["--manual-gc"],
        ["--empty-unused-memory-level", "1"],
        ["--exit-duration-in-mins", "235"],
        # DDP_ARGS, appended to TRAINING_ARGS by the script
        ["--use-distributed-optimizer"],
        ["--overlap-grad-reduce"],
        ["--overlap-param-gather"],
    ]
    fp8 = (
        [
            ["--fp8-format", "hybrid"],
            ["--fp8-amax-history-len", "1024"],
            ["--fp8-amax-compute-algo", "max"],
            ["--fp8-param-gather"],
        ]
        if dtype == "fp8"
        else []
    )
    parallel = [
        ["--tensor-model-parallel-size", "1"],
        ["--context-parallel-size", "1"],
        ["--sequence-parallel"],
    ]
    data_args = [
        ["--data-path", data],
        ["--tokenizer-type", "HuggingFaceTokenizer"],
        ["--tokenizer-model", tokenizer],
        ["--data-cache-path", cache],
        ["--split", "99,1,0"],
        ["--no-create-attention-mask-in-dataloader"],
        ["--no-mmap-bin-files"],
        ["--num-workers", "1"],
        ["--vocab-size", "128256"],
    ]
    if data == "MOCK":  # the script's default branch (TOKENIZER_ARG or DATA_ARG "MOCK")
        # "--split '99,1,0'" is one array entry, word-split unquoted: the quotes reach the parser.
        data_args = [
            ["--mock-data"],
            ["--tokenizer-type", "NullTokenizer"],
            ["--vocab-size", "128256"],
            ["--data-cache-path", cache],
            ["--tiktoken-pattern", "v2"],
            ["--split", "'99,1,0'"],
            ["--no-create-attention-mask-in-dataloader"],
            ["--no-mmap-bin-files"],
            ["--num-workers", "1"],
        ]
    logging = [
        ["--log-interval", "1"],
        ["--eval-iters", "32"],
        ["--eval-interval", "100"],
        ["--save-interval", "1000"],
        ["--log-throughput"],
        ["--profile"],
        ["--profile-step-start", "4"],
        ["--profile-step-end", "6"],
        ["--ckpt-format", "torch_dist"],
        ["--distributed-timeout-minutes", "60"],
        ["--save", checkpoint],
        ["--load", checkpoint],
        ["--tensorboard-dir", tensorboard],
    ]
    # The script's order: MODEL, TRAINING (+DDP), DTYPE, MODEL_PARALLEL, DATA, EVAL_AND_LOGGING.
    return _argv(model + training + fp8 + parallel + data_args + logging, shrink)  # fmt: skip


def gpt3_175b(checkpoint: str, tensorboard: str, vocab: str, merges: str, data: str,
              shrink: dict[str, str] | None = None) -> list[str]:  # fmt: skip
    """examples/gpt3/train_gpt3_175b_distributed.sh."""
    groups = [
        ["--num-layers", "96"], ["--hidden-size", "12288"], ["--num-attention-heads", "96"],
        ["--seq-length", "2048"], ["--max-position-embeddings", "2048"],
        ["--attention-backend", "auto"],
        ["--micro-batch-size", "1"], ["--global-batch-size", "1536"],
        ["--rampup-batch-size", "16", "16", "5859375"], ["--train-iters", "500000"],
        ["--weight-decay", "0.1"], ["--adam-beta1", "0.9"], ["--adam-beta2", "0.95"],
        ["--init-method-std", "0.006"], ["--clip-grad", "1.0"], ["--fp16"], ["--lr", "6.0e-5"],
        ["--lr-decay-style", "cosine"], ["--min-lr", "6.0e-6"], ["--lr-warmup-fraction", ".001"],
        ["--lr-decay-iters", "430000"],
        ["--tensor-model-parallel-size", "8"], ["--pipeline-model-parallel-size", "16"],
        ["--data-path", data], ["--vocab-file", vocab], ["--merge-file", merges],
        ["--split", "949,50,1"],
        ["--log-interval", "100"], ["--save-interval", "10000"], ["--eval-interval", "1000"],
        ["--save", checkpoint], ["--load", checkpoint], ["--eval-iters", "10"],
        ["--tensorboard-dir", tensorboard],
    ]  # fmt: skip
    return _argv(groups, shrink)


def llama3_docs_finetune(checkpoint: str, tokenizer: str, tp: str = "1",
                         llama31: bool = False) -> list[str]:  # fmt: skip
    """docs/llama_mistral.md, "Llama-3 / 3.1": the flags to run a converted checkpoint.

    The docs write ``--group-query-attention 8``, which Megatron-LM's own parser refuses (the
    flag takes no value); the value belongs to ``--num-query-groups``, as the converter records.
    """
    groups = [
        ["--tensor-model-parallel-size", tp], ["--pipeline-model-parallel-size", "1"],
        ["--seq-length", "8192"], ["--max-position-embeddings", "131072" if llama31 else "8192"],
        ["--tokenizer-type", "HuggingFaceTokenizer"], ["--tokenizer-model", tokenizer],
        ["--load", checkpoint], ["--exit-on-missing-checkpoint"], ["--use-checkpoint-args"],
        ["--no-load-optim"], ["--no-load-rng"], ["--untie-embeddings-and-output-weights"],
        ["--normalization", "RMSNorm"], ["--position-embedding-type", "rope"],
        ["--no-masked-softmax-fusion"], ["--attention-softmax-in-fp32"],
        ["--disable-bias-linear"], ["--transformer-impl", "transformer_engine"],
        ["--group-query-attention"], ["--num-query-groups", "8"], ["--attention-dropout", "0.0"],
        ["--hidden-dropout", "0.0"], ["--rotary-base", "500000"], ["--rotary-percent", "1.0"],
        *([["--use-rope-scaling"]] if llama31 else []),
        ["--ffn-hidden-size", "14336"], ["--num-attention-heads", "32"], ["--swiglu"],
        ["--bf16"],
    ]  # fmt: skip
    return _argv(groups, None)
