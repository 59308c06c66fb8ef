"""What the in-process benchmarks drive: the HTTP scope, the smallest app, a pass-through."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send


def http_scope(path: str = "/", client: str = "127.0.0.1") -> dict[str, Any]:
    """A fresh GET scope for ``path`` from ``client``, as uvicorn would build it."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1:8000"), (b"user-agent", b"bench"), (b"accept", b"*/*")],
        "client": (client, 1234),
        "server": ("127.0.0.1", 8000),
    }


async def raw_app(scope: Scope, receive: Receive, send: Send) -> None:
    """The smallest honest ASGI app: a 200 with a two-byte body."""
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", b"2")],
        }
    )
    await send({"type": "http.response.body", "body": b"ok"})


class PassThrough:
    """A middleware that does nothing: the floor for any middleware."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)
