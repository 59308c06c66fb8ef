"""The blocking-call watchdog: a thread that notices when one step holds the event loop.

The loop publishes a heartbeat (a tick counter bumped by requests as they end, or by a
heartbeat task when none did, at least every three quarters of a poll interval) and, at
each beat, pushes back a kernel timer set one poll interval ahead: the tap's (below), or a
Linux ``timerfd`` where there is no tap. The watchdog thread sleeps until that timer fires:
while the loop goes round it never wakes (each wake-up of a thread of this process costs
the busy loop thread far more than the wake-up itself: the GIL changes hands twice). When
the loop misses a beat, the timer expires and the watchdog wakes, then looks every poll
interval until the loop beats again. Where there is no ``timerfd`` it simply looks every
poll interval. A look reads the loop thread's stack and
finds the *step* running on it: the frames inward of the innermost frame of loop, task-runner or
server machinery (the task's coroutine and what it calls). When the same step has been on
the thread, with the tick unchanged, for longer than the threshold, the loop is blocked:
the watchdog looks twice (to tell a blocking call from a CPU loop), checks the tick again
(a stall that has just ended is never blamed on the frame that follows it), and reports.
It goes on looking at a reported step: another line where the loop then waits (a call that
lets the GIL go) for at least the threshold, from the first look that sees it there to the
last, is reported as a stall of its own when the loop moves on from it.
Requests are found by walking from the sampled frame to the middleware's own frame and
reading its ``scope`` argument (nothing is registered per request); a step in a task the
request spawned (a task group child, a streaming body Starlette runs in a task of its own)
never meets that frame, so its task is looked up and the request read from the context the
task inherited.

When a C call holds the GIL, the watchdog cannot run at all. On Linux, with the loop on the
main thread, a *tap* (`_Tap`) makes the loop thread sample itself where such a call returns:
a POSIX timer, pushed back at each beat, signals the watchdog thread, and CPython runs the
handler on the main thread at its next bytecode boundary, before any other thread can take
the GIL. A late handler's sample is reported, labelled ``holds_gil``. Without a tap the
watchdog notices on waking that it overslept, and reports the stall with the stack it finds.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import dis
import errno
import functools
import gc
import hashlib
import importlib.util
import itertools
import logging
import math
import os
import queue
import select
import signal
import sys
import sysconfig
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import CodeType, FrameType
from typing import Any, Literal

from starlette.types import Scope

from ._deadline import _check_seconds
from ._errors import ConfigurationError
from ._paths import route_template

__all__ = ["BlockingEvent", "Watchdog"]

logger = logging.getLogger("asgi_guard.blocking")

#: Where library code lives: the standard library, installed packages, and asgi_guard's
#: own files wherever they are (an editable install, strict mode's wrappers).
_LIBRARY_PATHS = tuple(
    os.path.join(path, "")
    for path in {
        *(sysconfig.get_paths()[name] for name in ("stdlib", "purelib", "platlib")),
        os.path.dirname(__file__),
    }
)


def package_dir(name: str) -> str | None:
    """The directory of the installed package ``name`` (with a trailing separator), found
    without importing it, or ``None`` when it is not installed."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):  # pragma: no cover - a broken installation
        return None
    locations = list(spec.submodule_search_locations or ()) if spec is not None else []
    return os.path.join(locations[0], "") if locations else None


#: The loop machinery of other backends and servers, by their installed directories (an
#: app's own directory may be named ``uvicorn`` or ``trio`` too), and the pytest plugin's
#: wrapper, which runs a checked test: the step is the test's.
_MACHINERY_OTHERS = tuple(
    os.path.join(directory, *rest)
    for directory, *rest in (
        (package_dir("trio"), "_core", ""),
        (package_dir("anyio"), "_backends", ""),
        (package_dir("uvicorn"), ""),
        (package_dir("hypercorn"), ""),
        (os.path.dirname(__file__), "pytest_plugin.py"),
    )
    if directory
)
#: The asyncio package's frames and those above: the event loop's own machinery.
_MACHINERY = (os.path.join(os.path.dirname(asyncio.__file__), ""), *_MACHINERY_OTHERS)
#: A step made only of these frames, called by the loop itself, is the loop waiting.
_IDLE = (f"{os.sep}selectors.py",)

Kind = Literal["blocking_call", "cpu_bound", "never_awaited"]
#: What tells two steps with the same root frame apart: the heartbeat's tick, and on trio
#: how many steps the task had taken (``None`` before any step is timed).
Mark = tuple[int, int | None] | None


@dataclass(frozen=True)
class BlockingEvent:
    """The event loop was blocked by one step for longer than the threshold.

    Attributes:
        duration: Seconds the loop had been blocked when the stall was reported. A stall
            the watchdog saw while it ran is reported just past the threshold, and the
            step may have gone on: ``duration`` is how long it had lasted then, not its
            whole length. Another line of a step reported already where the loop then
            waited in a call (one that lets the GIL go, as a sleep or a socket read does)
            for at least the threshold is reported too, once the loop moved on from it,
            with how long the watchdog saw it there (from its first look to its last).
            A C call that held the GIL and let nothing run until it returned
            (``holds_gil``) is seen only then: ``duration`` is its whole length, counted
            from when the first heartbeat it delayed was due (so slightly less). Some C
            calls that hold the GIL let the loop thread's tap in midway (json's encoder):
            they are reported while they run, labelled ``holds_gil``, with how long they
            had lasted. ``never_awaited``: 0.
        stack: Where it was blocked, in Python's usual order (innermost frame last): the
            step running on the loop, down to the line that blocked.
        method: The method of the HTTP request being served, or ``None`` in a WebSocket
            session or outside any request.
        path: The path of the request or WebSocket session, or ``None`` outside both.
        route: Its route template, or ``None`` (outside a request, or before routing).
        holds_gil: A C call held the GIL: nothing could run, not even the watchdog, and the
            stall was seen only once the call returned (the stack is where the code went on).
        fingerprint: A short hash of the stack's code locations, the same for the same stack
            in every process: for de-duplication.
        kind: ``"blocking_call"`` (a call that waits or computes in C: the stack stood still),
            ``"cpu_bound"`` (Python code computing without ever awaiting: make the handler
            a ``def`` endpoint, or move the work to a thread or process), or
            ``"never_awaited"`` (a coroutine was created and dropped without being awaited:
            the stack shows where; ``duration`` is 0).

    Examples:
        An ``on_block`` callback gets each one, on a thread of its own:

        >>> def alert(event: BlockingEvent) -> None:
        ...     where = event.location
        ...     line = where.lineno if where is not None else "?"
        ...     print(f"{event.route or 'outside requests'}: {event.kind} at line {line}")
        >>> stack = traceback.StackSummary.from_list(
        ...     [("/srv/app/reports.py", 14, "render_report", "time.sleep(0.3)")]
        ... )
        >>> event = BlockingEvent(
        ...     duration=0.104, stack=stack, method="GET", path="/reports/7",
        ...     route="/reports/{id}", holds_gil=False, fingerprint="9f2c0e1a4b7d3c55",
        ... )
        >>> alert(event)
        /reports/{id}: blocking_call at line 14
        >>> event.describe()[:60]
        'GET /reports/{id}: the event loop was blocked for 0.104 s at'
    """

    duration: float
    stack: traceback.StackSummary
    method: str | None
    path: str | None
    route: str | None
    holds_gil: bool
    fingerprint: str
    kind: Kind = "blocking_call"

    @property
    def location(self) -> traceback.FrameSummary | None:
        """The innermost frame of application code (not the standard library, an installed
        package or asgi_guard's own files), or the innermost frame when there is none."""
        for frame in reversed(self.stack):
            if not _is_library(frame.filename):
                return frame
        return self.stack[-1] if len(self.stack) else None

    def describe(self) -> str:
        """One line: which request, where, how long."""
        where = self.location
        at = f"{where.filename}:{where.lineno} in {where.name}" if where else "an unknown place"
        code = f" ({where.line.strip()})" if where is not None and where.line else ""
        if self.path is None:
            request = "outside requests"
        else:  # a WebSocket session has a path, not a method
            request = f"{self.method or 'WEBSOCKET'} {self.route or self.path}"
        if self.kind == "never_awaited":
            return f"{request}: a coroutine was never awaited at {at}{code}; add await"
        gil = " holding the GIL" if self.holds_gil else ""
        advice = (
            "; an async handler that never awaits: make it a def endpoint, or move the work "
            "to a thread or a process"
            if self.kind == "cpu_bound"
            else ""
        )
        return (
            f"{request}: the event loop was blocked{gil} for {self.duration:.3f} s at "
            f"{at}{code}{advice}"
        )


def _is_library(filename: str) -> bool:
    return filename.startswith(_LIBRARY_PATHS) or filename.startswith("<")


def _is_machinery(frame: FrameType) -> bool:
    return frame.f_code.co_filename.startswith(_MACHINERY)


def _request_of(scope: Scope) -> tuple[str | None, str | None, str | None]:
    return scope.get("method"), scope.get("path"), route_template(scope)


def _scope_of(frame: FrameType) -> Scope | None:
    """The ``scope`` argument of a running call of the middleware (read on the watchdog
    thread while it holds the GIL, so the loop thread is not running bytecode)."""
    try:
        scope = frame.f_locals.get("scope")
    except Exception:  # pragma: no cover - a frame the interpreter is tearing down
        return None
    return scope if isinstance(scope, dict) else None


def _context_of(task: Any) -> contextvars.Context | None:
    """The context a task runs in: ``get_context()`` (asyncio 3.12+), ``context`` (trio),
    or, for asyncio's C tasks of 3.11, the context its garbage-collector traversal visits
    first (the task's own; its callbacks' come after)."""
    get_context = getattr(task, "get_context", None)
    if get_context is not None:
        context = get_context()
        return context if isinstance(context, contextvars.Context) else None
    context = getattr(task, "context", None) or getattr(task, "_context", None)
    if isinstance(context, contextvars.Context):
        return context
    for referent in gc.get_referents(task):
        if isinstance(referent, contextvars.Context):
            return referent
    return None


def _asyncio_tasks(loop: asyncio.AbstractEventLoop) -> Iterator[tuple[Any, Any]]:
    for task in asyncio.all_tasks(loop):  # copies the set; retries while the loop adds
        yield task, task.get_coro()


def _trio_tasks(root: Any) -> Iterator[tuple[Any, Any]]:
    pending = [root]
    while pending:
        task = pending.pop()
        yield task, task.coro
        for nursery in list(task.child_nurseries):
            pending.extend(list(nursery.child_tasks))


def running_task(top: FrameType | None, anchor: object) -> Any:
    """The task whose coroutine runs ``top``, or ``None``. ``anchor`` is the asyncio loop, or
    the trio run's root task. Called from the watchdog thread while the step still runs."""
    on_stack = set()
    frame = top
    while frame is not None:
        on_stack.add(id(frame))
        frame = frame.f_back
    if isinstance(anchor, asyncio.AbstractEventLoop):
        tasks = _asyncio_tasks(anchor)
    elif anchor is not None and hasattr(anchor, "child_nurseries"):
        tasks = _trio_tasks(anchor)
    else:
        return None
    try:
        for task, coro in tasks:
            if id(getattr(coro, "cr_frame", None)) in on_stack:
                return task
    except RuntimeError:  # the loop changed its tasks while we looked: leave it unnamed
        return None
    return None


def spawned_request(
    top: FrameType | None,
    anchor: object,
    var: contextvars.ContextVar[int],
    in_flight: dict[int, Scope],
) -> Scope | None:
    """The request whose context the task running ``top`` inherited: a child task of a
    request carries a copy of the request's context."""
    task = running_task(top, anchor)
    context = _context_of(task) if task is not None else None
    number = context.get(var, None) if context is not None else None
    return in_flight.get(number) if number is not None else None


def _trio_steps() -> int | None:
    """How many steps the running trio task has taken (on the loop thread), or ``None``."""
    trio = sys.modules.get("trio")
    try:
        steps = trio.lowlevel.current_task()._schedule_points  # type: ignore[union-attr]
    except Exception:  # not in a trio task, or a trio without the counter
        return None
    return steps if isinstance(steps, int) else None


def fingerprint(stack: traceback.StackSummary) -> str:
    """A stable short hash of the stack's code locations."""
    text = "\n".join(f"{f.filename}:{f.lineno}:{f.name}" for f in stack)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


@functools.lru_cache(maxsize=1024)
def _entry_offset(code: CodeType) -> int:
    """The offset of the instruction where a call of ``code`` starts running its body
    (``RESUME``, after the cells and a generator's setup), or 0 where there is none (3.10)."""
    for instruction in dis.get_instructions(code):
        if instruction.opname == "RESUME":
            return instruction.offset
    return 0


def _entering(frame: FrameType) -> bool:
    """Whether ``frame`` has not yet run its body: its instruction, not its line, says so (a
    one-line function or a lambda is always on its first line)."""
    return frame.f_lasti <= _entry_offset(frame.f_code)


class _Sample:
    """The loop thread's stack at one moment, cut to the running step.

    Everything that changes as the loop thread goes on (line numbers, the request) is read
    here at once, while this thread holds the GIL: reading source lines afterwards lets the
    loop thread run.
    """

    __slots__ = ("lines", "request", "root", "steps", "top", "via_tap")

    def __init__(self, top: FrameType | None, request_codes: frozenset[CodeType]) -> None:
        self.top = top
        # The step: the frames inward of the innermost frame of loop machinery (the event
        # loop, a task wrapper, the server), innermost first.
        lines: list[tuple[FrameType, int]] = []
        request: tuple[str | None, str | None, str | None] = (None, None, None)
        found = False
        frame = top
        while frame is not None and not _is_machinery(frame):
            lines.append((frame, frame.f_lineno))
            if not found and frame.f_code in request_codes:
                scope = _scope_of(frame)
                if scope is not None:
                    found = True
                    request = _request_of(scope)
            frame = frame.f_back
        if frame is None or all(
            f.f_code.co_filename.endswith(_IDLE) for f, _ in lines
        ):  # no loop on this stack at all, or the loop waiting in select: no step
            lines = []
            request = (None, None, None)
        elif len(lines) > 1 and _entering(lines[0][0]):
            # Caught entering a function (the GIL changes hands there): its ``def`` line is
            # not where the work is, its caller's line is.
            del lines[0]
        self.lines = lines
        self.request = request
        self.root = lines[-1][0] if lines else None
        #: Taken while the loop thread ran the tap's handler (see `_Tap`).
        self.via_tap = False
        #: On trio, how many steps the root's task had taken (`Watchdog._steps_of`): two
        #: steps of one task have the same root frame, and may come with no beat between.
        self.steps: int | None = None


#: A sample's step as code locations, outermost first: two samples at the same line of the
#: same calls have the same.
Lines = tuple[tuple[CodeType, int], ...]


def _lines_of(sample: _Sample) -> Lines:
    return tuple((frame.f_code, line) for frame, line in reversed(sample.lines))


class _Run:
    """Looks at a reported step that found it at one line (of the same calls), in a row:
    when, and the loop thread's CPU time then (``None`` where it cannot be read), and
    whether a look came in through the tap (a C call holding the GIL)."""

    __slots__ = ("cpu_last", "cpu_since", "last", "lines", "sample", "since", "tapped")

    def __init__(self, sample: _Sample, lines: Lines, now: float, cpu: float | None) -> None:
        self.sample = sample
        self.lines = lines
        self.since = self.last = now
        self.cpu_since = self.cpu_last = cpu
        self.tapped = sample.via_tap

    def add(self, sample: _Sample, now: float, cpu: float | None) -> None:
        self.last = now
        self.cpu_last = cpu
        self.tapped = self.tapped or sample.via_tap

    @property
    def waiting(self) -> bool:
        """Whether the loop thread waited at this line (a sleep, a socket read), not
        computed: it used less than half the time on a CPU."""
        if self.tapped or self.cpu_since is None or self.cpu_last is None:
            return False
        return self.cpu_last - self.cpu_since < (self.last - self.since) / 2


class _Alarm:
    """A one-shot kernel timer (Linux ``timerfd``) the loop pushes ``delay`` ahead at every
    beat, and the watchdog thread sleeps on: reading it releases the GIL and returns only
    once the loop has not beaten for ``delay``, or when `ring` is called. Pushing it back
    is one system call and wakes no thread, but moving a kernel timer costs this VM's loop
    thread about 24 µs (measured): with a tap (`_Tap`), whose signal wakes the watchdog
    too, the loop pushes only the tap, and the alarm is left to `ring` (`sleep`)."""

    def __init__(
        self, fd: int, delay: float, push: Callable[[], object], ring: Callable[[], object]
    ) -> None:
        self.fd = fd
        self.delay = delay
        self.push = push
        self.ring = ring

    def wait(self) -> None:
        with contextlib.suppress(OSError):  # interrupted: the caller looks early, no harm
            os.read(self.fd, 8)  # the number of expiries since the last read

    def sleep(self, longest: float) -> None:
        """Sleep until `ring`, a signal reaching this thread (the tap's: unlike ``os.read``,
        a ``poll`` through ctypes returns when one interrupts it), or ``longest`` seconds."""
        with contextlib.suppress(OSError):  # closed by a stop meanwhile
            if _poll(self.fd, longest):
                os.read(self.fd, 8)  # rung: take the expiry (it is readable: no wait)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


@functools.cache
def _poll_call() -> Any:
    """libc's ``poll`` and its ``struct pollfd`` (ctypes releases the GIL while it waits)."""
    import ctypes

    class Pollfd(ctypes.Structure):
        _fields_ = [("fd", ctypes.c_int), ("events", ctypes.c_short), ("revents", ctypes.c_short)]

    poll = ctypes.CDLL(None, use_errno=True).poll
    poll.argtypes = [ctypes.POINTER(Pollfd), ctypes.c_ulong, ctypes.c_int]
    return poll, Pollfd


def _poll(fd: int, timeout: float) -> bool:
    """Wait until ``fd`` is readable (True), a signal handler ran on this thread, or
    ``timeout`` seconds passed (False)."""
    import ctypes

    poll, pollfd = _poll_call()
    entry = pollfd(fd, select.POLLIN, 0)
    if poll(ctypes.byref(entry), 1, max(1, round(timeout * 1000))) < 0:
        if ctypes.get_errno() == errno.EINTR:
            return False
        raise OSError(ctypes.get_errno(), "poll")
    return bool(entry.revents & select.POLLIN)


@functools.cache
def _itimerspec() -> Any:
    """The C ``struct itimerspec`` (ctypes is imported only where a timer is made)."""
    import ctypes

    class Timespec(ctypes.Structure):
        _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]

    class Itimerspec(ctypes.Structure):
        _fields_ = [("it_interval", Timespec), ("it_value", Timespec)]

    return Itimerspec


def _once_in(delay: float) -> Any:
    """An ``itimerspec`` that fires once, ``delay`` seconds from when it is set."""
    seconds = int(delay)
    spec = _itimerspec()()
    spec.it_value.tv_sec, spec.it_value.tv_nsec = seconds, int((delay - seconds) * 1e9)
    return spec


def make_alarm(delay: float) -> _Alarm | None:
    """An `_Alarm`, or ``None`` where the platform has no ``timerfd`` (the watchdog then
    looks every poll interval)."""
    if sys.version_info >= (3, 13):
        try:
            fd = os.timerfd_create(time.CLOCK_MONOTONIC, flags=os.TFD_CLOEXEC)
        except (AttributeError, OSError):  # not Linux
            return None

        def push() -> None:
            os.timerfd_settime(fd, initial=delay)

        def ring() -> None:
            os.timerfd_settime(fd, initial=1e-6)

        return _Alarm(fd, delay, push, ring)
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        create, settime = libc.timerfd_create, libc.timerfd_settime
    except (AttributeError, OSError):  # pragma: no cover - an unusual C library
        return None
    create.argtypes = [ctypes.c_int, ctypes.c_int]
    settime.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.POINTER(_itimerspec()), ctypes.c_void_p]
    fd = create(time.CLOCK_MONOTONIC, os.O_CLOEXEC)  # TFD_CLOEXEC is O_CLOEXEC
    if fd < 0:  # pragma: no cover
        return None
    ahead, at_once = _once_in(delay), _once_in(1e-6)
    # Arguments prepared once: a push is a single foreign call.
    return _Alarm(
        fd,
        delay,
        functools.partial(settime, fd, 0, ctypes.byref(ahead), None),
        functools.partial(settime, fd, 0, ctypes.byref(at_once), None),
    )


class _Tap:
    """A POSIX timer whose signal is delivered to the watchdog thread only, so that no
    system call of the loop thread is ever interrupted. The signal still makes CPython run
    the Python handler on the main thread (the loop's) at its next bytecode boundary, which
    after a C call holding the GIL comes right when it returns, before any other thread can
    take the GIL: the loop thread samples itself exactly where it went on."""

    def __init__(
        self,
        signum: int,
        previous: Any,
        arm: Callable[[], object],
        delete: Callable[[], object],
    ) -> None:
        self.signum = signum
        self._previous = previous
        #: Sets the timer to fire once, its delay from now (one prepared foreign call).
        self.arm = arm
        self._delete = delete

    def close(self) -> None:
        """Delete the timer and give the signal back (SIG_IGN first: it discards one still
        pending, whose default action would end the process)."""
        self._delete()
        with contextlib.suppress(ValueError, OSError):  # not on the main thread: keep ours
            signal.signal(self.signum, signal.SIG_IGN)
            signal.signal(self.signum, self._previous)


def make_tap(
    thread_id: int, handler: Callable[[int, FrameType | None], None], delay: float
) -> _Tap | None:
    """A `_Tap` aimed at ``thread_id`` (a native thread id) running ``handler`` on the main
    thread, armed ``delay`` ahead each time, or ``None``: not Linux, not called on the main
    thread, or no free real-time signal."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not (
        threading.main_thread()
    ):
        return None
    signum = next(
        (
            n
            for n in range(signal.SIGRTMAX - 1, signal.SIGRTMIN + 1, -1)
            if signal.getsignal(n) == signal.SIG_DFL
        ),
        None,
    )
    if signum is None:
        return None
    import ctypes

    pad = (64 - 2 * ctypes.sizeof(ctypes.c_int) - ctypes.sizeof(ctypes.c_void_p)) // 4 - 1

    class Sigevent(ctypes.Structure):
        _fields_ = [
            ("sigev_value", ctypes.c_void_p),
            ("sigev_signo", ctypes.c_int),
            ("sigev_notify", ctypes.c_int),
            ("sigev_notify_thread_id", ctypes.c_int),
            ("pad", ctypes.c_int * pad),
        ]

    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "timer_create"):  # pragma: no cover - glibc before 2.34
        try:
            libc = ctypes.CDLL("librt.so.1", use_errno=True)
        except OSError:
            return None
    create, settime, delete = libc.timer_create, libc.timer_settime, libc.timer_delete
    create.argtypes = [ctypes.c_int, ctypes.POINTER(Sigevent), ctypes.POINTER(ctypes.c_void_p)]
    settime.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.POINTER(_itimerspec()),
        ctypes.c_void_p,
    ]
    delete.argtypes = [ctypes.c_void_p]
    previous = signal.signal(signum, handler)
    event = Sigevent()
    event.sigev_signo = signum
    event.sigev_notify = 4  # SIGEV_THREAD_ID
    event.sigev_notify_thread_id = thread_id
    timer = ctypes.c_void_p()
    if create(time.CLOCK_MONOTONIC, ctypes.byref(event), ctypes.byref(timer)) != 0:
        signal.signal(signum, previous)  # pragma: no cover
        return None

    return _Tap(
        signum,
        previous,
        functools.partial(settime, timer, 0, ctypes.byref(_once_in(delay)), None),
        functools.partial(delete, timer),
    )


class Watchdog:
    """Watches one event loop thread; reports stalls to ``report``.

    ``beat()`` is called on the loop: by requests as they end, once `beat_due` has passed
    (set from how often requests end), and by a heartbeat when no
    request has beaten for a whole `beat_period` (so under load no beat wakes the loop,
    and while the loop runs a beat comes at least every `beat_period`). A frame running one
    of `request_codes` is a request. Thread-safe by the GIL: the loop thread writes, the
    watchdog thread reads.
    """

    def __init__(
        self,
        *,
        threshold: float,
        poll: float,
        report: Callable[[BlockingEvent], None],
    ) -> None:
        self.threshold = threshold
        self.poll = poll
        self._report = report
        self.tick = 0
        self.beat_at = -math.inf
        #: From when a request that ends beats (before the heartbeat has to), and how
        #: many requests ended since the last beat (counted by the middleware).
        self.beat_due = -math.inf
        self.ended = 0
        #: The code of the middleware's per-request call: a frame running it is a request,
        #: whose ``scope`` argument the watchdog reads when it reports (nothing is
        #: registered per request).
        self.request_codes: frozenset[CodeType] = frozenset()
        #: The request of the running context (for tasks a request spawned).
        self.request_var: contextvars.ContextVar[int] = contextvars.ContextVar(
            "asgi_guard_blocking_request"
        )
        #: The requests in flight by the number their context carries. The context holds
        #: only the number: a context holding the scope kept it alive long enough to
        #: cost the loop 18 ms pauses at p99.9 under load (measured).
        self.in_flight: dict[int, Scope] = {}
        self.ids = itertools.count()
        #: Where to look for the loop's tasks: the asyncio loop, or trio's root task.
        self.anchor: object = None
        self.loop_thread: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: The step being timed: its root frame, its mark (the tick, and on trio how many
        #: steps its task had taken) and since when; and the step reported last.
        self._root: FrameType | None = None
        self._root_mark: Mark = None
        self._root_since = 0.0
        self._reported_root: FrameType | None = None
        self._reported_mark: Mark = None
        #: On trio: the root frame a task was last looked up for, and the task.
        self._stepping: tuple[FrameType, Any] | None = None
        #: The lines the reported step has been reported at, and its request; what the
        #: looks at it have seen since (`_follow`).
        self._reported_lines: set[Lines] = set()
        self._reported_request: tuple[str | None, str | None, str | None] = (None, None, None)
        self._line_run: _Run | None = None
        self._cpu_clock: int | None = None
        self._first_look = 0.0
        self._cpu = (0.0, 0.0)  # the loop thread's and the process's CPU time at the last check
        #: The loop thread's and the process's CPU time at the last beat (with an alarm).
        self.beat_cpu = (0.0, 0.0)
        self._alarm: _Alarm | None = None
        #: How many times the watchdog has looked at the loop thread (for tests).
        self.looks = 0
        self._tap: _Tap | None = None
        #: Late taps, appended by the loop thread: (when, tick, how late, sample).
        self._taps: collections.deque[tuple[float, int, float, _Sample]] = collections.deque(
            maxlen=64
        )
        self._tap_last: tuple[int, float, tuple[float, float]] | None = None
        self._last_look_at = -math.inf
        #: When the stall being reported was last seen (tests match reports to stalls).
        self.seen_at = 0.0
        #: Whether to sleep on an alarm where the platform has one (tests turn it off).
        self.use_alarm = True
        #: Whether to have the loop thread sample itself after late beats (main thread,
        #: Linux; tests turn it off).
        self.use_tap = True
        #: How often the loop beats at least (set by `start`): every three quarters of a
        #: poll interval with an alarm (the watchdog wakes when a beat is a quarter of a poll
        #: interval late), else every quarter threshold. Each beat costs the loop thread a
        #: timer push and two clock reads (about 30 µs on this VM, measured), so no more
        #: often.
        self.beat_period = threshold / 4

    #: How far past the threshold the look at a step being timed is made.
    _MARGIN = 0.001
    #: How long the watchdog sleeps at most when the tap's signal is to wake it.
    _SLEEP_AT_MOST = 0.5

    # -- the loop's side -------------------------------------------------------------------

    def beat(self) -> None:
        self.tick += 1
        now = time.monotonic()
        # Requests that end from `beat_due` on beat (the heartbeat beats a `beat_period`
        # after the last beat): early enough that one ends before the heartbeat's turn,
        # three of their gaps, and no earlier than half the period (each beat costs).
        ended, self.ended = self.ended, 0
        period = self.beat_period
        gap = (now - self.beat_at) / ended if ended else period
        self.beat_at = now
        self.beat_due = now + period - min(period / 2, max(period / 10, 3 * gap))
        alarm = self._alarm
        if alarm is not None:
            try:
                tap = self._tap
                if tap is not None:
                    tap.arm()  # its signal is the watchdog's alarm too (`_Alarm.sleep`)
                else:
                    # A push resets a ring the tap's handler made and the watchdog has not
                    # woken to yet: while taps wait to be looked at, ring again instead.
                    alarm.ring() if self._taps else alarm.push()
            except OSError:  # pragma: no cover - closed by a stop from another thread
                return
            self.beat_cpu = (time.thread_time(), time.process_time())

    def _tap_due(self, last: tuple[int, float, tuple[float, float]] | None, tick: int) -> float:
        """When the tap was due to run: a poll interval after its last run in this tick,
        else after the last beat."""
        start = last[1] if last is not None and last[0] == tick else self.beat_at
        return start + self.poll

    def _tapped(self, signum: int, frame: FrameType | None) -> None:
        """The tap's handler, on the loop (main) thread at a bytecode boundary, a poll
        interval after the last beat (or the last tap): how late is it? Late by more than
        the threshold, with the loop thread using the time itself, means a call that let
        no bytecode run (a C call holding the GIL) has just returned here."""
        # It runs inside whatever code the loop thread was running: it must never raise.
        try:
            now = time.monotonic()
            cpu = (time.thread_time(), time.process_time())
            tick, last = self.tick, self._tap_last
            due = self._tap_due(last, tick)
            before = last[2] if last is not None and last[0] == tick else self.beat_cpu
            self._tap_last = (tick, now, cpu)
            late = now - due
            if late > self.threshold and (cpu[1] - before[1]) - (cpu[0] - before[0]) < late / 2:
                sample = _Sample(frame, self.request_codes)
                if not isinstance(self.anchor, asyncio.AbstractEventLoop):
                    sample.steps = _trio_steps()
                self._taps.append((now, tick, late, sample))
                alarm = self._alarm
                if alarm is not None:
                    with contextlib.suppress(OSError):
                        alarm.ring()  # the watchdog may be asleep: have it look at this
            tap = self._tap
            if tap is not None:
                with contextlib.suppress(OSError):
                    tap.arm()  # again, while the loop does not beat
        except Exception:  # pragma: no cover - a bug here must not reach the app
            return

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, loop_thread: int, anchor: object = None) -> None:
        if self.running:
            return
        self.loop_thread = loop_thread
        self.anchor = anchor
        # Nothing of a previous run: a step it was timing when it stopped is not this run's
        # (kept, a restart reported the time it was stopped as a stall).
        self._root = self._reported_root = None
        self._root_mark = self._reported_mark = None
        self._root_since = 0.0
        self._stepping = None
        self._reported_lines = set()
        self._line_run = None
        self._taps.clear()
        self._tap_last = None
        self._last_look_at = -math.inf
        try:
            self._cpu_clock = time.pthread_getcpuclockid(loop_thread)
        except (AttributeError, OSError):  # not on this platform: the GIL test is skipped
            self._cpu_clock = None
        self._cpu = self._cpu_times()
        # A start counts as a beat: a previous run's last beat (a loop that has just
        # ended, as each request of a TestClient used without ``with``) is not this one's,
        # and would have the watchdog wait for a wake-up nothing has set.
        self.beat_at = time.monotonic()
        self.beat_cpu = self._cpu
        self._first_look = self.beat_at + self.poll
        self._stop.clear()
        alarm = make_alarm(self.poll) if self.use_alarm else None
        self._alarm = alarm
        self.beat_period = 0.75 * self.poll if alarm is not None else self.threshold / 4
        if alarm is not None:
            with contextlib.suppress(OSError):
                alarm.push()  # armed as a beat would: a stall before the first beat is seen
        self._thread = threading.Thread(
            target=self._run, args=(alarm,), name="asgi_guard-blocking-watchdog", daemon=True
        )
        self._thread.start()
        if alarm is not None and self.use_tap and self._thread.native_id is not None:
            try:
                self._tap = make_tap(self._thread.native_id, self._tapped, self.poll)
            except (OSError, ValueError, AttributeError):  # pragma: no cover
                self._tap = None
            if self._tap is not None:
                # Armed from now, as if a beat: a stall before the first beat is tapped too.
                self._tap_last = (self.tick, time.monotonic(), self._cpu)
                self._tap.arm()
                # The thread may already sleep on the alarm alone, which beats no longer
                # push: have it look, and sleep again on the tap's signal too.
                alarm.ring()

    def stop(self) -> None:
        self._stop.set()
        self.beat_due = -math.inf  # the next request looks for its loop (and starts again)
        alarm, self._alarm = self._alarm, None
        tap, self._tap = self._tap, None
        if tap is not None:
            tap.close()
        if alarm is not None:
            alarm.ring()  # the thread closes it on its way out
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=max(1.0, 5 * self.poll))

    # -- the watchdog thread ----------------------------------------------------------------

    def _run(self, alarm: _Alarm | None) -> None:
        try:
            self._watch(alarm)
        finally:
            with contextlib.suppress(Exception):  # a bug here must not hide a stop
                self._end_run()
            if alarm is not None:
                alarm.close()

    def _watch(self, alarm: _Alarm | None) -> None:
        poll = self.poll
        # Scheduled by `start`, on the loop thread: if the loop holds the GIL before this
        # thread first runs, the first look still knows it overslept.
        expected = self._first_look
        # Looks on a fixed schedule (not ``poll`` after the previous look ended), plus one
        # look just past the threshold of a step that is being timed, so a stall is
        # reported at most ``threshold + poll`` after it began, however long looks take.
        # With an alarm, no looks while the loop beats on time: a step that holds the
        # loop began after the last beat, so the alarm's look, one poll interval after
        # that beat, is as early as the schedule's would have been.
        while True:
            if alarm is not None and self._on_time(alarm):
                self._end_run()  # the loop goes round again: the reported step is over
                if self._tap is None:
                    alarm.wait()
                else:
                    # The tap's signal wakes it (beats push only the tap's timer). A signal
                    # that came between the check above and the sleep would be missed: the
                    # sleep is bounded, and a wake with the loop beating on time looks at
                    # nothing.
                    alarm.sleep(self._SLEEP_AT_MOST)
                    if self._on_time(alarm) and not self._stop.is_set():
                        continue
                if self._stop.is_set():
                    return
                now = time.monotonic()
                # The CPU times at the last beat: the GIL test compares the time since then.
                self._cpu = self.beat_cpu
                try:
                    self._check(now, self.beat_at + alarm.delay)
                except Exception:  # pragma: no cover - a bug here must not kill the watchdog
                    logger.exception("asgi_guard: the blocking watchdog failed a check")
                expected = now + poll
                continue
            target = min(expected, self._due())
            if self._stop.wait(max(0.0, target - time.monotonic())):
                return
            now = time.monotonic()
            try:
                self._check(now, target)
            except Exception:  # pragma: no cover - a bug here must not kill the watchdog
                logger.exception("asgi_guard: the blocking watchdog failed a check")
            if now >= expected:
                expected += poll
                if expected < now:  # overslept (the GIL was held): start the schedule again
                    expected = now + poll

    def _on_time(self, alarm: _Alarm) -> bool:
        """The loop beat within the alarm's delay, and no tap it recorded waits to be
        looked at (those come first): nothing to look at."""
        return time.monotonic() - self.beat_at < alarm.delay and not self._taps

    def _due(self) -> float:
        """When the step being timed, if it still runs, has passed the threshold."""
        root = self._root
        if root is None or self._reported(root, self._root_mark):
            return math.inf
        return self._root_since + self.threshold + self._MARGIN - self._pause

    def _reported(self, root: FrameType, mark: Mark) -> bool:
        """Whether this step is the one reported last (a stall is reported once)."""
        return root is self._reported_root and mark == self._reported_mark

    def _time(self, root: FrameType | None, mark: Mark, now: float) -> None:
        """Time the step ``root`` runs from ``now``. Two steps of one task have the same
        root, and the loop may run the second before any beat (asyncio runs a task's next
        step before the heartbeat's wake-up, queued behind it): on asyncio a beat is posted
        to the loop, which runs it before anything the step queues when it yields, so the
        next step has a new tick; on trio the mark counts the task's steps."""
        if root is not self._reported_root or mark != self._reported_mark:
            self._end_run()
        self._root, self._root_mark, self._root_since = root, mark, now
        loop = self.anchor
        if root is not None and isinstance(loop, asyncio.AbstractEventLoop):
            with contextlib.suppress(RuntimeError):  # closed meanwhile
                loop.call_soon_threadsafe(self.beat)

    def _steps_of(self, sample: _Sample) -> int | None:
        """On trio, how many steps the task running ``sample`` has taken (its task is looked
        up once per root frame); ``None`` on asyncio."""
        anchor, root = self.anchor, sample.root
        if root is None or anchor is None or isinstance(anchor, asyncio.AbstractEventLoop):
            return None
        stepping = self._stepping
        if stepping is None or stepping[0] is not root:
            stepping = self._stepping = (root, running_task(sample.top, anchor))
        steps = getattr(stepping[1], "_schedule_points", None)
        return steps if isinstance(steps, int) else None

    @property
    def _pause(self) -> float:
        """How long before the threshold the watchdog looks first, to look again just past it."""
        return min(0.002, self.poll / 4)

    def _cpu_times(self) -> tuple[float, float]:
        clock = self._cpu_clock
        if clock is None:
            return 0.0, 0.0
        try:
            return time.clock_gettime(clock), time.process_time()
        except OSError:  # the loop thread is gone
            return 0.0, 0.0

    def _sample(self) -> _Sample:
        thread = self.loop_thread
        top = sys._current_frames().get(thread) if thread is not None else None
        if self._tap is not None:
            # In the tap's handler (its bytecode let this thread in): the loop thread's
            # own code is the frame the handler interrupted.
            frame = top
            for _ in range(8):
                if frame is None:
                    break
                if frame.f_code is _TAPPED_CODE:
                    sample = _Sample(frame.f_back, self.request_codes)
                    sample.via_tap = True
                    sample.steps = self._steps_of(sample)
                    return sample
                frame = frame.f_back
        sample = _Sample(top, self.request_codes)
        sample.steps = self._steps_of(sample)
        return sample

    def _report_taps(self, previous_look: float) -> None:
        """Report the GIL-holding calls the loop thread's late taps found, each where it
        ended (never where the loop went on after it)."""
        taps = self._taps
        while taps:
            at, tick, late, sample = taps.popleft()
            root, mark = sample.root, (tick, sample.steps)
            if root is None or self._reported(root, mark):
                continue
            switch = sys.getswitchinterval()
            if at - late + 2 * switch < previous_look < at - 2 * switch:
                continue  # this thread looked meanwhile: the GIL was free, not held
            self.seen_at = at
            self._emit(sample, late, holds_gil=True, kind="blocking_call")
            self._reported_step(root, mark, sample)

    def _check(self, now: float, expected: float) -> None:
        # Read first: once this thread runs Python it may hand the GIL back, and a tap's
        # handler it came in through would then go on and change them.
        tap_last, tick = self._tap_last, self.tick
        tapped = self._tap is not None
        self.looks += 1
        if tapped:
            self._report_taps(self._last_look_at)
        self.seen_at = now
        sample = self._sample()
        if not sample.via_tap:
            # A look from outside the handler: the GIL was free then (`_report_taps`). The
            # clock is read again: `now` may be older than a handler that ran meanwhile.
            self._last_look_at = time.monotonic()
        root = sample.root
        mark: Mark = (tick, sample.steps)
        (loop_before, all_before), self._cpu = self._cpu, self._cpu_times()
        overslept = now - expected
        # Waking, this thread may wait one switch interval for a busy loop to let it in.
        if overslept > self.threshold + sys.getswitchinterval():
            # Other threads than the loop's used the time this thread could not run: a
            # worker thread held the GIL, not the loop.
            others = (self._cpu[1] - all_before) - (self._cpu[0] - loop_before)
            if self._cpu_clock is not None and others >= overslept / 2:
                # The loop was starved, not blocked by its own code: the step is timed
                # again from now, the time it could not run does not count against it.
                self._time(root, mark, now)
                return
            if tapped:
                # Only what the loop thread's taps saw is reported: where it stood when
                # the tap's handler let this thread in (right where a GIL-holding call
                # returned), or what a late tap recorded (above). Any other stack may be
                # the next step's. Whatever runs now is timed from now.
                if sample.via_tap and root is not None and not self._reported(root, mark):
                    due = self._tap_due(tap_last, tick)
                    if now - due > self.threshold:
                        self._emit(sample, now - due, holds_gil=True, kind="blocking_call")
                        self._reported_step(root, mark, sample)
                self._time(root, mark, now)
                return
            if (
                now - self.beat_at > self.threshold  # no heartbeat since before the stall
                and root is not None
                and not self._reported(root, mark)
            ):
                # Nothing ran, not even this thread: a C call on the loop held the GIL and
                # has just returned. Report it now, where the code goes on (never with an
                # empty stack, and never twice for one step).
                self._emit(sample, overslept, holds_gil=True, kind="blocking_call")
                self._reported_step(root, mark, sample)
                self._time(root, mark, now)
                return
        if root is None:
            self._end_run()
            self._root, self._root_mark = None, mark  # idle, waiting in select
            return
        if root is not self._root or mark != self._root_mark:
            # A new step (or the same coroutine stepped again): it is timed from this first
            # look, so a shorter step is never reported.
            self._time(root, mark, now)
            return
        if self._reported(root, mark):
            # Reported already: follow it, to report any other line where the loop waits
            # as long again (the loop thread's CPU time tells waiting from computing).
            self._follow(sample, now, self._cpu[0] if self._cpu_clock is not None else None)
            return
        pause = self._pause
        if now - self._root_since <= self.threshold - pause:
            return
        # A second look, just past the threshold (this one came shortly before it): the
        # same step and no heartbeat in between confirm the stall. Waiting long for the
        # GIL to take it means Python code is computing.
        started = time.monotonic()
        wait = max(pause / 4, self._root_since + self.threshold + self._MARGIN - started)
        time.sleep(wait)
        second = self._sample()
        gil_wait = time.monotonic() - started - wait
        via_tap = sample.via_tap and second.via_tap
        if second.root is not root or (self.tick, second.steps) != mark:
            return  # it has just ended: never blame the frame that follows
        # Python code computing holds the GIL until the interpreter's switch interval
        # ends; a call that waits, or computes in C, lets this thread in at once. A C call
        # holding the GIL lets it in only from the tap's handler, which it runs when it
        # checks for signals (as json's encoder does): both looks came in that way.
        computing = gil_wait > sys.getswitchinterval() / 2
        self._emit(
            second,
            time.monotonic() - self._root_since,
            holds_gil=via_tap,
            kind="blocking_call" if via_tap or not computing else "cpu_bound",
        )
        self._reported_step(root, mark, second)

    def _reported_step(self, root: FrameType, mark: Mark, sample: _Sample) -> None:
        """Note the step just reported (at ``sample``), to report it once, and follow it."""
        self._end_run()
        self._reported_root, self._reported_mark = root, mark
        self._reported_lines = {_lines_of(sample)}
        self._reported_request = sample.request

    def _follow(self, sample: _Sample, now: float, cpu: float | None) -> None:
        """A look at the reported step: the same line as the previous look's extends its
        run, another starts one."""
        run, lines = self._line_run, _lines_of(sample)
        if run is not None and run.lines == lines:
            run.add(sample, now, cpu)
            return
        self._end_run()
        self._line_run = _Run(sample, lines, now, cpu)

    def _end_run(self) -> None:
        """A run of looks at one line of the reported step has ended: a line it was not
        reported at, seen for at least the threshold (from its first look to its last, so
        never longer than it lasted), is reported as a stall of its own, in the request of
        the step."""
        run, self._line_run = self._line_run, None
        if run is None or run.lines in self._reported_lines:
            return
        if run.last - run.since < self.threshold or not run.waiting:
            # Only a call that waits stays at one line look after look: Python code
            # computing is seen wherever the GIL changed hands, so the lines its looks
            # land on are chance (a loop over two helpers was reported again); it was
            # reported once already. Where the CPU clock cannot be read, nothing follows.
            return
        self._reported_lines.add(run.lines)
        sample = run.sample
        sample.request = self._reported_request  # the step's: read while it ran
        self.seen_at = run.last
        self._emit(
            sample, run.last - run.since, holds_gil=False, kind="blocking_call", attribute=False
        )

    def never_awaited(self, frame: FrameType | None) -> None:
        """Report a coroutine dropped unawaited while ``frame`` ran (on the loop thread,
        while the watchdog runs)."""
        if threading.get_ident() == self.loop_thread and self.running:
            sample = _Sample(frame, self.request_codes)
            number = self.request_var.get(None)
            scope = self.in_flight.get(number) if number is not None else None
            if sample.request[0] is None and scope is not None:
                sample.request = _request_of(scope)
            self._emit(sample, 0.0, holds_gil=False, kind="never_awaited")

    def _emit(
        self,
        sample: _Sample,
        duration: float,
        *,
        holds_gil: bool,
        kind: Kind,
        attribute: bool = True,
    ) -> None:
        if attribute and sample.request[0] is None and sample.lines and kind != "never_awaited":
            scope = spawned_request(sample.top, self.anchor, self.request_var, self.in_flight)
            if scope is not None:
                sample.request = _request_of(scope)
        stack = traceback.StackSummary.extract(reversed(sample.lines), capture_locals=False)
        method, path, route = sample.request
        event = BlockingEvent(
            duration=duration,
            stack=stack,
            method=method,
            path=path,
            route=route,
            holds_gil=holds_gil,
            fingerprint=fingerprint(stack),
            kind=kind,
        )
        self._report(event)


_TAPPED_CODE = Watchdog._tapped.__code__


class _Lane:
    """A daemon thread delivering queued events, one at a time, with ``deliver``."""

    def __init__(self, name: str, deliver: Callable[[BlockingEvent], None]) -> None:
        self._name = name
        self._deliver = deliver
        self._queue: queue.SimpleQueue[BlockingEvent | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.dropped = 0

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        # A queue of its own: a thread a stop left in a blocking callback takes its own
        # queue's end, never this one's.
        self._queue = queue.SimpleQueue()
        self._thread = threading.Thread(
            target=self._run,
            args=(self._queue,),
            name=self._name,
            daemon=True,  # a callback that never returns must not keep the process alive
        )
        self._thread.start()

    def put(self, event: BlockingEvent) -> None:
        if self._queue.qsize() >= Dispatcher.MAX_PENDING:
            self.dropped += 1  # stuck: keep the watchdog going
            return
        self._queue.put(event)

    def end(self) -> threading.Thread | None:
        """Have the thread end once it has delivered what is queued; the thread, to join."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
        return thread

    def _run(self, pending: queue.SimpleQueue[BlockingEvent | None]) -> None:
        while True:
            event = pending.get()
            if event is None:
                return
            self._deliver(event)


class Dispatcher:
    """Delivers events to logging and to callbacks, each on a thread of its own, so that a
    slow or failing callback never holds up the watchdog, nor the log. Identical stacks are
    logged at most once per ``log_interval`` (with how many were left out)."""

    MAX_PENDING = 1000

    def __init__(
        self, handlers: Sequence[Callable[[BlockingEvent], None]], log_interval: float
    ) -> None:
        self._handlers = tuple(handlers)
        self._log_interval = log_interval
        self._logged: dict[str, tuple[float, int]] = {}
        self._failed = False
        self._lanes = [_Lane("asgi_guard-blocking-log", self._log)]
        if self._handlers:
            self._lanes.append(_Lane("asgi_guard-blocking-callbacks", self._call))
        self.suppressed = 0

    @property
    def dropped(self) -> int:
        """Events not delivered because a thread had ``MAX_PENDING`` waiting."""
        return sum(lane.dropped for lane in self._lanes)

    def start(self) -> None:
        for lane in self._lanes:
            lane.start()

    def stop(self, timeout: float = 1.0) -> None:
        """End the threads once they have delivered what is queued, waiting ``timeout`` at
        most: a callback cannot be interrupted, so a blocking one is left to end on its own."""
        deadline = time.monotonic() + timeout
        for thread in [lane.end() for lane in self._lanes]:
            if thread is not None:
                thread.join(max(0.0, deadline - time.monotonic()))

    def put(self, event: BlockingEvent) -> None:
        for lane in self._lanes:
            lane.put(event)

    def _call(self, event: BlockingEvent) -> None:
        for handler in self._handlers:
            try:
                handler(event)
            except Exception:
                if not self._failed:
                    self._failed = True
                    logger.exception("asgi_guard: an on_block callback raised; it is ignored")

    def _log(self, event: BlockingEvent) -> None:
        now = time.monotonic()
        last, skipped = self._logged.get(event.fingerprint, (-math.inf, 0))
        if now - last < self._log_interval:
            self._logged[event.fingerprint] = (last, skipped + 1)
            self.suppressed += 1
            return
        self._logged[event.fingerprint] = (now, 0)
        more = f" ({skipped} more like it not logged)" if skipped else ""
        logger.warning(
            "%s%s\n%s",
            event.describe(),
            more,
            "".join(event.stack.format()).rstrip(),
            extra={"asgi_guard_event": event},
        )


#: The longest threshold: a stall of a day is a hung process, not a slow step (and the
#: thread and timer calls a watchdog makes overflow well before a float does).
MAX_THRESHOLD = 86_400.0


def check_settings(threshold: Any, poll: Any) -> None:
    """Raise `ConfigurationError` unless ``0 < poll < threshold <= MAX_THRESHOLD``."""
    _check_seconds(threshold, "threshold")
    _check_seconds(poll, "poll_interval")
    if threshold > MAX_THRESHOLD:
        raise ConfigurationError(
            f"threshold ({threshold}) must be at most {MAX_THRESHOLD:.0f} seconds (a day)"
        )
    if poll >= threshold:
        raise ConfigurationError(
            f"threshold ({threshold}) must be above poll_interval ({poll}): the watchdog "
            "looks every poll_interval, so it cannot see shorter stalls"
        )
