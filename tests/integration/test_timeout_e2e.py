"""End to end: FastAPI apps behind TimeoutMiddleware, served by real servers over HTTP.

Times are measured by the client, so each upper bound allows ``SLACK`` for a busy machine.
The lower bounds are the deadlines themselves: a deadline counts from the request's arrival
at the server, after the client started its clock.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import httpx
import pytest

from tests.apps.timeout_app import (
    BACKGROUND_SLEEP,
    BODY_RATE_GRACE,
    BODY_TIMEOUT,
    DEADLINE,
    FIRST_CHUNK,
    IDLE_TIMEOUT,
    LOOSE_SLEEP,
    SYNC_SLEEP,
    TIGHT,
    WATCHFUL_DEADLINE,
)

from .servers import HypercornServer, UvicornServer, free_port

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

APP = "tests.apps.timeout_app:app"
WATCHFUL_APP = "tests.apps.timeout_app:watchful_app"
#: How late past a deadline the client may see its answer on a noisy CI machine.
SLACK = 0.25
#: Clock granularity: the client's and the server's monotonic clocks are read separately.
EARLY = 0.01

Server = UvicornServer | HypercornServer
#: What httpx raises reading a body the server ended by closing the connection mid-body.
CUT_SHORT = (httpx.RemoteProtocolError, httpx.ReadError)


@pytest.fixture
def anyio_backend() -> str:
    # The servers pick their own event loop whatever the client runs on, and each server's
    # journal serves the whole module: the client runs on asyncio only.
    return "asyncio"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UvicornServer]:
    """uvicorn (asyncio loop) serving ``tests.apps.timeout_app:app`` on a free port."""
    uvicorn = UvicornServer(APP, free_port(), tmp_path_factory.mktemp("uvicorn"))
    uvicorn.start()
    yield uvicorn
    uvicorn.stop(graceful=True)


@pytest.fixture(scope="module")
def watchful(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UvicornServer]:
    """uvicorn serving ``tests.apps.timeout_app:watchful_app`` (body and disconnect guards)."""
    uvicorn = UvicornServer(WATCHFUL_APP, free_port(), tmp_path_factory.mktemp("uvicorn"))
    uvicorn.start()
    yield uvicorn
    uvicorn.stop(graceful=True)


@pytest.fixture(scope="module", params=["uvicorn", "uvicorn-uvloop", "hypercorn-trio"])
def any_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """``tests.apps.timeout_app:app`` on uvicorn (asyncio, uvloop) and Hypercorn (trio).

    Two servers' HTTP implementations and three event loops, for the tests where the
    server's part matters: answering on time, closing a cut response, reusing a connection.
    """
    kind = str(request.param)
    if kind == "uvicorn":
        yield request.getfixturevalue("server")
        return
    log_dir = tmp_path_factory.mktemp(kind)
    started: Server
    if kind == "uvicorn-uvloop":
        pytest.importorskip("uvloop", reason="uvloop is not installed")
        started = UvicornServer(APP, free_port(), log_dir, args=["--loop", "uvloop"])
    else:
        pytest.importorskip("hypercorn", reason="hypercorn is not installed")
        worker = kind.removeprefix("hypercorn-")
        if worker == "trio":
            pytest.importorskip("trio", reason="trio is not installed")
        started = HypercornServer(APP, free_port(), log_dir, worker_class=worker)
    started.start()
    yield started
    started.stop(graceful=True)


def client_for(server: Server, **kwargs: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=server.url, timeout=5.0, **kwargs)


def new_tag() -> str:
    """A name for one request, to find it in the app's journal."""
    return uuid.uuid4().hex[:12]


async def wait_for_state(
    client: httpx.AsyncClient, ready: Callable[[dict[str, Any]], bool], what: str
) -> dict[str, Any]:
    """Poll ``/state`` until ``ready`` holds (at most 5 s) and return that state."""
    deadline = time.monotonic() + 5.0
    while True:
        r = await client.get("/state")
        assert r.status_code == 200, r.text
        state: dict[str, Any] = r.json()
        if ready(state):
            return state
        assert time.monotonic() < deadline, f"never saw {what}: {state}"
        await anyio.sleep(0.02)


def events_for(state: dict[str, Any], path: str) -> list[dict[str, Any]]:
    return [event for event in state["events"] if event["path"] == path]


def outcomes(state: dict[str, Any], path: str) -> list[tuple[str, bool]]:
    """What the middleware reported for ``path``: each event's kind, and whether the
    response had started."""
    return [(event["kind"], event["response_started"]) for event in events_for(state, path)]


def route_events(state: dict[str, Any], route: str) -> list[dict[str, Any]]:
    return [event for event in state["events"] if event["route"] == route]


async def body_event(client: httpx.AsyncClient, path: str) -> dict[str, Any]:
    """The one event of the request to ``path``, a body timeout."""
    state = await wait_for_state(client, lambda s: bool(events_for(s, path)), "the event")
    [event] = events_for(state, path)
    assert event["kind"] == "body", event
    return event


def assert_problem(r: httpx.Response, status: int, title: str) -> dict[str, Any]:
    """``r`` is an RFC 9457 problem+json answer with ``status`` and ``title``."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json", r.headers
    body: dict[str, Any] = r.json()
    assert body["type"] == "about:blank", body
    assert body["title"] == title, body
    assert body["status"] == status, body
    assert "127.0.0.1" not in r.text, r.text
    return body


async def collect(chunks: AsyncIterator[bytes], into: list[bytes]) -> None:
    """Read a response body to its end, keeping what arrives before any error."""
    async for chunk in chunks:
        into.append(chunk)


async def timed_get(
    client: httpx.AsyncClient, path: str, **kwargs: Any
) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    r = await client.get(path, **kwargs)
    return r, time.monotonic() - started


# -- the deadline, on every server ------------------------------------------------------------


async def test_slow_async_handler_gets_504_at_deadline(any_server: Server) -> None:
    """A slow async handler is answered 504 problem+json at its deadline and cancelled."""
    tag = new_tag()
    async with client_for(any_server) as client:
        r, elapsed = await timed_get(client, f"/slow/async/{tag}")
        body = assert_problem(r, 504, "Gateway Timeout")
        assert f"{DEADLINE:g} s deadline" in body["detail"], body
        assert DEADLINE - EARLY <= elapsed < DEADLINE + SLACK, f"answered after {elapsed:.3f} s"
        state = await wait_for_state(client, lambda s: tag in s["cancelled"], "the cancellation")
        assert tag not in state["finished"], state
        assert outcomes(state, f"/slow/async/{tag}") == [("deadline", False)], state["events"]


async def test_sync_handler_gets_504_at_deadline_not_when_thread_ends(any_server: Server) -> None:
    """A sync def handler's 504 comes at the deadline; its thread runs on, its answer dropped."""
    tag = new_tag()
    async with client_for(any_server, limits=httpx.Limits(max_connections=1)) as client:
        peer = (await client.get("/peer")).json()["port"]
        r, elapsed = await timed_get(client, f"/slow/sync/{tag}")
        assert_problem(r, 504, "Gateway Timeout")
        assert DEADLINE - EARLY <= elapsed < DEADLINE + SLACK, f"answered after {elapsed:.3f} s"
        assert elapsed < SYNC_SLEEP, f"answered after {elapsed:.3f} s"
        # Polled over the same connection: the late 200 must never reach it.
        state = await wait_for_state(
            client,
            lambda s: (
                tag in s["finished"]
                and any(e["kind"] == "overrun" for e in route_events(s, "/slow/sync/{tag}"))
            ),
            "the thread ending and its overrun reported",
        )
        assert tag not in state["cancelled"], state
        r = await client.get("/peer")
        assert r.status_code == 200, r.text
        assert r.json()["port"] == peer, "the connection was not kept alive"


async def test_keep_alive_connection_serves_after_504(any_server: Server) -> None:
    """The keep-alive connection that carried a 504 serves the next request normally."""
    async with client_for(any_server, limits=httpx.Limits(max_connections=1)) as client:
        r = await client.get("/peer")
        assert r.status_code == 200, r.text
        peer = r.json()["port"]
        r = await client.get(f"/slow/async/{new_tag()}")
        assert_problem(r, 504, "Gateway Timeout")
        assert r.headers.get("connection", "").lower() != "close", r.headers
        r = await client.get("/peer")
        assert r.status_code == 200, r.text
        assert r.json()["port"] == peer, "the 504 closed the connection"


async def test_stalled_stream_is_cut_short(any_server: Server) -> None:
    """A stream stalled after its first chunk is cut at the idle limit: an incomplete body."""
    tag = new_tag()
    rest: list[bytes] = []
    async with client_for(any_server) as client:
        async with client.stream("GET", f"/stream/stall/{tag}") as r:
            assert r.status_code == 200, r.headers
            chunks = r.aiter_raw()
            first = await anext(chunks)
            stalled = time.monotonic()
            with pytest.raises(CUT_SHORT):
                await collect(chunks, rest)
            elapsed = time.monotonic() - stalled
        assert first == FIRST_CHUNK, first
        assert rest == [], rest
        # The route's own deadline is 2 s: only the idle limit explains the cut.
        assert elapsed < IDLE_TIMEOUT + SLACK, f"cut after {elapsed:.3f} s"
        state = await wait_for_state(client, lambda s: tag in s["cancelled"], "the cancellation")
        assert outcomes(state, f"/stream/stall/{tag}") == [("idle", True)], state["events"]


# -- the deadline's other edges, on uvicorn ----------------------------------------------------


async def test_endless_stream_is_cut_at_deadline(server: UvicornServer) -> None:
    """A stream that never stalls is cut at the request deadline, never ended cleanly."""
    tag = new_tag()
    received: list[bytes] = []
    async with client_for(server) as client:
        started = time.monotonic()
        async with client.stream("GET", f"/stream/endless/{tag}") as r:
            assert r.status_code == 200, r.headers
            with pytest.raises(CUT_SHORT):
                await collect(r.aiter_raw(), received)
        elapsed = time.monotonic() - started
        assert b"".join(received).startswith(FIRST_CHUNK + b"more\n"), received
        assert DEADLINE - EARLY <= elapsed < DEADLINE + SLACK, f"cut after {elapsed:.3f} s"
        path = f"/stream/endless/{tag}"
        state = await wait_for_state(client, lambda s: bool(events_for(s, path)), "the event")
        assert outcomes(state, path) == [("deadline", True)], state["events"]


async def test_background_task_runs_past_deadline(server: UvicornServer) -> None:
    """A BackgroundTasks task outlives the deadline uncancelled, with remaining() None."""
    tag = new_tag()
    async with client_for(server) as client:
        started = time.monotonic()
        r = await client.post(f"/background/{tag}")
        assert r.status_code == 200, r.text
        state = await wait_for_state(client, lambda s: tag in s["background"], "the task end")
        elapsed = time.monotonic() - started
        assert elapsed >= BACKGROUND_SLEEP > DEADLINE, f"done after {elapsed:.3f} s"
        assert state["background"][tag] is None, state
        assert events_for(state, f"/background/{tag}") == [], state["events"]


async def test_route_dependency_tightens_deadline(server: UvicornServer) -> None:
    """Depends(timeout(0.1)) answers 504 at 0.1 s, before the app's 0.3 s deadline."""
    tag = new_tag()
    async with client_for(server) as client:
        r, elapsed = await timed_get(client, f"/tight/{tag}")
        body = assert_problem(r, 504, "Gateway Timeout")
        assert f"{TIGHT:g} s deadline" in body["detail"], body
        assert TIGHT - EARLY <= elapsed < TIGHT + SLACK, f"answered after {elapsed:.3f} s"
        assert elapsed < DEADLINE, f"answered after {elapsed:.3f} s"
        await wait_for_state(client, lambda s: tag in s["cancelled"], "the cancellation")


async def test_route_dependency_loosens_deadline(server: UvicornServer) -> None:
    """Depends(timeout(1.0)) lets a 0.6 s handler answer 200, past the app's 0.3 s deadline."""
    tag = new_tag()
    async with client_for(server) as client:
        r, elapsed = await timed_get(client, f"/loose/{tag}")
        assert r.status_code == 200, r.text
        assert r.json() == {"in_time": True}, r.text
        assert elapsed >= LOOSE_SLEEP > DEADLINE, f"answered after {elapsed:.3f} s"
        state = await wait_for_state(client, lambda s: tag in s["finished"], "the handler end")
        assert tag not in state["cancelled"], state


@pytest.mark.parametrize(
    ("path", "header", "expected"),
    [
        ("/slow/async", "100m", 0.1),
        ("/slow/async", "0.1", 0.1),
        ("/slow/async", "5", DEADLINE),
        ("/slow/async", "soon", DEADLINE),
        ("/loose", "0.1", 0.1),
    ],
    ids=["grpc-syntax", "seconds", "looser-ignored", "malformed-ignored", "over-route-timeout"],
)
async def test_caller_header_tightens_deadline(
    server: UvicornServer, path: str, header: str, expected: float
) -> None:
    """x-request-timeout tightens any deadline (both syntaxes), never loosens or breaks it."""
    async with client_for(server) as client:
        r, elapsed = await timed_get(
            client, f"{path}/{new_tag()}", headers={"x-request-timeout": header}
        )
        assert_problem(r, 504, "Gateway Timeout")
        assert expected - EARLY <= elapsed < expected + SLACK, f"answered after {elapsed:.3f} s"


@pytest.mark.parametrize("path", ["/remaining", "/remaining/sync"], ids=["async", "sync"])
async def test_remaining_inside_handler(server: UvicornServer, path: str) -> None:
    """remaining() in an async or sync handler is the time left before the (caller's) deadline."""
    async with client_for(server) as client:
        r = await client.get(path)
        assert r.status_code == 200, r.text
        left = r.json()["remaining"]
        assert isinstance(left, float), r.text
        assert 0 < left < DEADLINE, r.text
        r = await client.get(path, headers={"x-request-timeout": "0.2"})
        assert r.status_code == 200, r.text
        assert 0 < r.json()["remaining"] < 0.2, r.text


# -- the request body and the client's disconnect ----------------------------------------------

#: The 408 comes while the client is still sending its body, and the server closes the
#: connection after it. httpx on asyncio loses that answer: its next write fails, asyncio's
#: transport aborts and drops what it had not read yet. On trio the failed write is reported,
#: httpx stops sending and reads the 408 the kernel still holds. So these clients run on trio.
ON_TRIO = pytest.mark.parametrize("anyio_backend", ["trio"])


@ON_TRIO
async def test_slow_request_body_gets_408(watchful: UvicornServer) -> None:
    """A body whose next piece comes later than body_timeout is answered 408 and closed."""

    async def slow_body() -> AsyncIterator[bytes]:
        yield b"x" * 2000  # enough that the minimum rate is not what fires
        await anyio.sleep(BODY_TIMEOUT + SLACK)
        yield b"x" * 2000

    tag = new_tag()
    async with client_for(watchful) as client:
        r = await client.post(f"/upload/{new_tag()}", content=b"x" * 4000)
        assert r.status_code == 200, r.text
        assert r.json() == {"size": 4000}, r.text
        r = await client.post(f"/upload/{tag}", content=slow_body())
        assert_problem(r, 408, "Request Timeout")
        assert r.headers["connection"] == "close", r.headers
        event = await body_event(client, f"/upload/{tag}")
        assert BODY_TIMEOUT - EARLY <= event["elapsed"] < BODY_TIMEOUT + SLACK, event


@ON_TRIO
async def test_trickling_request_body_gets_408(watchful: UvicornServer) -> None:
    """A body trickling below min_body_rate is answered 408, though no gap hits body_timeout."""

    async def trickle() -> AsyncIterator[bytes]:
        for _ in range(100):
            yield b"x" * 20  # 400 B/s, each piece well within the body timeout
            await anyio.sleep(0.05)

    tag = new_tag()
    async with client_for(watchful) as client:
        started = time.monotonic()
        r = await client.post(f"/upload/{tag}", content=trickle())
        elapsed = time.monotonic() - started
        assert_problem(r, 408, "Request Timeout")
        assert r.headers["connection"] == "close", r.headers
        assert elapsed < 1.0, f"answered after {elapsed:.3f} s"
        event = await body_event(client, f"/upload/{tag}")
        assert BODY_RATE_GRACE <= event["elapsed"] < 1.0, event


async def test_client_disconnect_cancels_handler(watchful: UvicornServer) -> None:
    """With cancel_on_disconnect, a client that gives up gets its handler cancelled at once."""
    tag = new_tag()
    async with client_for(watchful) as client:
        started = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            await client.get(f"/hang/{tag}", timeout=0.2)
        state = await wait_for_state(client, lambda s: tag in s["cancelled"], "the cancellation")
        elapsed = time.monotonic() - started
        assert elapsed < WATCHFUL_DEADLINE / 2, f"cancelled after {elapsed:.3f} s"
        assert tag not in state["finished"], state
        kinds = [e["kind"] for e in events_for(state, f"/hang/{tag}")]
        assert kinds == ["disconnect"], state["events"]
