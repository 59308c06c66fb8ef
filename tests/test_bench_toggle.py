"""The switch ``bench/shedding_toggle.py`` measures through (``bench/_overload_apps.py``'s
``shed_toggled``): its figures mean something only if a guarded mode's ticker stops when
the switch leaves it (else it would tick in the other mode's windows) and starts again
with the mode's next request, and if only the counted route is counted."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent

# The switch finds and awaits the guards' tickers as asyncio tasks.
pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["asyncio"])]


@pytest.fixture(scope="module")
def apps() -> Iterator[ModuleType]:
    """``bench._overload_apps`` without its calibration; forgotten afterwards."""
    before = set(sys.modules)
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(ROOT))
        patch.setenv("OVERLOAD_WORK_ROUNDS", "10")
        yield importlib.import_module("bench._overload_apps")
    for name in set(sys.modules) - before:
        del sys.modules[name]


async def switch(client: httpx.AsyncClient, mode: str) -> dict[str, Any]:
    response = await client.get(f"/_mode?to={mode}")
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


async def light(client: httpx.AsyncClient) -> None:
    response = await client.get("/light")
    assert response.status_code == 200, response.text


async def test_a_guarded_modes_ticker_runs_only_in_its_windows(apps: ModuleType) -> None:
    """A guard's ticker starts with its mode's first request, stops when the switch leaves
    the mode (the task has ended by the time the switch answers), and runs again as soon
    as the switch enters the mode anew, before any request."""
    toggled = apps.shed_toggled
    transport = httpx.ASGITransport(app=toggled)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await switch(client, "default"))["tickers"] == 0  # its stack is not built
        await light(client)
        assert (await switch(client, "default"))["tickers"] == 1

        left = await switch(client, "none")
        assert left["tickers"] == 0
        assert left["admitted"] == 1
        assert left["refused"] == 0
        await light(client)  # unguarded: not admitted
        assert (await switch(client, "fixed"))["admitted"] == 1
        await light(client)
        assert (await switch(client, "fixed"))["tickers"] == 1

        # Back in the default mode: its ticker runs again at once, the fixed one's is over.
        back = await switch(client, "default")
        assert back["tickers"] == 1
        default_guard = apps._guard_of(toggled.modes["default"])
        assert apps._ticker_of(default_guard) is not None
        assert apps._ticker_of(apps._guard_of(toggled.modes["fixed"])) is None
        await light(client)
        after = await switch(client, "none")
        assert after["tickers"] == 0
        assert after["admitted"] == 3
        assert after["refused"] == 0


async def test_only_the_counted_route_is_counted(apps: ModuleType) -> None:
    """The windows count ``GET /light`` only (the load's requests, not the switch's)."""
    toggled = apps.shed_toggled
    transport = httpx.ASGITransport(app=toggled)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        start = (await switch(client, "pass"))["after"]["served"]
        await light(client)
        assert (await client.get("/health")).status_code == 200
        assert (await switch(client, "pass"))["before"]["served"] == start + 1
        await switch(client, "none")
