"""Apps for ``blocking_overhead.py``: one small app without and with the blocking detector.

uvicorn imports them as ``bench._blocking_apps:<name>`` (run from the project root). ``GET /``
awaits 1 ms (``anyio.sleep``) and answers a small JSON: it never blocks the loop, so the
detector must report nothing while the benchmark runs. Two routes for the script's checks,
never hit while it measures: ``/_block`` blocks the loop for 150 ms (``time.sleep``, past the
100 ms threshold), and ``/_stats`` says whether the watchdog thread is alive and how many
stalls the detector reported (through an ``on_block`` callback).

``fastapi_off`` / ``fastapi_on``: FastAPI, the detector added with ``add_middleware``
(``threshold=0.1``, the default poll interval: 20 ms). ``starlette_off`` / ``starlette_on``:
the same with Starlette. ``breakdown_*`` (built on first use): the FastAPI app with parts of
the detector, for ``--breakdown``. ``toggled``: the FastAPI app behind a switch between no
detector, a pass-through middleware and the detector, for ``blocking_toggle.py``.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from asgi_guard import BlockingDetectorMiddleware, BlockingEvent

if TYPE_CHECKING:  # mypy reads bench/ as top-level modules, as the scripts import them
    from _toggle import Switched
else:  # uvicorn imports this module as bench.<name>
    from ._toggle import Switched

THRESHOLD = 0.1
HANDLER_SLEEP = 0.001
BLOCK = 0.15

#: Stalls the detector reported in this process (the on_block callback, its own thread).
REPORTED = {"blocks": 0}


def _count(event: BlockingEvent) -> None:
    REPORTED["blocks"] += 1


def _stats() -> dict[str, Any]:
    names = [t.name for t in threading.enumerate()]
    return {"watchdog": "asgi_guard-blocking-watchdog" in names, **REPORTED}


def _fastapi(detector: bool, middleware: type[BlockingDetectorMiddleware] | None = None) -> FastAPI:
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    @app.get("/")
    async def home() -> dict[str, Any]:
        await anyio.sleep(HANDLER_SLEEP)
        return {"ok": True, "items": [1, 2, 3]}

    @app.get("/_block")
    async def block() -> dict[str, Any]:
        time.sleep(BLOCK)
        return {"blocked": BLOCK}

    @app.get("/_stats")
    async def stats() -> dict[str, Any]:
        return _stats()

    if detector:
        app.add_middleware(BlockingDetectorMiddleware, threshold=THRESHOLD, on_block=_count)
    elif middleware is not None:
        app.add_middleware(middleware, threshold=THRESHOLD, on_block=_count)
    return app


async def _home(request: Request) -> JSONResponse:
    await anyio.sleep(HANDLER_SLEEP)
    return JSONResponse({"ok": True, "items": [1, 2, 3]})


async def _block(request: Request) -> JSONResponse:
    time.sleep(BLOCK)
    return JSONResponse({"blocked": BLOCK})


async def _stats_route(request: Request) -> JSONResponse:
    return JSONResponse(_stats())


def _starlette(detector: bool) -> Starlette:
    app = Starlette(
        routes=[Route("/", _home), Route("/_block", _block), Route("/_stats", _stats_route)]
    )
    if detector:
        app.add_middleware(BlockingDetectorMiddleware, threshold=THRESHOLD, on_block=_count)
    return app


fastapi_off = _fastapi(False)
fastapi_on = _fastapi(True)
starlette_off = _starlette(False)
starlette_on = _starlette(True)


# -- where the cost comes from (``blocking_overhead.py --breakdown``) -------------------------


class _PassThrough:
    """A middleware that only passes each call on: what any middleware costs."""

    def __init__(self, app: Any, **options: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


class _RequestsOnly(BlockingDetectorMiddleware):
    """The detector's per-request work only: no heartbeat, no threads."""

    def _start_threads(self) -> None:
        pass

    async def _heartbeat(self) -> None:
        await anyio.sleep_forever()


class _HeartbeatOnly(BlockingDetectorMiddleware):
    """Per-request work and the heartbeat task, no watchdog thread."""

    def _start_threads(self) -> None:
        pass


class _SleepingThread(_HeartbeatOnly):
    """As ``_HeartbeatOnly``, plus a Python thread that never wakes (until `stop`): what a
    second thread costs by merely existing (a process with threads takes locks a
    single-threaded one skips, in its C library among others)."""

    _wake: threading.Event | None = None
    _sleeper: threading.Thread | None = None

    def _start_threads(self) -> None:
        if self._sleeper is not None:
            return  # started already (a second start keeps it, as the detector's does)
        self._wake = threading.Event()
        self._sleeper = threading.Thread(target=self._wake.wait, name="sleeper", daemon=True)
        self._sleeper.start()

    def stop(self) -> None:
        wake, sleeper, self._wake, self._sleeper = self._wake, self._sleeper, None, None
        if wake is not None and sleeper is not None:
            wake.set()
            sleeper.join()
        super().stop()


class _IdleThread(_HeartbeatOnly):
    """As ``_HeartbeatOnly``, plus a Python thread that wakes every poll interval and does
    nothing else: what the watchdog's wake-ups cost by themselves."""

    def _start_threads(self) -> None:
        stop = threading.Event()
        poll = self.poll_interval

        def wake() -> None:
            while not stop.wait(poll):
                pass

        threading.Thread(target=wake, name="idle-waker", daemon=True).start()


class _IdleProcess(_HeartbeatOnly):
    """As ``_HeartbeatOnly``, plus a child process that wakes every poll interval (and
    exits with its parent): the same wake-ups, without sharing the server's GIL."""

    def _start_threads(self) -> None:
        code = (
            "import os, time\n"
            f"parent = {os.getpid()}\n"
            f"while os.getppid() == parent: time.sleep({self.poll_interval})\n"
        )
        subprocess.Popen([sys.executable, "-c", code])


class _NoTap(BlockingDetectorMiddleware):
    """The detector without its tap (the watchdog sleeps on its alarm alone)."""

    def _start_threads(self) -> None:
        self._watchdog.use_tap = False
        super()._start_threads()


class _Polling(BlockingDetectorMiddleware):
    """The detector as where there is no ``timerfd``: the watchdog looks every poll interval."""

    def _start_threads(self) -> None:
        self._watchdog.use_alarm = False
        super()._start_threads()


class _QuietBeats(BlockingDetectorMiddleware):
    """The detector without its tap, whose beats move no timer and read no clock (its
    watchdog sleeps for good, and it detects nothing): what a beat's system calls cost,
    against ``on``."""

    def _start_threads(self) -> None:
        self._watchdog.use_tap = False
        super()._start_threads()
        watchdog = self._watchdog
        period = watchdog.beat_period

        def beat() -> None:
            watchdog.tick += 1
            watchdog.beat_at = now = time.monotonic()
            watchdog.beat_due = now + 0.9 * period

        watchdog.beat = beat  # type: ignore[method-assign]


class _FastBeats(BlockingDetectorMiddleware):
    """The detector with a poll interval of 4 ms instead of 20 (beats about six times as
    often under ``blocking_toggle.py``'s load): what a beat costs, by amplifying it."""

    def __init__(self, app: Any, **options: Any) -> None:
        super().__init__(app, poll_interval=0.004, **options)


_BREAKDOWN: dict[str, Callable[[], FastAPI]] = {
    "breakdown_off": lambda: _fastapi(False),
    "breakdown_pass": lambda: _fastapi(False, _PassThrough),  # type: ignore[arg-type]
    "breakdown_requests": lambda: _fastapi(False, _RequestsOnly),
    "breakdown_heartbeat": lambda: _fastapi(False, _HeartbeatOnly),
    "breakdown_sleeper": lambda: _fastapi(False, _SleepingThread),
    "breakdown_thread": lambda: _fastapi(False, _IdleThread),
    "breakdown_process": lambda: _fastapi(False, _IdleProcess),
    "breakdown_notap": lambda: _fastapi(False, _NoTap),
    "breakdown_polling": lambda: _fastapi(False, _Polling),
    "breakdown_quiet": lambda: _fastapi(False, _QuietBeats),
    "breakdown_on": lambda: _fastapi(True),
}


class Toggled(Switched):
    """The FastAPI app of ``fastapi_off`` behind a switch (``_toggle.Switched``), for
    ``blocking_toggle.py``: alone (``off``), through a pass-through middleware (``pass``),
    through the detector (``on``) or through one of the ``--breakdown`` variants of the
    detector (``requests``, ``heartbeat``, ``sleeper``, ``notap``, ``quiet``, ``polling``), or
    the detector beating six times as often (``beats``). A detector is
    started when the switch goes to it and stopped when the switch leaves it."""

    def __init__(self) -> None:
        app = _fastapi(False)
        modes: dict[str, Any] = {"off": app, "pass": _PassThrough(app)}
        for name, cls in TOGGLED_DETECTORS.items():
            modes[name] = cls(app, threshold=THRESHOLD, on_block=_count)
        super().__init__(modes, "off")

    def on_leave(self, app: Any) -> None:
        if isinstance(app, BlockingDetectorMiddleware):
            # `stop()` cancels the heartbeat only from the watchdog's loop thread, which the
            # variants without a watchdog (``requests``, ``heartbeat``, ``sleeper``) never
            # set: cancel it here, or every switch would leave one behind.
            heartbeat = app._heartbeat_task
            app.stop()
            if isinstance(heartbeat, asyncio.Task) and not heartbeat.done():
                heartbeat.cancel()

    async def on_enter(self, app: Any) -> None:
        if isinstance(app, BlockingDetectorMiddleware):
            app._lazy_start(asyncio.get_running_loop())

    def extra(self) -> dict[str, Any]:
        """The stats, and how often the detector now switched to has beaten and looked."""
        app = self.modes[self.mode]
        tasks = {"tasks": len(asyncio.all_tasks())}
        if isinstance(app, BlockingDetectorMiddleware):
            watchdog = app._watchdog
            return {**_stats(), **tasks, "beats": watchdog.tick, "looks": watchdog.looks}
        return {**_stats(), **tasks}


#: The detectors ``Toggled`` switches between (the detector and its breakdown variants).
TOGGLED_DETECTORS: dict[str, type[BlockingDetectorMiddleware]] = {
    "on": BlockingDetectorMiddleware,
    "requests": _RequestsOnly,
    "heartbeat": _HeartbeatOnly,
    "sleeper": _SleepingThread,
    "beats": _FastBeats,
    "notap": _NoTap,
    "polling": _Polling,
    "quiet": _QuietBeats,
}


toggled = Toggled()


def __getattr__(name: str) -> FastAPI:
    """Build a breakdown variant on first use (uvicorn's ``getattr`` of the module)."""
    if name not in _BREAKDOWN:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    app = _BREAKDOWN[name]()
    globals()[name] = app
    return app
