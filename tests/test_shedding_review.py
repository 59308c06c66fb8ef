"""Load shedding: leaks, share admission, CoDel bookkeeping and triggers found in review."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import anyio
import pytest
from starlette.responses import PlainTextResponse
from starlette.types import Message

from asgi_guard import LoadSheddingMiddleware
from asgi_guard import shedding as shedding_module
from asgi_guard._algorithms import Fixed
from asgi_guard._shedding import ConcurrencyLimiter, Permit, Refusal

from .asgi_driver import drive, http_scope, ok_app

pytestmark = pytest.mark.anyio


async def until(check: Callable[[], bool]) -> None:
    """Wait (at most 2 s) until ``check()`` holds."""
    with anyio.fail_after(2.0):
        while not check():  # noqa: ASYNC110 - polling state the guard owns
            await anyio.sleep(0.001)


class FailingSamples:
    """A custom algorithm whose ``on_sample`` raises."""

    limit = 1

    def on_sample(self, now: float, rtt: float, inflight: int, dropped: bool) -> None:
        raise RuntimeError("a bug in the user's algorithm")

    def on_lag(self, now: float, lag: float) -> None:
        pass

    def state(self) -> Mapping[str, float]:
        return {"limit": self.limit}


async def test_an_algorithm_raising_in_on_sample_does_not_leak_the_place() -> None:
    """A custom algorithm that raises when told about a request must not keep the
    request's place: with a limit of 1, the service would refuse everything after."""
    shedder = LoadSheddingMiddleware(ok_app, limit=FailingSamples(), max_queue=0)
    for _ in range(2):
        sent: list[Message] = []

        async def receive() -> Message:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Message, sent: list[Message] = sent) -> None:
            sent.append(message)

        with pytest.raises(RuntimeError):
            await shedder(http_scope("/a"), receive, send)
        assert sent[0]["status"] == 200
        assert shedder.limiter.inflight == 0


async def test_a_waiter_below_its_share_is_admitted_when_its_class_frees_a_place() -> None:
    """Sheddable requests borrow the whole limit; critical has half of it reserved. When a
    critical request ends, the critical request waiting for a place gets it at once, and
    a critical newcomer does not overtake it."""
    limiter = ConcurrencyLimiter(Fixed(2), max_queue=4, queue_timeout=1.0, shares={1: 0.5})
    assert limiter.try_acquire(3) is not None
    assert limiter.try_acquire(3) is not None
    first = limiter.try_acquire(1)  # below its share: admitted beyond the limit
    assert first is not None
    outcomes: dict[str, Permit | Refusal] = {}

    async def wait() -> None:
        outcomes["waiter"] = await limiter.acquire(1)

    async with anyio.create_task_group() as group:
        group.start_soon(wait)
        await until(lambda: limiter.queued == 1)
        limiter.release(first)
        assert limiter.queued == 0, "the waiter was not given the share its class freed"
        assert limiter.try_acquire(1) is None, "a newcomer overtook the waiter"
        await until(lambda: "waiter" in outcomes)
    assert isinstance(outcomes["waiter"], Permit)
    assert limiter.inflight_by_class[1] == 1


async def test_pushing_out_the_only_waiter_keeps_a_standing_queue_standing() -> None:
    """A push-out swaps one waiter for another: the queue never empties, so a queue that
    was standing stays standing (and the newcomer waits codel_target, not the interval)."""
    now = [0.0]
    limiter = ConcurrencyLimiter(
        Fixed(1), max_queue=1, codel_target=0.5, codel_interval=1.0, clock=lambda: now[0]
    )
    assert limiter.try_acquire(1) is not None
    outcomes: dict[str, Permit | Refusal] = {}

    async def wait(name: str, priority: int) -> None:
        outcomes[name] = await limiter.acquire(priority)

    async with anyio.create_task_group() as group:
        group.start_soon(wait, "batch", 3)
        await until(lambda: limiter.queued == 1)
        now[0] = 2.0  # not empty for longer than the interval: standing
        assert limiter.standing(now[0])
        group.start_soon(wait, "pay", 1)
        await until(lambda: "batch" in outcomes)
        assert outcomes["batch"] == "pushed_out"
        assert limiter.queued == 1
        assert limiter.standing(now[0]), "the push-out reset the standing queue's clock"
        group.cancel_scope.cancel()


def test_a_loop_lag_spike_does_not_clear_the_memory_trigger(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While memory is above max_memory, a lag spike that comes and goes must leave the
    memory trigger on, not clear it until the next memory reading."""
    monkeypatch.setattr(shedding_module, "_rss", lambda: 10**12)
    shedder = LoadSheddingMiddleware(ok_app, limit=1, max_loop_lag=0.05, max_memory=1000)
    shedder._check_triggers(0.0, 0.0, memory=True)
    assert shedder.state()["trigger"] == "memory"
    shedder._check_triggers(0.02, 0.2, memory=False)
    assert shedder.state()["trigger"] == "loop_lag"
    shedder._check_triggers(0.04, 0.0, memory=False)
    assert shedder.state()["trigger"] == "memory"


class _Broken:
    """An algorithm whose on_lag raises every time."""

    def __init__(self) -> None:
        self.limit = 4
        self.lag_calls = 0

    def on_sample(self, now: float, rtt: float, inflight: int, dropped: bool) -> None:
        pass

    def on_lag(self, now: float, lag: float) -> None:
        self.lag_calls += 1
        raise RuntimeError("a bug in a custom algorithm")

    def state(self) -> dict[str, float]:
        return {"limit": self.limit}


async def test_a_raising_algorithm_does_not_stop_the_ticker(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A custom algorithm raising in on_lag is logged once; the ticker goes on (at TICK:
    a lag trigger watches)."""
    algorithm = _Broken()
    shedder = LoadSheddingMiddleware(PlainTextResponse("ok"), limit=algorithm, max_loop_lag=10)
    assert (await drive(shedder, http_scope("/"))).status == 200
    with anyio.fail_after(2):
        while algorithm.lag_calls < 5:  # noqa: ASYNC110 - polling the ticker's work
            await anyio.sleep(0.01)
    assert sum("ticker failed" in r.getMessage() for r in caplog.records) == 1


async def test_refusals_encoded_once_match_the_general_problem_path() -> None:
    """The 503 of every reason is encoded once (refusals are the hot path of an overloaded
    worker): it must be byte for byte what the general problem+json path sends, and each
    response must get a headers list of its own, so that an outer middleware appending to
    one (as Starlette's CORS middleware does) never leaks into the next."""
    from asgi_guard._problem import send_rejection
    from asgi_guard.shedding import _rejection

    shedder = LoadSheddingMiddleware(ok_app, limit=1, max_queue=0)
    sent: list[Message] = []

    async def receive() -> Message:
        raise AssertionError("the body of a refused request is never read")

    async def send(message: Message) -> None:
        sent.append(message)

    for why in ("queue_full", "queue_timeout", "pushed_out", "deadline", "trigger"):
        sent.clear()
        await shedder._refuse(why, http_scope("/a"), receive, send)
        fast = list(sent)
        retry = dict(fast[0]["headers"])[b"retry-after"]
        sent.clear()
        await send_rejection(_rejection(why, int(retry)), http_scope("/a"), receive, send)
        assert fast == sent, why
        fast[0]["headers"].append((b"access-control-allow-origin", b"*"))
    sent.clear()
    await shedder._refuse("queue_full", http_scope("/a"), receive, send)
    assert len(sent[0]["headers"]) == 3
