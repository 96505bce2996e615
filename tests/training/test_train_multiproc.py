"""Data- and tensor-parallel CPU training (2 gloo processes under torchrun) match one process."""

import re
import subprocess
import sys

import pytest
from train_fixtures import make_corpus, train_flags

from megatron_endprompt.device import free_port

LINE = re.compile(r"^iter\s+(\d+)/\d+ \| loss ([\d.e+-]+) \| lr [\d.e+-]+ \| grad_norm ([\d.e+-]+)")


def _metrics(cmd: list[str]) -> list[tuple[float, float]]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [LINE.match(line) for line in proc.stdout.splitlines()]
    return [(float(m.group(2)), float(m.group(3))) for m in rows if m]


@pytest.fixture(scope="module")
def flags(tmp_path_factory):
    d = tmp_path_factory.mktemp("mp")
    # Divisible-by 2 pads the 259-token byte vocabulary to 260 for both TP=1 and TP=2, so the
    # two layouts initialise the same full model from the same seed.
    return train_flags(
        make_corpus(str(d)),
        str(d / "cache"),
        "--train-iters",
        "4",
        "--make-vocab-size-divisible-by",
        "2",
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "parallel", [[], ["--tensor-model-parallel-size", "2"]], ids=["dp2", "tp2"]
)
def test_two_processes_match_one(flags, parallel):
    single = _metrics([sys.executable, "-m", "megatron_endprompt.train", *flags])
    multi = _metrics(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(free_port()),
            "-m",
            "megatron_endprompt.train",
            *flags,
            *parallel,
        ]
    )
    assert len(single) == len(multi) == 4
    for (loss1, norm1), (loss2, norm2) in zip(single, multi):
        # Same global batch and weights; only the reduction order differs (printed to 6 digits).
        assert loss2 == pytest.approx(loss1, rel=2e-5)
        assert norm2 == pytest.approx(norm1, rel=2e-5)
