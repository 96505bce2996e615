"""tools/convert_checkpoint.py: HF <-> Megatron directories, exact round trips, logits, errors."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from tool_main import tool_main
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from megatron_endprompt.checkpoint.layout import write_checksum
from megatron_endprompt.checkpoint.weights import (
    load_megatron_state_dict,
    megatron_shard_shapes,
    merge_tensor_parallel,
    shard_for_tensor_parallel,
)
from megatron_endprompt.config import ModelConfig, RopeScalingConfig
from megatron_endprompt.convert.checkpoint import (
    convert_hf_to_megatron,
    convert_megatron_to_hf,
    staged_output,
)
from megatron_endprompt.convert.safetensors_io import parse_size
from megatron_endprompt.model.gpt import build_model

pytestmark = pytest.mark.usefixtures("single_process_parallel_state")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 128,
}


def _hf_model(rope_scaling=None, seed=0) -> LlamaForCausalLM:
    """4 layers (PP = 2 splits 2 + 2), vocab 300 (padded to 384 at TP 1, 512 at TP 2)."""
    config = LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        rope_theta=50000.0, tie_word_embeddings=False,
        rope_scaling=dict(rope_scaling) if rope_scaling else None,  # transformers edits it
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0.0, 0.15)
    return model


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """{"plain": one-file dir, "llama3": sharded dir with llama3 RoPE, "model": plain's model}."""
    root = tmp_path_factory.mktemp("hf")
    plain, scaled = _hf_model(), _hf_model(LLAMA3, seed=1)
    plain.save_pretrained(root / "plain")
    scaled.save_pretrained(root / "llama3", max_shard_size="200KB")
    return {"plain": str(root / "plain"), "llama3": str(root / "llama3"), "model": plain}


def _tiny(**fields) -> ModelConfig:
    sizes = dict(hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2)
    return ModelConfig(vocab_size=300, **sizes, **fields)


def _tensors(directory) -> dict[str, torch.Tensor]:
    out = {}
    for path in glob.glob(os.path.join(directory, "*.safetensors")):
        out.update(load_file(path))
    return out


def _config(directory) -> dict:
    with open(os.path.join(directory, "config.json")) as f:
        return json.load(f)


def _shard(directory, tp_rank=0, pp_rank=0) -> dict:
    path = f"{directory}/iter_0000000/mp_rank_{tp_rank:02d}_{pp_rank:03d}/model_optim_rng.pt"
    if not os.path.isfile(path):  # Megatron-LM names the PP = 1 folder mp_rank_TT
        path = f"{directory}/iter_0000000/mp_rank_{tp_rank:02d}/model_optim_rng.pt"
    return torch.load(path, weights_only=False)


def _tool_main():
    return tool_main("convert_checkpoint.py")


def test_round_trip_tp2_pp2_is_bitwise_exact(hf_dirs, tmp_path):
    src, mg, back = hf_dirs["llama3"], str(tmp_path / "mg"), str(tmp_path / "hf")
    assert os.path.isfile(os.path.join(src, "model.safetensors.index.json"))  # sharded input
    run = subprocess.run(
        [sys.executable, "tools/convert_checkpoint.py", "--direction", "hf-to-megatron",
         "--input", src, "--output", mg, "--tensor-model-parallel-size", "2",
         "--pipeline-model-parallel-size", "2", "--no-progress"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert open(os.path.join(mg, "latest_checkpointed_iteration.txt")).read().strip() == "0"
    assert sorted(os.listdir(os.path.join(mg, "iter_0000000"))) == [
        "mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"
    ]  # fmt: skip
    # Stage 1 numbers its layers locally: its layer 0 is global layer 2; TP rank 1 holds the
    # second half of fc2's input columns (ffn 96 -> 48 per rank).
    hf = _tensors(src)
    stage1 = _shard(mg, tp_rank=1, pp_rank=1)
    assert stage1["format"] == "megatron_endprompt/v1" and stage1["iteration"] == 0
    fc2 = stage1["model"]["decoder.layers.0.mlp.linear_fc2.weight"]
    assert torch.equal(fc2, hf["model.layers.2.mlp.down_proj.weight"][:, 48:])
    assert stage1["model"]["output_layer.weight"].shape == (256, 64)  # 512 padded rows / 2
    convert_megatron_to_hf(mg, back, max_shard_size="200KB", progress=False)
    assert os.path.isfile(os.path.join(back, "model.safetensors.index.json"))
    out = _tensors(back)
    assert set(out) == set(hf)
    for name, tensor in hf.items():
        assert torch.equal(out[name], tensor), name
    src_cfg, out_cfg = _config(src), _config(back)
    src_rope = src_cfg.get("rope_parameters") or {}
    assert out_cfg["rope_theta"] == src_rope.get("rope_theta", src_cfg.get("rope_theta")) == 5e4
    assert {k: out_cfg["rope_scaling"][k] for k in LLAMA3} == LLAMA3
    assert out_cfg["max_position_embeddings"] == 1024


def test_logits_match_hf_and_exported_scaled_model(hf_dirs, tmp_path):
    mg, mg4, out = str(tmp_path / "mg"), str(tmp_path / "mg4"), str(tmp_path / "out")
    m = convert_hf_to_megatron(hf_dirs["plain"], mg, progress=False)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    ours = build_model(m).eval()
    load_megatron_state_dict(ours, _shard(mg)["model"])
    with torch.no_grad():
        expected = hf_dirs["model"](ids).logits
        assert torch.allclose(ours(ids)[..., :300], expected, atol=1e-4)
    # The same weights extended x4 by linear PI, exported with the 4096-token window.
    linear = RopeScalingConfig("linear", factor=4.0)
    m4 = convert_hf_to_megatron(hf_dirs["plain"], mg4, rope_scaling=linear, progress=False)
    config = convert_megatron_to_hf(mg4, out, target_length=4096, progress=False)
    assert _config(out) == json.loads(json.dumps(config))
    assert _config(out)["max_position_embeddings"] == 4096
    assert _config(out)["rope_scaling"]["factor"] == 4.0
    assert _config(out)["rope_scaling"]["rope_type"] == "linear"
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    scaled = build_model(m4).eval()
    load_megatron_state_dict(scaled, _shard(mg4)["model"])
    pos = torch.tensor([list(range(6)) + list(range(4090, 4096))] * 2)  # EndPrompt layout
    with torch.no_grad():
        theirs, mine = exported(ids, position_ids=pos).logits, scaled(ids, pos)[..., :300]
    assert torch.allclose(mine, theirs, atol=1e-4)
    assert (mine - expected).abs().max() > 0.1  # the scaling and the positions do matter


def test_training_run_config_gives_target_length(hf_dirs, tmp_path):
    mg, out = str(tmp_path / "mg"), str(tmp_path / "out")
    convert_hf_to_megatron(hf_dirs["plain"], mg, progress=False)
    path = f"{mg}/iter_0000000/mp_rank_00/model_optim_rng.pt"  # Megatron-LM: PP = 1
    shard = torch.load(path, weights_only=False)
    model = dict(shard.pop("model_config"), rope_scaling={"rope_type": "linear", "factor": 8.0})
    shard["run_config"] = {"model": model, "endprompt": {"target_length": 8192}}
    torch.save(shard, path)
    write_checksum(path)  # edited by hand: a new checksum, or the load refuses the shard
    os.remove(os.path.join(mg, "model_config.json"))
    tokenizer = tmp_path / "tok"
    tokenizer.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        (tokenizer / name).write_text("{}")
    convert_megatron_to_hf(mg, out, tokenizer_dir=str(tokenizer), progress=False)
    assert sorted(os.listdir(out)) == [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"
    ]  # fmt: skip
    assert _config(out)["max_position_embeddings"] == 8192
    assert _config(out)["rope_scaling"]["factor"] == 8.0


def test_tied_te_model_round_trip(tmp_path):
    hf = LlamaForCausalLM(
        LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    )  # fmt: skip
    hf.save_pretrained(tmp_path / "hf")
    mg, back = str(tmp_path / "mg"), str(tmp_path / "back")
    convert_hf_to_megatron(str(tmp_path / "hf"), mg, 2, 2, transformer_impl="te", progress=False)
    last = _shard(mg, tp_rank=0, pp_rank=1)["model"]
    assert "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight" in last
    embed = _tensors(tmp_path / "hf")["model.embed_tokens.weight"]
    assert torch.equal(last["output_layer.weight"], embed[:256])  # tied copy, TP rank 0's rows
    convert_megatron_to_hf(mg, back, progress=False)  # the te key names are recognised
    src, out = _tensors(tmp_path / "hf"), _tensors(back)
    assert set(out) == set(src) and all(torch.equal(out[k], src[k]) for k in src)
    assert _config(back)["tie_word_embeddings"] is True


@pytest.mark.parametrize("untied", [True, False])
def test_shape_arithmetic_matches_built_stages(untied):
    m = _tiny(num_layers=4, untie_embeddings_and_output_weights=untied)
    stage = dataclasses.replace(m, num_layers=2)  # one stage of PP = 2, built with PP = 1
    for pp_rank, flags in ((0, (True, False)), (1, (False, True))):
        model = build_model(stage, pre_process=flags[0], post_process=flags[1], seed=None)
        built = {k: tuple(v.shape) for k, v in model.state_dict().items()
                 if v is not None and not k.endswith("_extra_state")}  # fmt: skip
        assert built == megatron_shard_shapes(m, 1, 2, pp_rank)
    whole = build_model(m, seed=None).state_dict()
    assert {k: tuple(v.shape) for k, v in whole.items() if v is not None} == (
        megatron_shard_shapes(m, 1, 1, 0)
    )


def test_merge_inverts_tensor_parallel_sharding():
    m = _tiny(num_layers=1)
    torch.manual_seed(0)
    full = {k: torch.randn(s) for k, s in megatron_shard_shapes(m, 1, 1, 0).items()}
    for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        full[key][300:] = 0  # padding rows carry no weights
    shards = [shard_for_tensor_parallel(full, m, 2, r) for r in range(2)]
    merged = merge_tensor_parallel(shards, m)
    assert set(merged) == set(full)
    for key, value in full.items():
        assert torch.equal(merged[key], value), key
    shards[1]["decoder.final_layernorm.weight"] += 1
    with pytest.raises(ValueError, match="final_layernorm.weight: replicated norm"):
        merge_tensor_parallel(shards, m)


def test_existing_output_and_missing_inputs_fail_cleanly(hf_dirs, tmp_path, capsys):
    main = _tool_main()
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    common = ["--direction", "hf-to-megatron", "--no-progress", "--output", str(out)]
    assert main([*common, "--input", hf_dirs["plain"]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --output=") and "--force" in err and err.count("\n") == 1
    assert os.listdir(out) == ["keep.txt"]
    assert main([*common, "--input", hf_dirs["plain"], "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model_config.json").is_file()
    new = ["--direction", "hf-to-megatron", "--no-progress", "--output", str(tmp_path / "new")]
    assert main([*new, "--input", str(tmp_path / "nope")]) == 2
    assert "--input=" in capsys.readouterr().err
    only_config = tmp_path / "only_config"
    only_config.mkdir()
    shutil.copy(os.path.join(hf_dirs["plain"], "config.json"), only_config)
    assert main([*new, "--input", str(only_config)]) == 2
    assert "no *.safetensors" in capsys.readouterr().err
    back = ["--direction", "megatron-to-hf", "--no-progress", "--output", str(tmp_path / "new")]
    assert main([*back, "--input", hf_dirs["plain"]]) == 2
    assert "latest_checkpointed_iteration.txt" in capsys.readouterr().err
    assert main([*new, "--input", hf_dirs["plain"], "--tensor-model-parallel-size", "3"]) == 2
    assert "--tensor-model-parallel-size=3" in capsys.readouterr().err
    assert main([*new, "--input", hf_dirs["plain"], "--output", hf_dirs["plain"]]) == 2
    assert "is or contains --input=" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_shape_mismatch_names_the_tensor_and_leaves_nothing(hf_dirs, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(hf_dirs["plain"], bad)
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    args = ["--direction", "hf-to-megatron", "--input", str(bad), "--output", str(tmp_path / "o")]
    assert _tool_main()([*args, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "model.layers.1.self_attn.k_proj.weight has shape (16, 64), expected (32, 64)" in err
    assert sorted(os.listdir(tmp_path)) == ["bad"]  # no output, no temporary directory


def test_staged_output_removes_partial_work(tmp_path):
    with pytest.raises(RuntimeError), staged_output(str(tmp_path / "o"), force=False) as tmp:
        open(os.path.join(tmp, "half_written"), "w").close()
        raise RuntimeError("disk full")
    assert os.listdir(tmp_path) == []
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20
    with pytest.raises(ValueError, match="--max-shard-size='5 parsecs'"):
        parse_size("5 parsecs")
