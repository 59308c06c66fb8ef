"""The backends the timeout tests run on: both ways of cancelling on asyncio, and trio."""

from __future__ import annotations

import pytest

from asgi_guard import _deadline


@pytest.fixture(params=["asyncio", "asyncio+scopes", "trio"])
def anyio_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """asyncio cancels requests natively; "asyncio+scopes" forces the anyio cancel scopes
    trio (and Python 3.10) use, so both ways are tested on asyncio."""
    if request.param == "asyncio+scopes":
        monkeypatch.setattr(_deadline, "_TASK_STATES", None)
        return "asyncio"
    return str(request.param)
