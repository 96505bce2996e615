"""Model-test fixtures: a single-process megatron parallel state."""

from __future__ import annotations

import pytest

from megatron_endprompt.training import device


@pytest.fixture(scope="module")
def single_process_parallel_state():
    """A 1-rank gloo group with megatron's parallel state (TP = PP = CP = 1)."""
    device.init_distributed("gloo", rank=0, world_size=1)
    device.initialize_model_parallel()
    yield
    # Left in place: other modules of the session may use the same 1-rank state.
