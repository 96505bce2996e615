"""Tensor-parallel evaluation: ``torchrun --nproc-per-node 2 tools/evaluate.py`` (TP = 2 on gloo)
reports the numbers of the one-process (TP = 1) run on the same checkpoint.

Two checkpoints, neither saved at the evaluation's layout: a per-shard one converted from Hugging
Face at TP = 2 x PP = 2 (large random weights, so greedy answers and losses are far from uniform),
and a dist_checkpointing one of a CUDA training run at PP = 2 with virtual stages.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from eval_fixtures import VOCAB

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "emulated"))

from dist_checkpoints import dist_checkpoint  # noqa: E402

from megatron_endprompt.convert.checkpoint import convert_hf_to_megatron  # noqa: E402
from megatron_endprompt.device import free_port  # noqa: E402
from megatron_endprompt.eval.cli import main  # noqa: E402

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def _per_shard_checkpoint(root: Path) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0.0, 0.15)
    hf.save_pretrained(root / "hf")
    out = str(root / "tp2_pp2")
    convert_hf_to_megatron(str(root / "hf"), out, 2, 2, make_vocab_size_divisible_by=64,
                           progress=False)  # fmt: skip
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_tp")
    corpus = root / "heldout.jsonl"
    words = "alpha beta gamma delta pass key theta".split()
    gen = torch.Generator().manual_seed(0)
    with open(corpus, "w") as f:
        for _ in range(3):
            idx = torch.randint(0, len(words), (60,), generator=gen).tolist()
            f.write(json.dumps({"text": " ".join(words[i] for i in idx)}) + "\n")
    return {
        "root": root,
        "corpus": str(corpus),
        "per_shard": _per_shard_checkpoint(root),
        "dist": dist_checkpoint(tmp_path_factory, "pp2_vpp2"),
    }


def _args(load: str, corpus: str, out: Path) -> list[str]:
    return [
        "--load", load, "--tokenizer-type", "ByteTokenizer", "--tasks", "passkey,perplexity",
        "--lengths", "128,160", "--depths", "0,1", "--trials", "2", "--ppl-jsonl", corpus,
        "--ppl-length", "64", "--ppl-max-windows", "4", "--output", str(out), "--no-progress",
    ]  # fmt: skip


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("kind", ["per_shard", "dist"])
def test_tp2_reports_the_tp1_numbers(setup, kind, capsys):
    root = setup["root"]
    assert main(_args(setup[kind], setup["corpus"], root / f"{kind}_tp1")) == 0, (
        capsys.readouterr().err
    )
    out = root / f"{kind}_tp2"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
              "--master-port", str(free_port()), "tools/evaluate.py"]  # fmt: skip
    cmd = [*launch, *_args(setup[kind], setup["corpus"], out), "--tensor-model-parallel-size", "2"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count(f"# {kind}_tp2") == 1  # rank 0 alone prints and writes
    one, two = _report(root / f"{kind}_tp1"), _report(out)
    assert one["meta"]["tensor_model_parallel_size"] == 1
    assert two["meta"]["tensor_model_parallel_size"] == 2
    assert two["meta"]["format"] == {"per_shard": "torch", "dist": "torch_dist"}[kind]
    p1, p2 = one["results"]["passkey"], two["results"]["passkey"]
    assert p1["exact_match"] == p2["exact_match"]
    assert p1["token_accuracy"] == p2["token_accuracy"]
    assert p1["answers"] == p2["answers"]  # same greedy decisions, KV cache sharded over TP
    if kind == "per_shard":  # large weights: the answers differ between prompts
        assert len({a for row in p1["answers"] for cell in row for a in cell}) > 1
    q1, q2 = one["results"]["perplexity"], two["results"]["perplexity"]
    assert q1["token_count"] == q2["token_count"] and q1["num_windows"] == 4
    for a, b in zip(q1["mean_loss"] + [q1["overall_mean_loss"]],
                    q2["mean_loss"] + [q2["overall_mean_loss"]]):  # fmt: skip
        assert math.isclose(a, b, rel_tol=1e-5), (a, b)


def test_tp_size_must_match_the_launch(setup, tmp_path, capsys):
    args = _args(setup["per_shard"], setup["corpus"], tmp_path / "o")
    assert main([*args, "--tensor-model-parallel-size", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: --tensor-model-parallel-size 2:") and "(1;" in err
