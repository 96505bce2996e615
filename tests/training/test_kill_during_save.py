"""kill -9 at every step of a checkpoint save, re-saves included: the tracker always names a
checkpoint that loads (checksum verified) with the content of one complete save, and the next
save recovers.

``kill_save_worker.py`` tries every crash point of the save's file-system sequence (SIGKILL just
before its k-th operation, for every k), not a sample of timings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kill_save_worker.py")


@pytest.mark.parametrize(
    "iteration, value", [(4, 4.0), (2, 9.0)], ids=["new_iteration", "resave_same_iteration"]
)
def test_kill_at_every_step_of_a_save_leaves_a_loadable_tracker(tmp_path, iteration, value):
    done = subprocess.run([sys.executable, WORKER, str(tmp_path), str(iteration), str(value)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in done.stdout.splitlines()]
    *killed, completed = records
    assert all(r["killed"] for r in killed) and not completed["killed"]
    assert completed["exit"] == 0 and completed["loaded"] == [iteration, value, True]
    assert len(killed) > 5  # the save really has several steps, each one tried
    for r in records:
        # Loads (its checksum verified), all of one save: the previous one or the new one.
        assert r["loaded"] in ([2, 2.0, True], [iteration, value, True]), r
        assert r["after_next_save"] == [6, 6.0, True] and r["leftovers"] == [], r
    outcomes = {tuple(r["loaded"]) for r in killed}
    assert outcomes == {(2, 2.0, True), (iteration, value, True)}  # both sides of the commit
