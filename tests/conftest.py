"""Fixtures shared by every test module."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Run every async test on asyncio and on trio (a module overrides this to narrow it)."""
    return str(request.param)
