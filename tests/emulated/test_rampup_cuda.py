"""--rampup-batch-size on the CUDA path (megatron-core schedules, DDP, dist checkpoints) on CPU.

The ramp (emulated_run.RAMP: batches 4, 4, 8, 8 of micro-batches of 2) changes the number of
micro-batches megatron-core's schedule runs per iteration. The one-process run is checked against
the CPU path (its own loop and optimizer), PP=2 against one process, and a PP=2 run stopped
mid-ramp and resumed against the straight one. The runs come from the launches in conftest.py.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from emulated_run import ITERS, RAMP_BATCHES, ramp_flags
from test_parallel_parity import assert_parity

from megatron_endprompt import checkpoint as ckpt

pytestmark = pytest.mark.slow


def test_ramp_follows_the_calculator_on_the_cuda_path(one_rank, two_ranks):
    for name, runs in (("ramp_fresh", one_rank), ("ramp_ref", one_rank), ("pp2_ramp", two_ranks)):
        got = runs[name]
        assert got["global_batch_sizes"] == RAMP_BATCHES, name
        assert got["iterations"] == ITERS and got["consumed_samples"] == sum(RAMP_BATCHES), name


def test_one_process_ramp_matches_the_cpu_path(one_rank, emu_data):
    """Same seed, same ramp: the megatron-core step and the CPU path's own step agree."""
    cmd = [sys.executable, "-m", "megatron_endprompt.train", "--device", "cpu"]
    proc = subprocess.run([*cmd, *ramp_flags(emu_data)], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("iter ")]
    cpu = [float(ln.split("| loss ")[1].split()[0]) for ln in lines]
    cpu += [float(ln.split("| grad_norm ")[1].split()[0]) for ln in lines]
    batches = [int(ln.split("| global_batch_size ")[1].split()[0]) for ln in lines]
    assert batches == RAMP_BATCHES
    ours = one_rank["ramp_fresh"]["losses"] + one_rank["ramp_fresh"]["grad_norms"]
    assert len(cpu) == len(ours) == 2 * ITERS
    for got, want in zip(ours, cpu):
        assert got == pytest.approx(want, rel=2e-5)  # the console prints 6 digits


def test_pp2_ramp_matches_one_process(one_rank, two_ranks):
    assert_parity("pp2 ramp", two_ranks["pp2_ramp"], one_rank["ramp_ref"], 1e-6)


def test_pp2_resume_mid_ramp_is_bit_exact(two_ranks):
    first, resumed, straight = (two_ranks[n] for n in ("pp2_ramp_first", "pp2_ramp_resumed",
                                                       "pp2_ramp"))  # fmt: skip
    assert first["iterations"] == 2 and first["consumed_samples"] == 8
    assert ckpt.read_tracker(first["save"]) == 2
    assert first["global_batch_sizes"] + resumed["global_batch_sizes"] == RAMP_BATCHES
    assert resumed["losses"] == straight["losses"][2:]
    assert resumed["grad_norms"] == straight["grad_norms"][2:]
