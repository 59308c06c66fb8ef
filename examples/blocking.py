"""Find the code that blocks the event loop: the detector on a FastAPI app.

``/report`` calls a sync function that sleeps inside ``async def``: every request to it
stalls the whole worker. ``BlockingDetectorMiddleware`` logs the exact line and the route
(once per minute for the same stack) and hands each detection to ``on_block``, here a
counter per route that a metrics endpoint could expose. ``/report-fixed`` is the cure:
the same work in a thread.
"""

from __future__ import annotations

import time
from collections import Counter

import anyio
from fastapi import FastAPI

from asgi_guard import BlockingDetectorMiddleware, BlockingEvent

blocked_routes: Counter[str] = Counter()


def count(event: BlockingEvent) -> None:
    # Runs on the detector's report thread, never on the event loop.
    blocked_routes[event.route or "outside requests"] += 1


def render_report() -> str:
    time.sleep(0.3)  # stands for a sync database driver or a slow library call
    return "report"


app = FastAPI(title="blocking")
app.add_middleware(BlockingDetectorMiddleware, threshold=0.1, on_block=count)


@app.get("/report")
async def report() -> dict[str, str]:
    return {"report": render_report()}  # blocks the loop for 0.3 s


@app.get("/report-fixed")
async def report_fixed() -> dict[str, str]:
    return {"report": await anyio.to_thread.run_sync(render_report)}
