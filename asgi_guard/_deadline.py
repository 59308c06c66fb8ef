"""Deadlines: a request's budget, the task that enforces budgets, and what handlers read.

Every guarded request gets a `Budget`. Instead of a timer per request, one `Keeper` task
per event loop holds the budgets in a heap and wakes only when the earliest live one is due:
registering a request is a heap push, and a request that completes in time costs nothing
more. At a budget's deadline the keeper cancels the request's cancel scope and, when
nothing was sent yet, answers the client itself, so the answer is on time even when the
handler cannot be cancelled (a sync endpoint in a worker thread).
"""

from __future__ import annotations

import asyncio
import logging
import math
import sys
import threading
from collections.abc import Callable, Coroutine
from contextvars import Context, ContextVar
from heapq import heapify, heappop, heappush
from itertools import count
from time import monotonic
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
from starlette.types import Receive, Scope, Send

from ._errors import ConfigurationError

if TYPE_CHECKING:
    import httpx

__all__ = [
    "Budget",
    "Keeper",
    "LoopCheck",
    "current_loop",
    "deadline",
    "httpx_timeout",
    "outbound_timeout",
    "remaining",
    "settle",
]

logger = logging.getLogger("asgi_guard.timeout")

_current: ContextVar[Budget | None] = ContextVar("asgi_guard_budget", default=None)

#: The keeper's shortest sleep when idle: budgets shorter than this wake it.
MIN_HORIZON = 0.01
#: How often the keeper retries cancelling a request that sits in a shielded section.
RETRY = 0.01
#: How long a deadline that falls while the server writes a response's start waits for
#: the app's next message once the start is written: a response whose body follows
#: completes instead of being cut.
START_GRACE = 0.05
#: How long past its due time a deadline waits for a start being written at most.
START_WRITE_LIMIT = 1.0


def _anyio_task_states() -> Any:
    """anyio's per-task cancel-scope state on asyncio, when it has the shape we rely on."""
    if sys.version_info < (3, 11):  # no Task.uncancel(): cancel scopes only
        return None
    try:
        from anyio._backends import _asyncio as backend

        states = backend._task_states
        probe = backend.CancelScope()
        if not (hasattr(probe, "_parent_scope") and hasattr(probe, "shield")):
            return None
    except (ImportError, AttributeError):  # pragma: no cover - another anyio layout
        return None
    return states


#: anyio's task states, or None where requests must run in anyio cancel scopes.
_TASK_STATES = _anyio_task_states()


def innermost_scope(task: asyncio.Task[Any]) -> object:
    """The anyio cancel scope ``task`` is in right now (``None`` outside any)."""
    state = _TASK_STATES.get(task)
    return state.cancel_scope if state is not None else None


def _shielded(task: asyncio.Task[Any], outer: object) -> bool:
    """Whether ``task`` is inside a shielded anyio cancel scope (a worker thread, a cleanup)
    entered within ``outer`` (the scope around the middleware: shields out there are not
    the request's to honour)."""
    scope = innermost_scope(task)
    while scope is not None and scope is not outer:
        if scope.shield:  # type: ignore[attr-defined]
            return True
        scope = scope._parent_scope  # type: ignore[attr-defined]
    return False


#: The smallest timeout `outbound_timeout` returns: a call with no time left fails fast
#: instead of being given "no timeout" (which 0 means to some clients).
MIN_OUTBOUND = 0.001


class Budget:
    """One request's time: its deadline and the state the keeper and the middleware share.

    Times are `time.monotonic` seconds. ``deadline_at`` is the request's deadline;
    ``idle_at`` and ``body_at`` are the streaming idle and body-read limits, ``inf``
    when unused. The keeper acts at the earliest of the three.
    """

    __slots__ = (
        "active",
        "answer_done",
        "answered",
        "arrival",
        "body_at",
        "caller",
        "caller_at",
        "cancel_scope",
        "cancels",
        "complete",
        "context",
        "deadline_at",
        "fired",
        "fired_at",
        "graced",
        "idle_at",
        "keeper",
        "max_timeout",
        "outer_scope",
        "receive",
        "scheduled",
        "scope",
        "send",
        "started",
        "task",
        "timeout",
        "writing_start",
    )

    def __init__(
        self,
        arrival: float,
        timeout: float,
        max_timeout: float,
        scope: Scope | None = None,
        receive: Receive | None = None,
        send: Send | None = None,
    ) -> None:
        self.arrival = arrival
        self.timeout = timeout
        self.max_timeout = max_timeout
        self.deadline_at = arrival + timeout
        self.caller = math.inf
        self.caller_at = math.inf
        self.idle_at = math.inf
        self.body_at = math.inf
        self.scheduled = math.inf
        #: Whether the keeper must still watch it (not finished, not yet fired).
        self.active = True
        self.complete = False
        self.started = False
        #: While the server writes the response's start (a send that yields, as every send
        #: on trio does), and when the keeper first waited for it (0.0: never).
        self.writing_start = False
        self.graced = 0.0
        self.answered = False
        self.fired: str | None = None
        self.fired_at = 0.0
        self.answer_done: anyio.Event | None = None
        self.cancel_scope: anyio.CancelScope | None = None
        #: On asyncio: the request's task, cancelled natively, and how many times.
        self.task: asyncio.Task[Any] | None = None
        self.cancels = 0
        self.outer_scope: object = None
        #: The request's context, for the answer the keeper sends on its behalf.
        self.context: Context | None = None
        self.keeper: Keeper | None = None
        self.scope = scope
        self.receive = receive
        self.send = send

    @property
    def due(self) -> float:
        """When the keeper must act: the earliest of the deadline and the idle and body limits."""
        due = self.deadline_at
        if self.idle_at < due:
            due = self.idle_at
        if self.body_at < due:
            due = self.body_at
        return due

    def remaining(self) -> float:
        """Seconds left before the deadline (never negative)."""
        left = self.deadline_at - monotonic()
        return left if left > 0.0 else 0.0

    def set_timeout(self, seconds: float) -> None:
        """Make the request's budget ``seconds`` from its arrival (a caller's tighter
        deadline still applies)."""
        self.timeout = seconds
        at = self.arrival + seconds
        self.deadline_at = at if at < self.caller_at else self.caller_at
        self.reschedule()

    def set_caller_timeout(self, seconds: float) -> None:
        """Apply a deadline the caller asked for; it can only tighten the request's own."""
        self.caller = seconds
        self.caller_at = self.arrival + seconds
        if self.caller_at < self.deadline_at:
            self.deadline_at = self.caller_at

    def reschedule(self) -> None:
        """Tell the keeper when the budget is next due, if that moved earlier."""
        due = self.due
        if self.active and due < self.scheduled and self.keeper is not None:
            self.keeper.schedule(self, due)

    def stop(self) -> None:
        """The keeper no longer watches it: it fired, or the response is complete."""
        if self.active:
            self.active = False
            if self.keeper is not None:
                self.keeper.live -= 1

    def completed(self) -> None:
        """The response is complete: the deadline no longer applies."""
        self.complete = True
        self.stop()

    def finish(self) -> None:
        """The app returned: stop, and drop the references to the request (a finished
        budget may wait in the keeper's heap until its due time)."""
        if self.active:
            self.active = False
            if self.keeper is not None:
                self.keeper.live -= 1
        self.scope = self.receive = self.send = None
        self.task = self.cancel_scope = self.context = self.outer_scope = None

    @property
    def seconds(self) -> float:
        """Seconds from arrival to the deadline (after a caller's or a route's say)."""
        return self.timeout if self.timeout < self.caller else self.caller


#: What the keeper calls at a budget's due time: ``fire(budget, now)``.
FireFunc = Callable[[Budget, float], None]
#: What the keeper runs, in a task of its own, when it must answer a request.
AnswerFunc = Callable[[Budget], Coroutine[Any, Any, None]]


def current_loop() -> object:
    """An identity for the running event loop: the asyncio loop or the trio run's token."""
    loop = asyncio._get_running_loop()  # None, not an exception, outside asyncio
    if loop is not None:
        return loop
    import trio

    return trio.lowlevel.current_trio_token()


def settle(future: asyncio.Future[Any], value: object = None) -> None:
    """Give ``future`` its result unless it has one (or was cancelled): how a timer
    handle, or whoever comes first, ends an asyncio wait."""
    if not future.done():
        future.set_result(value)


class LoopCheck:
    """Tells cheaply whether code runs on the asyncio loop a middleware is bound to.

    Finding the running loop costs a system call before Python 3.12 (``getpid``: 0.8 µs
    in process, several in a busy server on a small VM), on every request. A thread runs
    one event loop at a time, so code running in the thread that bound an asyncio loop,
    while that loop runs, runs on it: a thread id and a flag, no system call. Anything
    else (another thread, a loop that stopped, trio) says no, and the caller looks the
    loop up as before."""

    __slots__ = ("_thread", "loop")

    def __init__(self) -> None:
        #: The bound loop (None: unbound).
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread = 0

    def bind(self, loop: object) -> None:
        """``loop`` runs in this thread now (anything but an asyncio loop unbinds)."""
        if isinstance(loop, asyncio.AbstractEventLoop):
            self.loop, self._thread = loop, threading.get_ident()
        else:
            self.loop, self._thread = None, 0

    def holds(self) -> bool:
        """The bound loop runs, in this thread: it is the running loop."""
        loop = self.loop
        return loop is not None and self._thread == threading.get_ident() and loop.is_running()


class Keeper:
    """The task that fires due budgets, one per event loop per middleware.

    ``horizon`` is the shortest usual budget: the keeper never sleeps longer than that, so
    a new budget (due at least that far ahead) is pushed without waking it. A shorter
    budget (a route's tighter deadline) wakes it once and shortens the horizon to match.
    """

    __slots__ = (
        "_answer",
        "_answers",
        "_fire",
        "_heap",
        "_retries",
        "_seq",
        "_target",
        "_wake",
        "alive",
        "cancel_scope",
        "horizon",
        "live",
        "loop",
        "native",
        "task",
    )

    #: Rebuild the heap once stale entries outnumber live ones by this much.
    SLACK = 1024

    def __init__(self, loop: object, fire: FireFunc, answer: AnswerFunc, horizon: float) -> None:
        self.loop = loop
        self.horizon = horizon
        self._fire = fire
        self._answer = answer
        self._heap: list[tuple[float, int, Budget]] = []
        self._seq = count()
        self._target = math.inf
        self._wake = anyio.Event()
        self._answers: set[asyncio.Task[None]] = set()
        self.live = 0
        self.alive = True
        self.task: object = None
        #: The running backend's cancel scope class: instantiating it directly skips
        #: anyio's per-call backend lookup, a third of a cancel scope's cost.
        self.cancel_scope: type[anyio.CancelScope] = type(anyio.CancelScope())
        #: Cancel requests natively, as `asyncio.timeout` does, instead of entering an
        #: anyio cancel scope per request (most of the cost of a timed request). Cancelling
        #: waits while the request is in a shielded anyio section (a worker thread), so
        #: threads are never abandoned. asyncio on Python 3.11+ only.
        self.native = _TASK_STATES is not None and isinstance(loop, asyncio.AbstractEventLoop)
        #: ``(when, budget)``: cancellations to deliver again (a request still shielded,
        #: or a handler still running after it was cancelled once).
        self._retries: list[tuple[float, Budget]] = []

    def add(self, budget: Budget) -> None:
        """Watch a new budget."""
        budget.keeper = self
        self.live += 1
        heap = self._heap
        if len(heap) > 2 * self.live + self.SLACK:
            # Finished budgets stay in the heap until their due time; drop them in bulk so
            # memory follows the number of requests in flight, not the request rate.
            # Entries superseded by an earlier one for the same budget go too: a live budget
            # keeps exactly one.
            heap[:] = [e for e in heap if e[2].active and e[0] == e[2].scheduled]
            heapify(heap)
        at = budget.scheduled = budget.due
        heappush(heap, (at, next(self._seq), budget))
        if at < self._target:
            self._target = at
            self._wake.set()

    def schedule(self, budget: Budget, at: float) -> None:
        budget.scheduled = at
        heappush(self._heap, (at, next(self._seq), budget))
        if at < self._target:
            self._target = at
            self._wake.set()
            # Budgets this short are usual here (a route's deadline): sleep no longer than
            # them from now on, so the next ones need no wake-up.
            ahead = at - monotonic()
            if ahead < self.horizon:
                self.horizon = max(ahead, MIN_HORIZON)

    def cancel(self, budget: Budget, now: float) -> None:
        """Cancel the request of ``budget`` where it awaits.

        On asyncio the request's task is cancelled natively, and again every `RETRY`
        seconds while the app has not returned (anyio cancel scopes are level-triggered
        too); while the task is in a shielded section, it is left alone until it leaves.
        """
        task = budget.task
        if task is None:
            if budget.cancel_scope is not None:
                budget.cancel_scope.cancel()
            return  # a cancel scope, or an app that has returned
        if task.done():
            return
        if not _shielded(task, budget.outer_scope):
            budget.cancels += 1
            task.cancel("asgi_guard: request deadline")
        self._retries.append((now + RETRY, budget))
        if now + RETRY < self._target:
            self._target = now + RETRY
            self._wake.set()

    def spawn(self, budget: Budget) -> None:
        """Answer ``budget``'s client in a task of its own, in the request's context."""
        budget.answer_done = anyio.Event()
        context = budget.context or Context()
        loop = self.loop
        if isinstance(loop, asyncio.AbstractEventLoop):
            task = context.run(loop.create_task, self._answer(budget))
            self._answers.add(task)  # the loop keeps only weak references to tasks
            task.add_done_callback(self._answers.discard)
        else:
            import trio

            trio.lowlevel.spawn_system_task(self._answer, budget, context=context)

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Fire budgets as they fall due, until cancelled."""
        try:
            task_status.started()
            while True:
                now = monotonic()
                self._fire_due(now)
                if self._retries:
                    self._retry_due(now)
                heap = self._heap
                # Sleep at most one horizon (the shortest usual budget): a request arriving
                # meanwhile is due later than that and need not wake us.
                self._target = now + self.horizon
                if heap and heap[0][0] < self._target:
                    self._target = heap[0][0]
                for when, _ in self._retries:
                    if when < self._target:
                        self._target = when
                if self._wake.is_set():
                    self._wake = anyio.Event()
                with anyio.move_on_after(self._target - now):
                    await self._wake.wait()
        finally:
            self.alive = False

    def _retry_due(self, now: float) -> None:
        retries = self._retries
        self._retries = [item for item in retries if item[0] > now]
        for when, budget in retries:
            if when <= now:
                self.cancel(budget, now)

    async def run_detached(self) -> None:
        """`run` as a free-standing task (no lifespan): it ends with the event loop."""
        try:
            await self.run()
        except anyio.get_cancelled_exc_class():
            raise
        except BaseException:  # pragma: no cover - run() itself never fails
            logger.exception("asgi_guard: the timeout keeper stopped")

    def _fire_due(self, now: float) -> None:
        heap = self._heap
        while heap:
            at, _, budget = heap[0]
            if not budget.active:
                heappop(heap)
                continue
            if at > now:
                return
            heappop(heap)
            if at != budget.scheduled:
                continue  # superseded by an earlier entry for the same budget
            due = budget.due
            if due > now:
                # The deadline moved later (a looser route timeout, a fresh chunk).
                budget.scheduled = due
                heappush(heap, (due, next(self._seq), budget))
                continue
            try:
                self._fire(budget, now)
            except Exception:  # pragma: no cover - a bug in fire must not stop the keeper
                logger.exception("asgi_guard: firing a request deadline failed")


def spawn_task(loop: object, run: Callable[[], Coroutine[Any, Any, None]]) -> object:
    """Start ``run()`` outside any task group, as a task of ``loop`` that ends with it.

    It runs in an empty context (not the current request's, which it would keep alive).
    Returns the asyncio task, which the caller must keep (the loop keeps only weak
    references to tasks); ``None`` on trio (a system task).
    """
    context = Context()
    if isinstance(loop, asyncio.AbstractEventLoop):
        return context.run(loop.create_task, run())
    import trio

    trio.lowlevel.spawn_system_task(run, context=context)
    return None


def spawn_detached(keeper: Keeper) -> None:
    """Start ``keeper.run`` outside any task group: a task of the running loop."""
    keeper.task = spawn_task(keeper.loop, keeper.run_detached)


def remaining() -> float | None:
    """Seconds left before the current request's deadline, or ``None``.

    ``None`` outside a request guarded by ``TimeoutMiddleware``, and once its response is
    complete (background tasks run with no deadline). Works in code the handler calls,
    including sync ``def`` endpoints and dependencies run in worker threads.

    Examples:
        >>> remaining() is None  # outside a request
        True
    """
    budget = _current.get()
    if budget is None or budget.complete:
        return None
    return budget.remaining()


def deadline() -> float | None:
    """The current request's deadline on the anyio clock (`anyio.current_time`), or ``None``.

    Use it for your own cancel scopes:
    ``with anyio.CancelScope(deadline=deadline() or math.inf):`` (``None`` where
    `remaining` is ``None``: on exempt paths, in background tasks, outside a request). Call
    it from async code (it reads the event loop's clock).
    """
    budget = _current.get()
    if budget is None or budget.complete:
        return None
    return anyio.current_time() + (budget.deadline_at - monotonic())


def outbound_timeout(default: float | None = None, *, reserve: float = 0.0) -> float | None:
    """A timeout for an outbound call that fits in what is left of the request's budget.

    Args:
        default: The call's own timeout, used as is outside a guarded request and as an
            upper bound inside one. ``None``: no bound of its own.
        reserve: Seconds kept back for the handler to build its answer after the call.

    Returns:
        ``min(default, remaining() - reserve)``, at least one millisecond so that a call
        with no time left fails fast; ``default`` outside a guarded request.

    Examples:
        >>> outbound_timeout(5.0)  # outside a request: the default
        5.0
    """
    _check_seconds(reserve, "reserve", allow_zero=True)
    if default is not None:
        _check_seconds(default, "default")
    left = remaining()
    if left is None:
        return default
    left = max(MIN_OUTBOUND, left - reserve)
    return left if default is None or left < default else default


def httpx_timeout(
    default: float | None = 5.0, *, connect: float | None = None, reserve: float = 0.0
) -> httpx.Timeout:
    """An ``httpx.Timeout`` bounded by the request's remaining budget.

    Every phase (connect, read, write, pool) gets `outbound_timeout`; ``connect`` bounds
    the connect phase further. Needs httpx (``pip install httpx``).

    Examples:
        >>> httpx_timeout(2.0, connect=0.5)  # outside a request
        Timeout(connect=0.5, read=2.0, write=2.0, pool=2.0)
    """
    import httpx

    total = outbound_timeout(default, reserve=reserve)
    connect_timeout = total
    if connect is not None:
        _check_seconds(connect, "connect")
        connect_timeout = connect if total is None or connect < total else total
    return httpx.Timeout(total, connect=connect_timeout)


#: The largest finite float: a larger int has no float value (``math.isfinite`` raises).
_LARGEST = sys.float_info.max


def _is_number(value: object) -> bool:
    """An int or a float (not a bool), and not NaN."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _check_seconds(value: Any, name: str, *, allow_zero: bool = False) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not -_LARGEST < value < _LARGEST  # infinite, NaN, or an int too large for a float
        or value < 0
        or (value == 0 and not allow_zero)
    ):
        qualifier = "non-negative" if allow_zero else "positive"
        raise ConfigurationError(f"{name} must be a {qualifier}, finite number of seconds")
