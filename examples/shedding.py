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

``internal`` is a second service, behind a gateway: the gateway may name a request's class
in ``X-Priority`` (believed only from its network, never from clients), batch jobs are
recognised by a function of the request, the loop's lag and the process's memory are
triggers, and CoDel's target and interval are set for routes that take a second.

Run it: ``uvicorn examples.shedding:guarded`` (or ``examples.shedding:internal``).
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
from fastapi import Depends, FastAPI
from starlette.types import Scope

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


# -- a second service, behind a gateway -------------------------------------------------------

internal_app = FastAPI(title="internal")


@internal_app.get("/ledger")
async def ledger() -> dict[str, str]:
    await anyio.sleep(0.005)
    return {"ledger": "balanced"}


@internal_app.get("/reindex")
async def reindex() -> dict[str, str]:
    await anyio.sleep(0.005)  # a batch job's step
    return {"reindex": "step done"}


@internal_app.get("/health")
async def internal_health() -> dict[str, str]:
    return {"status": "up"}


def job_class(scope: Scope) -> str | None:
    """Batch jobs say who they are in their User-Agent: they go first under load. ``None``
    gives the rest the default class (``critical``). A plain function: it runs on every
    request, before admission."""
    for name, value in scope["headers"]:
        if name == b"user-agent" and value.startswith(b"batch-"):
            return "sheddable"
    return None


def from_gateway(scope: Scope) -> bool:
    """Only the gateway (10.0.0.0/8) may set X-Priority; a client's own value is ignored."""
    client = scope.get("client")
    return client is not None and client[0].startswith("10.")


internal = LoadSheddingMiddleware(
    internal_app,
    priority=job_class,
    priority_header="X-Priority",  # e.g. "critical-plus" for the gateway's own probes
    trust_priority_header=from_gateway,
    max_loop_lag=0.05,  # shed the sheddable classes while the loop lags 50 ms
    max_memory=4 * 1024**3,  # ... or while the process holds more than 4 GiB
    codel_target=0.02,  # a queue of 20 ms is normal for this service
    codel_interval=0.5,
    exempt=["/health"],
    on_event=changes.append,
)
