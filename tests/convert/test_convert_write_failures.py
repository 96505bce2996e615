"""A conversion that meets a full disk: one error line naming the file and the errno, exit 2, no
temporary directory left, and an earlier output replaced with ``--force`` byte-identical."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from fs_faults import small_tmpfs, tree
from tool_main import tool_main
from transformers import LlamaConfig, LlamaForCausalLM

from megatron_endprompt.checkpoint import layout
from megatron_endprompt.convert import safetensors_io

pytestmark = pytest.mark.usefixtures("single_process_parallel_state")


def _tool_main():
    return tool_main("convert_checkpoint.py")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A tiny HF model and its Megatron conversion (2 PP stages: two shard files)."""
    root = tmp_path_factory.mktemp("convert")
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         max_position_embeddings=256)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "hf")
    args = ["--direction", "hf-to-megatron", "--no-progress", "--input", str(root / "hf"),
            "--output", str(root / "megatron"), "--pipeline-model-parallel-size", "2"]  # fmt: skip
    assert _tool_main()(args) == 0
    return str(root / "hf"), str(root / "megatron")


def _second_call_fails(monkeypatch, owner, name, error):
    real, calls = getattr(owner, name), []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)


@pytest.mark.parametrize("direction", ["hf-to-megatron", "megatron-to-hf"])
def test_refused_write_keeps_the_earlier_output(dirs, tmp_path, capsys, monkeypatch, direction):
    hf, megatron = dirs
    source = hf if direction == "hf-to-megatron" else megatron
    common = ["--direction", direction, "--no-progress", "--input", source,
              "--output", str(tmp_path / "out")]  # fmt: skip
    if direction == "hf-to-megatron":
        common += ["--pipeline-model-parallel-size", "2"]
    main = _tool_main()
    assert main(common) == 0
    before = tree(tmp_path)
    if direction == "hf-to-megatron":  # the second shard's torch.save
        error = OSError(errno.ENOSPC, "No space left on device")
        _second_call_fails(monkeypatch, layout.torch, "save", error)
        file = "model_optim_rng.pt"
    else:  # safetensors (Rust) reports the errno in its message only
        error = safetensors_io.SafetensorError("I/O error: No space left on device (os error 28)")
        _second_call_fails(monkeypatch, safetensors_io, "save_file", error)
        common += ["--max-shard-size", "20KB"]  # several files: the second one fails
        file = ".safetensors"
    assert main([*common, "--force"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write {tmp_path / 'out'}.tmp-") and err.count("\n") == 1
    assert f"{file}: No space left on device (errno 28 ENOSPC)" in err
    assert tree(tmp_path) == before  # byte-identical, no temporary directory


def test_conversion_into_a_real_full_tmpfs(dirs, tmp_path, capsys):
    _, megatron = dirs
    with small_tmpfs(tmp_path / "disk", "64k") as disk:
        out = os.path.join(disk, "hf")
        args = ["--direction", "megatron-to-hf", "--no-progress", "--input", megatron,
                "--output", out]  # fmt: skip
        assert _tool_main()(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: cannot write ") and "(errno 28 ENOSPC)" in err, err
        assert os.listdir(disk) == []
