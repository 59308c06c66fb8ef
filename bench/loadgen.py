"""An open-loop HTTP/1.1 load generator: a library for the overload benchmarks, and a CLI.

Open loop. The send times are fixed before the run (:func:`make_schedule`: evenly spaced
or Poisson arrivals from a seeded RNG; :func:`step_schedule`: phases of different rates,
e.g. 1x -> 4x -> 1x) and never wait for a response, so a slow server gets more requests
queued against it, as real clients would do, instead of fewer (what a closed loop like wrk
does). Every latency counts from the request's *scheduled* time, not from when it left:
the generator's own lateness and any wait for a free connection count against the server,
so a stall is not hidden by the requests it kept from being sent (no coordinated omission).

Connections, as a reverse proxy in front of the app would hold them: a pool of at most
``connections`` HTTP/1.1 keep-alive connections to 127.0.0.1, one request at a time on
each, reused most-recently-freed first (so that at a low rate the spare ones sit idle and
the server may close them, as uvicorn does after 5 s). A due request takes a free
connection; if none is free and the pool is not full it opens a new one and waits for it
(its connect counts in its latency); if the pool is full it waits in a FIFO for the next
connection to come free. Every request has a deadline, its scheduled time + ``timeout``;
past it the request is abandoned, counted by where it was: ``timeout-connect`` (its new
connection's TCP connect had not completed: the server's listen backlog is full, say),
``timeout-pool`` (never got a connection), ``timeout-response`` (sent; no full response
yet). The connection of an abandoned request is closed (never reused with a response
pending) and its slot in the pool is free for a new one. A server that answers
``Connection: close`` gets its connection closed and replaced the same way. Refused and
reset connections, and responses cut short, are errors of their own.

Transport: raw asyncio (one ``asyncio.Protocol`` per connection with a small response
parser: status line, headers, a body by ``Content-Length``, chunked or up to the close),
one precomputed ``GET`` for every request. The scheduler is the calling task; responses
are handled in the protocols' callbacks: no task per request or per connection (a task per
connect, and one that expires deadlines). Measured on this 2-core VM against a trivial
uvloop server: 12-20 µs of the generator's CPU per request at 8,000-25,000 requests/s on
uvloop (25,000/s took 30% of a core, with 0.15% late sends), 57 µs on asyncio's loop; at
low rates 100-200 µs, every send being a wake-up of its own. A task per request would
add about 4 µs to each (uvloop), a third of the whole, so there is none.

Late sends. The loops' timers have millisecond resolution (uvloop rounds a delay to the
nearest millisecond, asyncio rounds it up), so the scheduler asks to wake up a little
early and sends what is due within the next millisecond (1.5 ms on asyncio's loop): a
request may leave up to that much *before* its time, and then its latency counts from
when it was sent. A request *dispatched* (handed to a free connection, a connect, or the
FIFO) more than ``late_threshold`` (1 ms) after its scheduled time is *late*: the
generator's own loop was behind (a wait for the pool is not lateness: the request was
dispatched on time). When more than 1% of the requests are late the run is flagged
INVALID (``LoadResult.valid`` false, and a warning). The generator's loop is uvloop where
installed (``--no-uvloop``: asyncio's); garbage collection is off during a run. On a
2-core machine the usual cause of late sends is the CPU: with the server busy on one core
and anything else on the other, an ordinary process's wake-ups wait 1-4 ms for a time
slice (2-13% of the sends were late in such runs). So the CLI makes the generator a
real-time process (:func:`realtime`, ``SCHED_FIFO``, not inherited by children) where it
may (``--no-realtime``: not); what remains are rare stalls of a few ms of the VM itself.

Results (:class:`LoadResult`): counts (scheduled, sent, 2xx, by status, timeouts by where,
errors, late sends, new connections), goodput (2xx answered within ``slo``, 100 ms, per
second of the schedule), latency percentiles for 2xx, rejections (503 and 429) and all
responses, and a series per second of scheduled time (scheduled, sent, 2xx, 2xx within
the SLO, rejected, timed out, errors, p99 of the 2xx), and every request's record.

    python bench/loadgen.py --port 8000 --rate 200 --duration 5
    python bench/loadgen.py --port 8000 --rate 800 --duration 10 --poisson --path /work
    python bench/loadgen.py --port 8000 --steps 200:5,800:5,200:5 --header 'X-Priority: high'

Self-check: ``--self-check`` starts uvicorn (one worker, 127.0.0.1, a free port, no access
log) serving ``bench._overload_apps:unguarded`` (``GET /work``: ~2 ms of CPU and a 1 ms
sleep) and runs ``GET /work`` at each of ``--rates``, one run at a time, each once the server
has gone idle again (an overloaded one works on for a while) and 2 s more:

    python bench/loadgen.py --self-check --rates 100 --duration 5
    python bench/loadgen.py --self-check --rates 400,440,480 --duration 5
    python bench/loadgen.py --self-check --server-loop uvloop --rates 1760 --duration 10

Only 127.0.0.1 (any loopback address) is accepted as a target.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import ipaddress
import json
import math
import os
import platform
import random
import sys
import time
import urllib.request
from collections import deque
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from _machine import Watch
from _wrk import Served, cpu_seconds, print_table

__all__ = [
    "AppServer",
    "Latencies",
    "LoadResult",
    "Phase",
    "Record",
    "Schedule",
    "Second",
    "make_schedule",
    "parse_steps",
    "print_result",
    "realtime",
    "run",
    "run_load",
    "step_schedule",
    "wait_idle",
]

T = TypeVar("T")

#: Error kinds of a request that got no (full) response.
TIMEOUT_CONNECT = "timeout-connect"
TIMEOUT_POOL = "timeout-pool"
TIMEOUT_RESPONSE = "timeout-response"
REFUSED = "refused"
RESET = "reset"
CLOSED = "closed"  # the server closed the connection before the whole response
CONNECT_ERROR = "connect-error"
BAD_RESPONSE = "bad-response"
TIMEOUTS = (TIMEOUT_CONNECT, TIMEOUT_POOL, TIMEOUT_RESPONSE)
REJECTIONS = frozenset({429, 503})

#: Per loop: (how early the scheduler may send, how long before the next send it asks to
#: wake up). uvloop's timers round to the nearest millisecond (so it wakes within 1 ms
#: before the send), asyncio's round up, twice (selectors, then epoll.poll), by up to 2 ms.
_TIMERS = {"uvloop": (0.001, 0.0005), "asyncio": (0.0015, 0.0015)}
_MAX_HEAD = 65536

# Where a request is.
_NEW, _POOL, _CONNECTING, _SENT, _DONE = range(5)
# What the response parser expects next.
_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _TRAILERS, _UNTIL_CLOSE = range(6)


# -- schedules -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Phase:
    """``rate`` requests a second for ``seconds``, from ``start`` seconds into the run."""

    rate: float
    seconds: float
    start: float


@dataclass(frozen=True)
class Schedule:
    """When each request is due, in seconds after the start of the run (sorted).

    Example:
        >>> s = make_schedule(100, 2)
        >>> len(s.offsets), s.duration
        (200, 2.0)
    """

    offsets: tuple[float, ...]
    phases: tuple[Phase, ...]
    poisson: bool = False

    @property
    def duration(self) -> float:
        return sum(p.seconds for p in self.phases)

    def rate_at(self, t: float) -> float:
        """The nominal rate at ``t`` seconds into the run (0 past its end)."""
        for p in self.phases:
            if p.start <= t < p.start + p.seconds:
                return p.rate
        return 0.0

    def describe(self) -> str:
        kind = "Poisson" if self.poisson else "fixed-rate"
        steps = " -> ".join(f"{p.rate:g}/s x {p.seconds:g} s" for p in self.phases)
        return f"{kind} {steps} ({len(self.offsets)} requests)"


def step_schedule(
    steps: Sequence[tuple[float, float]], *, poisson: bool = False, seed: int = 0
) -> Schedule:
    """A schedule of phases, each ``(rate, seconds)``, one after the other.

    Fixed-rate phases space their requests evenly (the first at the phase's start); Poisson
    phases draw exponential gaps from ``random.Random(seed)``, so a seed gives the same
    schedule every time.

    Example:
        >>> s = step_schedule([(200, 5), (800, 5), (200, 5)])
        >>> len(s.offsets)
        6000
    """
    if not steps:
        raise ValueError("a schedule needs at least one phase")
    rng = random.Random(seed)
    offsets: list[float] = []
    phases: list[Phase] = []
    start = 0.0
    for step_rate, step_seconds in steps:
        rate, seconds = float(step_rate), float(step_seconds)
        if not (math.isfinite(rate) and rate >= 0 and math.isfinite(seconds) and seconds > 0):
            raise ValueError(f"bad phase {rate}/s x {seconds} s")
        end = start + seconds
        if rate > 0 and poisson:
            t = start + rng.expovariate(rate)
            while t < end:
                offsets.append(t)
                t += rng.expovariate(rate)
        elif rate > 0:
            k = 0
            while (t := start + k / rate) < end - 1e-9:
                offsets.append(t)
                k += 1
        phases.append(Phase(rate, seconds, start))
        start = end
    return Schedule(tuple(offsets), tuple(phases), poisson)


def make_schedule(
    rate: float, duration: float, *, poisson: bool = False, seed: int = 0
) -> Schedule:
    """``rate`` requests a second for ``duration`` seconds (see :func:`step_schedule`).

    Example:
        >>> s = make_schedule(1000, 1, poisson=True, seed=1)
        >>> len(s.offsets), round(s.offsets[0], 6)
        (968, 0.000144)
    """
    return step_schedule([(rate, duration)], poisson=poisson, seed=seed)


def parse_steps(text: str) -> list[tuple[float, float]]:
    """``"200:5,800:5,200:5"`` -> ``[(200.0, 5.0), (800.0, 5.0), (200.0, 5.0)]``."""
    steps = []
    for part in text.split(","):
        rate, sep, seconds = part.strip().partition(":")
        if not sep:
            raise ValueError(f"a step is RATE:SECONDS, not {part!r}")
        steps.append((float(rate), float(seconds)))
    return steps


# -- results ---------------------------------------------------------------------------------


@dataclass(slots=True)
class Record:
    """One request. Times in seconds after the start of the run.

    ``status`` is the response's (0 when there was none, see ``error``); ``latency`` runs
    from the scheduled time (or the send, if that was earlier) to the end of the response
    or to the failure; ``dispatched``: when the scheduler handed it to a connection, a
    connect or the FIFO; ``sent``: when it was written (nan if never); ``fresh``: it was
    the first request on its connection.
    """

    scheduled: float
    dispatched: float
    sent: float
    status: int
    error: str
    latency: float
    retry_after: bool
    fresh: bool


@dataclass(frozen=True)
class Latencies:
    """Percentiles of some latencies, in milliseconds (nan when ``count`` is 0)."""

    count: int
    p50: float
    p90: float
    p99: float
    max: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Latencies:
        values = sorted(seconds)
        return cls(
            len(values),
            _percentile(values, 50) * 1e3,
            _percentile(values, 90) * 1e3,
            _percentile(values, 99) * 1e3,
            (values[-1] if values else math.nan) * 1e3,
        )


@dataclass(frozen=True)
class Second:
    """The requests scheduled in one second of the run (``second`` <= t < ``second`` + 1)."""

    second: int
    rate: float  # the schedule's nominal rate at the start of the second
    scheduled: int
    sent: int
    ok: int
    ok_in_slo: int
    rejected: int
    timeouts: int
    errors: int
    p99_ok: float  # ms, nan without a 2xx


@dataclass
class LoadResult:
    """What a run measured (latencies in ms in ``Latencies``, times in seconds)."""

    target: str
    schedule: Schedule
    connections: int
    timeout: float
    slo: float
    late_threshold: float
    loop: str
    scheduled: int
    sent: int
    responses: int
    ok: int
    ok_in_slo: int
    rejected: int
    statuses: dict[int, int]
    errors: dict[str, int]  # error kind -> count, timeouts included
    late: int
    lateness_p99: float  # s, dispatch time - scheduled time
    lateness_max: float
    new_connections: int
    goodput: float  # 2xx within the SLO per second of the schedule
    latency_ok: Latencies
    latency_rejected: Latencies
    latency_all: Latencies
    seconds: list[Second]
    wall: float  # the whole run, draining included
    cpu: float  # this process's CPU seconds over the run
    valid: bool  # at most 1% of the requests were dispatched late
    records: list[Record] = field(repr=False)
    warnings: list[str] = field(default_factory=list)

    @property
    def timeouts(self) -> int:
        return sum(self.errors.get(kind, 0) for kind in TIMEOUTS)

    @property
    def timeouts_connect(self) -> int:
        return self.errors.get(TIMEOUT_CONNECT, 0)

    @property
    def timeouts_pool(self) -> int:
        return self.errors.get(TIMEOUT_POOL, 0)

    @property
    def timeouts_response(self) -> int:
        return self.errors.get(TIMEOUT_RESPONSE, 0)

    @property
    def connection_errors(self) -> int:
        """Errors other than timeouts: refused, reset, closed early, bad responses."""
        return sum(n for kind, n in self.errors.items() if kind not in TIMEOUTS)


def _percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of sorted ``values`` (nan when empty)."""
    if not values:
        return math.nan
    return values[max(0, math.ceil(q / 100 * len(values)) - 1)]


# -- the engine ------------------------------------------------------------------------------


class _Flight:
    """A request on its way: raw monotonic times, where it is, the connection it is on."""

    __slots__ = (
        "conn",
        "deadline",
        "dispatched",
        "done",
        "error",
        "fresh",
        "retry_after",
        "scheduled",
        "sent",
        "status",
        "where",
    )

    def __init__(self, scheduled: float, deadline: float) -> None:
        self.scheduled = scheduled
        self.deadline = deadline
        self.dispatched = self.sent = self.done = math.nan
        self.where = _NEW
        self.status = 0
        self.error = ""
        self.retry_after = self.fresh = False
        self.conn: _Conn | None = None


class _Conn(asyncio.Protocol):
    """One keep-alive connection and its response parser; one request at a time."""

    def __init__(self, load: _Load) -> None:
        self.load = load
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None
        self.flight: _Flight | None = None
        self.used = False
        self.closed = False
        self.buf = bytearray()
        self.mode = _HEAD
        self.remaining = 0
        self.close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)  # uvloop's is not a subclass
        self.load.connected(self)

    def data_received(self, data: bytes) -> None:
        if self.flight is None:
            self.load.drop(self)  # bytes nobody asked for: not a connection to reuse
            return
        self.buf += data
        try:
            complete = self._parse()
        except ValueError:
            self.load.fail(self, BAD_RESPONSE)
            return
        if complete:
            self.load.complete(self)

    def eof_received(self) -> bool | None:
        return None  # let the transport close: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.load.lost(self, exc)

    def start(self, flight: _Flight, request: bytes) -> None:
        """Send ``flight``'s request; the parser expects a new response."""
        assert self.transport is not None
        self.flight = flight
        flight.conn = self
        flight.where = _SENT
        flight.fresh = not self.used
        self.used = True
        self.mode = _HEAD
        self.buf.clear()
        flight.sent = time.monotonic()
        self.transport.write(request)

    def _parse(self) -> bool:
        """Consume what has arrived; True once the response is complete."""
        buf = self.buf
        while True:
            mode = self.mode
            if mode == _HEAD:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > _MAX_HEAD:
                        raise ValueError("response head too long")
                    return False
                head = bytes(buf[:end])
                del buf[: end + 4]
                self._head(head)
            elif mode == _LENGTH:
                if len(buf) < self.remaining:
                    self.remaining -= len(buf)
                    buf.clear()
                    return False
                del buf[: self.remaining]
                return True
            elif mode == _CHUNK_SIZE:
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > _MAX_HEAD:
                        raise ValueError("chunk size line too long")
                    return False
                size = int(bytes(buf[:end]).split(b";", 1)[0].strip(), 16)
                del buf[: end + 2]
                if size:
                    self.mode, self.remaining = _CHUNK_DATA, size + 2  # the data and its CRLF
                else:
                    self.mode = _TRAILERS
            elif mode == _CHUNK_DATA:
                if len(buf) < self.remaining:
                    self.remaining -= len(buf)
                    buf.clear()
                    return False
                del buf[: self.remaining]
                self.mode = _CHUNK_SIZE
            elif mode == _TRAILERS:
                end = buf.find(b"\r\n")
                if end < 0:
                    return False
                del buf[: end + 2]
                if end == 0:
                    return True
            else:  # _UNTIL_CLOSE: the body ends with the connection
                buf.clear()
                return False

    def _head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        version, status_text = lines[0].split(b" ", 2)[:2]
        status = int(status_text)
        if not version.startswith(b"HTTP/1."):
            raise ValueError(f"not HTTP/1.x: {lines[0]!r}")
        if 100 <= status < 200:
            return  # an interim response; the real one follows
        flight = self.flight
        assert flight is not None
        flight.status = status
        length = -1
        chunked = False
        keep_alive = version == b"HTTP/1.1"
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                tokens = value.lower()
                if b"close" in tokens:
                    keep_alive = False
                elif b"keep-alive" in tokens:
                    keep_alive = True
            elif name == b"retry-after":
                flight.retry_after = True
        self.close_after = not keep_alive
        if status in (204, 304):
            self.mode, self.remaining = _LENGTH, 0
        elif chunked:
            self.mode = _CHUNK_SIZE
        elif length >= 0:
            self.mode, self.remaining = _LENGTH, length
        else:
            self.mode = _UNTIL_CLOSE
            self.close_after = True


class _Load:
    """The pool, the FIFO and the bookkeeping of one run (all on the loop's thread)."""

    def __init__(
        self, host: str, port: int, request: bytes, connections: int, timeout: float
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.uvloop = type(self.loop).__module__.startswith("uvloop")
        self.host, self.port = host, port
        self.request = request
        self.max = connections
        self.timeout = timeout
        self.idle: list[_Conn] = []  # most recently freed last
        self.waiting: deque[_Flight] = deque()  # the FIFO (abandoned ones left in, skipped)
        self.flights: list[_Flight] = []
        self.expiring: deque[_Flight] = deque()  # dispatched, in deadline order
        self.live: set[_Conn] = set()
        self.tasks: set[asyncio.Task[None]] = set()  # connects under way
        self.open = 0  # connections counted against the pool: connecting, busy or idle
        self.new_connections = 0
        self.outstanding = 0
        self.scheduling = True
        self.drained = asyncio.Event()

    # The scheduler's side.

    async def schedule(self, t0: float, offsets: Sequence[float]) -> None:
        clock = time.monotonic
        early, lead = _TIMERS["uvloop" if self.uvloop else "asyncio"]
        n = len(offsets)
        i = 0
        while i < n:
            horizon = clock() - t0 + early
            while i < n and offsets[i] <= horizon:
                self.dispatch(t0 + offsets[i])
                i += 1
            if i < n:
                await asyncio.sleep(offsets[i] - (clock() - t0) - lead)
        self.scheduling = False
        if not self.outstanding:
            self.drained.set()

    def dispatch(self, scheduled: float) -> None:
        flight = _Flight(scheduled, scheduled + self.timeout)
        flight.dispatched = time.monotonic()
        self.flights.append(flight)
        self.expiring.append(flight)
        self.outstanding += 1
        if self.idle:
            self.idle.pop().start(flight, self.request)
        elif self.open < self.max:
            self.connect(flight)
        else:
            flight.where = _POOL
            self.waiting.append(flight)

    def connect(self, flight: _Flight) -> None:
        conn = _Conn(self)
        self.open += 1
        self.new_connections += 1
        self.live.add(conn)
        flight.where = _CONNECTING
        flight.conn = conn
        conn.flight = flight
        conn.task = task = self.loop.create_task(self._connect(conn))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _connect(self, conn: _Conn) -> None:
        try:
            await self.loop.create_connection(lambda: conn, self.host, self.port)
        except OSError as exc:
            if conn.closed:
                return
            kind = REFUSED if isinstance(exc, ConnectionRefusedError) else CONNECT_ERROR
            flight = conn.flight
            self.retire(conn)
            if flight is not None:
                self.finish(flight, kind)
            self.refill()

    # The connections' side.

    def connected(self, conn: _Conn) -> None:
        flight = conn.flight
        conn.flight = None
        if conn.closed:  # abandoned while connecting
            assert conn.transport is not None
            conn.transport.abort()
            return
        if flight is not None and flight.where == _CONNECTING:
            if time.monotonic() <= flight.deadline:
                conn.start(flight, self.request)
                return
            self.finish(flight, TIMEOUT_CONNECT)
        self.free(conn)

    def complete(self, conn: _Conn) -> None:
        flight = conn.flight
        assert flight is not None
        conn.flight = None
        now = time.monotonic()
        if now > flight.deadline:  # the client would have given up already
            flight.status = 0
            self.finish(flight, TIMEOUT_RESPONSE, now)
        else:
            self.finish(flight, "", now)
        if conn.close_after:
            self.drop(conn)
        else:
            self.free(conn)

    def free(self, conn: _Conn) -> None:
        """``conn`` can take a request: the FIFO's first, else it waits in the pool."""
        while self.waiting:
            flight = self.waiting.popleft()
            if flight.where != _POOL:
                continue  # abandoned already
            if time.monotonic() > flight.deadline:
                self.finish(flight, TIMEOUT_POOL)
                continue
            conn.start(flight, self.request)
            return
        self.idle.append(conn)

    def refill(self) -> None:
        """A slot came free: a new connection for the FIFO's first, if any waits."""
        while self.waiting and self.open < self.max:
            flight = self.waiting.popleft()
            if flight.where == _POOL:
                self.connect(flight)

    def fail(self, conn: _Conn, kind: str) -> None:
        flight = conn.flight
        self.drop(conn)
        if flight is not None and flight.where != _DONE:
            self.finish(flight, kind)

    def drop(self, conn: _Conn) -> None:
        """Close ``conn`` for good (its request, if any, is the caller's) and refill."""
        if conn.closed:
            return
        self.retire(conn)
        if conn.transport is not None:
            conn.transport.abort()
        self.refill()

    def retire(self, conn: _Conn) -> None:
        conn.closed = True
        conn.flight = None
        self.open -= 1
        self.live.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)

    def lost(self, conn: _Conn, exc: Exception | None) -> None:
        if conn.closed:
            return
        flight = conn.flight
        self.retire(conn)
        if flight is not None and flight.where == _SENT:
            if conn.mode == _UNTIL_CLOSE:
                self.finish(flight, "")
            else:
                self.finish(flight, RESET if isinstance(exc, ConnectionResetError) else CLOSED)
        self.refill()

    # Deadlines and the end.

    def finish(self, flight: _Flight, error: str, now: float = 0.0) -> None:
        flight.where = _DONE
        flight.done = now or time.monotonic()
        flight.error = error
        self.outstanding -= 1
        if not self.outstanding and not self.scheduling:
            self.drained.set()

    def expire(self, flight: _Flight) -> None:
        """``flight`` is past its deadline and still out: abandon it where it is."""
        where = flight.where
        conn = flight.conn
        if where == _POOL:
            self.finish(flight, TIMEOUT_POOL)  # stays in the FIFO, skipped later
        elif where == _CONNECTING:
            assert conn is not None
            self.retire(conn)
            if conn.task is not None:
                conn.task.cancel()
            self.finish(flight, TIMEOUT_CONNECT)
            self.refill()
        elif where == _SENT:
            assert conn is not None
            flight.status = 0
            self.finish(flight, TIMEOUT_RESPONSE)
            self.drop(conn)

    async def sweep(self) -> None:
        """Expire requests at their deadlines (they are dispatched in deadline order)."""
        expiring = self.expiring
        while True:
            now = time.monotonic()
            while expiring and (expiring[0].where == _DONE or expiring[0].deadline <= now):
                flight = expiring.popleft()
                if flight.where != _DONE:
                    self.expire(flight)
            wait = expiring[0].deadline - now if expiring else self.timeout
            await asyncio.sleep(max(wait, 0.001))

    def expire_all(self) -> None:
        for flight in self.flights:
            if flight.where != _DONE:
                self.expire(flight)

    async def close(self) -> None:
        """Close every connection and end every connect task, awaiting them."""
        tasks = list(self.tasks)
        for conn in list(self.live):
            conn.closed = True
            if conn.transport is not None:
                conn.transport.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.live.clear()
        self.idle.clear()
        await asyncio.sleep(0)  # let the transports' connection_lost run


def _request_bytes(host: str, port: int, path: str, headers: Sequence[tuple[str, str]]) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}", "User-Agent: asgi-guard-loadgen"]
    lines += [f"{name}: {value}" for name, value in headers]
    for line in lines:
        if "\r" in line or "\n" in line:
            raise ValueError(f"no CR or LF in the request line or headers: {line!r}")
    if not path.startswith("/"):
        raise ValueError(f"the path must start with '/': {path!r}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def run_load(
    host: str,
    port: int,
    schedule: Schedule,
    *,
    path: str = "/",
    headers: Sequence[tuple[str, str]] = (),
    connections: int = 64,
    timeout: float = 2.0,
    slo: float = 0.1,
    late_threshold: float = 0.001,
    lead: float = 0.05,
) -> LoadResult:
    """Send ``schedule``'s requests to ``host:port`` (loopback only) and measure them.

    Args:
        host: a loopback address (``127.0.0.1``).
        port: the server's port.
        schedule: when to send, from :func:`make_schedule` or :func:`step_schedule`.
        path: the path every ``GET`` asks for.
        headers: extra request headers, ``(name, value)`` pairs.
        connections: the most keep-alive connections open at once.
        timeout: seconds from a request's scheduled time to giving it up.
        slo: a 2xx within this many seconds counts towards goodput.
        late_threshold: a request dispatched later than this after its time is late.
        lead: seconds between the call and the schedule's time 0.

    Returns at most ``timeout`` after the last scheduled request, with every connection
    closed and every task it started ended.

    Example:
        >>> result = await run_load("127.0.0.1", 8000, make_schedule(100, 5))  # doctest: +SKIP
        >>> result.ok, result.latency_ok.p99, result.valid  # doctest: +SKIP
        (500, 4.1, True)
    """
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"loopback targets only, not {host}")
    if connections < 1 or not timeout > 0 or not slo > 0:
        raise ValueError("connections >= 1, timeout > 0 and slo > 0")
    load = _Load(host, port, _request_bytes(host, port, path, headers), connections, timeout)
    gc_was_on = gc.isenabled()
    gc.collect()
    gc.disable()
    cpu0 = time.process_time()
    t0 = time.monotonic() + lead
    sweeper = load.loop.create_task(load.sweep())
    try:
        await load.schedule(t0, schedule.offsets)
        last = t0 + (schedule.offsets[-1] if schedule.offsets else 0.0) + timeout
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(load.drained.wait(), max(last - time.monotonic(), 0) + 0.01)
        load.expire_all()
    finally:
        sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sweeper
        await load.close()
        wall = time.monotonic() - t0
        cpu = time.process_time() - cpu0
        if gc_was_on:
            gc.enable()
    return _result(load, schedule, t0, wall, cpu, slo, late_threshold, f"{host}:{port}{path}")


def _result(
    load: _Load,
    schedule: Schedule,
    t0: float,
    wall: float,
    cpu: float,
    slo: float,
    late_threshold: float,
    target: str,
) -> LoadResult:
    records = []
    for f in load.flights:
        start = min(f.scheduled, f.dispatched)
        records.append(
            Record(
                scheduled=f.scheduled - t0,
                dispatched=f.dispatched - t0,
                sent=f.sent - t0,
                status=f.status,
                error=f.error,
                latency=f.done - start,
                retry_after=f.retry_after,
                fresh=f.fresh,
            )
        )
    statuses: dict[int, int] = {}
    errors: dict[str, int] = {}
    ok_lat: list[float] = []
    rejected_lat: list[float] = []
    all_lat: list[float] = []
    lateness = sorted(r.dispatched - r.scheduled for r in records)
    n_seconds = max(1, math.ceil(schedule.duration))
    buckets: list[list[Record]] = [[] for _ in range(n_seconds)]
    for r in records:
        buckets[min(int(r.scheduled), n_seconds - 1)].append(r)
        if r.status:
            statuses[r.status] = statuses.get(r.status, 0) + 1
            all_lat.append(r.latency)
            if 200 <= r.status < 300:
                ok_lat.append(r.latency)
            elif r.status in REJECTIONS:
                rejected_lat.append(r.latency)
        else:
            errors[r.error] = errors.get(r.error, 0) + 1
    seconds = []
    for k, bucket in enumerate(buckets):
        oks = sorted(r.latency for r in bucket if 200 <= r.status < 300)
        seconds.append(
            Second(
                second=k,
                rate=schedule.rate_at(k),
                scheduled=len(bucket),
                sent=sum(1 for r in bucket if not math.isnan(r.sent)),
                ok=len(oks),
                ok_in_slo=sum(1 for x in oks if x <= slo),
                rejected=sum(1 for r in bucket if r.status in REJECTIONS),
                timeouts=sum(1 for r in bucket if r.error in TIMEOUTS),
                errors=sum(1 for r in bucket if r.error and r.error not in TIMEOUTS),
                p99_ok=_percentile(oks, 99) * 1e3,
            )
        )
    ok_in_slo = sum(1 for x in ok_lat if x <= slo)
    late = sum(1 for x in lateness if x > late_threshold)
    result = LoadResult(
        target=target,
        schedule=schedule,
        connections=load.max,
        timeout=load.timeout,
        slo=slo,
        late_threshold=late_threshold,
        loop=type(load.loop).__module__.split(".")[0],
        scheduled=len(records),
        sent=sum(1 for r in records if not math.isnan(r.sent)),
        responses=len(all_lat),
        ok=len(ok_lat),
        ok_in_slo=ok_in_slo,
        rejected=len(rejected_lat),
        statuses=dict(sorted(statuses.items())),
        errors=dict(sorted(errors.items())),
        late=late,
        lateness_p99=_percentile(lateness, 99),
        lateness_max=lateness[-1] if lateness else math.nan,
        new_connections=load.new_connections,
        goodput=ok_in_slo / schedule.duration,
        latency_ok=Latencies.of(ok_lat),
        latency_rejected=Latencies.of(rejected_lat),
        latency_all=Latencies.of(all_lat),
        seconds=seconds,
        wall=wall,
        cpu=cpu,
        valid=late <= 0.01 * len(records),
        records=records,
    )
    if not result.valid:
        result.warnings.append(
            f"INVALID: {late} of {len(records)} requests ({late / len(records):.1%}) were "
            f"dispatched more than {late_threshold * 1e3:g} ms late: the generator fell behind"
        )
    if cpu > 0.8 * wall:
        result.warnings.append(
            f"the generator used {cpu / wall:.0%} of a core: it may be what limits the run"
        )
    return result


def run(coro: Coroutine[Any, Any, T], *, use_uvloop: bool = True) -> T:
    """Run ``coro`` on a new uvloop loop (asyncio's if uvloop is missing or not wanted)."""
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            result: T = uvloop.run(coro)
            return result
    return asyncio.run(coro)


def realtime(priority: int = 10) -> str:
    """Put this process in the real-time class (``SCHED_FIFO``), if allowed; say what happened.

    On a small machine the server and anything else running take both cores, and an
    ordinary process's wake-ups then wait for a time slice: a millisecond or more, which
    makes sends late. A real-time process runs as soon as it wakes. The generator needs
    a few percent of a core, so it takes little from the server. Children started later
    (``SCHED_RESET_ON_FORK``) are ordinary processes again. Needs root or CAP_SYS_NICE;
    Linux only.
    """
    policy = getattr(os, "SCHED_FIFO", None)
    if policy is None or not hasattr(os, "sched_setscheduler"):
        return "real-time scheduling not available here"
    try:
        os.sched_setscheduler(
            0, policy | getattr(os, "SCHED_RESET_ON_FORK", 0), os.sched_param(priority)
        )
    except OSError as exc:
        return f"real-time scheduling refused ({exc.strerror}): ordinary process"
    return f"SCHED_FIFO priority {priority}"


# -- printing --------------------------------------------------------------------------------


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.1f}"


def print_result(result: LoadResult, *, series: bool = True) -> None:
    """The result as tables: counts, latencies, and (``series``) one line per second."""
    s = result.schedule
    print(
        f"{result.target}: {s.describe()}, {result.connections} connections, timeout "
        f"{result.timeout:g} s, SLO {result.slo * 1e3:g} ms, generator loop {result.loop}"
    )
    statuses = ", ".join(f"{k}: {v}" for k, v in result.statuses.items()) or "-"
    others = {k: v for k, v in result.errors.items() if k not in TIMEOUTS}
    rows = [
        ["measure", "value"],
        ["scheduled", f"{result.scheduled}"],
        ["sent", f"{result.sent}"],
        ["responses by status", statuses],
        ["2xx", f"{result.ok}"],
        [f"2xx within {result.slo * 1e3:g} ms", f"{result.ok_in_slo}"],
        ["goodput (2xx within SLO / s)", f"{result.goodput:.1f}"],
        ["rejected (503/429)", f"{result.rejected}"],
        [
            "  with Retry-After",
            f"{sum(r.retry_after for r in result.records if r.status in REJECTIONS)}",
        ],
        ["timeouts: connecting", f"{result.timeouts_connect}"],
        ["timeouts: waiting for a pool connection", f"{result.timeouts_pool}"],
        ["timeouts: waiting for the response", f"{result.timeouts_response}"],
        ["connection errors", ", ".join(f"{k}: {v}" for k, v in others.items()) or "0"],
        ["new connections", f"{result.new_connections}"],
        [
            f"late dispatches (> {result.late_threshold * 1e3:g} ms)",
            f"{result.late} ({result.late / max(result.scheduled, 1):.2%})",
        ],
        [
            "dispatch lateness p99 / max, ms",
            f"{result.lateness_p99 * 1e3:.2f} / {result.lateness_max * 1e3:.2f}",
        ],
        [
            "generator CPU",
            f"{result.cpu:.2f} s over {result.wall:.1f} s ({result.cpu / result.wall:.0%} "
            f"of a core, {result.cpu / max(result.scheduled, 1) * 1e6:.0f} µs/request)",
        ],
    ]
    print_table(rows, left=2)
    print()
    lat = [["latency, ms", "count", "p50", "p90", "p99", "max"]]
    for name, x in (
        ("2xx", result.latency_ok),
        ("rejected", result.latency_rejected),
        ("all responses", result.latency_all),
    ):
        lat.append([name, f"{x.count}", _ms(x.p50), _ms(x.p90), _ms(x.p99), _ms(x.max)])
    print_table(lat)
    if series:
        print()
        rows = [
            ["second", "rate", "sched", "sent", "2xx", "in SLO", "rej", "t/o", "err", "p99 2xx"]
        ]
        for b in result.seconds:
            rows.append(
                [
                    f"{b.second}",
                    f"{b.rate:g}",
                    f"{b.scheduled}",
                    f"{b.sent}",
                    f"{b.ok}",
                    f"{b.ok_in_slo}",
                    f"{b.rejected}",
                    f"{b.timeouts}",
                    f"{b.errors}",
                    _ms(b.p99_ok),
                ]
            )
        print_table(rows, left=0)
    for warning in result.warnings:
        print(f"WARNING: {warning}")


# -- the self-check --------------------------------------------------------------------------


@dataclass(kw_only=True)
class AppServer(Served):
    """A uvicorn serving an app of ``bench/_overload_apps.py``; ready when ``/health`` answers
    (the self-check's server, and the base of ``overload.py``'s)."""

    label: str = "bench._overload_apps:unguarded"

    def wait_ready(self, timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"uvicorn exited:\n{self.log_tail(2000)}")
            try:
                url = f"http://127.0.0.1:{self.port}/health"
                with urllib.request.urlopen(url, timeout=1) as response:
                    health: dict[str, Any] = json.loads(response.read())
                    return health
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"port {self.port} did not answer within {timeout} s")


def wait_idle(pid: int, limit: float) -> float:
    """Wait (at most ``limit`` s) until ``pid`` uses under 10% of a core; return the wait.

    An overloaded server goes on working through requests whose clients have gone."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        before = sum(cpu_seconds(pid))
        time.sleep(0.5)
        if sum(cpu_seconds(pid)) - before < 0.05:
            break
    return time.monotonic() - start


def _self_check(args: argparse.Namespace) -> int:
    """Serve ``bench._overload_apps:unguarded`` and run the generator at ``args.rates``."""
    server = AppServer()
    server.start(server.label, args.server_loop, "auto")
    try:
        health = server.wait_ready()
        print(
            f"python {platform.python_version()}, nproc {os.cpu_count()}; uvicorn --loop "
            f"{args.server_loop} on 127.0.0.1:{server.port}, GET /work burns "
            f"{health['work_cpu_ms']} ms of CPU (calibrated at import) + a 1 ms sleep; "
            f"generator: {args.scheduling}"
        )
        rows = [
            ["rate/s", "sent", "2xx", "in SLO", "goodput/s", "p50", "p99", "max",
             "t/o conn", "t/o pool", "t/o resp", "errors", "new conn", "late", "gen CPU",
             "server CPU"],
        ]  # fmt: skip
        for rate in args.rates:
            watch = Watch.start()
            assert server.proc is not None
            server0 = sum(cpu_seconds(server.proc.pid))
            result = run(
                run_load(
                    "127.0.0.1",
                    server.port,
                    make_schedule(rate, args.duration, poisson=args.poisson, seed=args.seed),
                    path="/work",
                    connections=args.connections,
                    headers=args.header,
                    timeout=args.timeout,
                    slo=args.slo / 1e3,
                    late_threshold=args.late / 1e3,
                ),
                use_uvloop=not args.no_uvloop,
            )
            server_cpu = sum(cpu_seconds(server.proc.pid)) - server0
            print(f"\n== {rate:g} req/s: {watch.summary()}")
            print_result(result, series=args.series)
            lat = result.latency_ok
            rows.append(
                [f"{rate:g}", f"{result.sent}", f"{result.ok}", f"{result.ok_in_slo}",
                 f"{result.goodput:.0f}", _ms(lat.p50), _ms(lat.p99), _ms(lat.max),
                 f"{result.timeouts_connect}", f"{result.timeouts_pool}",
                 f"{result.timeouts_response}", f"{result.connection_errors}",
                 f"{result.new_connections}", f"{result.late}",
                 f"{result.cpu / result.wall:.0%}", f"{server_cpu / result.wall:.0%}"]
            )  # fmt: skip
            waited = wait_idle(server.proc.pid, limit=60.0)
            if waited > 1:
                print(f"(the server worked on for {waited:.0f} s after the run)")
            if args.pause:
                time.sleep(args.pause)
    finally:
        server.stop(timeout=5)
    print("\nsummary (latencies of 2xx, ms)")
    print_table(rows, left=0)
    return 0


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"a header is 'Name: value', not {text!r}")
    return name.strip(), value.strip()


def _rates(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1", help="a loopback address")
    parser.add_argument("--port", type=int, help="the server's port")
    parser.add_argument("--rate", type=float, default=100.0, help="requests/s (default 100)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds (default 5)")
    parser.add_argument("--steps", help="phases RATE:SECONDS,... instead of --rate/--duration")
    parser.add_argument("--poisson", action="store_true", help="Poisson arrivals")
    parser.add_argument("--seed", type=int, default=0, help="the Poisson RNG's seed")
    parser.add_argument("--connections", type=int, default=64, help="pool size (default 64)")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds (default 2)")
    parser.add_argument("--slo", type=float, default=100.0, help="ms (default 100)")
    parser.add_argument("--late", type=float, default=1.0, help="late threshold, ms")
    parser.add_argument("--path", default="/")
    parser.add_argument(
        "--header", action="append", type=_header, default=[], help="'Name: value' (repeatable)"
    )
    parser.add_argument("--no-uvloop", action="store_true", help="asyncio's loop, not uvloop")
    parser.add_argument(
        "--no-realtime", action="store_true", help="stay an ordinary process (no SCHED_FIFO)"
    )
    parser.add_argument("--no-series", action="store_true", help="no per-second table")
    self_check = parser.add_argument_group("self-check (serves bench._overload_apps itself)")
    self_check.add_argument("--self-check", action="store_true")
    self_check.add_argument("--server-loop", choices=["asyncio", "uvloop"], default="asyncio")
    self_check.add_argument("--rates", type=_rates, default=[100.0], help="comma-separated")
    self_check.add_argument("--series", action="store_true", help="per-second tables too")
    self_check.add_argument(
        "--pause", type=float, default=2.0, help="s between runs, once the server is idle"
    )
    args = parser.parse_args(argv)
    args.scheduling = "ordinary process" if args.no_realtime else realtime()
    if args.self_check:
        return _self_check(args)
    if args.port is None:
        parser.error("--port is required (or --self-check)")
    try:
        schedule = (
            step_schedule(parse_steps(args.steps), poisson=args.poisson, seed=args.seed)
            if args.steps
            else make_schedule(args.rate, args.duration, poisson=args.poisson, seed=args.seed)
        )
    except ValueError as exc:
        parser.error(str(exc))
    watch = Watch.start()
    result = run(
        run_load(
            args.host,
            args.port,
            schedule,
            path=args.path,
            headers=args.header,
            connections=args.connections,
            timeout=args.timeout,
            slo=args.slo / 1e3,
            late_threshold=args.late / 1e3,
        ),
        use_uvloop=not args.no_uvloop,
    )
    print_result(result, series=not args.no_series)
    print(f"generator: {args.scheduling}; machine: {watch.summary()}")
    return 0 if result.valid else 1


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
