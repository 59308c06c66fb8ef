"""Blocking-call detection: `BlockingDetectorMiddleware` finds what blocks the event loop."""

from __future__ import annotations

import asyncio
import atexit
import linecache
import logging
import sys
import threading
import time
import traceback
import warnings
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
from starlette.types import ASGIApp, Receive, Scope, Send

from ._blocking import BlockingEvent, Dispatcher, Watchdog, check_settings
from ._deadline import _check_seconds, _is_number, current_loop, settle, spawn_task
from ._errors import ConfigurationError
from ._lifespan import run_lifespan
from ._paths import route_template
from ._strict import BlockingCallError, StrictCalls

__all__ = ["BlockingCallError", "BlockingDetectorMiddleware", "BlockingEvent"]

logger = logging.getLogger("asgi_guard.blocking")

#: A callback for detections; it runs on a thread of its own, never on the event loop.
BlockHandler = Callable[[BlockingEvent], None]


class BlockingDetectorMiddleware:
    """Finds the code that blocks the event loop, and the request it was serving.

    A watchdog thread notices when one step (a coroutine between two awaits) holds the
    event loop for longer than ``threshold``, and reports the exact line and the route:
    to the ``asgi_guard.blocking`` logger (one line, then the stack; identical stacks at
    most once per ``log_interval``), to ``on_block`` callbacks and to `stats`. Cheap
    enough to leave on in production. It observes HTTP, WebSocket and lifespan; lifespan
    starts and stops the watchdog (without lifespan it starts at the first request and
    stops at exit).

    Args:
        app: The ASGI app to watch.
        threshold: Report steps that hold the loop longer than this many seconds.
        poll_interval: How late a heartbeat may be before the watchdog looks, and how
            often it looks until the loop beats again (default: a fifth of ``threshold``;
            where there is no Linux ``timerfd``, how often it looks). A stall is reported
            within ``threshold + poll_interval`` of its start.
        on_block: Callbacks receiving every `BlockingEvent`, on a thread of their own
            (never the event loop's, nor the log's); one that raises is logged once, one
            that blocks delays only other callbacks and later callbacks, never the log (it
            cannot be interrupted: a stop waits for it at most a second, and that daemon
            thread never keeps the process alive). ``None``: no callback (reports are still
            logged).
        log_interval: Log identical stacks at most once per this many seconds.
        strict: For tests and development: also make the known blocking calls of the
            standard library (``time.sleep``, blocking sockets, ``subprocess``,
            ``os.system``, ``select.select``, ``threading.Event.wait``, ``queue.Queue.get``
            ...) raise `BlockingCallError` when called on the event loop thread, whatever
            their duration. Patches those functions process-wide while it runs.
        allow: Known calls strict mode lets through, by name (``"time.sleep"``); those
            never used are listed in a warning when the detector stops.
        follow_tasks: Also name the request of a stall in a task the request spawned (a
            task group child, a ``StreamingResponse`` body). It marks each request's context,
            which cost a real uvicorn server rare 10-15 ms pauses (p99.9) in our benchmark,
            so it is off by default (on in strict mode); such stalls are still reported, at
            their line, without the request.

    Raises:
        ConfigurationError: A non-positive or non-finite threshold or poll interval, a
            threshold at or below the poll interval or above a day, or an ``on_block`` that
            is not callable.

    Examples:
        >>> from starlette.applications import Starlette
        >>> app = Starlette()
        >>> app.add_middleware(BlockingDetectorMiddleware, threshold=0.1)
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        threshold: float = 0.1,
        poll_interval: float | None = None,
        on_block: BlockHandler | Sequence[BlockHandler] | None = (),
        log_interval: float = 60.0,
        strict: bool = False,
        allow: Iterable[str] = (),
        follow_tasks: bool = False,
    ) -> None:
        self.app = app
        poll = threshold / 5 if poll_interval is None and _is_number(threshold) else poll_interval
        check_settings(threshold, poll)
        if on_block is None:
            handlers: tuple[Any, ...] = ()
        elif callable(on_block):
            handlers = (on_block,)
        else:
            try:
                handlers = tuple(on_block)
            except TypeError:
                handlers = (on_block,)
        if not all(callable(h) for h in handlers):
            raise ConfigurationError(
                "on_block takes a callable (event) -> None, a sequence of them, or None"
            )
        _check_seconds(log_interval, "log_interval", allow_zero=True)
        self.threshold = float(threshold)
        self.poll_interval = float(poll)  # type: ignore[arg-type]
        self._dispatcher = Dispatcher(handlers, float(log_interval))
        self.stats = {"blocks": 0, "holding_gil": 0, "cpu_bound": 0, "never_awaited": 0}
        self._watchdog = Watchdog(
            threshold=self.threshold, poll=self.poll_interval, report=self._on_block
        )
        # Its frames are how the watchdog knows a request (and reads its scope).
        self._watchdog.request_codes = frozenset(
            {BlockingDetectorMiddleware.__call__.__code__, type(self).__call__.__code__}
        )
        self._loop: object = None
        self._heartbeat_task: object = None
        #: Counts starts (lazy or lifespan): a heartbeat acts on its own start only.
        self._generation = 0
        #: The asyncio heartbeat's wake-up: its timer, and the future the timer completes.
        self._timer: asyncio.TimerHandle | None = None
        self._waker: asyncio.Future[None] | None = None
        self._exit_hook = False
        self._strict = StrictCalls(allow, self._where) if strict else None
        self._follow_tasks = bool(follow_tasks or strict)
        if not strict and allow:
            raise ConfigurationError("allow= applies to strict mode only: pass strict=True")

    # -- reports (watchdog thread) --------------------------------------------------------------

    def _on_block(self, event: BlockingEvent) -> None:
        if event.kind == "never_awaited":
            self.stats["never_awaited"] += 1
            self._dispatcher.put(event)
            return
        self.stats["blocks"] += 1
        if event.holds_gil:
            self.stats["holding_gil"] += 1
        if event.kind == "cpu_bound":
            self.stats["cpu_bound"] += 1
        self._dispatcher.put(event)

    # -- lifecycle ----------------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        """Beat whenever a beat is due and no request has ended to give it. A task, not a
        bare timer callback: a beat one loop iteration later after a stall leaves the
        watchdog, waiting for the GIL, time to look first."""
        watchdog = self._watchdog
        # Which start this heartbeat serves: one of a loop closed with it pending is run
        # to its end later (when it is collected), and must then leave a newer start alone.
        generation = self._generation
        try:
            loop = asyncio._get_running_loop()
            if loop is None:  # trio: a plain periodic task
                while True:
                    now = time.monotonic()
                    if now >= watchdog.beat_due:
                        watchdog.beat()
                    await anyio.sleep(max(0.0, watchdog.beat_at + watchdog.beat_period - now))
            while True:
                if time.monotonic() >= watchdog.beat_due:
                    watchdog.beat()
                # Requests that beat push this timer back (`_beat`): it fires only when none
                # did, so under load the loop is never woken just to beat.
                waker = self._waker = loop.create_future()
                self._timer = loop.call_later(
                    max(0.0, watchdog.beat_at + watchdog.beat_period - time.monotonic()),
                    settle,
                    waker,
                )
                try:
                    await waker
                finally:
                    # `_beat` may have replaced it; another start may have cleared it.
                    if self._generation == generation and self._timer is not None:
                        self._timer.cancel()
        finally:
            if self._generation == generation:
                self._timer = self._waker = None
                # The loop is shutting down (or lifespan ended): without a heartbeat the
                # watchdog would take any long step of a later loop for a stall.
                self.stop()

    def _beat(self) -> None:
        """A beat made by a request as it ends (on the loop thread): the heartbeat's timer is
        pushed back to the next beat."""
        if self._loop is not (asyncio._get_running_loop() or current_loop()):
            return  # a request of another loop than the one watched: the next one starts it
        watchdog = self._watchdog
        watchdog.beat()
        timer, waker = self._timer, self._waker
        if timer is not None and waker is not None:
            timer.cancel()
            self._timer = waker.get_loop().call_later(watchdog.beat_period, settle, waker)

    def _start_threads(self) -> None:
        self._dispatcher.start()
        self._watchdog.start(threading.get_ident(), _task_anchor())
        _UNAWAITED.add(self._watchdog)
        if self._strict is not None:
            self._strict.start(threading.get_ident())

    def stop(self) -> None:
        """Stop the watchdog (lifespan shutdown does it; so does interpreter exit). It
        starts again at the next request (or lifespan startup); stopping twice is harmless.

        Examples:
            >>> from starlette.responses import PlainTextResponse
            >>> detector = BlockingDetectorMiddleware(PlainTextResponse("ok"))
            >>> detector.stop()
            >>> detector.stats["blocks"]
            0
        """
        _UNAWAITED.discard(self._watchdog)
        heartbeat, self._heartbeat_task = self._heartbeat_task, None
        if (
            isinstance(heartbeat, asyncio.Task)
            and threading.get_ident() == self._watchdog.loop_thread
            and not heartbeat.done()
            and not heartbeat.get_loop().is_closed()  # closed with its tasks pending
        ):
            heartbeat.cancel()  # a lazily started heartbeat would beat on until its loop ends
        self._watchdog.stop()
        self._dispatcher.stop()
        self._loop = None
        strict = self._strict
        if strict is not None and strict.active:
            strict.stop()
            unused = strict.unused()
            if unused:
                logger.warning("asgi_guard: strict mode allowed calls never made: %s", unused)

    def unused_allowances(self) -> list[str]:
        """The ``allow=`` entries strict mode never had to let through (so far).

        Examples:
            >>> import anyio, time
            >>> async def main() -> list[str]:
            ...     detector = BlockingDetectorMiddleware(
            ...         lambda *args: None, strict=True, allow=["time.sleep", "os.system"]
            ...     )
            ...     async with detector.watching():
            ...         time.sleep(0.001)  # allowed: passes, and counts as used
            ...     return detector.unused_allowances()
            >>> anyio.run(main)
            ['os.system']
        """
        return self._strict.unused() if self._strict is not None else []

    def _where(self) -> str:
        """The request being served on this thread, for a strict-mode error."""
        watchdog = self._watchdog
        number = watchdog.request_var.get(None)
        scope = watchdog.in_flight.get(number) if number is not None else None
        if scope is None:
            return "outside requests"
        template = route_template(scope) or scope.get("path")
        return f"in {scope.get('method', 'WEBSOCKET')} {template}"

    @asynccontextmanager
    async def watching(self) -> AsyncIterator[None]:
        """Watch the running event loop for the duration of the block (for tests: the
        pytest plugin uses it), then stop. An exception the block raises comes out as it
        is, not wrapped in an exception group.

        Examples:
            >>> import anyio, time
            >>> events = []
            >>> async def main() -> None:
            ...     detector = BlockingDetectorMiddleware(
            ...         lambda *args: None, threshold=0.05, on_block=events.append
            ...     )
            ...     async with detector.watching():
            ...         time.sleep(0.2)  # blocks the loop
            >>> anyio.run(main)
            >>> [(event.kind, event.location.name) for event in events]
            [('blocking_call', 'main')]
        """
        error: BaseException | None = None
        async with anyio.create_task_group() as task_group:
            self._generation += 1
            self._timer = self._waker = None
            self._loop = current_loop()
            task_group.start_soon(self._heartbeat)
            try:
                self._start_threads()  # may fail: another strict detector runs
                yield
            except (anyio.get_cancelled_exc_class(), GeneratorExit):
                raise  # the task group's (or an outer scope's) business
            except BaseException as exc:  # pytest's outcomes (skip, fail) are BaseExceptions
                error = exc
            finally:
                task_group.cancel_scope.cancel()
                self.stop()
        if error is not None:
            raise error

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The detector watches for the app's lifespan and stops before the server hears
        # that shutdown is complete.
        await run_lifespan(self.app, scope, receive, send, self._lifespan_watch)

    async def _lifespan_watch(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        async with self.watching():
            task_status.started()
            await anyio.sleep_forever()

    def _lazy_start(self, loop: object) -> None:
        """Start without lifespan: a heartbeat task of this loop, the threads, an exit hook."""
        self._watchdog.stop()  # a previous loop's watchdog (tests run a loop each)
        # A previous loop's heartbeat, if that loop closed with it pending: not this one's.
        self._generation += 1
        self._timer = self._waker = None
        self._loop = loop
        self._heartbeat_task = spawn_task(loop, self._heartbeat)
        self._start_threads()
        if not self._exit_hook:
            self._exit_hook = True
            atexit.register(_stop_at_exit, weakref.ref(self))

    # -- per request --------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        watchdog = self._watchdog
        # A beat within the last beat period means the watchdog watches this loop; else
        # look (finding the running loop costs a system call: ``getpid``).
        if time.monotonic() >= watchdog.beat_due:
            loop = asyncio._get_running_loop() or current_loop()
            if self._loop is not loop:  # not started, stopped (``_loop`` is None), a new loop
                self._lazy_start(loop)
        # The watchdog finds this request through this call's frame and its ``scope``
        # argument: nothing is registered per request.
        if not self._follow_tasks:
            try:
                await self.app(scope, receive, send)
            finally:
                watchdog.ended += 1
                if time.monotonic() >= watchdog.beat_due:
                    self._beat()
            return
        # Tasks the request spawns inherit its number; the watchdog reads it from their
        # context.
        number = next(watchdog.ids)
        in_flight = watchdog.in_flight
        in_flight[number] = scope
        token = watchdog.request_var.set(number)
        try:
            await self.app(scope, receive, send)
        finally:
            del in_flight[number]
            watchdog.request_var.reset(token)
            watchdog.ended += 1
            if time.monotonic() >= watchdog.beat_due:
                self._beat()


class _UnawaitedHook:
    """Hears of coroutines dropped unawaited, for every running detector.

    CPython reports each through ``warnings._warn_unawaited_coroutine``, which it looks up at
    each report. That is process-wide by nature, so there is one hook (this module's one
    piece of mutable state): installed while a detector runs, it tells each running
    detector's watchdog, then warns as Python would; it is removed when the last detector
    stops, in whatever order they stop, so a stopped detector never reports.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watchdogs: dict[int, Watchdog] = {}
        #: What the hook replaced (and calls), while it is installed.
        self._original: Callable[[Any], object] | None = None

    def add(self, watchdog: Watchdog) -> None:
        with self._lock:
            if self._original is None:
                original = getattr(warnings, "_warn_unawaited_coroutine", None)
                if original is None:  # pragma: no cover - a Python without the hook
                    return
                self._original = original
                warnings._warn_unawaited_coroutine = self._hear  # type: ignore[attr-defined]
            self._watchdogs[id(watchdog)] = watchdog

    def discard(self, watchdog: Watchdog) -> None:
        with self._lock:
            self._watchdogs.pop(id(watchdog), None)
            if self._watchdogs or self._original is None:
                return
            # Wrapped since by someone else: then it stays, and only warns, until the
            # next detector runs.
            if getattr(warnings, "_warn_unawaited_coroutine", None) == self._hear:
                warnings._warn_unawaited_coroutine = self._original  # type: ignore[attr-defined]
                self._original = None

    def _hear(self, coro: Any) -> None:
        try:
            frame = sys._getframe(1)  # the code that dropped it (CPython calls the hook)
            for watchdog in list(self._watchdogs.values()):
                watchdog.never_awaited(frame)
        finally:
            original = self._original
            if original is not None and getattr(original, "__module__", None) in {
                "warnings",
                "_py_warnings",
            }:
                _warn_unawaited(coro)
            elif original is not None:
                original(coro)  # someone else's hook: its warning points here


def _warn_unawaited(coro: Any) -> None:
    """Python's own warning (``warnings._warn_unawaited_coroutine``), called from one frame
    further in: it points at the line that dropped the coroutine, not at this module, so
    warning filters by module still match."""
    lines = [f"coroutine '{coro.__qualname__}' was never awaited\n"]
    origin = getattr(coro, "cr_origin", None)
    if origin is not None:  # sys.set_coroutine_origin_tracking_depth
        frames = [
            (filename, lineno, name, linecache.getline(filename, lineno))
            for filename, lineno, name in reversed(origin)
        ]
        lines.append("Coroutine created at (most recent call last)\n")
        lines += traceback.format_list(frames)
    message = "".join(lines).rstrip("\n")
    # 1 is this function, 2 the hook, 3 the code that dropped the coroutine.
    warnings.warn(message, category=RuntimeWarning, stacklevel=3, source=coro)


_UNAWAITED = _UnawaitedHook()


def _task_anchor() -> object:
    """Where the watchdog finds this loop's tasks: the asyncio loop, or trio's root task."""
    loop = asyncio._get_running_loop()
    if loop is not None:
        return loop
    import trio

    return trio.lowlevel.current_root_task()


def _stop_at_exit(ref: weakref.ref[BlockingDetectorMiddleware]) -> None:
    middleware = ref()
    if middleware is not None:
        middleware.stop()
