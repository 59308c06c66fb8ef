"""End to end: a FastAPI app behind RateLimitMiddleware, served by a real uvicorn over HTTP."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import anyio
import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.apps.fastapi_app import STREAM_CHUNK, STREAM_CHUNKS

from .servers import UvicornServer, free_port

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


@pytest.fixture
def anyio_backend() -> str:
    # The server is uvicorn on asyncio whatever the client runs on, the websockets client is
    # asyncio-only, and one server with its counters serves the whole module: asyncio only.
    return "asyncio"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UvicornServer]:
    """uvicorn serving ``tests.apps.fastapi_app:app`` (memory storage) on a free port."""
    uvicorn = UvicornServer(
        "tests.apps.fastapi_app:app", free_port(), tmp_path_factory.mktemp("uvicorn")
    )
    uvicorn.start()
    yield uvicorn
    uvicorn.stop(graceful=True)


def client_for(server: UvicornServer) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=server.url, timeout=5.0)


def assert_quota_problem(r: httpx.Response) -> None:
    """``r`` is a 429 problem+json naming the violated policy, without the client address."""
    assert r.status_code == 429, r.text
    assert r.headers["content-type"] == "application/problem+json", r.headers
    assert int(r.headers["retry-after"]) >= 1, r.headers
    body = r.json()
    assert body["type"].endswith("#quota-exceeded"), body
    assert body["status"] == 429, body
    assert isinstance(body["violated-policies"], list), body
    assert body["violated-policies"], body
    assert "127.0.0.1" not in r.text, r.text
    assert "127.0.0.1" not in str(r.headers), r.headers


async def test_middleware_rejects_with_problem_json(server: UvicornServer) -> None:
    """Over real HTTP the middleware admits 3 of /limited, then answers 429 problem+json."""
    async with client_for(server) as client:
        for remaining in (2, 1, 0):
            r = await client.get("/limited")
            assert r.status_code == 200, r.text
            assert f'"3-per-60s";r={remaining}' in r.headers["ratelimit"], r.headers
        r = await client.get("/limited")
        assert_quota_problem(r)
        assert r.json()["violated-policies"] == ["3-per-60s"], r.text
        assert '"3-per-60s";r=0' in r.headers["ratelimit"], r.headers


async def test_dependency_rejects_with_problem_json(server: UvicornServer) -> None:
    """A rate_limit dependency behind the middleware admits 2, then answers 429 problem+json."""
    async with client_for(server) as client:
        for remaining in (1, 0):
            r = await client.get("/dependency")
            assert r.status_code == 200, r.text
            # The dependency's entry joins the middleware's in one RateLimit field.
            assert f'"2-per-60s";r={remaining}' in r.headers["ratelimit"], r.headers
            assert '"1000-per-60s"' in r.headers["ratelimit"], r.headers
        r = await client.get("/dependency")
        assert_quota_problem(r)
        assert r.json()["violated-policies"] == ["2-per-60s"], r.text


async def test_streaming_response_arrives_whole_with_headers(server: UvicornServer) -> None:
    """A StreamingResponse passes through the middleware whole, with RateLimit headers."""
    async with client_for(server) as client, client.stream("GET", "/stream") as r:
        assert r.status_code == 200, r.headers
        assert "ratelimit" in r.headers, r.headers
        assert "ratelimit-policy" in r.headers, r.headers
        assert r.headers.get("transfer-encoding") == "chunked", r.headers
        body = b"".join([chunk async for chunk in r.aiter_raw()])
    assert body == STREAM_CHUNK * STREAM_CHUNKS, len(body)


async def test_background_task_runs(server: UvicornServer) -> None:
    """Background tasks of an admitted request run; the exempt counter route has no headers."""
    async with client_for(server) as client:
        r = await client.get("/background/count")
        assert r.status_code == 200, r.text
        assert "ratelimit" not in r.headers, r.headers
        before = r.json()["count"]
        for _ in range(3):
            r = await client.post("/background")
            assert r.status_code == 200, r.text
            assert "ratelimit" in r.headers, r.headers
        deadline = time.monotonic() + 5
        while (count := (await client.get("/background/count")).json()["count"]) < before + 3:
            assert time.monotonic() < deadline, f"background tasks ran {count - before} of 3"
            await anyio.sleep(0.02)
        assert count == before + 3


async def test_websocket_handshake_refused_with_http_429(server: UvicornServer) -> None:
    """uvicorn offers websocket.http.response, so the third handshake gets HTTP 429 problem+json."""
    ws_url = server.url.replace("http://", "ws://") + "/ws"
    for _ in range(2):
        async with connect(ws_url, open_timeout=5) as ws:
            await ws.send("hello")
            assert await ws.recv() == "hello"
    with pytest.raises(InvalidStatus) as refused:
        async with connect(ws_url, open_timeout=5):
            pass
    response = refused.value.response
    assert response.status_code == 429, response
    assert response.headers["content-type"] == "application/problem+json", response.headers
    assert int(response.headers["retry-after"]) >= 1, response.headers
    assert '"2-per-60s";r=0' in response.headers["ratelimit"], response.headers
    body = json.loads(bytes(response.body or b""))
    assert body["type"].endswith("#quota-exceeded"), body
    assert body["violated-policies"] == ["2-per-60s"], body
    assert "127.0.0.1" not in json.dumps(body), body
