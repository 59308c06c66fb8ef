"""Load shedding: `LoadSheddingMiddleware` keeps an overloaded service useful."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import anyio
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._adaptive import LimitAlgorithm
from ._algorithms import Adaptive, as_algorithm
from ._clock import Clock, MonotonicClock
from ._deadline import (
    LoopCheck,
    _check_seconds,
    _is_number,
    current_loop,
    settle,
    spawn_task,
)
from ._errors import ConfigurationError
from ._events import LoadSheddingEvent, _CallbackGuard, emit, event_handlers
from ._keys import _is_async_callable
from ._lifespan import run_lifespan
from ._pacing import Pacer
from ._paths import Exemptions, ExemptSpec, compile_template, route_path
from ._problem import (
    TEMPORARY_REDUCED_CAPACITY,
    Rejection,
    ResponseFactory,
    encode_problem,
    send_rejection,
)
from ._record import get_record
from ._shedding import (
    BURST_WAIT,
    RECENT_BURST_WAIT,
    WAIT_MARGIN,
    ConcurrencyLimiter,
    Permit,
    Refusal,
    Waiter,
    check_queue_options,
    class_index,
)

__all__ = ["DEFAULT_EXEMPT", "LoadSheddingMiddleware"]

logger = logging.getLogger("asgi_guard.shedding")

#: Paths never shed nor counted unless ``exempt=`` says otherwise: health checks and metrics,
#: each with and without a trailing slash (a mounted app answers at ``/metrics/``, as
#: prometheus_client's ``make_asgi_app()`` does under ``app.mount("/metrics", ...)``). They
#: are matched against the path the app routes (without the ``root_path``).
DEFAULT_EXEMPT = (
    "/health",
    "/health/",
    "/healthz",
    "/healthz/",
    "/livez",
    "/livez/",
    "/readyz",
    "/readyz/",
    "/ping",
    "/ping/",
    "/metrics",
    "/metrics/",
)

#: How often the ticker measures the event loop's lag while the worker is busy (seconds):
#: half its limit in flight, or requests waiting or refused.
TICK = 0.02
#: How often it does otherwise (seconds); a request that takes half the limit wakes it.
#: The lag says little then, and each tick wakes a loop that is mostly idle, which costs
#: a small VM about 0.25 ms of CPU (measured: at 50 ticks a second an idle worker spent
#: 11-12 ms of CPU a second on them, against 2.5 for uvicorn's own; at half its capacity,
#: ticking whenever a request had come, 0.12 more loop wakes a response).
IDLE_TICK = 1.0
#: Shedding has stopped when nothing was refused for this long (seconds).
CALM = 1.0

_DETAILS: dict[Refusal, str] = {
    "queue_full": "The service is at capacity and its wait queue is full; retry later.",
    "queue_timeout": "The service is at capacity; the request waited its longest and was "
    "not served; retry later.",
    "pushed_out": "The service is at capacity; more critical requests took the place of "
    "this one; retry later.",
    "deadline": "The service is at capacity and cannot serve the request before its deadline.",
    "trigger": "The service is overloaded; retry later.",
}


class LoadSheddingMiddleware:
    """Keeps an overloaded service useful: a concurrency limit, a managed wait queue,
    priorities, and fast 503s for what cannot be served.

    Requests run while fewer than the limit are in the application; then they wait in a
    bounded queue managed after Facebook's CoDel (first in, first out while the queue
    absorbs a burst; once a standing queue forms, short waits and a single waiter), and the
    rest are refused at once with 503 ``application/problem+json``
    (``temporary-reduced-capacity``) and a ``Retry-After`` that grows with how much is
    being refused, with jitter. The body is never read and the connection is kept
    alive. A request that waits watches its ``receive`` (no further than the body's first
    chunk, which the app then gets): a client that disconnects leaves the queue at once,
    unanswered, and never reaches the app. Lower priority classes are shed first. Exempt
    paths (health checks, metrics by default) are never shed and never counted. Per
    process: each worker sheds for itself.

    Args:
        app: The ASGI app to protect.
        limit: A fixed concurrency cap (an int), or a limit algorithm: `Fixed`, `AIMD`,
            `Vegas`, `Gradient2`, or the default, which learns the limit from latency and
            the event loop's lag. The default (and `Vegas`) starts at 1 to measure the
            no-load latency over five requests; requests wait for it meanwhile (see
            ``queue_timeout``) rather than being refused.
        max_queue: How many requests may wait (0: none). Default: as many as the limit,
            and at least 32.
        queue_timeout: The longest a request may wait while the queue absorbs a burst, in
            seconds (default: 80% of ``codel_interval``, 80 ms, as scaled; half the
            interval, 50 ms, within ten intervals of a standing queue; two intervals for a
            class while lower classes arrive too); once a standing queue has formed, a
            request waits no longer than ``codel_target``. While the algorithm measures
            a fresh worker's no-load latency, a request may wait this, or a second by
            default, and the queue never counts as standing.
        codel_target: The wait allowed once a standing queue has formed (5 ms).
        codel_interval: How long the queue must stay non-empty to be standing (100 ms);
            the wait allowed before is a share of it. Both scale up for slow applications.
        priority: Rules mapping paths or route-like templates (``"/batch/{rest:path}"``)
            to a class, or a plain (not async) function of the scope returning a class
            name (or ``None``): it runs on every request. Classes, highest first:
            ``critical-plus``, ``critical``, ``sheddable-plus``, ``sheddable``. Paths are
            matched as the app routes them, without the ``root_path``. A function that
            raises or names no class gives ``default_priority`` (logged once).
        default_priority: The class of requests no rule names.
        priority_header: A request header naming the class, used only when
            ``trust_priority_header(scope)`` is true (never trust clients by default).
        trust_priority_header: Whether a request's priority header may be believed (for
            example: it comes from your gateway): a plain (not async) function of the
            scope, called on every request that carries the header. One that raises
            means "not trusted" (logged once).
        reserve: Guaranteed shares of the limit by class (``{"critical": 0.25}``): a class
            below its share is admitted even at the limit; others borrow it while idle.
        exempt: Paths, templates or plain predicates of the scope never shed nor counted
            (``()``: none). Paths are matched as the app routes them, without the
            ``root_path``. Default: ``/health``, ``/healthz``, ``/livez``, ``/readyz``,
            ``/ping`` and ``/metrics``, each with and without a trailing slash (a mounted
            app, such as a metrics app, answers at ``/metrics/``).
        max_loop_lag: Also shed the two sheddable classes while the event loop lags more
            than this many seconds.
        max_memory: Also shed the two sheddable classes while the process's resident
            memory exceeds this many bytes (Linux).
        retry_after: The base of ``Retry-After`` in seconds: a refused client is told to
            wait this, rounded up to whole seconds, up to four times it as more of the
            requests are refused, plus a jitter of up to as much again.
        response: Build the rejection response yourself: ``(scope, Rejection) -> ASGI app``.
        on_event: Callbacks for `LoadSheddingEvent` (state changes, never one per request):
            plain functions, called synchronously.
        pace: At the limit, start admitted requests one per event-loop iteration (every
            other iteration), after the requests that arrived meanwhile: those are
            refused (or queued) first, instead of waiting behind a batch of handlers
            (asyncio; trio is not paced).
        clock: The clock (tests).

    Raises:
        ConfigurationError: Nonsense configuration: a negative or zero limit, a negative
            queue, a queue timeout without a queue, an unknown class name, shares above
            the whole limit, a priority header without a trust predicate or a trust
            predicate without a header, an async priority function, trust predicate,
            exempt predicate or event callback, a ``response`` that is not callable, or
            options of the wrong type.

    Examples:
        >>> from starlette.applications import Starlette
        >>> app = Starlette()
        >>> app.add_middleware(LoadSheddingMiddleware, limit=32, max_queue=64)
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        limit: int | LimitAlgorithm | None = None,
        max_queue: int | None = None,
        queue_timeout: float | None = None,
        codel_target: float = 0.005,
        codel_interval: float = 0.1,
        priority: Mapping[str, str] | Callable[[Scope], str | None] | None = None,
        default_priority: str = "critical",
        priority_header: str | None = None,
        trust_priority_header: Callable[[Scope], bool] | None = None,
        reserve: Mapping[str, float] | None = None,
        exempt: Iterable[ExemptSpec] = DEFAULT_EXEMPT,
        max_loop_lag: float | None = None,
        max_memory: int | None = None,
        retry_after: float = 1.0,
        response: ResponseFactory | None = None,
        on_event: Callable[[LoadSheddingEvent], None]
        | Sequence[Callable[[LoadSheddingEvent], None]] = (),
        pace: bool = True,
        clock: Clock | None = None,
    ) -> None:
        self.app = app
        if not isinstance(pace, bool):
            raise ConfigurationError(f"pace is True or False, got {pace!r}")
        algorithm = Adaptive() if limit is None else as_algorithm(limit)
        check_queue_options(max_queue, queue_timeout)
        _check_seconds(codel_target, "codel_target")
        _check_seconds(codel_interval, "codel_interval")
        if codel_target >= codel_interval:
            raise ConfigurationError("codel_target must be shorter than codel_interval")
        self._default = class_index(default_priority)
        self._rules: dict[str, int] = {}
        self._patterns: list[tuple[Any, int]] = []
        self._classify_call: Callable[[Scope], str | None] | None = None
        if callable(priority):
            if _is_async_callable(priority):
                raise ConfigurationError(
                    f"priority functions run on every request and must be plain functions, "
                    f"not async: {priority!r}"
                )
            self._classify_call = priority
        elif priority is not None:
            if not isinstance(priority, Mapping):
                raise ConfigurationError(
                    "priority takes a mapping of paths to classes or a callable"
                )
            for path, name in priority.items():
                if not isinstance(path, str) or not path.startswith("/"):
                    raise ConfigurationError(
                        f"priority rules are paths starting with '/': {path!r}"
                    )
                if "{" in path:
                    self._patterns.append((compile_template(path), class_index(name)))
                else:
                    self._rules[path] = class_index(name)
        if priority_header is not None:
            if not isinstance(priority_header, str) or not priority_header.strip():
                raise ConfigurationError("priority_header must be a header name")
            if trust_priority_header is None or not callable(trust_priority_header):
                raise ConfigurationError(
                    "priority_header needs trust_priority_header: a client must not choose "
                    "its own priority; pass a predicate of the scope (for example, the "
                    "request came through your gateway)"
                )
            if _is_async_callable(trust_priority_header):
                # A coroutine is always true: every client would choose its own priority.
                raise ConfigurationError(
                    f"trust_priority_header runs on every request and must be a plain "
                    f"function, not async: {trust_priority_header!r}"
                )
        elif trust_priority_header is not None:
            raise ConfigurationError(
                "trust_priority_header without priority_header: name the header it trusts"
            )
        self._header = priority_header.strip().lower() if priority_header else None
        self._trust = trust_priority_header
        self._classifies = bool(
            self._header or self._classify_call or self._rules or self._patterns
        )
        if reserve is not None and not isinstance(reserve, Mapping):
            raise ConfigurationError(
                f"reserve maps class names to shares ({{'critical': 0.25}}), got {reserve!r}"
            )
        shares: dict[int, float] = {}
        for name, share in (reserve or {}).items():
            if not _is_number(share) or not 0 < share < 1:
                raise ConfigurationError(f"reserve shares are fractions in (0, 1), got {share!r}")
            shares[class_index(name)] = float(share)
        if sum(shares.values()) >= 1:
            raise ConfigurationError("reserve shares must add up to less than the whole limit")
        if max_loop_lag is not None:
            _check_seconds(max_loop_lag, "max_loop_lag")
        if max_memory is not None and (
            not isinstance(max_memory, int) or isinstance(max_memory, bool) or max_memory <= 0
        ):
            raise ConfigurationError("max_memory is a number of bytes > 0")
        _check_seconds(retry_after, "retry_after")
        if response is not None and not callable(response):
            raise ConfigurationError("response must be a callable (scope, rejection) -> ASGI app")
        handlers = event_handlers(on_event)
        self._exempt = Exemptions(exempt, logger, "shed")
        self._exempt_paths = self._exempt.paths
        self._exempt_more = self._exempt.needs_check
        self._clock = clock or MonotonicClock()
        self.limiter = ConcurrencyLimiter(
            algorithm,
            max_queue=max_queue,
            queue_timeout=None if queue_timeout is None else float(queue_timeout),
            codel_target=float(codel_target),
            codel_interval=float(codel_interval),
            shares=shares,
            burst_share=BURST_WAIT,
            recent_share=RECENT_BURST_WAIT,
            wait_margin=WAIT_MARGIN,
            # The default clock's own ``time.monotonic``: one call less per reading, and
            # the limiter reads it twice a request.
            clock=time.monotonic if isinstance(self._clock, MonotonicClock) else self._clock.now,
        )
        self._max_loop_lag = max_loop_lag
        self._max_memory = max_memory
        self._retry_after = float(retry_after)
        self._response = response
        self._handlers = handlers
        self._callback_guard = _CallbackGuard()
        #: Event-loop lag, seconds: the last measurement.
        self.loop_lag = 0.0
        self._triggered: str | None = None
        self._memory_high = False
        self._shedding = False
        self._tick_failed = False
        self._priority_failed = False  # the priority function's first error was logged
        self._trust_failed = False  # the trust predicate's
        self._calm = CALM
        self._last_refusal = -math.inf
        self._refused_since = 0
        self._arrivals = 0
        self._refusals = 0
        self._refusal_ratio = 0.0
        self._reported_limit = algorithm.limit
        self._loop: object = None
        self._on_loop = LoopCheck()  # whether a request runs on ``_loop``, cheaply
        self._ticker: object = None
        #: Called by a request that finds the worker busy while the ticker runs slowly.
        self._hurry: Callable[[], None] | None = None
        self._asyncio_loop: asyncio.AbstractEventLoop | None = None
        self._pace = pace
        self._pacer: Pacer | None = None

    # -- state --------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """What the guard knows now, for metrics and tests: ``limit``, ``inflight``,
        ``queued``, ``queue_delay`` (s), ``loop_lag`` (s), ``rtt`` (s), ``place_time`` (s:
        how often a place freed while requests waited, smoothed; 0 before any waited),
        ``shedding``, ``trigger``, the algorithm's own state, counts of admissions and
        refusals, and ``paced``: how many starts were held for an iteration of their own."""
        limiter = self.limiter
        return {
            "limit": limiter.limit,
            "inflight": limiter.inflight,
            "queued": limiter.queued,
            "queue_delay": limiter.queue_delay,
            "loop_lag": self.loop_lag,
            "rtt": limiter.rtt,
            "place_time": limiter.place_time,
            "shedding": self._shedding,
            "trigger": self._triggered,
            "algorithm": dict(limiter.algorithm.state()),
            "counts": dict(limiter.counts),
            "paced": self._pacer.paced if self._pacer is not None else 0,
        }

    # -- the ticker ---------------------------------------------------------------------------

    def _busy(self) -> bool:
        """Whether the ticker must run at ``TICK``: half the limit is in flight (the
        algorithm may grow it, and the lag is what stops it on a saturated loop), some
        wait, some are refused, or a lag trigger watches."""
        limiter = self.limiter
        return (
            2 * limiter.inflight >= limiter.limit
            or limiter.queued > 0
            or self._shedding
            or self._triggered is not None
            or self._max_loop_lag is not None
        )

    def _wake_ticker(self) -> None:
        hurry = self._hurry
        if hurry is not None:
            self._hurry = None
            hurry()

    async def _nap(
        self, loop: asyncio.AbstractEventLoop | None, seconds: float, *, wakeable: bool = False
    ) -> bool:
        """The ticker's sleep; a ``wakeable`` one ends early at `_wake_ticker`. Whether it
        was woken early.

        On asyncio a future and a timer handle: anyio's sleep, event and cancel scope
        made a tick cost 13 ``getpid`` system calls (each finds the running loop, before
        Python 3.12) and two loop iterations, on every tick of a busy worker."""
        if loop is None:  # trio
            if not wakeable:
                await anyio.sleep(seconds)
                return False
            hurry = anyio.Event()
            self._hurry = hurry.set
            try:
                with anyio.move_on_after(seconds):
                    await hurry.wait()
            finally:
                self._hurry = None
            return hurry.is_set()
        waker: asyncio.Future[bool] = loop.create_future()
        timer = loop.call_later(seconds, settle, waker, False)
        if wakeable:
            self._hurry = functools.partial(settle, waker, True)
        try:
            return await waker
        finally:
            timer.cancel()
            self._hurry = None

    async def _tick(self) -> None:
        """Measures the loop's lag, feeds it to the algorithm and the lag trigger, and
        reports state changes; every ``TICK`` seconds while the worker is busy, every
        ``IDLE_TICK`` seconds otherwise (a request that finds it busy wakes the ticker),
        while the loop lives."""
        clock = self._clock
        algorithm = self.limiter.algorithm
        loop = self._asyncio_loop  # the loop it runs on (None on trio)
        ticks = reported = measured = 0  # in TICKs
        while True:
            before = clock.now()
            if self._busy():
                await self._nap(loop, TICK)
                now = clock.now()
                lag = max(0.0, now - before - TICK)
                steps = 1
            else:
                # Less than half the limit in flight: the next reading is due only after
                # IDLE_TICK, or once a request takes half the limit. Requests that come
                # and go meanwhile do not keep it at TICK.
                hurried = await self._nap(loop, IDLE_TICK, wakeable=True)
                now = clock.now()
                # The wait counts as a reading per TICK it lasted, lag-free (the mean lag
                # an algorithm takes is one over time, not over the busy moments only),
                # but for the lag of a wait that ran its course, read last.
                steps = int((now - before) / TICK)
                if hurried:
                    lag = 0.0
                    if not steps:
                        continue  # cut short at once: from now on at TICK
                else:
                    lag = max(0.0, now - before - IDLE_TICK)
                    steps = max(1, steps)
            self.loop_lag = lag
            ticks += steps
            try:
                for _ in range(steps - 1):
                    algorithm.on_lag(now, 0.0)
                algorithm.on_lag(now, lag)
                memory = ticks - measured >= 50
                if memory:
                    measured = ticks
                self._check_triggers(now, lag, memory=memory)
                if ticks - reported >= 5:
                    reported = ticks
                    self._report(now)
            except Exception:
                # A custom algorithm's bug must not stop the ticker (nor, on trio, the run).
                if not self._tick_failed:
                    self._tick_failed = True
                    logger.exception("asgi_guard: the load-shedding ticker failed; it goes on")

    def _check_triggers(self, now: float, lag: float, *, memory: bool) -> None:
        why = None
        if memory and self._max_memory is not None:
            self._memory_high = _rss() > self._max_memory  # kept between readings
        if self._max_loop_lag is not None and lag > self._max_loop_lag:
            why = "loop_lag"
        elif self._memory_high:
            why = "memory"
        if why != self._triggered:
            self._triggered = why
            self._event(
                "trigger_on" if why else "trigger_off",
                now,
                logging.WARNING if why else logging.INFO,
                f"asgi_guard: load shedding trigger {why or 'cleared'}"
                + (f" (loop lag {lag * 1e3:.0f} ms)" if why == "loop_lag" else ""),
            )

    def _report(self, now: float) -> None:
        arrivals, refusals = self._arrivals, self._refusals
        self._arrivals = self._refusals = 0
        ratio = refusals / arrivals if arrivals else 0.0
        self._refusal_ratio += (ratio - self._refusal_ratio) * 0.3
        limit = self.limiter.limit
        if limit != self._reported_limit:
            self._reported_limit = limit
            self._event("limit_changed", now, logging.DEBUG, f"asgi_guard: limit now {limit}")
        if self._shedding and now - self._last_refusal > self._calm:
            self._shedding = False
            self._event(
                "shedding_stopped",
                now,
                logging.INFO,
                f"asgi_guard: load shedding stopped after {self._refused_since} refusals",
            )

    def _event(self, kind: Any, now: float, level: int, message: str) -> None:
        limiter = self.limiter
        event = LoadSheddingEvent(
            kind=kind,
            limit=limiter.limit,
            inflight=limiter.inflight,
            queued=limiter.queued,
            queue_delay=limiter.queue_delay,
            loop_lag=self.loop_lag,
            refused=self._refused_since,
            trigger=self._triggered,
        )
        emit(event, self._handlers, self._callback_guard, level, message)

    def _bind(self, loop: object) -> None:
        """Serve on ``loop`` (with a pacer of its own, on asyncio)."""
        self._loop = loop
        self._on_loop.bind(loop)
        asyncio_loop = loop if isinstance(loop, asyncio.AbstractEventLoop) else None
        self._asyncio_loop = asyncio_loop
        self._pacer = Pacer(asyncio_loop) if self._pace and asyncio_loop is not None else None

    def _start(self, loop: object) -> None:
        self._bind(loop)

        async def tick_until_the_loop_ends() -> None:
            try:
                await self._tick()
            finally:
                if self._loop is loop:
                    self._loop = None
                    self._on_loop.bind(None)

        self._ticker = spawn_task(loop, tick_until_the_loop_ends)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The ticker runs for the app's lifespan and stops before the server hears that
        # shutdown is complete.
        await run_lifespan(self.app, scope, receive, send, self._lifespan_ticker)

    async def _lifespan_ticker(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        self._bind(current_loop())
        try:
            task_status.started()
            await self._tick()
        finally:
            self._loop = None
            self._on_loop.bind(None)

    # -- per request --------------------------------------------------------------------------

    def _classify(self, scope: Scope, path: str) -> int:
        header = self._header
        trust = self._trust
        if header is not None and trust is not None:
            value = Headers(scope=scope).get(header)
            if value is not None and self._trusts(trust, scope):
                try:
                    return class_index(value)
                except ConfigurationError:
                    pass  # a value that names no class: the rules decide
        if self._classify_call is not None:
            try:
                name = self._classify_call(scope)
                return self._default if name is None else class_index(name)
            except Exception as exc:
                if not self._priority_failed:
                    self._priority_failed = True
                    logger.error(
                        "asgi_guard: the priority function raised %s; such requests get the "
                        "default class (logged once)",
                        type(exc).__name__,
                        exc_info=exc,
                    )
                return self._default
        found = self._rules.get(path)
        if found is not None:
            return found
        for pattern, index in self._patterns:
            if pattern.match(path):
                return index
        return self._default

    def _trusts(self, trust: Callable[[Scope], bool], scope: Scope) -> bool:
        """``trust(scope)``; a predicate that raises, or returns an awaitable (an async
        function behind a plain one), does not trust (logged once)."""
        try:
            trusted = trust(scope)
            if trusted is True or not trusted:
                return trusted is True
            if inspect.isawaitable(trusted):
                if inspect.iscoroutine(trusted):
                    trusted.close()
                raise TypeError("trust_priority_header returned an awaitable, not a bool")
            return bool(trusted)
        except Exception as exc:
            if not self._trust_failed:
                self._trust_failed = True
                logger.error(
                    "asgi_guard: trust_priority_header raised %s; such requests' priority "
                    "header is not trusted (logged once)",
                    type(exc).__name__,
                    exc_info=exc,
                )
            return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http" and kind != "websocket":
            if kind == "lifespan":
                await self._lifespan(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        path = scope["path"]
        if scope.get("root_path"):
            path = route_path(scope)  # the path the app routes: rules and exemptions use it
        if path in self._exempt_paths or (self._exempt_more and self._exempt(scope, path)):
            await self.app(scope, receive, send)
            return
        if not self._on_loop.holds():  # else the loop it is bound to (no system call)
            loop = current_loop()
            if self._loop is not loop:  # not started, or a new event loop (tests run one each)
                self._start(loop)
        self._arrivals += 1
        if self._classifies:
            priority = self._classify(scope, path)
            get_record(scope).priority = priority  # for bulkheads after routing
        else:
            priority = self._default
        limiter = self.limiter
        if self._triggered is not None and priority >= 2:
            await self._refuse(limiter.refuse_trigger(), scope, receive, send)
            return
        permit = limiter.try_acquire(priority)
        if permit is None:
            record = scope.get("asgi_guard")
            budget = record.budget if record is not None else None
            queued = limiter.enqueue(priority, budget.deadline_at if budget is not None else None)
            if isinstance(queued, Waiter):
                outcome, read = await _watched_turn(limiter, queued, scope, receive)
                if outcome is None:
                    return  # the client went away while it waited: nobody to answer
                if read:
                    receive = _replaying(read, receive)
            else:
                outcome = queued
            if isinstance(outcome, str):
                await self._refuse(outcome, scope, receive, send)
                return
            permit = outcome
        if self._hurry is not None and 2 * limiter.inflight >= limiter.algorithm.limit:
            self._wake_ticker()  # the lag matters now: the algorithm may grow the limit
        if kind == "websocket":
            await self._websocket(permit, scope, receive, send)
            return
        dropped = False
        reached = True
        try:
            pacer = self._pacer
            if pacer is not None and limiter.inflight >= limiter.algorithm.limit > 1:
                # It took the last place: others may be refused meanwhile. They go first.
                reached = False
                await pacer.start()
                limiter.started(permit)  # the hold is not time in the application
                reached = True
            await self.app(scope, receive, send)
        except BaseException:
            record = scope.get("asgi_guard")
            budget = record.budget if record is not None else None
            dropped = budget is not None and budget.fired == "deadline"
            raise
        finally:
            if reached:
                record = scope.get("asgi_guard")
                if record is not None and record.refused:
                    reached = False  # a guard inside refused it (a 429): not the app's speed
            limiter.release(permit, dropped=dropped, learn=reached)

    async def _websocket(self, permit: Permit, scope: Scope, receive: Receive, send: Send) -> None:
        """A WebSocket counts only until its handshake is answered: a long-lived
        connection must not hold a place for its whole life. A handshake a guard inside
        refused teaches the algorithm nothing (as over HTTP)."""
        limiter = self.limiter
        held = [True]

        def release() -> None:
            held[0] = False
            record = scope.get("asgi_guard")
            limiter.release(permit, learn=record is None or not record.refused)

        async def send_wrapper(message: Message) -> None:
            if held[0] and message["type"] in ("websocket.accept", "websocket.close"):
                release()
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            if held[0]:
                release()

    async def _refuse(self, why: Refusal, scope: Scope, receive: Receive, send: Send) -> None:
        get_record(scope).refused = True  # an outer load shedder does not learn from it
        now = self._clock.now()
        self._refusals += 1
        self._refused_since += 1
        self._last_refusal = now
        if not self._shedding:
            self._wake_ticker()
            self._shedding = True
            self._refused_since = 1
            self._event(
                "shedding_started",
                now,
                logging.WARNING,
                f"asgi_guard: load shedding started ({why}; limit {self.limiter.limit}, "
                f"{self.limiter.inflight} in flight, {self.limiter.queued} queued)",
            )
        # Retry-After grows with the share of requests refused lately (``retry_after`` while
        # calm, four times it once all are refused), jittered over whole seconds, from
        # that base to twice it, so that the refused do not all come back at once.
        low = math.ceil(self._retry_after * (1.0 + 3.0 * self._refusal_ratio))
        retry = low + int(random.random() * (low + 1))
        if self._response is None and scope["type"] == "http":
            # The common case, on the hot path of an overloaded worker: the body of each
            # reason is encoded once (every refusal spends CPU the admitted need).
            body = _BODIES[why]
            await send(
                {
                    "type": "http.response.start",
                    "status": 503,
                    "headers": [
                        (b"content-type", b"application/problem+json"),
                        (b"content-length", b"%d" % len(body)),
                        (b"retry-after", b"%d" % retry),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        await send_rejection(_rejection(why, retry), scope, receive, send, self._response)


def _rejection(why: Refusal, retry: int) -> Rejection:
    return Rejection(
        status=503,
        type=TEMPORARY_REDUCED_CAPACITY,
        title="Service temporarily at capacity",
        detail=_DETAILS[why],
        headers=(("Retry-After", str(retry)),),
        extensions={"reason": why},
        guard="load_shedding",
    )


#: The problem+json body of each reason (``Retry-After`` is a header, not in the body).
_BODIES: dict[Refusal, bytes] = {why: encode_problem(_rejection(why, 1)) for why in _DETAILS}


async def _watched_turn(
    limiter: ConcurrencyLimiter, waiter: Waiter, scope: Scope, receive: Receive
) -> tuple[Permit | Refusal | None, list[Message]]:
    """Wait in the queue (`ConcurrencyLimiter.turn`) while watching ``receive``: a client
    that disconnects leaves the queue at once, and the outcome is None (servers do not
    cancel a request's task when its client goes, and the request would be admitted later
    and run for nobody). Also returns what the watch read, for the app to get first (see
    `_replaying`): a body's first chunk (it reads no further), or a complete request (then
    only a disconnect can follow). The middleware and the bulkhead dependency use it."""
    if _expects_continue(scope):
        return await limiter.turn(waiter), []  # reading would ask for the body
    read: list[Message] = []
    future = waiter.future
    if future is not None:
        # asyncio: a plain task (anyio's task group costs a waiter several times more).
        watch = future.get_loop().create_task(_watch(receive, read, limiter, waiter))
        try:
            outcome = await limiter.turn(waiter)
        finally:
            # A receive cancelled in its wait has taken nothing from the server.
            watch.cancel()
    else:
        async with anyio.create_task_group() as group:
            group.start_soon(_watch, receive, read, limiter, waiter)
            try:
                outcome = await limiter.turn(waiter)
            finally:
                group.cancel_scope.cancel()
    return outcome, read


def _replaying(read: list[Message], receive: Receive) -> Receive:
    """A ``receive`` that returns ``read`` (emptying it) before reading on."""

    async def replay() -> Message:
        if read:
            return read.pop(0)
        return await receive()

    return replay


async def _watch(
    receive: Receive, read: list[Message], limiter: ConcurrencyLimiter, waiter: Waiter
) -> None:
    """Read what a waiting request's client sends, into ``read``: two messages at most.
    A disconnect abandons the waiter. After a complete request, or a WebSocket's connect,
    nothing but a disconnect can come, and the watch reads on; after a body chunk with
    more to come it stops (the body is the app's to read)."""
    try:
        for _ in range(2):
            message = await receive()
            read.append(message)
            kind = message["type"]
            if kind == "http.disconnect" or kind == "websocket.disconnect":
                limiter.abandon(waiter)
                return
            if kind == "websocket.connect":
                continue
            if kind != "http.request" or message.get("more_body", False):
                return
    except Exception:
        return  # the app's own reads will meet it


def _expects_continue(scope: Scope) -> bool:
    """Whether the client waits for ``100 Continue`` before it sends its body (which
    uvicorn sends at the first ``receive``)."""
    for name, value in scope["headers"]:
        if name == b"expect" and value.lower() == b"100-continue":
            return True
    return False


def _rss() -> int:
    """The process's resident memory in bytes (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")
