"""Megatron-LM's --mock-data: megatron-core's synthetic documents, no --data-path, our layouts.

Facts from Megatron-LM core_v0.16.1: ``pretrain_gpt.py`` builds ``MockGPTDataset`` with the run's
tokenizer (its example script pairs --mock-data with ``--tokenizer-type NullTokenizer
--vocab-size N``); ``validate_args`` refuses --mock-data together with --data-path ("A single data
source must be provided"); megatron-core's dataset config, given no blend, sets ``mock`` and the
split "1,1,1" whatever --split says.
"""

import types

import numpy as np
import pytest
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, MockGPTDataset

from megatron_endprompt.cli import parse_run_config
from megatron_endprompt.positions import endprompt_positions
from megatron_endprompt.training.loop import train
from megatron_endprompt.training.state import build_datasets_for_run, build_tokenizer_for_run

MOCK = [
    "--model-preset", "tiny", "--device", "cpu", "--num-layers", "2", "--hidden-size", "64",
    "--ffn-hidden-size", "128", "--num-attention-heads", "4", "--num-query-groups", "2",
    "--seq-length", "32", "--max-position-embeddings", "256", "--make-vocab-size-divisible-by",
    "1", "--tokenizer-type", "NullTokenizer", "--vocab-size", "300", "--mock-data",
    "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "2",
    "--eval-iters", "1", "--num-workers", "0", "--log-interval", "1", "--seed", "11",
]  # fmt: skip
TAIL = ["--position-mode", "endprompt", "--target-length", "256", "--endprompt-terminal", "tail",
        "--endprompt-tail-length", "4", "--allow-unscaled-extension"]  # fmt: skip
READER = types.SimpleNamespace(is_data_reader=True)


def _datasets(argv):
    run = parse_run_config(argv)
    return run, build_datasets_for_run(run, READER, build_tokenizer_for_run(run))


@pytest.fixture(scope="module")
def contiguous():
    return _datasets([*MOCK, "--position-mode", "contiguous"])


def _megatron_mock(run, tokenizer, sizes):
    """megatron-core's own MockGPTDataset splits, configured as Megatron-LM configures them."""
    config = GPTDatasetConfig(
        random_seed=run.training.seed, sequence_length=run.model.seq_length, blend=None,
        tokenizer=tokenizer, reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=False, create_attention_mask=False,
    )  # fmt: skip
    return BlendedMegatronDatasetBuilder(MockGPTDataset, sizes, lambda: True, config).build()


def test_contiguous_samples_are_megatron_cores_mock_samples(contiguous):
    run, (train_ds, valid_ds) = contiguous
    assert run.data.split == "1,1,1" and not run.data.data_path
    sizes = [run.train_dataset_samples, run.training.eval_iters * 4, 0]
    ref_train, ref_valid, _ = _megatron_mock(run, train_ds.config.tokenizer, sizes)
    for ours, ref in ((train_ds, ref_train), (valid_ds, ref_valid)):
        assert len(ours) == len(ref)
        for i in [*range(8), len(ref) - 1]:
            a, b = ours[i], ref[i]
            for key in ("tokens", "labels", "loss_mask", "position_ids"):
                assert torch.equal(a[key], b[key]), (i, key)


def test_endprompt_layout_over_mock_text(contiguous):
    """Tail terminal, fixed placement: the text is the contiguous mock sample itself, the
    positions are [0 .. S-t-1] then [L-t .. L-1] (DESIGN.md's worked example)."""
    _, (plain, _) = contiguous
    run, (train_ds, _) = _datasets([*MOCK, *TAIL])
    expected = endprompt_positions(28, 4, 256, "fixed", np.random.default_rng(0))
    assert list(expected) == [*range(28), *range(252, 256)]
    for i in range(8):
        got, ref = train_ds[i], plain[i]
        for key in ("tokens", "labels"):
            assert torch.equal(got[key], ref[key]), (i, key)
        assert got["position_ids"].tolist() == list(expected)


def test_cpu_run_trains_two_iterations_on_mock_data(capsys):
    result = train(parse_run_config(MOCK))
    assert result.iterations == 2 and result.consumed_samples == 8
    assert all(np.isfinite(result.losses)) and np.isfinite(result.valid_loss)
    # Untrained, the loss is about ln(vocabulary): 301 ids (300 + EOD) padded to 301.
    assert abs(result.losses[0] - np.log(301)) < 1.0


def test_split_is_noted_as_without_effect():
    run = parse_run_config([*MOCK, "--split", "99,1,0"])
    assert run.data.split == "1,1,1"
    assert any(n.startswith("--split=99,1,0: no effect with --mock-data") for n in run.notices)


def test_null_tokenizer_text_cues_are_refused_naming_the_flag(capsys, monkeypatch):
    from megatron_endprompt.train import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cue = [*TAIL[:4], "--endprompt-terminal", "cue", "--allow-unscaled-extension"]
    assert main([*MOCK, *cue]) == 2
    first = capsys.readouterr().err.strip().splitlines()[0]
    assert first.startswith("error: --endprompt-cues: the default cue 'This is the end") and (
        "NullTokenizer" in first and '--endprompt-cues "7 8 9"' in first
    ), first
    assert main([*MOCK, *cue, "--endprompt-cues", "7 8 9"]) == 0  # cues as ids train
