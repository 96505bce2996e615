"""Plain progress lines with an ETA, for logs (``--no-progress``), where tqdm bars would not do.

``ProgressLines`` counts units of work (trials, windows) and, when asked, prints one line such as
``passkey@1024: 20/50 trials, elapsed 0m12s eta 0m18s`` to stderr. The ETA extrapolates the
elapsed time of the whole task linearly over the units left.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from megatron_endprompt.cli_utils import format_duration


class ProgressLines:
    """One stderr line per reported step: ``"<label>: done/total unit, elapsed .. eta .."``.

    Args:
        total: units of the whole task (>= 1).
        enabled: print nothing when False (updates are still counted).
        stream: where to print (default ``sys.stderr``, looked up at print time).
        clock: seconds (default ``time.monotonic``).
    """

    def __init__(
        self,
        total: int,
        enabled: bool = True,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = max(1, int(total))
        self.enabled = enabled
        self.stream = stream
        self.clock = clock
        self.done = 0
        self.start = clock()

    def update(self, n: int = 1) -> None:
        """Count ``n`` finished units."""
        self.done += n

    def line(self, label: str, part_done: int, part_total: int, unit: str) -> str:
        """The text of one progress line (``part_*``: the progress of the current interval)."""
        elapsed = self.clock() - self.start
        if self.done > 0:
            eta = format_duration(elapsed * (self.total - self.done) / self.done)
        else:
            eta = "?"
        whole = f" ({self.done}/{self.total} total)" if part_total != self.total else ""
        return (
            f"{label}: {part_done}/{part_total} {unit}{whole}, "
            f"elapsed {format_duration(elapsed)} eta {eta}"
        )

    def report(self, label: str, part_done: int, part_total: int, unit: str) -> None:
        """Print :meth:`line` (when enabled) and flush."""
        if not self.enabled:
            return
        stream = self.stream if self.stream is not None else sys.stderr
        print(self.line(label, part_done, part_total, unit), file=stream, flush=True)
