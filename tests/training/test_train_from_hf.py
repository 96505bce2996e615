"""A Hugging Face checkpoint converted to our format fine-tunes with --load --finetune."""

import pytest
import torch
from train_fixtures import make_corpus, train_flags
from transformers import LlamaConfig, LlamaForCausalLM

from megatron_endprompt.cli import parse_run_config
from megatron_endprompt.convert.checkpoint import convert_hf_to_megatron
from megatron_endprompt.training.loop import train


def _converted_hf_model(tmp_path):
    """A tiny random HF Llama (byte vocabulary) saved under hf/ and converted to mg/."""
    torch.manual_seed(0)
    hf = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=259,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=False,
        )
    )
    hf.save_pretrained(tmp_path / "hf")
    convert_hf_to_megatron(
        str(tmp_path / "hf"), str(tmp_path / "mg"), progress=False, make_vocab_size_divisible_by=1
    )
    return hf


def test_finetune_from_converted_hf_checkpoint(tmp_path):
    hf = _converted_hf_model(tmp_path)
    data = make_corpus(str(tmp_path))
    flags = train_flags(
        data,
        str(tmp_path / "cache"),
        "--train-iters",
        "1",
        "--lr",
        "1e-12",
        "--norm-epsilon",
        "1e-6",
    )  # HF Llama's rms_norm_eps
    from_hf = train(parse_run_config([*flags, "--load", str(tmp_path / "mg"), "--finetune"]))
    scratch = train(parse_run_config(flags))
    # First-step loss is computed before any update: it must be the HF model's loss on the same
    # batch, and differ from a fresh initialisation's.
    assert from_hf.losses[0] != scratch.losses[0]
    batch_loss = _hf_loss_on_first_batch(hf, flags)
    assert abs(from_hf.losses[0] - batch_loss) < 1e-5


def test_load_refuses_disagreeing_model_flags(tmp_path):
    _converted_hf_model(tmp_path)
    data = make_corpus(str(tmp_path))
    flags = train_flags(data, str(tmp_path / "cache"), "--train-iters", "1")
    with pytest.raises(ValueError, match="--norm-epsilon: checkpoint 1e-06, run 1e-05"):
        train(parse_run_config([*flags, "--load", str(tmp_path / "mg"), "--finetune"]))


def _hf_loss_on_first_batch(hf, flags) -> float:
    from megatron_endprompt.data.tokenizers import build_tokenizer
    from megatron_endprompt.training.runtime import setup_runtime, teardown_runtime
    from megatron_endprompt.training.state import build_datasets_for_run

    run = parse_run_config(flags)
    rt = setup_runtime("cpu")
    try:
        train_ds, _ = build_datasets_for_run(run, rt, build_tokenizer("ByteTokenizer"))
        samples = [train_ds[i] for i in range(run.training.global_batch_size)]
    finally:
        teardown_runtime()
    tokens = torch.stack([s["tokens"] for s in samples])
    labels = torch.stack([s["labels"] for s in samples])
    mask = torch.stack([s["loss_mask"] for s in samples])
    pos = torch.stack([s["position_ids"] for s in samples])
    with torch.no_grad():
        logits = hf(input_ids=tokens, position_ids=pos).logits
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
    return float((ce * mask).sum() / mask.sum())
