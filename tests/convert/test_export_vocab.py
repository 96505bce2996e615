"""megatron-to-hf exports the tokenizer's vocabulary, not Megatron's padded one.

The Hugging Face model has 300 tokens; Megatron pads them to 384 rows at TP = 1 and 512 at TP = 2
(``--make-vocab-size-divisible-by 128`` x TP). Megatron-LM records only the padded size
(``args.padded_vocab_size``), so its checkpoints need the size from ``--vocab-size`` or a
``--tokenizer-dir``; ours record the tokenizer's.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from test_convert_checkpoint import _hf_model, _tensors, _tool_main
from test_convert_megatron_lm import _megatron_lm_checkpoint
from transformers import AutoModelForCausalLM

from megatron_endprompt.convert.vocab import tokenizer_dir_vocab_size

pytestmark = pytest.mark.usefixtures("single_process_parallel_state")
VOCAB, PADDED = 300, 384


@pytest.fixture(scope="module")
def megatron_lm(tmp_path_factory):
    """(the original HF model, its directory, its Megatron-LM checkpoint of 384 padded rows)."""
    root = tmp_path_factory.mktemp("vocab")
    hf = _hf_model()
    hf.save_pretrained(root / "hf")
    _megatron_lm_checkpoint(str(root / "hf"), str(root / "mg"), pp=1)
    return hf, str(root / "hf"), str(root / "mg")


def _tokenizer_json(directory, size: int, added: int = 3) -> None:
    """A tokenizer.json of ``size`` ids: ``size - added`` vocabulary entries + added tokens."""
    vocab = {f"t{i}": i for i in range(size - added)}
    added_tokens = [{"id": size - added + i, "content": f"<s{i}>", "special": True}
                    for i in range(added)]  # fmt: skip
    directory.mkdir(exist_ok=True)
    (directory / "tokenizer.json").write_text(
        json.dumps({"model": {"type": "BPE", "vocab": vocab}, "added_tokens": added_tokens})
    )


def _assert_equals_the_original(hf, hf_dir: str, out: str) -> None:
    """Every tensor as the original HF model has it; transformers gives its logits."""
    ours, theirs = _tensors(out), _tensors(hf_dir)
    assert set(ours) == set(theirs)
    for key, value in ours.items():
        assert torch.equal(value, theirs[key]), key
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    assert exported.config.vocab_size == VOCAB
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(tokens).logits, hf(tokens).logits)


@pytest.mark.parametrize("source", ["flag", "config_json", "tokenizer_json"])
def test_megatron_lm_padding_rows_are_stripped(megatron_lm, tmp_path, source):
    hf, hf_dir, mg = megatron_lm
    out = str(tmp_path / "out")
    args = ["--direction", "megatron-to-hf", "--no-progress", "--input", mg, "--output", out]
    if source == "flag":
        args += ["--vocab-size", str(VOCAB)]
    else:  # config.json's vocab_size wins over a tokenizer of another size
        tok = tmp_path / "tok"
        _tokenizer_json(tok, VOCAB if source == "tokenizer_json" else 400)
        if source == "config_json":
            shutil.copy(os.path.join(hf_dir, "config.json"), tok)
        args += ["--tokenizer-dir", str(tok)]
    assert _tool_main()(args) == 0
    _assert_equals_the_original(hf, hf_dir, out)


def test_our_checkpoint_exports_its_recorded_vocabulary(megatron_lm, tmp_path):
    """hf-to-megatron at TP = 2 records the HF config (300) beside 512 padded rows."""
    hf, hf_dir, _ = megatron_lm
    mg, out = str(tmp_path / "mg"), str(tmp_path / "out")
    main = _tool_main()
    assert main(["--direction", "hf-to-megatron", "--no-progress", "--input", hf_dir,
                 "--output", mg, "--tensor-model-parallel-size", "2"]) == 0  # fmt: skip
    assert main(["--direction", "megatron-to-hf", "--no-progress", "--input", mg,
                 "--output", out]) == 0  # fmt: skip
    _assert_equals_the_original(hf, hf_dir, out)


@pytest.mark.parametrize(
    "extra,message",
    [
        ([], "--vocab-size: the checkpoint (Megatron-LM's args) records only its padded "
             f"vocabulary ({PADDED} rows"),
        (["--vocab-size", str(PADDED + 1)], f"--vocab-size={PADDED + 1}: vocabulary size "
                                           f"{PADDED + 1} exceeds the checkpoint's {PADDED}"),
        (["--vocab-size", "0"], "--vocab-size=0: must be a positive integer"),
        ("tokenizer", f"tokenizer.json: vocabulary size 400 exceeds the checkpoint's {PADDED}"),
    ],
    ids=["unknown", "flag_too_large", "flag_zero", "tokenizer_too_large"],
)  # fmt: skip
def test_unknown_or_too_large_vocabulary_is_refused(megatron_lm, tmp_path, capsys, extra, message):
    _, _, mg = megatron_lm
    if extra == "tokenizer":
        _tokenizer_json(tmp_path / "tok", 400)
        extra = ["--tokenizer-dir", str(tmp_path / "tok")]
    out = tmp_path / "out"
    args = ["--direction", "megatron-to-hf", "--no-progress", "--input", mg, "--output", str(out)]
    assert _tool_main()([*args, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not out.exists() and os.listdir(tmp_path) in ([], ["tok"])


def test_tokenizer_dir_vocab_size_sources(tmp_path, tiny_sp_model):
    """config.json first, then tokenizer.json (highest id + 1), then a SentencePiece model."""
    assert tokenizer_dir_vocab_size(str(tmp_path)) is None
    shutil.copy(tiny_sp_model, tmp_path / "tokenizer.model")
    assert tokenizer_dir_vocab_size(str(tmp_path))[0] == 400  # the fixture's piece count
    _tokenizer_json(tmp_path, 123, added=5)
    assert tokenizer_dir_vocab_size(str(tmp_path)) == (123, str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 128256}))
    assert tokenizer_dir_vocab_size(str(tmp_path))[0] == 128256
