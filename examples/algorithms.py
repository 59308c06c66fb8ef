"""Choosing how the load-shedding limit is set: fixed, learned, or your own.

Each of these apps puts ``LoadSheddingMiddleware`` in front of the same FastAPI app with a
different limit algorithm. ``Fixed`` is a cap you measured; ``AIMD``, ``Vegas`` and
``Gradient2`` learn the limit from latency (and timeouts); the default, ``Adaptive``, also
watches the event loop's lag. ``OffHours`` is an algorithm of our own: any object with the
`LimitAlgorithm` shape works, here a limit that is lower while a nightly batch job shares the
machine.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import anyio
from fastapi import FastAPI

from asgi_guard import (
    AIMD,
    Adaptive,
    Fixed,
    Gradient2,
    LimitAlgorithm,
    LoadSheddingMiddleware,
    Vegas,
)

app = FastAPI(title="algorithms")


@app.get("/work")
async def work() -> dict[str, bool]:
    await anyio.sleep(0.002)
    return {"ok": True}


class OffHours:
    """A fixed limit that halves while ``batch_running()`` says the batch job runs."""

    def __init__(self, limit: int, batch_running: Callable[[], bool]) -> None:
        self._full = limit
        self._batch_running = batch_running
        self.limit = limit

    def on_sample(self, now: float, rtt: float, inflight: int, dropped: bool) -> None:
        self.limit = max(1, self._full // 2) if self._batch_running() else self._full

    def on_lag(self, now: float, lag: float) -> None:
        pass

    def state(self) -> Mapping[str, float]:
        return {"limit": self.limit}


batch = {"running": False}

#: One middleware, and one algorithm object, per app: algorithms are never shared.
guarded: dict[str, LoadSheddingMiddleware] = {
    "fixed": LoadSheddingMiddleware(app, limit=Fixed(16)),  # the same as limit=16
    "aimd": LoadSheddingMiddleware(app, limit=AIMD(initial=10, latency_threshold=0.05)),
    "vegas": LoadSheddingMiddleware(app, limit=Vegas(initial=10, max_limit=200)),
    "gradient2": LoadSheddingMiddleware(app, limit=Gradient2(initial=10, max_limit=200)),
    "adaptive": LoadSheddingMiddleware(app, limit=Adaptive(max_lag=0.01)),
    "off_hours": LoadSheddingMiddleware(app, limit=OffHours(16, lambda: batch["running"])),
}

custom: LimitAlgorithm = OffHours(8, lambda: False)
assert isinstance(custom, LimitAlgorithm)  # the protocol is checkable at runtime
