"""The LLM simulator as a real process for the LLM and simulator tests: the local stack's own launcher
(:class:`localstack.services.SimulatorServer`) with fast latencies, one process per test module."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from localstack.process import free_port
from localstack.services import SimulatorServer
from tests.conftest import SIM_FAST_ENV

FAST_ENV = SIM_FAST_ENV
SimProc = SimulatorServer

__all__ = ["FAST_ENV", "SimProc", "free_port", "running_simulator"]


@contextlib.contextmanager
def running_simulator(env: dict[str, str] | None = None) -> Iterator[SimulatorServer]:
    """A simulator on a free port with :data:`FAST_ENV` plus ``env``; stopped (by its process group) on exit."""
    with SimulatorServer({**FAST_ENV, **(env or {})}) as sim:
        yield sim
