"""FastAPI apps behind ``TimeoutMiddleware``, for end-to-end tests over real HTTP.

``app``: a 0.3 s deadline (routes may ask for up to 2 s), a 0.25 s idle limit on streams,
the caller's ``x-request-timeout`` header honoured. Routes: ``/slow/async`` (sleeps 5 s),
``/slow/sync`` (a ``def`` endpoint blocking its thread for 1 s), ``/stream/stall`` (one chunk,
then silence, under a 2 s route deadline), ``/stream/endless`` (a chunk every 50 ms,
forever), ``/background`` (answers at once; its background task sleeps past the deadline),
``/tight`` and ``/loose`` (route deadlines of 0.1 s and 1 s; ``/loose`` takes 0.6 s),
``/remaining`` and ``/remaining/sync`` (the time left as an async and a sync handler see it),
``/peer`` (the client's port, to recognise a kept-alive connection).

``watchful_app``: a 5 s deadline, a 0.3 s limit between request body pieces, at least
1000 B/s of body after 0.2 s, and handlers cancelled when their client leaves. Routes:
``/upload`` (reads the body), ``/hang`` (sleeps 10 s).

Every route but ``/peer``, ``/remaining`` and ``/state`` ends with a ``{tag}`` naming the
request (so the middleware's events, which carry the path, name it too). Each app's
``/state`` (exempt from the deadline) reports which tagged handlers were cancelled or ran to
their end, which background tasks completed, and the middleware's events. The state lives
in the closure of the app's factory, not in the module.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import anyio
from fastapi import BackgroundTasks, Depends, FastAPI, Request
from fastapi.responses import StreamingResponse

from asgi_guard import Event, TimeoutEvent, TimeoutMiddleware, remaining
from asgi_guard.fastapi import timeout

DEADLINE = 0.3
MAX_TIMEOUT = 2.0
IDLE_TIMEOUT = 0.25
SYNC_SLEEP = 1.0
BACKGROUND_SLEEP = 0.6
TIGHT = 0.1
LOOSE = 1.0
LOOSE_SLEEP = 0.6
FIRST_CHUNK = b"first chunk\n"

WATCHFUL_DEADLINE = 5.0
BODY_TIMEOUT = 0.3
MIN_BODY_RATE = 1000.0
BODY_RATE_GRACE = 0.2


@dataclass
class Journal:
    """What the app's handlers and its middleware did, by request tag."""

    cancelled: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    background: dict[str, float | None] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)

    def record(self, event: Event) -> None:
        """An ``on_event`` callback: keep the middleware's events for ``/state``."""
        if isinstance(event, TimeoutEvent):
            self.events.append(asdict(event))

    @contextmanager
    def watch(self, tag: str) -> Iterator[None]:
        """Note whether the code in the block was cancelled or ran to its end."""
        try:
            yield
        except anyio.get_cancelled_exc_class():
            self.cancelled.append(tag)
            raise
        self.finished.append(tag)


def add_state_route(api: FastAPI, journal: Journal) -> None:
    @api.get("/state")
    async def state() -> dict[str, Any]:
        return asdict(journal)


def create_app() -> FastAPI:
    """The app with a short deadline, an idle limit and the caller's deadline header."""
    api = FastAPI()
    journal = Journal()
    add_state_route(api, journal)

    @api.get("/peer")
    async def peer(request: Request) -> dict[str, int]:
        assert request.client is not None
        return {"port": request.client.port}

    @api.get("/slow/async/{tag}")
    async def slow_async(tag: str) -> dict[str, bool]:
        with journal.watch(tag):
            await anyio.sleep(5.0)
        return {"late": True}

    @api.get("/slow/sync/{tag}")
    def slow_sync(tag: str) -> dict[str, bool]:
        time.sleep(SYNC_SLEEP)  # a blocking call: its thread cannot be cancelled
        journal.finished.append(tag)
        return {"late": True}

    @api.get("/stream/stall/{tag}", dependencies=[Depends(timeout(MAX_TIMEOUT))])
    async def stream_stall(tag: str) -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            yield FIRST_CHUNK
            with journal.watch(tag):
                await anyio.sleep(10.0)
            yield b"never sent\n"

        return StreamingResponse(chunks(), media_type="text/plain")

    @api.get("/stream/endless/{tag}")
    async def stream_endless(tag: str) -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            yield FIRST_CHUNK
            with journal.watch(tag):
                while True:
                    await anyio.sleep(0.05)
                    yield b"more\n"

        return StreamingResponse(chunks(), media_type="text/plain")

    @api.post("/background/{tag}")
    async def background(tag: str, tasks: BackgroundTasks) -> dict[str, bool]:
        async def work() -> None:
            await anyio.sleep(BACKGROUND_SLEEP)
            journal.background[tag] = remaining()

        tasks.add_task(work)
        return {"queued": True}

    @api.get("/tight/{tag}", dependencies=[Depends(timeout(TIGHT))])
    async def tight(tag: str) -> dict[str, bool]:
        with journal.watch(tag):
            await anyio.sleep(1.0)
        return {"late": True}

    @api.get("/loose/{tag}", dependencies=[Depends(timeout(LOOSE))])
    async def loose(tag: str) -> dict[str, bool]:
        with journal.watch(tag):
            await anyio.sleep(LOOSE_SLEEP)
        return {"in_time": True}

    @api.get("/remaining")
    async def time_left() -> dict[str, float | None]:
        return {"remaining": remaining()}

    @api.get("/remaining/sync")
    def time_left_in_thread() -> dict[str, float | None]:
        return {"remaining": remaining()}

    api.add_middleware(
        TimeoutMiddleware,
        timeout=DEADLINE,
        max_timeout=MAX_TIMEOUT,
        idle_timeout=IDLE_TIMEOUT,
        deadline_header="x-request-timeout",
        exempt=["/state"],
        on_event=journal.record,
    )
    return api


def create_watchful_app() -> FastAPI:
    """The app that watches the request body and the client's disconnect."""
    api = FastAPI()
    journal = Journal()
    add_state_route(api, journal)

    @api.post("/upload/{tag}")
    async def upload(tag: str, request: Request) -> dict[str, int]:
        return {"size": len(await request.body())}

    @api.get("/hang/{tag}")
    async def hang(tag: str) -> dict[str, bool]:
        with journal.watch(tag):
            await anyio.sleep(10.0)
        return {"late": True}

    api.add_middleware(
        TimeoutMiddleware,
        timeout=WATCHFUL_DEADLINE,
        body_timeout=BODY_TIMEOUT,
        min_body_rate=MIN_BODY_RATE,
        body_rate_grace=BODY_RATE_GRACE,
        cancel_on_disconnect=True,
        exempt=["/state"],
        on_event=journal.record,
    )
    return api


app = create_app()
watchful_app = create_watchful_app()
