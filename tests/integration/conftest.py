"""Real servers for the integration tests, started once per session (or per test) and killed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .servers import MemcachedServer, RedisServer, free_port, require_binary


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the whole session."""
    binary = require_binary("redis-server", "redis-server")
    server = RedisServer(binary, free_port(), tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session redis-server's URI, emptied for this test."""
    redis_server.flush()
    return redis_server.url


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, free to be killed, frozen and restarted."""
    binary = require_binary("redis-server", "redis-server")
    server = RedisServer(binary, free_port(), tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def memcached_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MemcachedServer]:
    """One memcached for the whole session."""
    binary = require_binary("memcached", "memcached")
    server = MemcachedServer(binary, free_port(), tmp_path_factory.mktemp("memcached"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def memcached_url(memcached_server: MemcachedServer) -> str:
    """The session memcached's URI, emptied for this test."""
    memcached_server.flush()
    return memcached_server.url
