"""asgi_guard.fastapi.bulkhead: clients that go away while their request waits in its queue.

Servers do not cancel a request's task when its client disconnects: only what the request
reads from ``receive`` tells. A waiting request watches it, as the middleware's do. FastAPI
has read the body of a route that declares one before the dependency runs (only a
disconnect can follow); on other routes the watch may read the body's first chunk, which
the endpoint then gets.
"""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest
from fastapi import Depends, FastAPI, Request
from pydantic import BaseModel
from starlette.types import Message

from asgi_guard import RequestRejected
from asgi_guard.fastapi import BulkheadDependency, bulkhead, rejection_handler

from .asgi_driver import Driven, drive, http_scope, until

pytestmark = pytest.mark.anyio

WAIT = 5.0  # the queue timeout: far longer than any test waits


class Item(BaseModel):
    name: str


def make_app(guard: BulkheadDependency) -> tuple[FastAPI, dict[str, Any]]:
    """Routes behind ``guard``: /hold stays in until the test opens the gate; /get and
    /raw (no body parameter: the endpoint reads the body itself) and /item (a body
    parameter FastAPI reads first) note their runs and answer what they got."""
    state: dict[str, Any] = {"open": anyio.Event(), "inside": 0, "runs": []}
    app = FastAPI()
    app.add_exception_handler(RequestRejected, rejection_handler)

    @app.get("/hold", dependencies=[Depends(guard)])
    async def hold() -> dict[str, str]:
        state["inside"] += 1
        try:
            await state["open"].wait()
        finally:
            state["inside"] -= 1
        return {"held": "yes"}

    @app.get("/get/{tag}", dependencies=[Depends(guard)])
    async def get(tag: str) -> dict[str, str]:
        state["runs"].append(tag)
        return {"tag": tag}

    @app.post("/raw/{tag}", dependencies=[Depends(guard)])
    async def raw(tag: str, request: Request) -> dict[str, str]:
        state["runs"].append(tag)
        return {"tag": tag, "body": (await request.body()).decode()}

    @app.post("/item/{tag}", dependencies=[Depends(guard)])
    async def item(tag: str, body: Item) -> dict[str, str]:
        state["runs"].append(tag)
        return {"tag": tag, "name": body.name}

    return app, state


def request(body: bytes = b"", *, more: bool = False) -> Message:
    return {"type": "http.request", "body": body, "more_body": more}


async def held(app: FastAPI, state: dict[str, Any], group: anyio.abc.TaskGroup) -> None:
    """Start /hold and wait until it is inside."""

    async def one() -> None:
        await drive(app, http_scope("/hold"), then="wait")

    group.start_soon(one)
    await until(lambda: state["inside"] == 1)


async def test_queued_requests_whose_clients_disconnect_leave_the_queue_at_once() -> None:
    """bulkhead(1, max_queue=3): three queued clients that leave after 0.2 s leave the
    queue at once, unanswered by the endpoint, so a fourth client queues (not
    queue_full) and is served; the endpoint never runs for the gone clients."""
    guard = bulkhead(1, max_queue=3, queue_timeout=WAIT)
    app, state = make_app(guard)
    gone: dict[str, Driven] = {}
    async with anyio.create_task_group() as group:
        await held(app, state, group)
        async with anyio.create_task_group() as ghosts:
            for n in range(3):

                async def ghost(tag: str = f"ghost{n}") -> None:
                    # The request, then the client waits a moment and closes its socket.
                    gone[tag] = await drive(app, http_scope(f"/get/{tag}"), [request(), 0.2])

                ghosts.start_soon(ghost)
            await until(lambda: guard.limiter.queued == 3)
            await until(lambda: guard.limiter.queued == 0)  # within 2 s, not the 5 s wait
        assert guard.limiter.counts["disconnected"] == 3
        assert guard.limiter.inflight == 1
        real: list[Driven] = []

        async def client() -> None:
            real.append(await drive(app, http_scope("/get/real"), then="wait"))

        group.start_soon(client)
        await until(lambda: guard.limiter.queued == 1)  # it queues: the ghosts left room
        state["open"].set()
    assert real[0].status == 200, real[0].sent
    assert state["runs"] == ["real"], "the endpoint never runs for a gone client"
    for tag, driven in gone.items():
        # The refusal FastAPI sends goes nowhere (the server drops it); it says why.
        assert json.loads(driven.body)["reason"] == "disconnected", (tag, driven.sent)
    assert guard.limiter.inflight == 0
    assert guard.limiter.queued == 0


async def test_a_body_read_by_fastapi_is_watched_for_a_disconnect() -> None:
    """A route with a body parameter: FastAPI has read the body before the bulkhead runs;
    a queued client that then disconnects leaves the queue at once, and one that stays
    is served with its body."""
    guard = bulkhead(1, max_queue=3, queue_timeout=WAIT)
    app, state = make_app(guard)
    scope = http_scope("/item/x", method="POST", headers=[(b"content-type", b"application/json")])
    results: dict[str, Driven] = {}
    async with anyio.create_task_group() as group:
        await held(app, state, group)

        async def ghost() -> None:
            results["ghost"] = await drive(app, scope, [request(b'{"name": "g"}'), 0.2])

        async def stays() -> None:
            stay = {**scope, "path": "/item/y", "raw_path": b"/item/y"}
            results["stays"] = await drive(app, stay, [request(b'{"name": "s"}')], then="wait")

        group.start_soon(ghost)
        group.start_soon(stays)
        await until(lambda: guard.limiter.queued == 2)
        await until(lambda: guard.limiter.queued == 1)
        assert guard.limiter.counts["disconnected"] == 1
        await until(lambda: "ghost" in results)  # answered (for nobody) and done
        state["open"].set()
    assert results["stays"].status == 200, results["stays"].sent
    assert json.loads(results["stays"].body) == {"tag": "y", "name": "s"}
    assert results["stays"].receive_calls == 2, "the body, then the bulkhead's watch"
    assert state["runs"] == ["y"]


async def test_a_complete_body_the_watch_read_reaches_the_endpoint() -> None:
    """A route without a body parameter: the watch reads the whole (one-message) body
    and waits on for a disconnect; the endpoint reading the body once admitted gets it."""
    guard = bulkhead(1, max_queue=3, queue_timeout=WAIT)
    app, state = make_app(guard)
    results: list[Driven] = []
    # A lost chunk would leave the endpoint waiting for it forever.
    with anyio.fail_after(5):
        async with anyio.create_task_group() as group:
            await held(app, state, group)

            async def post() -> None:
                scope = http_scope("/raw/r", method="POST")
                results.append(await drive(app, scope, [request(b"hello")], then="wait"))

            group.start_soon(post)
            await until(lambda: guard.limiter.queued == 1)
            await anyio.sleep(0.05)  # the watch has read the body and waits on
            state["open"].set()
    assert results[0].status == 200, results[0].sent
    assert json.loads(results[0].body) == {"tag": "r", "body": "hello"}


async def test_a_chunked_body_is_read_no_further_than_its_first_chunk_and_replayed_once() -> None:
    """A route without a body parameter and a body in three chunks: the watch reads the
    first and stops; the endpoint gets every chunk exactly once, in order."""
    guard = bulkhead(1, max_queue=3, queue_timeout=WAIT)
    app, state = make_app(guard)
    chunks = [request(b"a", more=True), request(b"b", more=True), request(b"c")]
    given: list[Message] = []
    sent: list[Message] = []

    async def receive() -> Message:
        if chunks:
            given.append(chunks.pop(0))
            return given[-1]
        await anyio.sleep_forever()  # the client waits for its answer
        raise AssertionError  # pragma: no cover

    async def send(message: Message) -> None:
        sent.append(message)

    # A lost chunk would leave the endpoint waiting for it forever.
    with anyio.fail_after(5):
        async with anyio.create_task_group() as group:
            await held(app, state, group)
            group.start_soon(app, http_scope("/raw/c", method="POST"), receive, send)
            await until(lambda: guard.limiter.queued == 1)
            await anyio.sleep(0.05)  # the watch has had every chance to read on
            assert len(given) == 1, "only the first chunk is read while it waits"
            state["open"].set()
    assert sent[0]["status"] == 200, sent
    assert json.loads(sent[1]["body"]) == {"tag": "c", "body": "abc"}
    assert len(given) == 3, "each chunk given once"


async def test_a_request_admitted_at_once_never_has_receive_read_by_the_bulkhead() -> None:
    """The hot path: a request the bulkhead admits at once is not watched."""
    guard = bulkhead(1, max_queue=3, queue_timeout=WAIT)
    app, _ = make_app(guard)
    driven = await drive(app, http_scope("/get/now"), then="wait")
    assert driven.status == 200, driven.sent
    assert driven.receive_calls == 0
