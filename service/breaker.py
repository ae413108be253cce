"""A consecutive-failure circuit breaker shared by the cache and the LLM client.

It counts real failures (not calls): ``failures`` in a row open it; while open, ``allow()`` is
false so callers skip the dependency at once instead of waiting on timeouts; after ``reset_s``
one trial call is let through (half-open) and its outcome closes or re-opens the breaker.
Single event loop per process, so no lock is needed.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

from prometheus_client import Gauge


class CircuitBreaker:
    def __init__(
        self,
        failures: int,
        reset_s: float,
        gauge: Gauge | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._threshold = failures
        self._reset_s = reset_s
        self._gauge = gauge
        self._clock = clock
        self._consecutive = 0
        self._opened_at: float | None = None
        self._trial_in_flight = False

    @property
    def is_open(self) -> bool:
        return self._opened_at is not None

    @property
    def consecutive_failures(self) -> int:
        return self._consecutive

    def allow(self) -> bool:
        """True if a call may go to the dependency now."""
        if self._opened_at is None:
            return True
        if self._trial_in_flight or self._clock() - self._opened_at < self._reset_s:
            return False
        self._trial_in_flight = True  # half-open: exactly one probe
        return True

    def record_success(self) -> None:
        self._consecutive = 0
        self._trial_in_flight = False
        if self._opened_at is not None:
            self._opened_at = None
            self._set_gauge(0)

    def record_failure(self) -> None:
        self._consecutive += 1
        if self._trial_in_flight or self._consecutive >= self._threshold:
            self._trial_in_flight = False
            self._opened_at = self._clock()
            self._set_gauge(1)

    def _set_gauge(self, value: int) -> None:
        if self._gauge is not None:
            with contextlib.suppress(Exception):  # a metrics failure never fails a request
                self._gauge.set(value)
