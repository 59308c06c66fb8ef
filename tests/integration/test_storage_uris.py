"""Storage URIs that cannot work fail when the middleware is built, not at the first request."""

from __future__ import annotations

from typing import Any

import coredis
import pytest
from starlette.types import Message, Receive, Scope, Send

from asgi_guard import ConfigurationError, RateLimiter, RateLimitMiddleware

from ..asgi_driver import ok_app


@pytest.mark.parametrize(
    ("storage", "message"),
    [
        ("nosuch://x", "unknown storage URI 'nosuch://x'"),
        ("127.0.0.1:6379", "unknown storage URI"),
        ("", "unknown storage URI"),
        ("async+nosuch://x", "unknown storage URI"),
        ("async+mongodb://127.0.0.1", "unknown storage URI"),
        ("redis://127.0.0.1:notaport", "cannot use storage 'redis://127.0.0.1:notaport'"),
        ("redis://127.0.0.1:99999", "cannot use storage"),
        ("redis+sentinel://127.0.0.1:26379", "service_name"),
        ("valkey://127.0.0.1:port", "cannot use storage"),
        ("memcached://127.0.0.1:port", "cannot use storage"),
    ],
)
def test_bad_storage_uri_fails_at_construction(storage: str, message: str) -> None:
    """A URI with an unknown scheme or a malformed address raises ConfigurationError at once."""
    with pytest.raises(ConfigurationError, match=message):
        RateLimitMiddleware(ok_app, limit="1/second", storage=storage)


@pytest.mark.parametrize(
    "storage",
    [
        "memcached://",
        "memcached:///tmp/memcached.sock",
        "redis://",
        "redis:///0",
        "rediss://",
        "async+redis://",
        "valkey://",
        "valkeys://",
        "redis+cluster://",
        "valkey+cluster://",
        "redis+sentinel:///mymaster",
        "valkey+sentinel:///mymaster",
        "redis://user:s3cret@/0",
    ],
)
def test_storage_uri_without_a_host_fails_at_construction(storage: str) -> None:
    """A network storage URI that names no host is a ConfigurationError when the middleware
    is built (it was accepted, and then every request was a storage error)."""
    with pytest.raises(ConfigurationError, match="names no host") as raised:
        RateLimitMiddleware(ok_app, limit="1/second", storage=storage)
    assert "s3cret" not in str(raised.value), raised.value


@pytest.mark.parametrize("storage", ["redis+unix://", "valkey+unix://", "redis+unix:///"])
def test_unix_socket_uri_without_a_path_fails_at_construction(storage: str) -> None:
    """A unix-socket URI must name the socket's path."""
    with pytest.raises(ConfigurationError, match="names no socket"):
        RateLimiter(storage)


@pytest.mark.parametrize(
    ("storage", "options"),
    [
        ("redis+unix:///run/redis.sock", None),
        ("valkey+unix:///run/valkey.sock", None),
        ("redis://127.0.0.1:6379", None),
        ("memcached://127.0.0.1:11211,127.0.0.2:11211", None),
        ("redis+cluster://127.0.0.1:7000,127.0.0.1:7001", None),
        ("redis+sentinel://127.0.0.1:26379/mymaster", None),
        ("redis+cluster://", {"startup_nodes": []}),
    ],
)
def test_storage_uris_with_a_host_or_socket_build(
    storage: str, options: dict[str, Any] | None
) -> None:
    """Hosts, unix sockets, or connections given in storage_options: the limiter builds
    (nothing connects before the first request)."""
    assert not RateLimiter(storage, storage_options=options).is_memory


def test_a_connection_pool_needs_no_host() -> None:
    """With storage_options={"connection_pool": ...} the client ignores the URI's host, so
    'redis://' builds."""
    pool = coredis.ConnectionPool(host="127.0.0.1", port=6379)
    assert not RateLimiter("redis://", storage_options={"connection_pool": pool}).is_memory


def test_storage_uri_password_is_redacted_in_errors() -> None:
    """The error for a bad URI never shows its password."""
    with pytest.raises(ConfigurationError) as raised:
        RateLimitMiddleware(ok_app, limit="1/second", storage="redis://u:s3cret@127.0.0.1:x")
    assert "s3cret" not in str(raised.value), raised.value


def test_storage_must_be_a_string() -> None:
    """A non-string storage is a ConfigurationError, not a crash deep inside limits."""
    bad: Any = ("redis", 6379)
    with pytest.raises(ConfigurationError, match="URI string"):
        RateLimiter(bad)


@pytest.mark.redis
@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # remote storages run on asyncio only
@pytest.mark.parametrize(
    ("storage", "options"),
    [
        ("{url}?no_such_option=1", None),
        ("{url}", {"no_such_option": 1}),
        ("{url}/99", None),
    ],
)
async def test_broken_redis_configuration_fails_lifespan_startup(
    redis_url: str, storage: str, options: dict[str, Any] | None
) -> None:
    """Options the client rejects, or a database that does not exist, fail the server's
    startup with a clear message instead of counting as an outage that never limits."""
    sent: list[Message] = []
    messages: list[Message] = [{"type": "lifespan.startup"}]

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "lifespan.startup.complete"})

    async def receive() -> Message:
        return messages.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    limiter = RateLimiter(storage.format(url=redis_url), storage_options=options)
    guarded = RateLimitMiddleware(app, limit="1/second", limiter=limiter)
    await guarded({"type": "lifespan"}, receive, send)
    assert sent[0]["type"] == "lifespan.startup.failed", sent
    assert "fails" in sent[0]["message"], sent
