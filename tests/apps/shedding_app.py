"""An app behind LoadSheddingMiddleware for the end-to-end tests (``tests/integration``).

``GET /slow`` takes ``SLOW`` seconds (an await): two run at once (``limit=2``), one more may
wait (``max_queue=1``), the rest are refused. ``/batch/...`` is sheddable, everything else
critical. ``/health`` is exempt; ``/state`` reports the guard's state and events.
The servers run ``shedding_app:guard``.
"""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import FastAPI

from asgi_guard import LoadSheddingEvent, LoadSheddingMiddleware

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
