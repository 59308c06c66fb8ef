"""Request timeouts: `TimeoutMiddleware`, a real deadline for every request."""

from __future__ import annotations

import asyncio
import logging
import math
import re
from asyncio import CancelledError, _get_running_loop, current_task
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from contextvars import copy_context
from time import monotonic
from typing import Any, cast

import anyio
import anyio.lowlevel
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._deadline import (
    MIN_HORIZON,
    START_GRACE,
    START_WRITE_LIMIT,
    Budget,
    Keeper,
    LoopCheck,
    _check_seconds,
    _current,
    current_loop,
    innermost_scope,
    spawn_detached,
)
from ._errors import ConfigurationError
from ._events import TimeoutEvent, _CallbackGuard, emit, event_handlers
from ._lifespan import run_lifespan
from ._paths import Exemptions, ExemptSpec, route_path, route_template
from ._problem import Rejection, ResponseFactory, send_rejection
from ._record import SCOPE_KEY, GuardRecord

__all__ = ["TimeoutMiddleware"]

logger = logging.getLogger("asgi_guard.timeout")

#: A callback for the events of this guard (any `EventHandler` also fits).
TimeoutHandler = Callable[[TimeoutEvent], None]

_GRPC_TIMEOUT = re.compile(r"(\d{1,8})([HMSmun])")
_GRPC_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def _seconds(value: float) -> str:
    """Seconds for a message: three significant digits, and never an exponent."""
    return f"{value:.3g}" if value < 1000 else f"{value:.0f}"


def parse_timeout_header(value: str) -> float | None:
    """Seconds from a relative timeout header, or ``None`` when it is malformed.

    Accepts plain seconds (``"2.5"``) and the ``grpc-timeout`` syntax (``"250m"``: up to
    eight digits and a unit among ``H M S m u n``).
    """
    value = value.strip()
    match = _GRPC_TIMEOUT.fullmatch(value)
    if match is not None:
        seconds = int(match.group(1)) * _GRPC_UNITS[match.group(2)]
    else:
        if not value or len(value) > 32 or not value.isascii():
            return None
        try:
            seconds = float(value)
        except ValueError:
            return None
    if not math.isfinite(seconds) or seconds <= 0:
        return None
    return seconds


def _uncancel(task: Any, budget: Budget) -> int:
    """Take back the cancellations the deadline asked for; return what others asked."""
    while budget.cancels:
        budget.cancels -= 1
        task.uncancel()
    return int(task.cancelling())


class TimeoutMiddleware:
    """Gives every HTTP request a deadline that really stops its handler.

    The deadline counts from the request's arrival at the outermost guard. At the deadline
    the handler is cancelled where it awaits (an anyio cancel scope, on asyncio and trio)
    and, when nothing was sent yet, the client gets ``504`` problem+json right then, even
    if the handler cannot be cancelled (a sync ``def`` endpoint runs to its end in its
    thread; its late response is dropped). A response that had already started is ended
    without its final chunk, so the client sees an incomplete body, never a truncation
    taken for success. Once the response is complete the deadline no longer applies:
    background tasks are never cancelled by it. WebSocket and lifespan pass through.

    Inside a request, `asgi_guard.remaining` and `asgi_guard.deadline` tell the time
    left, and `asgi_guard.outbound_timeout` bounds outbound calls by it.

    Args:
        app: The ASGI app to guard.
        timeout: Seconds from arrival to the deadline.
        max_timeout: The longest deadline a route may ask for with the
            ``asgi_guard.fastapi.timeout`` dependency (default: ``timeout``, so routes can
            only tighten it).
        idle_timeout: End a started response that sends nothing for this many seconds
            (a stalled stream), even before its deadline.
        body_timeout: Answer ``408`` when the handler waits longer than this for the next
            piece of the request body.
        min_body_rate: Answer ``408`` when the request body arrives slower than this many
            bytes per second on average, after ``body_rate_grace`` seconds.
        body_rate_grace: Seconds of body reading before ``min_body_rate`` applies.
        cancel_on_disconnect: Cancel the handler when the client disconnects before its
            response is complete (costs a task per request).
        deadline_header: Honour a caller's relative deadline from this request header
            (``"x-request-timeout"`` in seconds, or ``"grpc-timeout"`` syntax such as
            ``"250m"``). It can only tighten the request's own deadline; malformed values
            are ignored. Off by default: only trust it from your own callers.
        exempt: Paths (exact or templates) and predicates ``(scope) -> bool`` that get no
            deadline (long polling, server-sent events).
        response: Build your own rejection response: ``(scope, Rejection) -> ASGI app``.
        on_event: Callbacks receiving every `TimeoutEvent`.

    Raises:
        ConfigurationError: On a zero, negative, NaN or infinite duration, or a nonsense
            combination of options.

    Examples:
        >>> from starlette.applications import Starlette
        >>> app = Starlette()
        >>> app.add_middleware(TimeoutMiddleware, timeout=5.0, exempt=["/events"])
    """

    #: A handler still running this long after its deadline is reported as an overrun.
    OVERRUN = 0.1

    def __init__(
        self,
        app: ASGIApp,
        *,
        timeout: float = 30.0,
        max_timeout: float | None = None,
        idle_timeout: float | None = None,
        body_timeout: float | None = None,
        min_body_rate: float | None = None,
        body_rate_grace: float = 1.0,
        cancel_on_disconnect: bool = False,
        deadline_header: str | None = None,
        exempt: Iterable[ExemptSpec] = (),
        response: ResponseFactory | None = None,
        on_event: TimeoutHandler | Sequence[TimeoutHandler] = (),
    ) -> None:
        self.app = app
        _check_seconds(timeout, "timeout")
        for name, value in (
            ("max_timeout", max_timeout),
            ("idle_timeout", idle_timeout),
            ("body_timeout", body_timeout),
            ("min_body_rate", min_body_rate),
        ):
            if value is not None:
                _check_seconds(value, name)
        _check_seconds(body_rate_grace, "body_rate_grace", allow_zero=True)
        if max_timeout is not None and max_timeout < timeout:
            raise ConfigurationError(
                f"max_timeout ({max_timeout}) is below timeout ({timeout}); it is the longest "
                "deadline a route may ask for"
            )
        if deadline_header is not None and (
            not isinstance(deadline_header, str) or not deadline_header.strip()
        ):
            raise ConfigurationError("deadline_header is a header name, e.g. 'x-request-timeout'")
        if response is not None and not callable(response):
            raise ConfigurationError("response must be a callable (scope, rejection) -> ASGI app")
        self.timeout = float(timeout)
        self.max_timeout = float(max_timeout) if max_timeout is not None else self.timeout
        self.idle_timeout = idle_timeout
        self.body_timeout = body_timeout
        self.min_body_rate = min_body_rate
        self.body_rate_grace = float(body_rate_grace)
        self.cancel_on_disconnect = bool(cancel_on_disconnect)
        self._header = (
            deadline_header.strip().lower().encode("latin-1") if deadline_header else None
        )
        self._watch_body = body_timeout is not None or min_body_rate is not None
        # The shortest time from a request's start to something the keeper must do.
        self._horizon = max(
            MIN_HORIZON,
            min(
                self.timeout,
                idle_timeout if idle_timeout is not None else math.inf,
                body_timeout if body_timeout is not None else math.inf,
                self.body_rate_grace if min_body_rate is not None else math.inf,
            ),
        )
        self.response = response
        self._exempt = Exemptions(exempt, logger, "given a deadline")
        self._exempt_paths = self._exempt.paths
        self._exempt_more = self._exempt.needs_check
        self._handlers: tuple[TimeoutHandler, ...] = event_handlers(on_event)
        self._callback_guard = _CallbackGuard()
        self._keeper: Keeper | None = None
        self._on_loop = LoopCheck()  # whether a request runs on ``_keeper``'s loop, cheaply
        self._keepers: dict[int, Keeper] = {}
        self._overrun_routes: set[str | None] = set()
        #: Counters: ``timeouts`` (answered 504), ``cut_short`` (started responses ended at
        #: their deadline or idle limit), ``body_timeouts`` (answered 408), ``disconnects``
        #: (handlers cancelled because the client left), ``overruns`` (handlers that ran on
        #: past their deadline, e.g. sync endpoints).
        self.stats = {
            "timeouts": 0,
            "cut_short": 0,
            "body_timeouts": 0,
            "disconnects": 0,
            "overruns": 0,
        }

    # -- the keeper -------------------------------------------------------------------------

    def _keeper_for(self, loop: object) -> Keeper:
        keeper = self._keepers.get(id(loop))
        if keeper is None or keeper.loop is not loop or not keeper.alive:
            # A new event loop (tests run one per test): forget the keepers of ended ones.
            self._keepers = {k: v for k, v in self._keepers.items() if v.alive}
            keeper = Keeper(loop, self._fire, self._answer, self._horizon)
            self._keepers[id(loop)] = keeper
            spawn_detached(keeper)
        self._keeper = keeper
        return keeper

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = current_loop()
        keeper = Keeper(loop, self._fire, self._answer, self._horizon)
        self._keepers[id(loop)] = self._keeper = keeper
        # The keeper runs for the app's lifespan and stops before the server hears that
        # shutdown is complete.
        await run_lifespan(self.app, scope, receive, send, keeper.run)

    # -- per request --------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self._lifespan(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        path = scope["path"]
        if scope.get("root_path"):
            path = route_path(scope)  # as the app routes it
        if path in self._exempt_paths or (self._exempt_more and self._exempt(scope, path)):
            exempt = scope.get(SCOPE_KEY)
            if exempt is None:
                exempt = scope[SCOPE_KEY] = GuardRecord()
            exempt.timeout_exempt = True  # a route's timeout() dependency leaves it alone
            await self.app(scope, receive, send)
            return
        record = scope.get(SCOPE_KEY)
        if record is None:
            record = scope[SCOPE_KEY] = GuardRecord()
        arrival = record.arrival
        if arrival is None:
            arrival = record.arrival = monotonic()
        budget = record.budget = Budget(
            arrival, self.timeout, self.max_timeout, scope, receive, send
        )
        if self._header is not None:
            self._apply_caller_deadline(scope, budget)
        keeper = self._keeper
        on_loop = self._on_loop
        if (
            keeper is None
            or not keeper.alive
            or keeper.loop is not on_loop.loop
            or not on_loop.holds()
        ):
            # Else this request runs on the keeper's loop: no lookup (a ``getpid`` system
            # call before Python 3.12).
            loop: object = _get_running_loop()
            if loop is None:
                loop = current_loop()  # trio
            if keeper is None or keeper.loop is not loop or not keeper.alive:
                keeper = self._keeper_for(loop)
            on_loop.bind(loop)
        keeper.add(budget)
        idle = self.idle_timeout
        trailers = False

        async def guarded_send(message: Message) -> None:
            nonlocal trailers
            if budget.fired is not None:
                # Answered (504/408) or cut short: the app's late messages are dropped. A
                # step of the loop each, so that the cancellation reaches an app that would
                # not suspend otherwise (a stream generated without await, once a thread it
                # waited for returns): it spun on, holding the worker.
                await anyio.lowlevel.checkpoint()
                return
            kind = message["type"]
            if kind == "http.response.body" or kind == "http.response.zerocopysend":
                if not message.get("more_body", False) and not trailers:
                    budget.complete = True
                    if budget.active:
                        budget.active = False
                        keeper.live -= 1
                elif idle is not None:
                    # A send that waits for a slow reader is not idleness of the app: the
                    # idle clock stops while it waits, and restarts when it returns.
                    budget.idle_at = math.inf
                    try:
                        await send(message)
                    finally:
                        budget.idle_at = monotonic() + idle
                        budget.reschedule()
                    return
            elif kind == "http.response.start":
                budget.started = True
                trailers = bool(message.get("trailers", False))
                if idle is not None:
                    budget.idle_at = monotonic() + idle
                    budget.reschedule()
                budget.writing_start = True
                try:
                    await send(message)
                finally:
                    budget.writing_start = False
                    if budget.graced and budget.active and keeper.alive:
                        # The deadline fell while it was written: the app's next message
                        # gets its moment from now.
                        keeper.schedule(budget, monotonic() + START_GRACE)
                return
            elif (kind == "http.response.trailers" and not message.get("more_trailers", False)) or (
                kind == "http.response.pathsend"
            ):
                budget.completed()
            await send(message)

        budget.context = copy_context()
        token = _current.set(budget)
        returned = False
        try:
            if self.cancel_on_disconnect:
                await self._call_watching(scope, receive, guarded_send, budget)
            else:
                if self._watch_body:
                    receive = self._timed_receive(budget, receive)
                if keeper.native:
                    # The keeper cancels this very task at the deadline (inline: a call
                    # layer less on every request).
                    # The loop given: no lookup. Any: cancelling() is Python 3.11+.
                    task: Any = current_task(cast("asyncio.AbstractEventLoop", keeper.loop))
                    budget.outer_scope = innermost_scope(task)
                    cancelling = task.cancelling()
                    budget.task = task
                    try:
                        await self.app(scope, receive, guarded_send)
                    except CancelledError:
                        budget.task = None
                        # The deadline's cancellation is swallowed; anyone else's goes on.
                        if not budget.cancels or _uncancel(task, budget) > cancelling:
                            raise
                    finally:
                        budget.task = None
                        if budget.cancels:
                            _uncancel(task, budget)
                else:
                    with keeper.cancel_scope() as cancel_scope:
                        budget.cancel_scope = cancel_scope
                        await self.app(scope, receive, guarded_send)
            returned = True
        except Exception as exc:
            if budget.fired is None:
                raise
            returned = True
            # The client has its answer (or its connection is being closed): the error
            # reaches nobody else, and may be a bug the cancellation revealed.
            logger.warning(
                "%s %s: the handler raised after its deadline",
                scope["method"],
                scope["path"],
                exc_info=exc,
            )
        finally:
            _current.reset(token)
            budget.task = budget.cancel_scope = None  # nothing may cancel it any more
            if budget.fired is None or not returned:
                budget.finish()
        if budget.fired is not None:
            try:
                await self._after_fired(scope, budget, monotonic())
            finally:
                budget.finish()

    def _apply_caller_deadline(self, scope: Scope, budget: Budget) -> None:
        name = self._header
        assert name is not None
        for key, value in scope["headers"]:
            if key == name:
                seconds = parse_timeout_header(value.decode("latin-1"))
                if seconds is None:
                    logger.debug("ignored a malformed %s header: %.40r", name.decode(), value)
                else:
                    budget.set_caller_timeout(seconds)
                return

    def _timed_receive(self, budget: Budget, receive: Receive) -> Receive:
        body_timeout = self.body_timeout
        rate = self.min_body_rate
        grace = self.body_rate_grace
        started_at = 0.0
        received = 0
        done = False

        async def timed_receive() -> Message:
            nonlocal started_at, received, done
            if done:
                return await receive()
            now = monotonic()
            if not started_at:
                started_at = now
            at = now + body_timeout if body_timeout is not None else math.inf
            if rate is not None:
                at = min(at, started_at + grace + received / rate)
            budget.body_at = at
            budget.reschedule()
            try:
                message = await receive()
            finally:
                budget.body_at = math.inf
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                done = not message.get("more_body", False)
            else:
                done = True
            return message

        return timed_receive

    async def _call_watching(
        self, scope: Scope, receive: Receive, send: Send, budget: Budget
    ) -> None:
        """Run the app while a second task listens for the client's disconnect.

        Only one of them calls the server's ``receive`` at a time; what the listener reads
        waits for the app (at most one message: a body is never read ahead further). The
        body timer, when set, times the app's reads, not the listener's.
        """
        stash: deque[Message] = deque()
        lock = anyio.Lock()
        consumed = anyio.Event()
        body_complete = False
        disconnected = False

        def note(message: Message) -> None:
            nonlocal body_complete, disconnected
            if message["type"] == "http.request":
                if not message.get("more_body", False):
                    body_complete = True
            else:
                body_complete = True
                disconnected = message["type"] == "http.disconnect"

        async def app_receive() -> Message:
            nonlocal consumed
            if not stash:
                async with lock:
                    if not stash:
                        message = await receive()
                        note(message)
                        return message
            message = stash.popleft()
            consumed.set()
            consumed = anyio.Event()
            return message

        async def listen(cancel_scope: anyio.CancelScope) -> None:
            while True:
                while stash and not body_complete:
                    await consumed.wait()
                if disconnected:
                    break
                async with lock:
                    message = await receive()
                note(message)
                stash.append(message)
                if disconnected:
                    break
            if budget.active and budget.fired is None:
                budget.stop()
                budget.fired = "disconnect"
                budget.fired_at = monotonic()
                self.stats["disconnects"] += 1
                budget.cancel_scope.cancel()  # type: ignore[union-attr]
                self._report("disconnect", budget, budget.fired_at)
            cancel_scope.cancel()

        app_side: Receive = app_receive
        if self._watch_body:
            app_side = self._timed_receive(budget, app_receive)
        error: Exception | None = None
        async with anyio.create_task_group() as task_group:
            with anyio.CancelScope() as cancel_scope:
                budget.cancel_scope = cancel_scope
                listener = anyio.CancelScope()

                async def run_listener() -> None:
                    with listener:
                        await listen(listener)

                task_group.start_soon(run_listener)

                async def completing_send(message: Message) -> None:
                    await send(message)
                    if budget.complete:
                        listener.cancel()  # background tasks run whatever the client does

                try:
                    await self.app(scope, app_side, completing_send)
                except Exception as exc:
                    error = exc  # raised as is below, not wrapped in an exception group
                finally:
                    listener.cancel()
        if error is not None:
            raise error

    # -- at the deadline ---------------------------------------------------------------------

    def _fire(self, budget: Budget, now: float) -> None:
        if budget.writing_start and now - (budget.graced or now) < START_WRITE_LIMIT:
            # Due while the server writes the response's start (each send yields on trio):
            # the app's next message comes right after, and a body that ends the response
            # completes it rather than leaving the client headers without their body.
            # Looked at again shortly, while the write lasts (a second at most).
            budget.graced = budget.graced or now
            assert budget.keeper is not None
            budget.keeper.schedule(budget, now + START_GRACE)
            return
        if now >= budget.deadline_at:
            kind = "deadline"
        elif now >= budget.body_at:
            kind = "body"
        else:
            kind = "idle"
        budget.stop()
        budget.fired = kind
        budget.fired_at = now
        assert budget.keeper is not None
        budget.keeper.cancel(budget, now)
        if not budget.started:
            budget.answered = True
            self.stats["body_timeouts" if kind == "body" else "timeouts"] += 1
            assert budget.keeper is not None
            budget.keeper.spawn(budget)
        else:
            self.stats["cut_short"] += 1
        if budget.context is not None:
            # In the request's context (a request id an outer middleware set, for the
            # callbacks and the log's filters), not the keeper's.
            budget.context.run(self._report, kind, budget, now)
        else:
            self._report(kind, budget, now)

    def _rejection(self, budget: Budget) -> Rejection:
        if budget.fired == "body":
            return Rejection(
                status=408,
                type="about:blank",
                title="Request Timeout",
                detail="The request body arrived too slowly.",
                headers=[("Connection", "close")],
                guard="timeout",
            )
        return Rejection(
            status=504,
            type="about:blank",
            title="Gateway Timeout",
            detail=(
                f"The request did not complete within its {_seconds(budget.seconds)} s deadline."
            ),
            guard="timeout",
        )

    async def _answer(self, budget: Budget) -> None:
        try:
            scope, receive, send = budget.scope, budget.receive, budget.send
            if scope is not None and receive is not None and send is not None:
                await send_rejection(self._rejection(budget), scope, receive, send, self.response)
        except OSError as exc:  # the client has gone
            logger.debug("could not answer a timed-out request: %r", exc)
        except Exception:
            logger.exception("asgi_guard: answering a timed-out request failed")
        finally:
            assert budget.answer_done is not None
            budget.answer_done.set()

    async def _after_fired(self, scope: Scope, budget: Budget, returned: float) -> None:
        if budget.answer_done is not None:
            # The keeper is answering the client; the app may return only once it has.
            await budget.answer_done.wait()
        if budget.fired == "disconnect":
            return
        late = returned - budget.fired_at
        if late > self.OVERRUN:
            self.stats["overruns"] += 1
            # Once per route template (bounded); requests no router matched share one.
            route = route_template(scope)
            if route not in self._overrun_routes:
                self._overrun_routes.add(route)
                self._report("overrun", budget, returned, level=logging.WARNING, late=late)

    def _report(
        self,
        kind: Any,
        budget: Budget,
        now: float,
        *,
        level: int = logging.INFO,
        late: float = 0.0,
    ) -> None:
        scope = budget.scope or {}
        event = TimeoutEvent(
            kind=kind,
            method=scope.get("method", ""),
            path=scope.get("path", ""),
            route=route_template(scope),
            timeout=budget.seconds,
            elapsed=now - budget.arrival,
            response_started=budget.started,
        )
        if kind == "overrun":
            message = (
                f"{event.method} {event.route or event.path}: the handler kept running "
                f"{late:.2f} s past its deadline (a sync endpoint in its thread, or code "
                "shielded from cancellation, runs to its end; reported once per route)"
            )
        elif kind == "disconnect":
            message = f"{event.method} {event.path}: the client disconnected; handler cancelled"
        else:
            what = {"deadline": "deadline", "idle": "idle timeout", "body": "body timeout"}[kind]
            outcome = (
                "response cut short"
                if budget.started
                else ("answered 408" if kind == "body" else "answered 504")
            )
            message = f"{event.method} {event.path}: {what} after {event.elapsed:.3f} s; {outcome}"
        emit(event, self._handlers, self._callback_guard, level, message)
