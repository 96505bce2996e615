"""dist_checkpointing checkpoints written by the real CUDA training path, for reader tests.

megatron-core's dist-checkpoint WRITER calls CUDA, so each checkpoint is saved by one emulated
``--device cuda`` run (``emulated_train.py``: the real ``training.loop.train`` under
``cuda_emulation``, one iteration, ``--save``) at its own TP/PP/VPP layout. The READERS under
test (``checkpoint/dist_reader.py``, evaluation, export) run in the plain test process, without any
emulation. Checkpoints are made on first use and shared by every test of the session (they live
under pytest's base temporary directory).

    from dist_checkpoints import dist_checkpoint
    path = dist_checkpoint(tmp_path_factory, "tp2")
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "training"))

from train_fixtures import make_corpus, train_flags  # noqa: E402

from megatron_endprompt.device import free_port  # noqa: E402

# name -> (processes, layout flags). 4 layers so PP = 2 x VPP = 2 has one layer per chunk.
LAYOUTS = {
    "tp1": (1, []),
    "pp2": (2, ["--pipeline-model-parallel-size", "2"]),
    "tp2": (2, ["--tensor-model-parallel-size", "2"]),
    "pp2_vpp2": (2, ["--pipeline-model-parallel-size", "2",
                     "--num-layers-per-virtual-pipeline-stage", "1"]),
}  # fmt: skip
# Divisible-by 2 pads the 259-id byte vocabulary to 260 at TP = 1 and TP = 2 alike.
MODEL = ["--num-layers", "4", "--make-vocab-size-divisible-by", "2"]


def _flags(root: Path) -> list[str]:
    data = root / "data"
    if not (data / "corpus_text_document.idx").is_file():
        data.mkdir(parents=True, exist_ok=True)
        make_corpus(str(data))
    flags = train_flags(str(data / "corpus_text_document"), str(data / "cache"), *MODEL)
    i = flags.index("--device")
    return flags[:i] + flags[i + 2 :]  # the emulated worker sets --device cuda itself


def dist_checkpoint(tmp_path_factory, name: str) -> str:  # noqa: ANN001
    """The ``--save`` directory of layout ``name`` (see ``LAYOUTS``), saved after 1 iteration."""
    root = tmp_path_factory.getbasetemp() / "dist_checkpoints"
    save = root / name
    if (save / "latest_checkpointed_iteration.txt").is_file():
        return str(save)
    nproc, layout = LAYOUTS[name]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-port", str(free_port()), str(HERE / "emulated_train.py"),
        str(root / f"{name}.out"), *_flags(root), *layout,
        "--train-iters", "1", "--save", str(save),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return str(save)
