"""--use-checkpoint-args: the model flags come from the --load checkpoint, as in Megatron-LM.

Megatron-LM's load_args_from_checkpoint takes the shape (layers, hidden, ffn, heads, kv channels,
sequence length, max positions) only where the flag is not given, and replaces the rest (query
groups, RoPE base/percent/interleave, biases, SwiGLU, tied embeddings, norm, dropouts) always.
"""

import glob
import os

import pytest
import torch
from train_fixtures import make_corpus, train_flags

from megatron_endprompt.cli import parse_run_config
from megatron_endprompt.training.loop import train


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt_args")
    data = make_corpus(str(d))
    save = str(d / "ckpt")
    flags = train_flags(data, str(d / "cache"), "--train-iters", "1", "--save", save,
                        "--rotary-base", "500000")  # fmt: skip
    train(parse_run_config(flags))
    return data, save


def _parse(data, save, *flags):
    base = ["--tokenizer-type", "ByteTokenizer", "--data-path", data, "--train-iters", "2",
            "--device", "cpu", "--load", save, "--use-checkpoint-args"]  # fmt: skip
    return parse_run_config([*base, *flags])


def _check_tiny(run):
    m = run.model  # tests/training/train_fixtures.TINY_MODEL on the tiny preset
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.kv_channels) == (2, 64, 128, 16)
    assert (m.num_attention_heads, m.num_query_groups) == (4, 2)
    assert (m.seq_length, m.max_position_embeddings, m.rotary_base) == (32, 256, 500000)
    assert (m.normalization, m.swiglu, m.add_bias_linear) == ("RMSNorm", True, False)
    assert m.untie_embeddings_and_output_weights and m.hidden_dropout == 0.0


def test_the_shape_comes_from_our_checkpoint(saved):
    _check_tiny(_parse(*saved))


def test_the_shape_comes_from_megatron_lm_args(saved, tmp_path):
    data, save = saved
    copy = tmp_path / "megatron"
    os.system(f"cp -r {save} {copy}")
    (shard,) = glob.glob(str(copy / "iter_*" / "mp_rank_*" / "model_optim_rng.pt"))
    state = torch.load(shard, weights_only=False)
    del state["run_config"]  # as Megatron-LM writes it: the model flags are in args only
    state.pop("model_config", None)
    torch.save(state, shard)
    os.remove(shard + ".sha256")
    _check_tiny(_parse(data, str(copy)))


def test_given_flags_kept_or_replaced_as_megatron_lm(saved):
    run = _parse(*saved, "--seq-length", "16", "--rotary-base", "10000")
    assert run.model.seq_length == 16  # shape flags given win
    assert run.model.rotary_base == 500000  # RoPE base is forced from the checkpoint
    assert "--rotary-base=10000.0: replaced by the checkpoint's 500000.0" in " ".join(run.notices)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="--use-checkpoint-args: --load="):
        _parse("x", str(tmp_path / "none"))
