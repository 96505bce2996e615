"""dist_checkpointing checkpoints of CUDA training (TP/PP/VPP as saved) read on a CPU, no emulation.

The checkpoints are written by emulated ``--device cuda`` runs (``tests/emulated``); everything
read here runs in the plain test process. The reference for every layout is megatron-core's own
``dist_checkpointing.load`` into a TP = PP = 1 model (it reshards, and works on CPU over a 1-rank
gloo group): our reader, the evaluation loader and the Hugging Face export must agree with it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "emulated"))

from dist_checkpoints import dist_checkpoint  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from megatron_endprompt.checkpoint import ShardRank, save_checkpoint  # noqa: E402
from megatron_endprompt.checkpoint.dist_reader import DistCheckpointReader  # noqa: E402
from megatron_endprompt.checkpoint.stored import open_checkpoint, rank_state_dict  # noqa: E402
from megatron_endprompt.convert.checkpoint import convert_megatron_to_hf  # noqa: E402
from megatron_endprompt.eval.loading import load_megatron_model, megatron_logits_fn  # noqa: E402
from megatron_endprompt.model.gpt import build_model  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_process_parallel_state")]
REPO = Path(__file__).resolve().parents[2]
LAYOUTS = ["tp1", "pp2", "tp2", "pp2_vpp2"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Layout name -> --save directory (made on first use, shared across the session)."""
    return lambda name: dist_checkpoint(tmp_path_factory, name)


def _megatron_load(save_dir: str):
    """(model config, TP = PP = 1 model loaded by megatron-core's dist_checkpointing.load)."""
    from megatron.core import dist_checkpointing

    ckpt = open_checkpoint(save_dir)
    config = dataclasses.replace(ckpt.model_config, transformer_impl="local")
    model = build_model(config, seed=0).eval()
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, ckpt.path)
    model.load_state_dict(loaded["model"], strict=True)
    return config, model


def _weights(model) -> dict[str, torch.Tensor]:  # noqa: ANN001
    return {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}


def _assert_same(ours: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Equal tensors, the vocabulary's trained padding row included (the same padded size)."""
    assert set(ours) == set(expected)
    for key, value in expected.items():
        assert torch.equal(ours[key], value), key


@pytest.mark.parametrize("name", LAYOUTS)
def test_reader_matches_megatron_load(ckpts, name):
    save = ckpts(name)
    config, reference = _megatron_load(save)
    ckpt = open_checkpoint(save)
    assert ckpt.format == "torch_dist" and ckpt.model_config.num_layers == 4
    assert ckpt.layout == {"tp1": (1, 1), "pp2": (1, 2), "tp2": (2, 1), "pp2_vpp2": (1, 2)}[name]
    # Stored under the TE norm names (megatron's local spec maps them), loaded as local ones.
    assert ckpt.model_config.transformer_impl == "te"
    expected = _weights(reference)
    _assert_same(rank_state_dict(ckpt, config), expected)
    # TP = 2 shards of the same weights: halves of the full tensors, norms replicated.
    shards = [rank_state_dict(ckpt, config, (2, r)) for r in range(2)]
    qkv = "decoder.layers.3.self_attention.linear_qkv.weight"
    assert torch.equal(torch.cat([s[qkv] for s in shards]), expected[qkv])
    assert torch.equal(shards[1]["decoder.final_layernorm.weight"], expected[
        "decoder.final_layernorm.weight"])  # fmt: skip


@pytest.mark.parametrize("name", ["tp2", "pp2_vpp2"])
def test_evaluation_loads_any_layout(ckpts, name):
    config, reference = _megatron_load(ckpts(name))
    model, loaded_config, meta = load_megatron_model(ckpts(name))
    assert meta["format"] == "torch_dist" and meta["iteration"] == 1
    assert loaded_config.transformer_impl == "local" and meta["seeds"] == {"training": 7}
    ids = torch.randint(0, 259, (2, 12), generator=torch.Generator().manual_seed(0))
    pos = torch.tensor([list(range(8)) + [200, 201, 202, 203]] * 2)
    with torch.no_grad():
        expected = reference(ids, pos)[..., :259]
    torch.testing.assert_close(megatron_logits_fn(model, "cpu", 259)(ids, pos), expected,
                               rtol=0, atol=0)  # fmt: skip


def _hf_tensors(directory: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(directory, "model.safetensors"))


@pytest.mark.parametrize("name", LAYOUTS)
def test_export_equals_export_of_per_shard_equivalent(ckpts, tmp_path, name):
    config, reference = _megatron_load(ckpts(name))
    shard_dir = str(tmp_path / "per_shard")
    state = {"model": _weights(reference), "model_config": config.to_dict()}
    save_checkpoint(shard_dir, 1, state, ShardRank())
    convert_megatron_to_hf(ckpts(name), str(tmp_path / "from_dist"), progress=False)
    convert_megatron_to_hf(shard_dir, str(tmp_path / "from_shard"), progress=False)
    a, b = _hf_tensors(str(tmp_path / "from_dist")), _hf_tensors(str(tmp_path / "from_shard"))
    assert set(a) == set(b) and len(a) == 2 + 4 * 9 + 1  # embed, norm, lm_head, 4 layers
    for key in a:
        assert torch.equal(a[key], b[key]), key
    configs = [json.loads((tmp_path / d / "config.json").read_text())
               for d in ("from_dist", "from_shard")]  # fmt: skip
    assert configs[0] == configs[1] and configs[0]["num_hidden_layers"] == 4


def test_convert_tool_accepts_dist_checkpoint(ckpts, tmp_path):
    out = str(tmp_path / "hf")
    proc = subprocess.run(
        [sys.executable, "tools/convert_checkpoint.py", "--direction", "megatron-to-hf",
         "--input", ckpts("pp2_vpp2"), "--output", out, "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    _, reference = _megatron_load(ckpts("pp2_vpp2"))
    ids = torch.randint(0, 259, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, reference(ids)[..., :259], rtol=0, atol=2e-5)


def _copy(src: str, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst / "iter_0000001"


def test_config_sources_and_errors(ckpts, tmp_path, capsys):
    src = ckpts("tp1")
    # An older dist checkpoint without run_config in common.pt: model_config.json beside it.
    it = _copy(src, tmp_path / "old")
    common = torch.load(it / "common.pt", weights_only=False)
    run_config = common.pop("run_config")
    common.pop("args")  # older saves had neither (newer ones carry Megatron-LM's args too)
    torch.save(common, it / "common.pt")
    with pytest.raises(ValueError, match="carries no model config .*model_config.json"):
        open_checkpoint(str(tmp_path / "old"))
    (tmp_path / "old" / "model_config.json").write_text(json.dumps(run_config["model"]))
    assert open_checkpoint(str(tmp_path / "old")).model_config.num_layers == 4
    # With Megatron-LM's args alone (as Megatron-LM writes common.pt), its args give the model.
    it = _copy(src, tmp_path / "megatron")
    common = torch.load(it / "common.pt", weights_only=False)
    common.pop("run_config")
    torch.save(common, it / "common.pt")
    from_args = open_checkpoint(str(tmp_path / "megatron")).model_config
    assert (from_args.num_layers, from_args.hidden_size) == (4, run_config["model"]["hidden_size"])

    it = _copy(src, tmp_path / "backend")
    (it / "metadata.json").write_text(json.dumps({"sharded_backend": "zarr"}))
    with pytest.raises(ValueError, match="sharded backend 'zarr'.*torch_dist"):
        open_checkpoint(str(tmp_path / "backend"))

    it = _copy(src, tmp_path / "corrupt")
    (it / ".metadata").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"cannot read .*\.metadata"):
        open_checkpoint(str(tmp_path / "corrupt"))

    it = _copy(src, tmp_path / "lost_shard")
    for path in it.glob("*.distcp"):
        path.unlink()
    with pytest.raises(ValueError, match="cannot read"):
        DistCheckpointReader(str(it), "--load x").read(
            {"e": ("embedding.word_embeddings.weight", None)}
        )

    it = _copy(src, tmp_path / "wrong_config")
    common = torch.load(it / "common.pt", weights_only=False)
    common["run_config"]["model"]["ffn_hidden_size"] = 96
    torch.save(common, it / "common.pt")
    tool = [sys.executable, "tools/evaluate.py", "--load", str(tmp_path / "wrong_config"),
            "--tokenizer-type", "ByteTokenizer", "--tasks", "passkey", "--lengths", "128",
            "--output", str(tmp_path / "eval")]  # fmt: skip
    proc = subprocess.run(tool, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("error: --load ") and "linear_fc1.weight has shape" in error, error
