"""Apps for the overload benchmarks (``loadgen.py``'s self-check, ``overload.py``).

uvicorn imports them as ``bench._overload_apps:<name>`` (run from the project root), one
worker. ``GET /work`` is a request that costs the server something real: about 2 ms of
CPU in a pure-Python loop (holding the event loop, as a template or a serializer would),
then a 1 ms ``anyio.sleep`` (a fast database call), then a small JSON. The loop's length
is calibrated at import with ``time.thread_time`` so that it takes ``WORK_CPU`` seconds of
this thread's CPU on the machine at hand (the median of a few trials, after a warm-up);
``GET /health`` answers at once and reports the calibration.

One worker serves at most ``1 / (WORK_CPU + framework overhead)`` requests a second: the
server used 2.3-2.5 ms of CPU per request on the 2-core VM, so about 400/s (uvicorn
``--loop asyncio``); past that it can only queue.

``unguarded``: the FastAPI app, no guard in front of it.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import anyio
from fastapi import FastAPI

#: CPU seconds one ``GET /work`` spends in its loop, and its await.
WORK_CPU = 0.002
WORK_SLEEP = 0.001


def burn(n: int) -> int:
    """A pure-Python loop of ``n`` rounds: CPU time on this thread, holding the GIL."""
    x = 0
    for i in range(n):
        x = (x + i * i) & 0xFFFF
    return x


def _calibrate(target: float, trials: int = 7) -> tuple[int, float]:
    """Rounds of :func:`burn` that take ``target`` CPU seconds, and what they took."""
    n = 20_000
    burn(n)  # warm-up
    per_round = []
    for _ in range(trials):
        t0 = time.thread_time()
        burn(n)
        per_round.append((time.thread_time() - t0) / n)
    rounds = max(1, round(target / statistics.median(per_round)))
    took = []
    for _ in range(3):
        t0 = time.thread_time()
        burn(rounds)
        took.append(time.thread_time() - t0)
    return rounds, statistics.median(took)


WORK_ROUNDS, WORK_MEASURED = _calibrate(WORK_CPU)


def build_app() -> FastAPI:
    """``GET /work`` (about 2 ms of CPU, then a 1 ms sleep) and ``GET /health``."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    @app.get("/work")
    async def work() -> dict[str, Any]:
        x = burn(WORK_ROUNDS)
        await anyio.sleep(WORK_SLEEP)
        return {"ok": True, "x": x}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "ok": True,
            "work_rounds": WORK_ROUNDS,
            "work_cpu_ms": round(WORK_MEASURED * 1e3, 3),
        }

    return app


unguarded = build_app()
