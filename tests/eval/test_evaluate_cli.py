"""tools/evaluate.py as users run it: reports, plots, summary, one-line errors, ``compare``."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from eval_fixtures import VOCAB, tiny_config
from megatron.core.datasets.indexed_dataset import (
    IndexedDatasetBuilder,
    get_bin_path,
    get_idx_path,
)

from megatron_endprompt.checkpoint import ShardRank, save_checkpoint
from megatron_endprompt.eval.cli import main
from megatron_endprompt.eval.passkey import PasskeyResult
from megatron_endprompt.eval.report import write_report
from megatron_endprompt.model.gpt import build_model

pytestmark = pytest.mark.usefixtures("single_process_parallel_state")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CONFIG = tiny_config(make_vocab_size_divisible_by=1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A randomly initialised checkpoint, its state dict and a 2-document byte corpus."""
    root = tmp_path_factory.mktemp("evaluate")
    model = build_model(CONFIG, seed=1)
    sd = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    run_config = {"model": CONFIG.to_dict(), "training": {"seed": 11}}
    save_checkpoint(str(root / "ckpt"), 2, {"model": sd, "run_config": run_config}, ShardRank())
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 256, size=n) for n in (300, 100)]
    prefix = str(root / "heldout")
    builder = IndexedDatasetBuilder(get_bin_path(prefix), dtype=np.int32)
    for doc in docs:
        builder.add_document(doc.astype(np.int32), [len(doc)])
    builder.finalize(get_idx_path(prefix))
    return {"root": root, "ckpt": str(root / "ckpt"), "sd": sd, "docs": docs, "prefix": prefix}


@pytest.fixture(scope="module")
def e2e(setup):
    """One real subprocess run: passkey + perplexity at two short lengths."""
    out = str(setup["root"] / "base")
    args = [
        "--load", setup["ckpt"], "--tokenizer-type", "ByteTokenizer",
        "--tasks", "passkey,perplexity", "--lengths", "128,160", "--depths", "0,1",
        "--trials", "1", "--ppl-data", setup["prefix"], "--ppl-length", "128",
        "--ppl-max-windows", "2", "--ppl-from-end", "--output", out, "--name", "base",
    ]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, os.path.join("tools", "evaluate.py"), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc, out


def _expected_loss(setup) -> float:
    """Mean next-token loss of the two 129-token windows of the 300-token document."""
    model = build_model(CONFIG, seed=0).eval()
    model.load_state_dict(setup["sd"])
    doc = torch.as_tensor(setup["docs"][0], dtype=torch.long)
    windows = torch.stack([doc[0:129], doc[128:257]])
    with torch.no_grad():
        logits = model(windows[:, :-1], torch.arange(128).expand(2, 128))[..., :VOCAB]
    return F.cross_entropy(logits.reshape(-1, VOCAB).double(), windows[:, 1:].reshape(-1)).item()


def test_end_to_end_report(setup, e2e):
    proc, out = e2e
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "passkey" in proc.stderr  # tqdm bars
    pngs = ("passkey_heatmap.png", "passkey_by_length.png", "perplexity_by_position.png")
    for name in ("report.json", "report.md", *pngs):
        assert os.path.isfile(os.path.join(out, name)), name
    for name in pngs:
        with open(os.path.join(out, name), "rb") as f:
            assert f.read(8) == PNG_MAGIC
    assert "| length | passkey exact | passkey digits |" in proc.stdout
    assert "| [0, 16) |" in proc.stdout and "| [64, 128) |" in proc.stdout

    report = json.load(open(os.path.join(out, "report.json")))
    meta = report["meta"]
    assert meta["name"] == "base" and meta["iteration"] == 2
    assert meta["seeds"] == {"eval": 0, "training": 11}
    assert meta["tokenizer"] == {"type": "ByteTokenizer", "model": None}
    assert meta["rope_scaling"]["rope_type"] == "none"
    passkey = report["results"]["passkey"]
    assert passkey["lengths"] == [128, 160] and passkey["depths"] == [0.0, 1.0]
    for grid in (passkey["exact_match"], passkey["token_accuracy"]):
        assert np.asarray(grid).shape == (2, 2) and all(0 <= v <= 1 for v in np.ravel(grid))
    ppl = report["results"]["perplexity"]
    assert ppl["bucket_edges"] == [0, 16, 32, 64, 128] and ppl["num_windows"] == 2
    assert all(p > 1 for p in ppl["perplexity"])
    # Untrained weights predict almost uniformly over the real (unpadded) vocabulary.
    assert VOCAB / 2 < ppl["overall_perplexity"] < VOCAB * 2
    assert math.isclose(ppl["overall_mean_loss"], _expected_loss(setup), rel_tol=1e-5)
    # Intervals: recorded in meta; one trial per depth, so a length's interval is its mean.
    assert meta["interval_level"] == 0.95 and meta["bootstrap_resamples"] == 2000
    for metric in ("exact_match", "token_accuracy"):
        means = passkey[f"mean_{metric}_by_length"]
        intervals = passkey[f"{metric}_interval_by_length"]
        assert sorted(intervals) == ["128", "160"]
        for n, (lo, hi) in intervals.items():
            assert lo == pytest.approx(means[n]) and hi == pytest.approx(means[n])
    assert np.asarray(ppl["window_mean_loss"]).shape == (2, 4)
    np.testing.assert_allclose(np.mean(ppl["window_mean_loss"], axis=0), ppl["mean_loss"])
    assert len(ppl["perplexity_interval"]) == 4
    for (lo, hi), p in zip(ppl["perplexity_interval"], ppl["perplexity"]):
        assert lo <= p * (1 + 1e-12) and p <= hi * (1 + 1e-12)
    lo, hi = ppl["overall_perplexity_interval"]
    assert lo <= ppl["overall_perplexity"] <= hi
    assert "percentile-bootstrap interval" in proc.stdout


def test_pi_override_and_jsonl_in_process(setup, tmp_path, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"text": "The pass key is 12345. " * 12}) + "\n")
    out = str(tmp_path / "pi")
    argv = [
        "--load", setup["ckpt"], "--tokenizer-type", "ByteTokenizer", "--tasks", "perplexity",
        "--lengths", "200", "--ppl-jsonl", str(corpus), "--rope-scaling-type", "linear",
        "--rope-scaling-factor", "8", "--max-position-embeddings", "2048", "--output", out,
        "--no-progress",
    ]  # fmt: skip
    assert main([*argv, "--interval-level", "0.8", "--bootstrap-resamples", "0"]) == 0, (
        capsys.readouterr().err
    )
    # --no-progress: plain progress lines with an ETA instead of bars.
    err = capsys.readouterr().err
    assert "ppl@200: 1/1 windows, elapsed " in err and " eta " in err
    meta = json.load(open(os.path.join(out, "report.json")))["meta"]
    assert meta["interval_level"] == 0.8 and meta["bootstrap_resamples"] == 0
    assert meta["name"] == "pi" and meta["rope_scaling_overridden"] is True
    assert meta["rope_scaling"]["rope_type"] == "linear" and meta["rope_scaling"]["factor"] == 8.0
    assert meta["max_position_embeddings"] == 2048
    ppl = json.load(open(os.path.join(out, "report.json")))["results"]["perplexity"]
    assert ppl["length"] == 200 and ppl["num_windows"] == 1  # 276 bytes: one 201-token window
    assert ppl["perplexity_interval"] is None  # --bootstrap-resamples 0


def test_hf_dir_in_process(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    LlamaForCausalLM(hf_config).save_pretrained(str(tmp_path / "hf"))
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"text": "x" * 100}) + "\n")
    out = str(tmp_path / "hf_eval")
    argv = [
        "--hf-dir", str(tmp_path / "hf"), "--tokenizer-type", "ByteTokenizer",
        "--tasks", "perplexity", "--lengths", "64", "--ppl-jsonl", str(corpus),
        "--output", out, "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    report = json.load(open(os.path.join(out, "report.json")))
    assert (
        report["meta"]["model_type"] == "llama" and report["meta"]["max_position_embeddings"] == 128
    )
    assert report["results"]["perplexity"]["num_windows"] == 1
    err = _error([*argv[:-1], "--lengths", "256"], capsys)
    assert "--lengths [256]" in err and "max position 128" in err
    err = _error([*argv, "--rope-scaling-type", "linear"], capsys)
    assert "--rope-scaling-type applies to --load" in err


def _error(argv: list[str], capsys) -> str:
    """Run ``main``; expect exit status 2 and one ``error:`` line, last on stderr."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()  # library progress bars / warnings may come first
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err, err
    return errors[0]


def test_errors_name_the_flag(setup, tmp_path, capsys):
    base = ["--tokenizer-type", "ByteTokenizer", "--output", str(tmp_path / "o")]
    load = ["--load", setup["ckpt"], *base]
    assert "--load and --hf-dir" in _error(base, capsys)
    assert "--load and --hf-dir" in _error([*load, "--hf-dir", str(tmp_path)], capsys)
    err = _error([*load, "--tasks", "passkey", "--lengths", "128,512"], capsys)
    assert "--lengths [512]" in err and "max position 256" in err
    err = _error([*load, "--tasks", "passkey", "--lengths", "64"], capsys)
    assert "--lengths (passkey)" in err and "cannot hold" in err
    missing = str(tmp_path / "tok.model")
    err = _error(
        ["--load", setup["ckpt"], "--tokenizer-type", "SentencePieceTokenizer",
         "--tokenizer-model", missing, "--tasks", "passkey", "--output", str(tmp_path / "o")],
        capsys,
    )  # fmt: skip
    assert f"--tokenizer-model {missing}" in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    err = _error([*load, "--tasks", "perplexity", "--lengths", "128", "--ppl-jsonl", str(empty)],
                 capsys)  # fmt: skip
    assert "--ppl-jsonl" in err and "no document has 129 tokens" in err
    assert "--ppl-data" in _error([*load, "--tasks", "perplexity", "--lengths", "128"], capsys)
    err = _error(["--load", str(tmp_path), *base, "--tasks", "passkey"], capsys)
    assert f"--load {tmp_path}" in err and "no checkpoint" in err
    assert "--tasks" in _error([*load, "--tasks", "passkey,sudoku"], capsys)
    assert "--bogus" in _error([*load, "--bogus"], capsys)
    err = _error([*load, "--tasks", "passkey", "--interval-level", "1"], capsys)
    assert "--interval-level must be in (0, 1)" in err
    err = _error([*load, "--tasks", "passkey", "--bootstrap-resamples", "-5"], capsys)
    assert "--bootstrap-resamples must be >= 0" in err
    assert not os.path.exists(tmp_path / "o")  # nothing written on an error


def test_compare_merges_reports(setup, e2e, tmp_path, capsys):
    other = PasskeyResult([128, 160], [0.0, 1.0], 2, 0, 5, [[1.0, 0.5], [0.5, 0.0]],
                          [[1.0, 0.8], [0.6, 0.2]])  # fmt: skip
    rope = {"rope_type": "linear", "factor": 8.0}
    write_report({"passkey": other}, tmp_path / "ep", {"name": "EndPrompt", "rope_scaling": rope})
    out = str(tmp_path / "all")
    assert main(["compare", e2e[1], str(tmp_path / "ep"), "--output", out]) == 0
    table = open(os.path.join(out, "compare.md")).read()
    assert table == capsys.readouterr().out.split("\nwrote ")[0].rstrip("\n") + "\n"
    lines = table.splitlines()
    assert lines[0].startswith("| model | rope scaling | passkey@128 | passkey@160 |")
    assert lines[2].startswith("| base | none |")
    base = json.load(open(os.path.join(e2e[1], "report.json")))["results"]["perplexity"]
    lo, hi = base["overall_perplexity_interval"]
    assert lines[2].endswith(f"| {base['overall_perplexity']:.4g} [{lo:.4g}, {hi:.4g}] |")
    assert lines[3].startswith("| EndPrompt | linear x8 | 0.75 | 0.25 | 0.9 | 0.4 | - |")
    with open(os.path.join(out, "compare_perplexity.png"), "rb") as f:
        assert f.read(8) == PNG_MAGIC
    err = _error(["compare", str(tmp_path / "nothing"), "--output", out], capsys)
    assert "nothing has no report.json" in err
