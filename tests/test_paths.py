"""Path matching shared by the guards: the route path under a root path, exempt specs."""

from __future__ import annotations

import logging

import pytest

from asgi_guard import ConfigurationError
from asgi_guard._paths import Exemptions, route_path

log = logging.getLogger("test")


@pytest.mark.parametrize(
    ("path", "root_path", "expected"),
    [
        ("/api/health", "/api", "/health"),
        ("/api", "/api", "/"),
        ("/api/", "/api", "/"),
        ("/apix/health", "/api", "/apix/health"),  # not under the root path
        ("/health", "/api", "/health"),  # a server that does not prefix the path
        ("/health", "", "/health"),
        ("/v1/users/1", "/v1", "/users/1"),
    ],
)
def test_route_path_strips_the_root_path_as_starlette_routes(
    path: str, root_path: str, expected: str
) -> None:
    assert route_path({"type": "http", "path": path, "root_path": root_path}) == expected


def test_route_path_without_a_root_path_key() -> None:
    assert route_path({"type": "http", "path": "/x"}) == "/x"


def test_an_async_exempt_predicate_is_refused_at_construction() -> None:
    async def is_probe(scope: object) -> bool:
        return True

    with pytest.raises(ConfigurationError, match="not async"):
        Exemptions([is_probe], log, "limited")  # type: ignore[list-item]


def test_a_sync_exempt_predicate_is_kept() -> None:
    exemptions = Exemptions([lambda scope: scope.get("method") == "OPTIONS"], log, "limited")
    assert exemptions.needs_check
    assert exemptions({"method": "OPTIONS"}, "/x")
    assert not exemptions({"method": "GET"}, "/x")
