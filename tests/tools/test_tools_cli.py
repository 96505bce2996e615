"""The tools/ scripts as users run them: exit codes, stdout summaries, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from megatron.core.datasets.indexed_dataset import IndexedDataset
from tool_main import tool_main

from megatron_endprompt.data.tokenizers import build_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tool(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, os.path.join("tools", name), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _main(name: str):
    """A tool's ``main`` loaded in-process (the tools/ folder is not a package)."""
    return tool_main(name)


def test_preprocess_success_and_user_errors(make_jsonl, tmp_path, capsys):
    path = make_jsonl([{"text": "hi"}, "oops", {"text": "yo"}])
    prefix = str(tmp_path / "out")
    common = ["--output-prefix", prefix, "--tokenizer-type", "ByteTokenizer"]
    ok = _tool("preprocess_data.py", "--input", path, *common, "--append-eod")
    assert ok.returncode == 0, ok.stderr
    assert "wrote 2 documents, 6 tokens" in ok.stdout and "malformed_json=1" in ok.stdout
    assert f"{path}:2: malformed_json" in ok.stderr
    ds = IndexedDataset(prefix + "_text_document")
    assert [ds[i].tolist() for i in range(len(ds))] == [[104, 105, 256], [121, 111, 256]]

    strict = _tool("preprocess_data.py", "--input", path, *common, "--strict")
    assert strict.returncode == 2
    assert f"error: {path}:2: malformed_json" in strict.stderr
    assert "Traceback" not in strict.stderr

    # Further errors in-process: importing megatron-core per subprocess costs seconds.
    main = _main("preprocess_data.py")
    assert main(["--input", str(tmp_path / "*.nope"), *common]) == 2
    assert main(["--input", path, "--output-prefix", prefix, "--tokenizer-type", "Bogus"]) == 2
    err = capsys.readouterr().err
    assert "error: --input" in err and "error: --tokenizer-type 'Bogus'" in err
    # The strict and failed runs left the first run's pair alone and no temporaries.
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out_text_document.bin",
                                            "out_text_document.idx"]  # fmt: skip


def test_corpus_tokenizer_preprocess_pipeline(tmp_path):
    corpus = str(tmp_path / "std.jsonl")
    run = _tool("prepare_corpus.py", "--output", corpus, "--max-docs", "5")
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("wrote 5 documents")
    with open(corpus, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    assert len(texts) == 5

    prefix = str(tmp_path / "tok")
    run = _tool("train_tokenizer.py", "--input", corpus, "--vocab-size", "400",
                "--output-prefix", prefix, "--max-sentences", "3000")  # fmt: skip
    assert run.returncode == 0, run.stderr
    tok = build_tokenizer("SentencePieceTokenizer", prefix + ".model")
    assert tok.vocab_size == 400

    rc = _main("preprocess_data.py")(
        ["--input", corpus, "--output-prefix", str(tmp_path / "d"), "--tokenizer-type",
         "SentencePieceTokenizer", "--tokenizer-model", prefix + ".model", "--append-eod",
         "--workers", "2", "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    ds = IndexedDataset(str(tmp_path / "d_text_document"))
    assert [tok.detokenize(ds[i][:-1]) for i in range(len(ds))] == texts
    assert all(ds[i][-1] == tok.eod for i in range(len(ds)))


def test_tool_errors_are_one_line(tmp_path):
    run = _tool("train_tokenizer.py", "--input", str(tmp_path / "none.txt"), "--vocab-size",
                "400", "--output-prefix", str(tmp_path / "t"))  # fmt: skip
    assert run.returncode == 2 and run.stderr.startswith("error: --input")
    run = _tool("prepare_corpus.py", "--output", str(tmp_path / "c.jsonl"), "--max-docs", "0")
    assert run.returncode == 2 and run.stderr.strip() == "error: --max-docs must be >= 1, got 0"
    assert os.listdir(tmp_path) == []
