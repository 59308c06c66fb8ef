"""Concurrency limit algorithms: how many requests the application may serve at once.

A `LimitAlgorithm` is told about every request that reached the application (never about a
fast rejection) and about the event loop's lag, and answers with a concurrency limit. The
load-shedding engine (`_shedding.ConcurrencyLimiter`) reads ``limit`` before each admission.

The algorithms themselves (`Fixed`, `AIMD`, `Vegas`, `Gradient2`, `Adaptive`) live in
`_algorithms`. They keep no clock: time comes as the ``now`` of each call, so ``on_lag`` is
also their clock (it ends a no-load measurement that no request comes to end); the engine
calls it regularly, at no particular fixed interval, from the same monotonic clock as
``on_sample``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

__all__ = ["LimitAlgorithm"]


@runtime_checkable
class LimitAlgorithm(Protocol):
    """A concurrency limit that may learn from what requests experience.

    One instance serves one limiter (one middleware or one bulkhead) in one process; it is
    called only from the event loop thread, so it needs no lock. Every method must be cheap
    (a few microseconds): ``on_sample`` runs once per request.

    Optionally, beyond the protocol: an algorithm that holds its limit down at the start to
    measure (as `Adaptive` and `Vegas` run five requests alone) may have a ``learning``
    attribute, true meanwhile. The engine then lets requests wait longer and never counts
    its queue as standing, instead of treating the low limit as overload; once ``learning``
    is false, the engine reads it no more.
    """

    @property
    def limit(self) -> int:
        """The current concurrency limit, at least 1 (the engine reads a lower one as 1)."""
        ...

    def on_sample(self, now: float, rtt: float, inflight: int, dropped: bool) -> None:
        """A request that reached the application has ended.

        Args:
            now: When it ended (`time.monotonic` seconds).
            rtt: Seconds it spent in the application (queueing before admission excluded).
            inflight: Requests in the application when it was admitted, itself included.
            dropped: It ended badly in a way that says the application is overloaded: it
                timed out, or it was cancelled by a deadline. (Client disconnects and
                application errors are not drops.)
        """
        ...

    def on_lag(self, now: float, lag: float) -> None:
        """The event loop's lag, measured by a ticker every few tens of milliseconds while
        the worker is busy: how late (seconds) a timer fired. CPU-bound handlers raise it
        before latency. While the worker is not busy the ticker sleeps longer and then
        makes one reading per tick it skipped, all at once with the same ``now``, lag-free
        but for the last, so that a mean over readings is a mean over time."""
        ...

    def state(self) -> Mapping[str, float]:
        """The algorithm's state for metrics and tests (at least ``limit``)."""
        ...
