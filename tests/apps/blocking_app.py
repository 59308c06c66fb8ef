"""A FastAPI app behind BlockingDetectorMiddleware, for the end-to-end tests."""

from __future__ import annotations

import time

import anyio
from fastapi import FastAPI

from asgi_guard import BlockingDetectorMiddleware

app = FastAPI()
app.add_middleware(BlockingDetectorMiddleware, threshold=0.05, log_interval=0)


@app.get("/orders/{order_id}")
async def order(order_id: int) -> dict[str, int]:
    time.sleep(0.2)  # E2E BLOCKING LINE
    return {"order": order_id}


@app.get("/fine")
async def fine() -> dict[str, bool]:
    await anyio.sleep(0.2)
    return {"fine": True}
