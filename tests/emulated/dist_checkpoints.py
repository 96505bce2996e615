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

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "training"))

sys.path.insert(0, str(HERE))

from emulated_run import launch_plan  # noqa: E402
from train_fixtures import make_corpus, train_flags  # noqa: E402

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
    """The ``--save`` directory of layout ``name`` (see ``LAYOUTS``), saved after 1 iteration.

    The first request for a layout saves every layout of the same process count in one
    launch (megatron-core and torch are imported once per launch, not once per layout).
    """
    root = tmp_path_factory.getbasetemp() / "dist_checkpoints"
    save = root / name
    if (save / "latest_checkpointed_iteration.txt").is_file():
        return str(save)
    nproc = LAYOUTS[name][0]
    flags = _flags(root)
    runs = [
        {
            "name": other,
            "flags": [*flags, *layout, "--train-iters", "1", "--save", str(root / other)],
        }
        for other, (n, layout) in LAYOUTS.items()
        if n == nproc and not (root / other / "latest_checkpointed_iteration.txt").is_file()
    ]
    launch_plan(nproc, runs, root / f"launch{nproc}")
    return str(save)
