"""Load a command-line tool's ``main`` in-process (``tools/`` is a folder of scripts, not a
package), so tests call it with argv and read its exit status and output."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tool_main(name: str) -> Callable[[list[str] | None], int]:
    """``tools/<name>``'s ``main`` (``name`` with its ``.py``)."""
    path = os.path.join(REPO, "tools", name)
    spec = importlib.util.spec_from_file_location(f"tool_{name.removesuffix('.py')}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main
