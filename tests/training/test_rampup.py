"""Megatron-LM's --rampup-batch-size: the batch of each iteration, the samples read, resume.

The expected sequences are worked by hand from megatron-core's rule (the calculator's docstring:
over ``(G - START) / INCREMENT`` increments the batch grows by INCREMENT every
``SAMPLES / increments`` consumed samples, then stays at G once more than SAMPLES were consumed)
and Megatron-LM's run length (``update_train_iters``: ramp iterations while at most SAMPLES and
at most --train-samples were consumed, then whole batches of G).

Hand-worked ramp, START 2, INCREMENT 2, SAMPLES 12, G 8: 3 increments, one every 12 / 3 = 4
samples, so the batch after c consumed samples is 2 + 2 * int(c / 4) while c <= 12, then 8:

    iteration          1  2  3  4   5   6
    consumed before    0  2  4  8  14  22
    global batch       2  2  4  6   8   8      (30 samples after iteration 6)
"""

import contextlib
import re
import subprocess
import sys

import pytest
from megatron.core.datasets.utils import Split
from megatron.core.num_microbatches_calculator import RampupBatchsizeNumMicroBatchesCalculator
from train_fixtures import _groups, make_corpus, train_flags

from megatron_endprompt import checkpoint as ckpt
from megatron_endprompt.cli import parse_run_config
from megatron_endprompt.data.dataset import EndPromptDataset
from megatron_endprompt.device import free_port
from megatron_endprompt.training.data import PretrainingSampler
from megatron_endprompt.training.loop import train

RAMP = ["--rampup-batch-size", "2", "2", "12", "--global-batch-size", "8"]
HAND_BATCHES = [2, 2, 4, 6, 8, 8]
HAND_CONSUMED_BEFORE = [0, 2, 4, 8, 14, 22]


def ramp_flags(data: str, cache: str, *extra: str) -> list[str]:
    """A tiny CPU run on the hand-worked ramp: 30 samples, linear decay over them, no warmup."""
    base = train_flags(data, cache, "--micro-batch-size", "1", "--lr-decay-style", "linear",
                       "--eval-iters", "0", "--train-samples", "30", *RAMP, *extra)  # fmt: skip
    iteration_based = {"--lr-warmup-iters", "--lr-decay-iters"}  # train_flags' defaults
    return [item for group in _groups(base) if group[0] not in iteration_based for item in group]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("ramp_corpus")
    return make_corpus(str(d)), str(d / "cache")


def _megatron_core_batches(dp: int, consumed_before: list[int]) -> list[tuple[int, int]]:
    """(global batch, micro-batches) of megatron-core's calculator at each consumed count."""
    calc = RampupBatchsizeNumMicroBatchesCalculator(8, 1, dp, False, 1, 2, 2, 12)
    out = []
    for consumed in consumed_before:
        calc.update(consumed, consistency_check=True)
        out.append((calc.get_current_global_batch_size(), calc.get()))
    return out


def _parse(train_samples: int, world_size: int = 1):
    argv = ["--model-preset", "tiny", "--device", "cpu", "--tokenizer-type", "ByteTokenizer",
            "--data-path", "x", "--micro-batch-size", "1", "--train-samples",
            str(train_samples), *RAMP]  # fmt: skip
    return parse_run_config(argv, world_size=world_size)


@pytest.mark.parametrize("dp", [1, 2])
def test_hand_worked_ramp_matches_megatron_core(dp):
    run = _parse(30, world_size=dp)
    assert run.train_iters == 6 and run.train_dataset_samples == 30
    plan = run.ramp_plan()
    assert list(plan.ramp_batches) == HAND_BATCHES[:4] and plan.constant_iterations == 2
    schedule = run.batch_schedule()
    ours = [(g, schedule.num_microbatches(g))
            for g in map(schedule.global_batch_at, HAND_CONSUMED_BEFORE)]  # fmt: skip
    hand = [(g, g // dp) for g in HAND_BATCHES]
    assert ours == hand == _megatron_core_batches(dp, HAND_CONSUMED_BEFORE)


@pytest.mark.parametrize(
    "train_samples,iterations,consumed",
    [
        (30, 6, 30),
        (33, 6, 30),  # 33 - 14 = 19 samples after the ramp: two whole batches of 8, 3 dropped
        (10, 4, 14),  # inside the ramp: batches 2 2 4 6 while at most 10 consumed (0, 2, 4, 8)
        (3, 2, 4),  # 0 and 2 consumed are <= 3: two batches of 2
    ],
)
def test_run_length_is_megatron_lms(train_samples, iterations, consumed):
    run = _parse(train_samples)
    assert run.train_iters == iterations
    assert run.ramp_plan().consumed_samples == consumed
    assert run.train_dataset_samples == max(train_samples, consumed)


@pytest.mark.parametrize("dp", [1, 2])
def test_sampler_reads_megatron_lms_order_along_the_ramp(dp):
    """MegatronPretrainingSampler's order: iteration i reads dataset indices [c_i, c_i + G_i);
    each micro-batch step takes the next micro x DP indices and rank r keeps the r-th."""
    samplers = [iter(PretrainingSampler(100, 0, 1, r, dp)) for r in range(dp)]
    for consumed, size in zip(HAND_CONSUMED_BEFORE, HAND_BATCHES):
        per_rank = [[next(s)[0] for _ in range(size // dp)] for s in samplers]
        for r, indices in enumerate(per_rank):
            assert indices == [consumed + step * dp + r for step in range(size // dp)]
        assert sorted(i for idx in per_rank for i in idx) == list(range(consumed, consumed + size))


def _spy_train_reads(monkeypatch) -> list[int]:
    read: list[int] = []
    real = EndPromptDataset.__getitem__

    def getitem(self, idx):
        if self.index_split == Split.train:
            read.append(int(idx))
        return real(self, idx)

    monkeypatch.setattr(EndPromptDataset, "__getitem__", getitem)
    return read


def _scalars(line: str):
    """``name value`` pairs of a console line's ``|``-separated fields."""
    for field in line.split(" | ")[1:]:
        name, _, value = field.partition(" ")
        with contextlib.suppress(ValueError):
            yield name, float(value)


def test_cpu_run_follows_the_ramp(corpus, monkeypatch, capsys):
    """Batch sizes, samples read in order, consumed samples, the LR counted in samples, logs."""
    read = _spy_train_reads(monkeypatch)
    result = train(parse_run_config(ramp_flags(*corpus, "--log-interval", "1")))
    assert result.iterations == 6 and result.global_batch_sizes == HAND_BATCHES
    assert result.consumed_samples == 30 and read == list(range(30))
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("iter ")]
    logged = [dict(_scalars(ln)) for ln in lines]
    assert [int(x["global_batch_size"]) for x in logged] == HAND_BATCHES
    after = [c + g for c, g in zip(HAND_CONSUMED_BEFORE, HAND_BATCHES)]
    assert [int(x["consumed_samples"]) for x in logged] == after
    # megatron-core's linear decay over --train-samples = 30 samples, no warmup: the rate after
    # c consumed samples is lr * (1 - c / 30).
    for x, c in zip(logged, after):
        assert x["lr"] == pytest.approx(1e-3 * (1 - c / 30), rel=1e-5, abs=1e-12)


def test_resume_mid_ramp_is_bitwise_identical(corpus, tmp_path):
    straight = train(parse_run_config(ramp_flags(*corpus)))
    save = str(tmp_path / "ckpt")
    first = train(parse_run_config(ramp_flags(*corpus, "--save", save, "--exit-interval", "3")))
    assert first.interrupted and first.consumed_samples == 8
    # Megatron-LM saves when the batch changes (after iteration 2: 2 -> 4), and the exit at 3.
    assert ckpt.read_tracker(save) == 3 and (tmp_path / "ckpt" / "iter_0000002").is_dir()
    second = train(parse_run_config(ramp_flags(*corpus, "--load", save, "--save", save)))
    assert first.global_batch_sizes + second.global_batch_sizes == HAND_BATCHES
    assert second.consumed_samples == straight.consumed_samples == 30
    assert first.losses + second.losses == straight.losses  # bitwise, float for float
    assert first.grad_norms + second.grad_norms == straight.grad_norms


LINE = re.compile(r"^iter\s+\d+/\d+ \| loss ([\d.e+-]+) \| lr [\d.e+-]+ \| grad_norm ([\d.e+-]+)")


def _metrics(cmd: list[str]) -> list[tuple[float, float]]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [LINE.match(line) for line in proc.stdout.splitlines()]
    return [(float(m.group(1)), float(m.group(2))) for m in rows if m]


@pytest.mark.slow
def test_two_data_parallel_ranks_ramp_as_one_process(corpus):
    """DP=2 reads each ramp batch split over the ranks: losses and norms as one process."""
    flags = ramp_flags(*corpus, "--make-vocab-size-divisible-by", "2")
    single = _metrics([sys.executable, "-m", "megatron_endprompt.train", *flags])
    multi = _metrics([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                      "--master-port", str(free_port()), "-m", "megatron_endprompt.train",
                      *flags])  # fmt: skip
    assert len(single) == len(multi) == len(HAND_BATCHES)
    for (loss1, norm1), (loss2, norm2) in zip(single, multi):
        assert loss2 == pytest.approx(loss1, rel=2e-5)
        assert norm2 == pytest.approx(norm1, rel=2e-5)
