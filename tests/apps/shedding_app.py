"""An app behind LoadSheddingMiddleware for the end-to-end tests (``tests/integration``).

``GET /slow`` takes ``SLOW`` seconds (an await): two run at once (``limit=2``), one more may
wait (``max_queue=1``), the rest are refused. ``/batch/...`` is sheddable, everything else
critical. ``/health`` is exempt; ``/state`` reports the guard's state and events.
The servers run ``shedding_app:guard``.

``shedding_app:flood`` is a second app for clients that go away while queued: one request
at a time (``limit=1``), a hundred may wait five seconds; ``GET /hold`` stays in until
``POST /release`` (exempt), ``GET /q/{n}`` notes that it ran, ``/state`` reports the
guard's state, the requests that ran and (on asyncio) how many tasks the loop has.

``shedding_app:bulkheaded`` is a third, for the same behind the ``bulkhead`` dependency
(one at a time, three may wait five seconds): ``GET /hold`` stays in until ``POST
/release``, ``GET /q/{n}`` and ``POST /item/{n}`` (a JSON body FastAPI reads before the
dependency) note that they ran, ``/state`` reports the bulkhead's counters and the runs.
"""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
from fastapi import Depends, FastAPI
from pydantic import BaseModel

from asgi_guard import LoadSheddingEvent, LoadSheddingMiddleware, RequestRejected
from asgi_guard.fastapi import bulkhead, rejection_handler

SLOW = 0.4
events: list[LoadSheddingEvent] = []

app = FastAPI()


@app.get("/slow")
async def slow() -> dict[str, str]:
    await anyio.sleep(SLOW)
    return {"ok": "slow"}


@app.get("/batch/{n}")
async def batch(n: int) -> dict[str, int]:
    await anyio.sleep(SLOW)
    return {"n": n}


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "up"}


@app.get("/state")
async def state() -> dict[str, Any]:
    return {**guard.state(), "events": [e.kind for e in events]}


#: What the servers run: the app wrapped directly, so the tests' /state sees this guard.
guard = LoadSheddingMiddleware(
    app,
    limit=2,
    max_queue=1,
    queue_timeout=2.0,
    codel_interval=1.0,  # requests take 0.4 s: a queue standing 0.4 s is only a burst
    priority={"/batch/{n}": "sheddable"},
    exempt=["/health", "/state"],
    on_event=events.append,
)


ran: list[int] = []
flood_app = FastAPI()
flood_release = {"now": False}


@flood_app.get("/hold")
async def hold() -> dict[str, str]:
    flood_release["now"] = False
    with anyio.move_on_after(30):  # never for ever
        while not flood_release["now"]:  # noqa: ASYNC110 - the test's POST /release sets it
            await anyio.sleep(0.01)
    return {"ok": "held"}


@flood_app.post("/release")
async def release_hold() -> dict[str, str]:
    flood_release["now"] = True
    return {"ok": "released"}


@flood_app.get("/q/{n}")
async def queued(n: int) -> dict[str, int]:
    ran.append(n)
    return {"n": n}


@flood_app.get("/state")
async def flood_state() -> dict[str, Any]:
    try:
        tasks: int | None = len(asyncio.all_tasks())
    except RuntimeError:  # trio
        tasks = None
    return {**flood.state(), "ran": ran, "tasks": tasks}


flood = LoadSheddingMiddleware(
    flood_app, limit=1, max_queue=100, queue_timeout=5.0, exempt=["/state", "/release"]
)


guarded = bulkhead(1, max_queue=3, queue_timeout=5.0)
bulkheaded = FastAPI()
bulkheaded.add_exception_handler(RequestRejected, rejection_handler)
bulkhead_runs: list[str] = []
release = {"now": False}


class Item(BaseModel):
    name: str


@bulkheaded.get("/hold", dependencies=[Depends(guarded)])
async def bulkhead_hold() -> dict[str, str]:
    release["now"] = False
    with anyio.move_on_after(30):  # never for ever
        while not release["now"]:  # noqa: ASYNC110 - the test's POST /release sets it
            await anyio.sleep(0.01)
    return {"ok": "held"}


@bulkheaded.post("/release")
async def bulkhead_release() -> dict[str, str]:
    release["now"] = True
    return {"ok": "released"}


@bulkheaded.get("/q/{n}", dependencies=[Depends(guarded)])
async def bulkhead_queued(n: str) -> dict[str, str]:
    bulkhead_runs.append(n)
    return {"n": n}


@bulkheaded.post("/item/{n}", dependencies=[Depends(guarded)])
async def bulkhead_item(n: str, item: Item) -> dict[str, str]:
    bulkhead_runs.append(n)
    return {"n": n, "name": item.name}


@bulkheaded.get("/state")
async def bulkhead_state() -> dict[str, Any]:
    limiter = guarded.limiter
    return {
        "inflight": limiter.inflight,
        "queued": limiter.queued,
        "counts": limiter.counts,
        "ran": bulkhead_runs,
    }
