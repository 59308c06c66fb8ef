"""LoadSheddingMiddleware: clients that go away while their request waits in the queue.

Servers do not cancel a request's task when its client disconnects: only what the request
reads from ``receive`` tells. A waiting request reads it (no further than the first body
chunk, which the app then gets); one admitted at once never does.
"""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import pytest
from starlette.types import Message, Receive, Scope, Send

from asgi_guard import LoadSheddingMiddleware

from .asgi_driver import Driven, drive, http_scope, until
from .test_shedding import SETUP, Gate, start

pytestmark = pytest.mark.anyio


def tasks() -> int:
    """How many tasks the asyncio loop has (0 on trio, whose tasks are in nurseries)."""
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:
        return 0


class Echo:
    """An app that reads the whole body and answers it, after the test opens the gate."""

    def __init__(self) -> None:
        self.open = anyio.Event()
        self.received: list[Message] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] == "/hold":
            await self.open.wait()
        body = b""
        while True:
            message = await receive()
            self.received.append(message)
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})


async def test_a_flood_of_queued_requests_whose_clients_disconnect_leaves_nothing_behind() -> None:
    """Fifty queued requests whose receive reports http.disconnect leave the queue at once,
    are never run by the app nor answered, and leave no task or waiter behind."""
    gate = Gate()
    shedder = LoadSheddingMiddleware(gate, limit=1, max_queue=100, queue_timeout=SETUP)
    results: dict[str, Driven] = {}
    async with anyio.create_task_group() as outer:
        await start(outer, shedder, "/hold", results)
        await until(lambda: gate.inside == 1)
        before = tasks()
        async with anyio.create_task_group() as flood:
            for n in range(50):

                async def one(path: str = f"/q{n}") -> None:
                    # The request, then the client waits a moment and closes its socket.
                    results[path] = await drive(
                        shedder,
                        http_scope(path),
                        [{"type": "http.request", "body": b"", "more_body": False}, 0.2],
                    )

                flood.start_soon(one)
            await until(lambda: shedder.limiter.queued == 50)
            await until(lambda: shedder.limiter.queued == 0)  # within 2 s, not the 5 s wait
        assert shedder.limiter.counts["disconnected"] == 50
        assert shedder.state()["inflight"] == 1
        await anyio.sleep(0.01)  # a cancelled task ends at the loop's next iteration
        assert tasks() == before, "no watcher task is left behind"
        gate.open.set()
    assert gate.entered == ["/hold"], "the app never runs a request for a gone client"
    assert all(results[f"/q{n}"].sent == [] for n in range(50)), "nobody to answer"
    assert shedder.state()["inflight"] == 0
    assert shedder.state()["queued"] == 0
    assert [len(q) for q in shedder.limiter._queues] == [0, 0, 0, 0]


async def test_a_request_admitted_at_once_never_has_receive_read_by_the_shedder() -> None:
    """The hot path: a request admitted at once does not pay for watching receive."""
    calls = 0

    async def receive() -> Message:
        nonlocal calls
        calls += 1
        return {"type": "http.request", "body": b"", "more_body": False}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert calls == 0
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    shedder = LoadSheddingMiddleware(app, limit=2)
    await shedder(http_scope("/"), receive, send)
    assert sent[0]["status"] == 204
    assert calls == 0


async def test_a_queued_body_is_read_no_further_than_its_first_chunk_and_replayed_once() -> None:
    """A waiting POST has its first chunk read (to watch for a disconnect) and no more;
    once admitted, the app gets every chunk exactly once, in order."""
    echo = Echo()
    shedder = LoadSheddingMiddleware(echo, limit=1, max_queue=10, queue_timeout=SETUP)
    chunks: list[Message] = [
        {"type": "http.request", "body": b"a", "more_body": True},
        {"type": "http.request", "body": b"b", "more_body": True},
        {"type": "http.request", "body": b"c", "more_body": False},
    ]
    results: dict[str, Driven] = {}
    async with anyio.create_task_group() as group:
        await start(group, shedder, "/hold", results)
        await until(lambda: shedder.limiter.inflight == 1)
        post = drive(shedder, http_scope("/post", method="POST"), list(chunks), then="wait")
        done: list[Driven] = []

        async def run() -> None:
            done.append(await post)

        group.start_soon(run)
        await until(lambda: shedder.limiter.queued == 1)
        await anyio.sleep(0.05)  # the watcher has had every chance to read on
        echo.open.set()
    driven = done[0]
    assert driven.status == 200, driven.sent
    assert driven.body == b"abc"
    assert [m.get("body") for m in echo.received if m["type"] == "http.request"][-3:] == [
        b"a",
        b"b",
        b"c",
    ]
    assert driven.receive_calls == 3, "each chunk read once: the first by the shedder"


async def test_a_queued_request_reads_only_its_first_chunk_while_it_waits() -> None:
    """While a POST waits, the shedder calls its receive once (a body chunk: no further)."""
    gate = Gate()
    shedder = LoadSheddingMiddleware(gate, limit=1, max_queue=10, queue_timeout=SETUP)
    calls = 0

    async def receive() -> Message:
        nonlocal calls
        calls += 1
        return {"type": "http.request", "body": b"x" * 10, "more_body": True}

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    results: dict[str, Driven] = {}
    async with anyio.create_task_group() as group:
        await start(group, shedder, "/hold", results)
        await until(lambda: gate.inside == 1)
        group.start_soon(shedder, http_scope("/post", method="POST"), receive, send)
        await until(lambda: shedder.limiter.queued == 1)
        await anyio.sleep(0.05)
        assert calls == 1
        gate.open.set()
    assert calls == 1  # the Gate app reads nothing
    assert sent[0]["status"] == 200


async def test_a_queued_get_gets_its_request_message_replayed() -> None:
    """A waiting GET has its (empty, complete) request read, then waits for a disconnect
    that does not come; admitted, the app reads the request message, once."""
    echo = Echo()
    shedder = LoadSheddingMiddleware(echo, limit=1, max_queue=10, queue_timeout=SETUP)
    results: dict[str, Driven] = {}
    async with anyio.create_task_group() as group:
        await start(group, shedder, "/hold", results)
        await until(lambda: shedder.limiter.inflight == 1)

        async def get() -> None:
            results["/get"] = await drive(shedder, http_scope("/get"), then="wait")

        group.start_soon(get)
        await until(lambda: shedder.limiter.queued == 1)
        await anyio.sleep(0.02)
        echo.open.set()
    assert results["/get"].status == 200, results["/get"].sent
    assert results["/get"].receive_calls == 2  # the request, then the watch cut short
    assert shedder.limiter.counts["disconnected"] == 0
    assert echo.received == [{"type": "http.request", "body": b"", "more_body": False}] * 2


async def test_a_request_expecting_100_continue_is_not_read_while_it_waits() -> None:
    """Reading it would ask the client for its body: the shedder leaves it alone."""
    gate = Gate()
    shedder = LoadSheddingMiddleware(gate, limit=1, max_queue=10, queue_timeout=SETUP)
    calls = 0

    async def receive() -> Message:
        nonlocal calls
        calls += 1
        return {"type": "http.request", "body": b"x", "more_body": True}

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    scope = http_scope("/upload", method="PUT", headers=[(b"expect", b"100-continue")])
    results: dict[str, Driven] = {}
    async with anyio.create_task_group() as group:
        await start(group, shedder, "/hold", results)
        await until(lambda: gate.inside == 1)
        group.start_soon(shedder, scope, receive, send)
        await until(lambda: shedder.limiter.queued == 1)
        await anyio.sleep(0.05)
        assert calls == 0
        gate.open.set()
    assert sent[0]["status"] == 200


async def test_a_queued_websocket_handshake_whose_client_leaves_leaves_the_queue() -> None:
    """A WebSocket client that disconnects before its handshake is answered leaves too."""
    gate = Gate()
    shedder = LoadSheddingMiddleware(gate, limit=1, max_queue=10, queue_timeout=SETUP)
    scope: dict[str, Any] = {**http_scope("/ws"), "type": "websocket", "scheme": "ws"}
    messages: list[Message | float] = [
        {"type": "websocket.connect"},
        0.1,
        {"type": "websocket.disconnect", "code": 1006},
    ]
    sent: list[Message] = []
    results: dict[str, Driven] = {}
    async with anyio.create_task_group() as group:
        await start(group, shedder, "/hold", results)
        await until(lambda: gate.inside == 1)

        async def ws() -> None:
            driven = await drive(shedder, scope, messages)
            sent.extend(driven.sent)

        group.start_soon(ws)
        await until(lambda: shedder.limiter.queued == 1)
        await until(lambda: shedder.limiter.queued == 0)
        assert shedder.limiter.counts["disconnected"] == 1
        gate.open.set()
    assert gate.entered == ["/hold"]
    assert sent == []
