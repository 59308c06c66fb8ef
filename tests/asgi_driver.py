"""A small raw ASGI driver for what httpx.ASGITransport cannot show: streaming, websockets."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
from asgi_lifespan import LifespanManager
from starlette.types import ASGIApp, Message, Receive, Scope, Send


def http_scope(
    path: str = "/",
    *,
    method: str = "GET",
    client: tuple[str, int] | None = ("10.1.2.3", 5000),
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": list(headers),
        "client": client,
        "server": ("127.0.0.1", 8000),
    }


class Driven:
    """What an app sent, and how often it called ``receive``."""

    def __init__(self) -> None:
        self.sent: list[Message] = []
        self.times: list[float] = []
        self.receive_calls = 0
        self.started_at = time.monotonic()

    @property
    def status(self) -> int:
        start = next(m for m in self.sent if m["type"] == "http.response.start")
        return int(start["status"])

    @property
    def headers(self) -> dict[str, str]:
        start = next(m for m in self.sent if m["type"].endswith("response.start"))
        return {k.decode(): v.decode() for k, v in start["headers"]}

    @property
    def starts(self) -> int:
        """How many ``http.response.start`` messages were sent (never more than one)."""
        return sum(m["type"] == "http.response.start" for m in self.sent)

    @property
    def complete(self) -> bool:
        """Whether the response ended with a final body message."""
        return any(
            m["type"] == "http.response.body" and not m.get("more_body", False) for m in self.sent
        )

    def at(self, kind: str) -> float:
        """Seconds from the start of the drive to the first message of type ``kind``."""
        index = next(i for i, m in enumerate(self.sent) if m["type"] == kind)
        return self.times[index] - self.started_at

    @property
    def body(self) -> bytes:
        return b"".join(
            m.get("body", b"") for m in self.sent if m["type"].endswith("response.body")
        )


async def drive(
    app: ASGIApp,
    scope: dict[str, Any],
    messages: Sequence[Message | float] = (),
    *,
    then: str = "disconnect",
) -> Driven:
    """Run ``app`` on ``scope``, feeding ``messages`` to receive and recording what it sends.

    A number among ``messages`` is a pause (seconds) before the next one. Once they run
    out, ``receive`` reports a disconnect (``then="disconnect"``) or, like a real server
    whose client waits, blocks until the app is cancelled (``then="wait"``).
    """
    driven = Driven()
    queue = list(messages) or [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> Message:
        driven.receive_calls += 1
        while queue:
            item = queue.pop(0)
            if isinstance(item, (int, float)):
                await anyio.sleep(item)  # a pause the test scripted
                continue
            return item
        if then == "wait":
            await anyio.sleep_forever()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        driven.sent.append(message)
        driven.times.append(time.monotonic())

    await app(scope, receive, send)
    return driven


async def ok_app(scope: Scope, receive: Receive, send: Send) -> None:
    """A raw ASGI app that answers 200 without reading the body."""
    await send({"type": "http.response.start", "status": 200, "headers": [(b"x-app", b"1")]})
    await send({"type": "http.response.body", "body": b"ok"})


@asynccontextmanager
async def lifespan_client(
    app: ASGIApp,
    *,
    root_path: str = "",
    client: tuple[str, int] = ("127.0.0.1", 123),
    base_url: str = "http://t",
) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client on ``app`` through `httpx.ASGITransport`, inside the app's lifespan."""
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app, root_path=root_path, client=client)
        async with httpx.AsyncClient(transport=transport, base_url=base_url) as http:
            yield http


async def until(check: Callable[[], object], within: float = 2.0) -> None:
    """Wait (at most ``within`` seconds) until ``check()`` holds."""
    with anyio.fail_after(within):
        while not check():  # noqa: ASYNC110 - polling state the guard owns
            await anyio.sleep(0.001)
