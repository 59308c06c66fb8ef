"""A FastAPI app behind ``RateLimitMiddleware``, for end-to-end tests over real HTTP.

Routes: ``/limited`` (3 per minute in the middleware), ``/dependency`` (2 per minute in a
``rate_limit`` dependency), ``/stream`` (a streaming response), ``/background`` (schedules a
background task) and ``/background/count`` (how many ran; exempt from limits), and the
WebSocket ``/ws`` (2 handshakes per minute, echoes one message).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import anyio.lowlevel
from fastapi import BackgroundTasks, Depends, FastAPI, WebSocket
from fastapi.responses import StreamingResponse

from asgi_guard import Policy, RateLimitMiddleware, RequestRejected, Rule
from asgi_guard.fastapi import rate_limit, rejection_handler

STREAM_CHUNKS = 200
STREAM_CHUNK = b"0123456789abcdef" * 64


def create_app() -> FastAPI:
    """Build the app; its background counter lives in this closure, not in the module."""
    app = FastAPI()
    app.add_exception_handler(RequestRejected, rejection_handler)
    finished: list[int] = []

    @app.get("/limited")
    async def limited() -> dict[str, bool]:
        return {"ok": True}

    @app.get(
        "/dependency",
        dependencies=[Depends(rate_limit(Policy("2/minute", strategy="moving-window")))],
    )
    async def dependency() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(STREAM_CHUNKS):
                await anyio.lowlevel.checkpoint()
                yield STREAM_CHUNK

        return StreamingResponse(chunks(), media_type="application/octet-stream")

    @app.post("/background")
    async def background(tasks: BackgroundTasks) -> dict[str, bool]:
        async def work() -> None:
            await anyio.sleep(0.01)
            finished.append(1)

        tasks.add_task(work)
        return {"queued": True}

    @app.get("/background/count")
    async def background_count() -> dict[str, int]:
        return {"count": len(finished)}

    @app.websocket("/ws")
    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text(await websocket.receive_text())
        await websocket.close()

    app.add_middleware(
        RateLimitMiddleware,
        limit="1000/minute",
        # Moving windows: memory fixed windows are aligned on the clock, and a window
        # boundary falling inside a test would reset its count.
        rules=[
            Rule("/limited", limit=Policy("3/minute", strategy="moving-window")),
            Rule("/ws", limit=Policy("2/minute", strategy="moving-window")),
        ],
        exempt=["/background/count"],
    )
    return app


app = create_app()
