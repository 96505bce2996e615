"""Worker of test_kill_during_save: kill -9 at every file-system step of one checkpoint save.

Run as ``python kill_save_worker.py SAVE_ROOT ITERATION VALUE`` in a fresh interpreter (forking
the test process itself could deadlock on its threads). For k = 1, 2, ... it saves iteration 2,
forks a child that saves ``ITERATION`` with SIGKILL sent to itself just before its k-th
operation (directory creation, rename, removal, fsync), then records what loads afterwards and
whether the next save recovers; one JSON line per k, until a child completes its save.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys

import torch

from megatron_endprompt import checkpoint as ckpt

OPERATIONS = ("replace", "makedirs", "remove", "fsync")


def state(value: float) -> dict:
    return {"model": {"w": torch.full((8,), value)}, "consumed_samples": int(value)}


def loaded(save: str) -> list:
    """[tracker iteration, the value of the loaded weights, whether they are all that value]."""
    w = ckpt.load_checkpoint(save, ckpt.ShardRank())["model"]["w"]
    return [ckpt.read_tracker(save), float(w[0]), bool(torch.all(w == w[0]))]


def killed_save(save: str, iteration: int, value: float, kill_at: int) -> None:
    count = [0]

    def killing(real):
        def op(*args, **kwargs):
            count[0] += 1
            if count[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)

        return op

    for name in OPERATIONS:
        setattr(os, name, killing(getattr(os, name)))
    shutil.rmtree = killing(shutil.rmtree)
    ckpt.save_checkpoint(save, iteration, state(value), ckpt.ShardRank())


def main(root: str, iteration: int, value: float) -> None:
    torch.set_num_threads(1)  # no thread pool in a process that forks
    for kill_at in range(1, 100):
        save = os.path.join(root, f"k{kill_at}")
        ckpt.save_checkpoint(save, 2, state(2.0), ckpt.ShardRank())
        pid = os.fork()
        if pid == 0:
            killed_save(save, iteration, value, kill_at)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        after_kill = loaded(save)
        ckpt.save_checkpoint(save, 6, state(6.0), ckpt.ShardRank())
        leftovers = sorted(n for n in os.listdir(save) if n.endswith((".tmp", ".old")))
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        record = {
            "kill_at": kill_at,
            "killed": killed,
            "exit": os.waitstatus_to_exitcode(status),
            "loaded": after_kill,
            "after_next_save": loaded(save),
            "leftovers": leftovers,
        }
        print(json.dumps(record), flush=True)
        if not killed:
            return


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))
