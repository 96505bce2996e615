"""Prep tests reuse the dataset tests' corpus helpers: put tests/data/ on the import path."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
