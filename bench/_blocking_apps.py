"""Apps for ``blocking_overhead.py``: one small app without and with the blocking detector.

uvicorn imports them as ``bench._blocking_apps:<name>`` (run from the project root). ``GET /``
awaits 1 ms (``anyio.sleep``) and answers a small JSON: it never blocks the loop, so the
detector must report nothing while the benchmark runs. Two routes for the script's checks,
never hit while it measures: ``/_block`` blocks the loop for 150 ms (``time.sleep``, past the
100 ms threshold), and ``/_stats`` says whether the watchdog thread is alive and how many
stalls the detector reported (through an ``on_block`` callback).

``fastapi_off`` / ``fastapi_on``: FastAPI, the detector added with ``add_middleware``
(``threshold=0.1``, the default poll interval: 20 ms). ``starlette_off`` / ``starlette_on``:
the same with Starlette.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import anyio
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from asgi_guard import BlockingDetectorMiddleware, BlockingEvent

THRESHOLD = 0.1
HANDLER_SLEEP = 0.001
BLOCK = 0.15

#: Stalls the detector reported in this process (the on_block callback, its own thread).
REPORTED = {"blocks": 0}


def _count(event: BlockingEvent) -> None:
    REPORTED["blocks"] += 1


def _stats() -> dict[str, Any]:
    names = [t.name for t in threading.enumerate()]
    return {"watchdog": "asgi_guard-blocking-watchdog" in names, **REPORTED}


def _fastapi(detector: bool) -> FastAPI:
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    @app.get("/")
    async def home() -> dict[str, Any]:
        await anyio.sleep(HANDLER_SLEEP)
        return {"ok": True, "items": [1, 2, 3]}

    @app.get("/_block")
    async def block() -> dict[str, Any]:
        time.sleep(BLOCK)
        return {"blocked": BLOCK}

    @app.get("/_stats")
    async def stats() -> dict[str, Any]:
        return _stats()

    if detector:
        app.add_middleware(BlockingDetectorMiddleware, threshold=THRESHOLD, on_block=_count)
    return app


async def _home(request: Request) -> JSONResponse:
    await anyio.sleep(HANDLER_SLEEP)
    return JSONResponse({"ok": True, "items": [1, 2, 3]})


async def _block(request: Request) -> JSONResponse:
    time.sleep(BLOCK)
    return JSONResponse({"blocked": BLOCK})


async def _stats_route(request: Request) -> JSONResponse:
    return JSONResponse(_stats())


def _starlette(detector: bool) -> Starlette:
    app = Starlette(
        routes=[Route("/", _home), Route("/_block", _block), Route("/_stats", _stats_route)]
    )
    if detector:
        app.add_middleware(BlockingDetectorMiddleware, threshold=THRESHOLD, on_block=_count)
    return app


fastapi_off = _fastapi(False)
fastapi_on = _fastapi(True)
starlette_off = _starlette(False)
starlette_on = _starlette(True)
