"""The pytest plugin: a test whose code blocks the event loop fails, with the line.

Installing asgi_guard registers the plugin, off unless asked: mark a test
``@pytest.mark.asgi_guard_blocking`` (or pass ``--asgi-guard-blocking`` to check every
async test). A checked test runs under a strict detector: a known blocking call raises
`BlockingCallError` at once, whatever its duration, and a step that holds the loop longer
than the threshold fails the test with its stack. Run it with::

    pytest examples/test_blocking_plugin.py

The two tests marked ``xfail`` show what the plugin catches (``--runxfail`` shows how).
"""

from __future__ import annotations

import json
import time
from typing import Any

import anyio
import pytest

from asgi_guard import BlockingCallError

pytestmark = pytest.mark.anyio

CART: dict[str, list[dict[str, Any]]] = {
    "items": [{"sku": f"sku-{n}", "price": n % 50} for n in range(200_000)]
}


async def load_cart() -> dict[str, list[dict[str, Any]]]:
    await anyio.sleep(0.01)  # an async client: the loop goes on meanwhile
    return {"items": [{"sku": "sku-1", "price": 3}]}


def total_price(cart: dict[str, list[dict[str, Any]]]) -> int:
    time.sleep(0.001)  # a sync call hidden in a helper: too short for any watchdog
    return sum(item["price"] for item in cart["items"])


@pytest.mark.asgi_guard_blocking
async def test_checkout_awaits() -> None:
    cart = await load_cart()
    assert cart["items"]


@pytest.mark.asgi_guard_blocking
@pytest.mark.xfail(raises=BlockingCallError, strict=True, reason="strict: time.sleep raises")
async def test_a_short_blocking_call_raises_at_once() -> None:
    total_price(CART)


@pytest.mark.asgi_guard_blocking(threshold=0.05, strict=False)
@pytest.mark.xfail(strict=True, reason="the step holds the loop past 0.05 s")
async def test_a_long_step_fails_the_test() -> None:
    started = time.monotonic()
    while time.monotonic() - started < 0.2:
        json.dumps(CART)  # THE BLOCKING LINE: 0.2 s of encoding without an await


@pytest.mark.asgi_guard_blocking(allow=["time.sleep"])
async def test_an_allowed_call_passes() -> None:
    assert total_price(CART) > 0
