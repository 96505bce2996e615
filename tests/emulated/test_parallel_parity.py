"""The ``--device cuda`` path (megatron-core DDP, optimizers, schedules, dist checkpoints) on CPU.

Every layout trains from the same weights (one dist checkpoint, resharded on load) on the same
global batches, and must match ONE process: loss and grad norm of each of 4 iterations. The
one-process reference itself is checked against the CPU path (its own loop, torch AdamW), an
independent implementation of the same step. The runs come from the launches in conftest.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from emulated_run import ITERS, assert_refused_save_kept_tracker, train_flags

from megatron_endprompt import checkpoint as ckpt

pytestmark = pytest.mark.slow

# (name, launch, relative tolerance against the one-process run of the same dtype). Pipeline
# splits compute the loss bit for bit; the grad norm's sum of squares is added up per stage
# (float32 rounding, ~1e-7). DP and TP change the order of reductions.
LAYOUTS = [
    ("pp2", "two_ranks", 1e-6),
    ("pp2_vpp2", "two_ranks", 1e-6),
    ("dp2_pp2", "four_ranks", 2e-5),
    ("tp2_pp2", "four_ranks", 2e-5),
    ("dp2_pp2_bf16_distopt", "four_ranks", 1e-5),
]


def _close(a: float, b: float, rel: float) -> bool:
    return abs(a - b) <= rel * abs(b)


def assert_parity(name: str, got: dict, ref: dict, rel: float, first: int = 0) -> None:
    """Iterations ``first+1 .. ITERS`` of ``got`` against the reference's."""
    ref_losses, ref_norms = ref["losses"][first:], ref["grad_norms"][first:]
    rows = list(zip(got["losses"], got["grad_norms"], ref_losses, ref_norms))
    print(f"\nPARITY {name} (loss, grad norm, reference loss, reference norm): {json.dumps(rows)}")
    assert len(rows) == ITERS - first and got["iterations"] == ITERS
    for i, (loss, norm, ref_loss, ref_norm) in enumerate(rows, first + 1):
        assert _close(loss, ref_loss, rel), f"{name} iteration {i}: loss {loss} vs {ref_loss}"
        assert _close(norm, ref_norm, rel), f"{name} iteration {i}: norm {norm} vs {ref_norm}"


def test_one_process_matches_the_cpu_path(one_rank, emu_data):
    """One emulated megatron-core process == the CPU path (own loop, torch AdamW), same seed.

    The CPU path builds the same weights from the seed; it cannot read dist checkpoints, so
    the comparison starts from initialisation (the ``fresh`` run).
    """
    cmd = [sys.executable, "-m", "megatron_endprompt.train", "--device", "cpu"]
    proc = subprocess.run(
        [*cmd, *train_flags(emu_data)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("iter ")]
    cpu = [float(ln.split("| loss ")[1].split()[0]) for ln in lines]
    cpu += [float(ln.split("| grad_norm ")[1].split()[0]) for ln in lines]
    ours = one_rank["fresh"]["losses"] + one_rank["fresh"]["grad_norms"]
    assert len(cpu) == len(ours) == 2 * ITERS
    for got, want in zip(ours, cpu):
        assert got == pytest.approx(want, rel=2e-5)  # the console prints 6 digits


@pytest.mark.parametrize("name,launch,rel", LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_layout_matches_one_process(request, one_rank, name, launch, rel):
    ref = one_rank["ref_bf16" if "bf16" in name else "ref"]
    assert_parity(name, request.getfixturevalue(launch)[name], ref, rel)


def test_sigterm_on_one_rank_saves_and_every_rank_exits(two_ranks):
    """Preemption on the CUDA path: rank 0 alone is signalled; the checkpoint is published."""
    first = two_ranks["pp2_first"]
    assert first["interrupted"] and first["iterations"] == 2
    assert all(r["interrupted"] and r["iterations"] == 2 for r in first["ranks"])
    save = first["save"]
    assert first["checkpoint"] == ckpt.iteration_dir(save, 2)
    assert ckpt.read_tracker(save) == 2 and os.path.isdir(ckpt.iteration_dir(save, 2))


def test_full_disk_on_one_rank_fails_every_rank_and_keeps_the_tracker(two_ranks):
    """dist_checkpointing's write of iteration 4 refused on rank 1 only: every rank ends with
    the one-line error (no rank waits forever), the partial iter_0000004.tmp is gone and the
    tracker still names iteration 2, which loads."""
    assert_refused_save_kept_tracker(two_ranks["pp2_disk_full"], "torch_dist")


@pytest.mark.parametrize(
    "launch,straight,first,resumed",
    [
        ("two_ranks", "pp2", "pp2_first", "pp2_resumed"),
        ("four_ranks", "dp2_pp2_bf16_distopt", "distopt_first", "distopt_resumed"),
    ],
    ids=["pp2", "dp2_pp2_bf16_distopt"],
)
def test_dist_checkpoint_resume_is_bit_exact(request, launch, straight, first, resumed):
    """Saved at iteration 2 (SIGTERM / --exit-interval), resumed to 4: the same floats."""
    runs = request.getfixturevalue(launch)
    assert runs[first]["iterations"] == 2 and ckpt.read_tracker(runs[first]["save"]) == 2
    got, want = runs[resumed], runs[straight]
    assert got["iterations"] == ITERS and len(got["losses"]) == ITERS - 2
    assert got["losses"] == want["losses"][2:]
    assert got["grad_norms"] == want["grad_norms"][2:]


def test_checkpoint_resumes_at_another_layout(two_ranks, one_rank):
    """Saved at PP=2 (model and optimizer state), resumed at TP=2: iterations 3-4 as one process."""
    assert_parity("pp2 -> tp2 resume", two_ranks["tp2_resumed"], one_rank["ref"], 2e-5, first=2)
