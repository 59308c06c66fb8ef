"""Strict mode, for development and tests: short blocking calls raise at once.

The watchdog reports only stalls longer than its threshold; a 2 ms ``time.sleep`` in a
handler that runs a thousand times a second goes unseen. With ``strict=True`` the known
blocking calls of the standard library raise `BlockingCallError` on the event loop thread,
whatever their duration: ``/settings`` fails at once with the call, the route and the fix.
``allow=`` lets named calls through (here a DNS lookup a library makes at startup).

In a test suite, the pytest plugin does the same for every async test::

    pytest --asgi-guard-blocking                       # every async test
    @pytest.mark.asgi_guard_blocking(threshold=0.05)   # or per test
"""

from __future__ import annotations

import time

from fastapi import FastAPI

from asgi_guard import BlockingCallError, BlockingDetectorMiddleware

app = FastAPI(title="strict")
app.add_middleware(
    BlockingDetectorMiddleware, threshold=0.1, strict=True, allow=["socket.getaddrinfo"]
)


def read_settings() -> dict[str, int]:
    time.sleep(0.002)  # a short blocking call: too short for the watchdog
    return {"workers": 4}


@app.get("/settings")
async def settings() -> dict[str, int]:
    return read_settings()


@app.get("/settings-checked")
async def settings_checked() -> dict[str, object]:
    try:
        return {"settings": read_settings()}
    except BlockingCallError as error:  # what strict mode raises, shown rather than raised
        return {"error": str(error)}
