"""Deadlines for a FastAPI app: a default, tighter and looser routes, and outbound calls.

``TimeoutMiddleware`` gives every request 1 second from arrival; ``/search`` has 0.5 s,
``/report`` 3 s (the middleware allows routes up to 10 s with ``max_timeout``). ``/quote``
calls an upstream with an ``httpx`` timeout bounded by what is left of the request's budget,
so a slow upstream ends in a 504 on time instead of holding the client. ``/suggest``
gathers what it can within its budget (a cancel scope on ``deadline()``) and answers with
that. Streams that stall for 5 s are ended; a caller can tighten its own deadline with
``X-Request-Timeout``.
"""

from __future__ import annotations

import logging
import math

import anyio
import httpx
from fastapi import BackgroundTasks, Depends, FastAPI, HTTPException

from asgi_guard import (
    TimeoutEvent,
    TimeoutMiddleware,
    deadline,
    httpx_timeout,
    outbound_timeout,
    remaining,
)
from asgi_guard.fastapi import TimeoutDependency, timeout

log = logging.getLogger("examples.timeouts")

#: Where /quote fetches from; a test points it at a local app.
UPSTREAM = "http://127.0.0.1:9000"
#: The outbound client: one per app, its transport replaceable in tests.
upstream = httpx.AsyncClient(base_url=UPSTREAM)

timeouts: list[TimeoutEvent] = []

search_deadline: TimeoutDependency = timeout(0.5)

app = FastAPI(title="timeouts")
app.add_middleware(
    TimeoutMiddleware,
    timeout=1.0,
    max_timeout=10.0,
    idle_timeout=5.0,
    deadline_header="x-request-timeout",
    on_event=timeouts.append,
)


@app.get("/search", dependencies=[Depends(search_deadline)])
async def search(q: str = "") -> dict[str, object]:
    await anyio.sleep(0.1 if q else 1.0)  # an empty query scans everything: too slow
    return {"q": q, "hits": []}


@app.get("/report", dependencies=[Depends(timeout(3.0))])
async def report() -> dict[str, float | None]:
    await anyio.sleep(1.2)  # longer than the app default, within this route's deadline
    return {"seconds_left": remaining()}


@app.get("/quote")
async def quote() -> dict[str, object]:
    # Keep 0.1 s to answer after the upstream: its timeout is what is left minus that.
    try:
        response = await upstream.get("/price", timeout=httpx_timeout(5.0, reserve=0.1))
    except httpx.TimeoutException:
        raise HTTPException(504, "the price service did not answer in time") from None
    return {"price": response.json()["price"], "budget_left": remaining()}


@app.get("/suggest", dependencies=[Depends(timeout(0.5))])
async def suggest() -> dict[str, object]:
    # As many suggestions as fit in the budget, less 0.1 s to answer: a partial answer on
    # time rather than a 504. (deadline() is None outside a guarded request: no limit.)
    found: list[int] = []
    with anyio.CancelScope(deadline=(deadline() or math.inf) - 0.1):
        for n in range(100):
            await anyio.sleep(0.05)  # one slow lookup
            found.append(n)
    return {"suggestions": found, "complete": len(found) == 100}


def audit(item: str) -> None:
    log.info("audited %s with no deadline (remaining=%s)", item, remaining())


@app.post("/orders/{item}")
async def order(item: str, tasks: BackgroundTasks) -> dict[str, object]:
    # Background tasks run after the response is complete: the deadline no longer applies.
    tasks.add_task(audit, item)
    return {"ordered": item, "db_timeout": outbound_timeout(1.0)}
