"""LoadSheddingMiddleware: limit, queue, CoDel, priorities, shares, deadlines, triggers."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio
import pytest
from starlette.responses import PlainTextResponse
from starlette.types import Message, Receive, Scope, Send

from asgi_guard import (
    ConfigurationError,
    LoadSheddingEvent,
    LoadSheddingMiddleware,
    TimeoutMiddleware,
)
from asgi_guard._adaptive import LimitAlgorithm

from .asgi_driver import Driven, drive, http_scope, until

pytestmark = pytest.mark.anyio

#: The queue wait of tests whose waiters must outlast their own setup: longer than any
#: stall of a loaded CI machine (the default, 100 ms, is not; one such run refused them).
SETUP = 5.0


class Gate:
    """An app whose requests stay in it until the test opens the gate."""

    def __init__(self) -> None:
        self.open = anyio.Event()
        self.entered: list[str] = []
        self.inside = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.entered.append(scope["path"])
        self.inside += 1
        try:
            await self.open.wait()
        finally:
            self.inside -= 1
        await PlainTextResponse("ok")(scope, receive, send)


def problem(driven: Driven) -> dict[str, Any]:
    assert driven.status == 503, driven.sent
    assert driven.headers["content-type"] == "application/problem+json"
    return json.loads(driven.body)  # type: ignore[no-any-return]


def never_receive() -> Callable[[], Awaitable[Message]]:
    async def receive() -> Message:
        raise AssertionError("the middleware read the request body")

    return receive


async def start(
    group: anyio.abc.TaskGroup, app: Any, path: str, results: dict[str, Driven], **kw: Any
) -> None:
    """Start a request from a client that waits for its answer (a queued request watches
    for a disconnect: the driver's default, a client gone once its request is read, would
    leave the queue at once)."""

    async def one() -> None:
        results[path] = await drive(app, http_scope(path, **kw), then="wait")

    group.start_soon(one)


async def test_requests_beyond_the_limit_and_queue_get_503_problem_json() -> None:
    """Limit 2, no queue: the third concurrent request is refused at once, with a
    problem+json 503, a Retry-After, no body read and no Connection: close."""
    gate = Gate()
    shedder = LoadSheddingMiddleware(gate, limit=2, max_queue=0)
    results: dict[str, Driven] = {}
    async with anyio.create_task_group() as group:
        await start(group, shedder, "/a", results)
        await start(group, shedder, "/b", results)
        await until(lambda: gate.inside == 2)
        refused = Driven()
        started = time.monotonic()
        scope = http_scope("/c")

        async def send(message: Message) -> None:
            refused.sent.append(message)
            refused.times.append(time.monotonic())

        await shedder(scope, never_receive(), send)
        assert time.monotonic() - started < 0.05
        gate.open.set()
    body = problem(refused)
    assert body["type"].endswith("#temporary-reduced-capacity")
    assert body["reason"] == "queue_full"
    assert int(refused.headers["retry-after"]) >= 1
    assert "connection" not in refused.headers
    assert results["/a"].status == results["/b"].status == 200
    assert shedder.state()["inflight"] == 0


async def test_a_bounded_queue_absorbs_a_burst_first_in_first_out() -> None:
    """Limit 1, queue 3: all four are served, in arrival order."""
    gate = Gate()
    shedder = LoadSheddingMiddleware(gate, limit=1, max_queue=3, queue_timeout=SETUP)
    results: dict[str, Driven] = {}
    async with anyio.create_task_group() as group:
        for n, path in enumerate(("/1", "/2", "/3", "/4")):
            await start(group, shedder, path, results)

            def placed(n: int = n) -> bool:
                return gate.inside + shedder.limiter.queued == n + 1

            await until(placed)
        assert shedder.state()["queued"] == 3
        gate.open.set()
    assert [results[p].status for p in ("/1", "/2", "/3", "/4")] == [200] * 4
    assert gate.entered == ["/1", "/2", "/3", "/4"]
    assert shedder.state()["queue_delay"] > 0
    assert shedder.state()["place_time"] > 0  # places freed while requests waited


async def test_a_queued_request_waits_no_longer_than_queue_timeout() -> None:
    """A request that cannot be admitted within queue_timeout is refused then."""
    gate = Gate()
    shedder = LoadSheddingMiddleware(gate, limit=1, max_queue=5, queue_timeout=0.05)
    results: dict[str, Driven] = {}
    async with anyio.create_task_group() as group:
        await start(group, shedder, "/long", results)
        await until(lambda: gate.inside == 1)
        started = time.monotonic()
        waited = await drive(shedder, http_scope("/late"), then="wait")
        elapsed = time.monotonic() - started
        gate.open.set()
    assert problem(waited)["reason"] == "queue_timeout"
    assert 0.04 <= elapsed < 0.5
    assert shedder.limiter.queued == 0


async def test_a_higher_class_pushes_the_lowest_out_of_a_full_queue() -> None:
    """A full queue of sheddable requests makes room for a critical one."""
    gate = Gate()
    shedder = LoadSheddingMiddleware(
        gate,
        limit=1,
        max_queue=1,
        queue_timeout=SETUP,
        priority={"/batch": "sheddable", "/pay": "critical"},
    )
    results: dict[str, Driven] = {}
    async with anyio.create_task_group() as group:
        await start(group, shedder, "/first", results)
        await until(lambda: gate.inside == 1)
        await start(group, shedder, "/batch", results)
        await until(lambda: shedder.limiter.queued == 1)
        await start(group, shedder, "/pay", results)
        await until(lambda: "/batch" in results)
        gate.open.set()
    assert problem(results["/batch"])["reason"] == "pushed_out"
    assert results["/pay"].status == 200
    assert gate.entered == ["/first", "/pay"]


async def test_higher_classes_leave_the_queue_first() -> None:
    """When a place frees up, the most critical waiter gets it, whatever the order."""
    gate = Gate()
    rules = {"/s": "sheddable", "/sp": "sheddable-plus", "/c": "critical", "/cp": "critical_plus"}
    shedder = LoadSheddingMiddleware(
        gate, limit=1, max_queue=8, queue_timeout=SETUP, priority=rules
    )
    results: dict[str, Driven] = {}
    async with anyio.create_task_group() as group:
        await start(group, shedder, "/first", results)
        await until(lambda: gate.inside == 1)
        for n, path in enumerate(("/s", "/sp", "/c", "/cp")):
            await start(group, shedder, path, results)

            def queued(n: int = n) -> bool:
                return shedder.limiter.queued == n + 1

            await until(queued)
        gate.open.set()
    assert gate.entered == ["/first", "/cp", "/c", "/sp", "/s"]


async def test_a_priority_header_counts_only_when_trusted() -> None:
    """The header decides the class only when the trust predicate says so."""
    gate = Gate()
    trusted = {"10.0.0.1"}
    shedder = LoadSheddingMiddleware(
        gate,
        limit=1,
        max_queue=1,
        queue_timeout=SETUP,
        default_priority="sheddable",
        priority_header="X-Priority",
        trust_priority_header=lambda scope: scope["client"][0] in trusted,
    )
    header = [(b"x-priority", b"critical")]
    results: dict[str, Driven] = {}
    async with anyio.create_task_group() as group:
        await start(group, shedder, "/first", results)
        await until(lambda: gate.inside == 1)
        await start(group, shedder, "/queued", results)
        await until(lambda: shedder.limiter.queued == 1)
        # Claims to be critical from an untrusted client: still sheddable, queue full.
        await start(group, shedder, "/liar", results, headers=header)
        await until(lambda: "/liar" in results)
        await start(group, shedder, "/gateway", results, headers=header, client=("10.0.0.1", 1))
        await until(lambda: "/queued" in results)
        gate.open.set()
    assert problem(results["/liar"])["reason"] == "queue_full"
    assert problem(results["/queued"])["reason"] == "pushed_out"
    assert results["/gateway"].status == 200


async def test_a_reserved_share_admits_its_class_at_the_limit() -> None:
    """With half the limit reserved for critical, a critical request is admitted even
    when sheddable requests have borrowed every place."""
    gate = Gate()
    shedder = LoadSheddingMiddleware(
        gate,
        limit=2,
        max_queue=0,
        default_priority="sheddable",
        priority={"/pay": "critical"},
        reserve={"critical": 0.5},
    )
    results: dict[str, Driven] = {}
    async with anyio.create_task_group() as group:
        await start(group, shedder, "/b1", results)
        await start(group, shedder, "/b2", results)
        await until(lambda: gate.inside == 2)
        await start(group, shedder, "/b3", results)
        await until(lambda: "/b3" in results)
        await start(group, shedder, "/pay", results)
        await until(lambda: gate.inside == 3)
        gate.open.set()
    assert problem(results["/b3"])["reason"] == "queue_full"
    assert results["/pay"].status == 200


async def test_exempt_paths_are_never_shed_nor_counted() -> None:
    """Health checks pass at the limit and do not take a place."""
    gate = Gate()
    shedder = LoadSheddingMiddleware(gate, limit=1, max_queue=0)
    results: dict[str, Driven] = {}
    async with anyio.create_task_group() as group:
        await start(group, shedder, "/work", results)
        await until(lambda: gate.inside == 1)
        await start(group, shedder, "/health", results)
        await until(lambda: gate.inside == 2)
        assert shedder.state()["inflight"] == 1
        gate.open.set()
    assert results["/health"].status == 200


async def test_a_request_that_cannot_meet_its_deadline_is_refused_at_once() -> None:
    """Behind a TimeoutMiddleware: when the deadline leaves less than requests take, a
    request that would queue is refused at once (503), not left to time out (504)."""

    async def slow(scope: Scope, receive: Receive, send: Send) -> None:
        await anyio.sleep(0.2 if scope["path"] == "/hold" else 0.1)
        await PlainTextResponse("ok")(scope, receive, send)

    shedder = LoadSheddingMiddleware(slow, limit=1, max_queue=4)
    app = TimeoutMiddleware(shedder, timeout=1.0)
    for _ in range(8):  # the guard learns that requests take ~0.1 s
        assert (await drive(app, http_scope("/learn"))).status == 200
    assert shedder.state()["rtt"] > 0.05
    tight = TimeoutMiddleware(shedder, timeout=0.05)
    results: dict[str, Driven] = {}
    async with anyio.create_task_group() as group:
        await start(group, app, "/hold", results)
        await until(lambda: shedder.state()["inflight"] == 1)
        started = time.monotonic()
        refused = await drive(tight, http_scope("/tight"))
        assert time.monotonic() - started < 0.03
    assert problem(refused)["reason"] == "deadline"


async def test_cancelled_waiters_leave_nothing_behind() -> None:
    """A flood of queued requests whose clients go away (their tasks cancelled) leaves no
    waiter and no place taken."""
    gate = Gate()
    shedder = LoadSheddingMiddleware(gate, limit=1, max_queue=100, queue_timeout=5.0)
    results: dict[str, Driven] = {}
    async with anyio.create_task_group() as outer:
        await start(outer, shedder, "/hold", results)
        await until(lambda: gate.inside == 1)
        async with anyio.create_task_group() as flood:
            for n in range(50):
                await start(flood, shedder, f"/q{n}", results)
            await until(lambda: shedder.limiter.queued == 50)
            flood.cancel_scope.cancel()
        assert shedder.state()["queued"] == 0
        assert shedder.limiter.counts["cancelled"] == 50
        gate.open.set()
    assert shedder.state()["inflight"] == 0
    assert [len(q) for q in shedder.limiter._queues] == [0, 0, 0, 0]


class Spy:
    """A limit algorithm that records what it is told."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.samples: list[tuple[float, int, bool]] = []
        self.lags: list[float] = []

    def on_sample(self, now: float, rtt: float, inflight: int, dropped: bool) -> None:
        self.samples.append((rtt, inflight, dropped))

    def on_lag(self, now: float, lag: float) -> None:
        self.lags.append(lag)

    def state(self) -> Mapping[str, float]:
        return {"limit": self.limit}


async def test_algorithms_learn_only_from_requests_that_reached_the_app() -> None:
    """Refusals are never samples; admitted requests are, with their in-flight count; the
    ticker feeds the loop's lag."""
    spy = Spy(1)
    assert isinstance(spy, LimitAlgorithm)
    gate = Gate()
    shedder = LoadSheddingMiddleware(gate, limit=spy, max_queue=0)
    results: dict[str, Driven] = {}
    async with anyio.create_task_group() as group:
        await start(group, shedder, "/in", results)
        await until(lambda: gate.inside == 1)
        for n in range(5):
            assert problem(await drive(shedder, http_scope(f"/out{n}")))["reason"] == "queue_full"
        await anyio.sleep(0.06)
        gate.open.set()
    assert len(spy.samples) == 1
    rtt, inflight, dropped = spy.samples[0]
    assert rtt >= 0.05
    assert inflight == 1
    assert not dropped
    assert spy.lags, "the ticker measures the loop's lag"


async def test_a_deadline_that_cancels_the_handler_is_a_drop() -> None:
    """A request cut by TimeoutMiddleware's deadline is reported to the algorithm as dropped."""
    spy = Spy(4)

    async def sleepy(scope: Scope, receive: Receive, send: Send) -> None:
        await anyio.sleep(1)

    app = TimeoutMiddleware(LoadSheddingMiddleware(sleepy, limit=spy), timeout=0.05)
    assert (await drive(app, http_scope("/slow"))).status == 504
    await until(lambda: len(spy.samples) == 1)
    assert spy.samples[0][2] is True


async def test_state_changes_are_events_not_one_per_refusal() -> None:
    """Many refusals: one shedding_started; calm again: one shedding_stopped."""
    events: list[LoadSheddingEvent] = []
    gate = Gate()
    shedder = LoadSheddingMiddleware(gate, limit=1, max_queue=0, on_event=events.append)
    shedder._calm = 0.15
    results: dict[str, Driven] = {}
    async with anyio.create_task_group() as group:
        await start(group, shedder, "/in", results)
        await until(lambda: gate.inside == 1)
        for n in range(20):
            await drive(shedder, http_scope(f"/out{n}"))
        gate.open.set()
    await until(lambda: any(e.kind == "shedding_stopped" for e in events))
    kinds = [e.kind for e in events if e.kind != "limit_changed"]
    assert kinds == ["shedding_started", "shedding_stopped"]
    assert events[-1].refused == 20


async def test_loop_lag_trigger_sheds_the_sheddable_classes() -> None:
    """While the loop lags past max_loop_lag, sheddable requests are refused and critical
    ones still served; the trigger clears when the lag goes away."""
    events: list[LoadSheddingEvent] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] == "/stall":
            time.sleep(0.08)  # noqa: ASYNC251 - the loop lags, on purpose
        await PlainTextResponse("ok")(scope, receive, send)

    shedder = LoadSheddingMiddleware(
        app,
        limit=10,
        max_loop_lag=0.03,
        priority={"/batch": "sheddable"},
        on_event=events.append,
    )
    assert (await drive(shedder, http_scope("/warm"))).status == 200
    await anyio.sleep(0.05)
    assert (await drive(shedder, http_scope("/stall"))).status == 200
    await until(lambda: shedder.state()["trigger"] == "loop_lag")
    assert problem(await drive(shedder, http_scope("/batch")))["reason"] == "trigger"
    assert (await drive(shedder, http_scope("/pay"))).status == 200
    await until(lambda: shedder.state()["trigger"] is None)
    assert (await drive(shedder, http_scope("/batch"))).status == 200
    assert [e.kind for e in events if e.kind.startswith("trigger")] == ["trigger_on", "trigger_off"]


async def test_websockets_count_only_until_the_handshake_is_answered() -> None:
    """An open WebSocket does not hold a place; a handshake at capacity is refused."""
    gate = Gate()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await receive()
            await send({"type": "websocket.accept"})
            await anyio.sleep(0.2)  # the connection stays open
            await send({"type": "websocket.close", "code": 1000})
            return
        await gate(scope, receive, send)

    shedder = LoadSheddingMiddleware(app, limit=1, max_queue=0)
    ws_scope = {**http_scope("/ws"), "type": "websocket"}
    sent: list[Message] = []

    async def ws_receive() -> Message:
        return {"type": "websocket.connect"}

    async def ws_send(message: Message) -> None:
        sent.append(message)

    results: dict[str, Driven] = {}
    async with anyio.create_task_group() as group:
        group.start_soon(shedder, ws_scope, ws_receive, ws_send)
        await until(lambda: any(m["type"] == "websocket.accept" for m in sent))
        await start(group, shedder, "/http", results)  # the place is free again
        await until(lambda: gate.inside == 1)
        refused: list[Message] = []

        async def refused_send(message: Message) -> None:
            refused.append(message)

        await shedder({**ws_scope}, ws_receive, refused_send)
        gate.open.set()
    assert results["/http"].status == 200
    assert refused[0]["type"] == "websocket.close"
    assert refused[0]["code"] == 1008


async def test_other_scope_types_pass_through_untouched() -> None:
    """Lifespan goes through (starting the ticker); unknown types reach the app as they are."""
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])
        if scope["type"] == "lifespan":
            message = await receive()
            assert message["type"] == "lifespan.startup"
            await send({"type": "lifespan.startup.complete"})
            message = await receive()
            await send({"type": "lifespan.shutdown.complete"})

    shedder = LoadSheddingMiddleware(app, limit=1)
    messages = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[Message] = []

    async def receive() -> Message:
        return messages.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    await shedder({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    await shedder({"type": "custom"}, receive, send)
    assert seen == ["lifespan", "custom"]
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


@pytest.mark.parametrize(
    "options",
    [
        {"limit": 0},
        {"limit": -3},
        {"limit": 2.5},
        {"limit": True},
        {"limit": "ten"},
        {"max_queue": -1},
        {"max_queue": 0, "queue_timeout": 1.0},
        {"queue_timeout": 0},
        {"queue_timeout": float("nan")},
        {"codel_target": 0.2, "codel_interval": 0.1},
        {"default_priority": "urgent"},
        {"priority": {"/x": "vip"}},
        {"priority": {"x": "critical"}},
        {"priority_header": "X-Priority"},
        {"reserve": {"critical": 1.5}},
        {"reserve": {"critical": 0.6, "critical-plus": 0.5}},
        {"reserve": {"gold": 0.1}},
        {"max_loop_lag": -1},
        {"max_memory": 0},
        {"retry_after": 0},
    ],
)
def test_nonsense_configuration_fails_at_construction(options: dict[str, Any]) -> None:
    """Negative limits, a queue timeout without a queue, unknown classes, an untrusted
    priority header...: ConfigurationError at construction."""
    with pytest.raises(ConfigurationError):
        LoadSheddingMiddleware(PlainTextResponse("ok"), **options)


async def test_in_a_standing_queue_lower_classes_take_the_cuts() -> None:
    """With sheddable requests arriving too, a standing queue cuts only them: critical
    waiters keep first in, first out and the whole queue, sheddable newcomers get the
    short queue."""
    from asgi_guard import Fixed, ManualClock
    from asgi_guard._shedding import ConcurrencyLimiter, Permit, class_index

    clock = ManualClock(100.0)
    limiter = ConcurrencyLimiter(Fixed(1), clock=clock.now)
    critical, sheddable = class_index("critical"), class_index("sheddable")
    held = limiter.try_acquire(critical)
    assert held is not None
    outcomes: dict[str, Permit | str] = {}

    async def wait(name: str, priority: int) -> None:
        outcomes[name] = await limiter.acquire(priority)

    async with anyio.create_task_group() as group:
        group.start_soon(wait, "s1", sheddable)
        await until(lambda: limiter.queued == 1)
        group.start_soon(wait, "c1", critical)
        await until(lambda: limiter.queued == 2)
        clock.advance(0.2)  # the queue has stood for two intervals
        assert limiter.standing(clock.now())
        for name, priority in (("s2", sheddable), ("c2", critical)):
            group.start_soon(wait, name, priority)
            await anyio.sleep(0.001)
        # The sheddable newcomer finds the standing queue's short queue full and is refused
        # at arrival: s1, queued during the burst before, keeps the wait it was allowed.
        await until(lambda: "s2" in outcomes)
        assert outcomes.pop("s2") == "queue_full"
        assert "s1" not in outcomes
        assert limiter.queued == 3  # s1, c1 and c2
        order: list[str] = []
        limiter.release(held)
        while len(order) < 2:
            await until(lambda: any(isinstance(v, Permit) for v in outcomes.values()))
            name = next(k for k, v in outcomes.items() if isinstance(v, Permit))
            order.append(name)
            permit = outcomes.pop(name)
            assert isinstance(permit, Permit)
            limiter.release(permit)
        group.cancel_scope.cancel()
    assert order == ["c1", "c2"]  # critical first, first in first out
