"""Load shedding for a FastAPI app: an adaptive limit, priorities, a bulkhead, deadlines.

``LoadSheddingMiddleware`` learns how many requests the worker serves well at once (the
default `Adaptive` algorithm) and refuses the rest with a fast 503 and a ``Retry-After``.
Checkout is ``critical-plus`` and keeps a fifth of the limit for itself; exports are
``sheddable`` and go first when the worker is overloaded. ``/report`` has a bulkhead of its
own: two at once, two more may wait up to a second. ``TimeoutMiddleware`` is outermost, so
the time a request waits in the queue counts against its deadline, and a request that can no longer
finish in time is refused at once. ``/health`` is never shed; ``/state`` shows what the
guard knows (serve it to your metrics).

A fresh process runs its first five requests one at a time while ``Adaptive`` measures the
no-load latency; requests that come meanwhile wait in the shedder's queue (up to a second)
rather than being refused, so a first burst of four reports is served one after another,
and the bulkhead sees them one by one. From then on the shedder lets them through together.

Run it: ``uvicorn examples.shedding:guarded``.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
from fastapi import Depends, FastAPI

from asgi_guard import (
    LoadSheddingEvent,
    LoadSheddingMiddleware,
    RequestRejected,
    TimeoutMiddleware,
)
from asgi_guard.fastapi import BulkheadDependency, bulkhead, rejection_handler

log = logging.getLogger("examples.shedding")

changes: list[LoadSheddingEvent] = []

app = FastAPI(title="shedding")
app.add_exception_handler(RequestRejected, rejection_handler)


@app.post("/checkout")
async def checkout() -> dict[str, str]:
    await anyio.sleep(0.01)  # the payment provider
    return {"status": "paid"}


@app.get("/search")
async def search(q: str = "") -> dict[str, Any]:
    await anyio.sleep(0.005)
    return {"q": q, "hits": []}


@app.get("/exports/{name}")
async def export(name: str) -> dict[str, str]:
    await anyio.sleep(0.05)
    return {"export": name}


#: Two reports at once; two more may wait up to a second for their turn.
report_bulkhead: BulkheadDependency = bulkhead(2, max_queue=2, queue_timeout=1.0)


@app.get("/report", dependencies=[Depends(report_bulkhead)])
async def report() -> dict[str, str]:
    await anyio.sleep(0.1)  # an expensive query: two at a time at most
    return {"report": "ready"}


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "up"}


@app.get("/state")
async def state() -> dict[str, Any]:
    return shedder.state()


shedder = LoadSheddingMiddleware(
    app,
    priority={"/checkout": "critical-plus", "/exports/{name}": "sheddable"},
    reserve={"critical-plus": 0.2},
    exempt=["/health", "/state"],
    on_event=changes.append,
)
#: What the server runs: deadlines outside, so that queueing counts against them.
guarded = TimeoutMiddleware(shedder, timeout=2.0)
