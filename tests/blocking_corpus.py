"""The blocking corpus: ways to block the event loop from an ``async def`` handler, and
legitimate async code that must never be reported.

Every case is a small function taking the `Lab`. A *blocking* case blocks the loop for
about `STALL` (twice the corpus `THRESHOLD`); the line that blocks ends with ``# BLOCKS``
(several lines when the blocking code is a loop: any of them is the right answer), and
``lab.begin()`` right before it marks when the stall starts. A *legitimate* case awaits,
or moves the blocking work to a thread, a process or an async client.

`Lab` holds what the cases need, built once: slow servers on 127.0.0.1 (TCP and HTTP,
answering after `STALL`), data sized on this machine so that each CPU-bound case takes
about `STALL`, scratch files and a thread pool. `build_app` mounts every case at a route
of its own (``/blocking/{name}/{item}``, ``/legit/{name}/{item}``) behind a `Recorder`
that notes, per request, when the stall began and when the request ended.
"""

from __future__ import annotations

import bz2
import concurrent.futures
import contextlib
import gc
import hashlib
import http.client
import http.server
import inspect
import json
import lzma
import math
import os
import pickle
import queue
import random
import re
import select
import selectors
import shutil
import socket
import socketserver
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from time import sleep as nap  # bound at import, long before any detector starts
from types import TracebackType
from typing import Any, Literal, cast

import anyio
import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from asgi_guard import BlockingDetectorMiddleware, BlockingEvent

__all__ = [
    "BLOCKING",
    "BY_NAME",
    "LEGIT",
    "MIXED_BLOCKING",
    "MIXED_LEGIT",
    "STALL",
    "THRESHOLD",
    "UNDER_THRESHOLD",
    "Case",
    "Lab",
    "Recorder",
    "Stall",
    "Verdict",
    "build_app",
    "case_of",
    "culprit",
    "judge",
    "misattributed",
]

#: The detector threshold the corpus is built for (seconds).
THRESHOLD = 0.1
#: How long each blocking case blocks the loop: twice the threshold.
STALL = 2 * THRESHOLD
#: How long the legitimate cases take: longer than the threshold, so a report is possible.
LONG = 1.5 * STALL
#: What the calibration aims at: above `STALL`, as machine noise cuts both ways. Twice it:
#: a case must block 1.5 thresholds, and on these shared VMs the same loop has run twice as
#: fast a few seconds after its calibration (at 1.5 times `STALL`, CI runs failed on cases
#: that blocked too briefly).
_AIM = 2 * STALL

MARK = "# BLOCKS"


# -- the request record -------------------------------------------------------------------


@dataclass
class Stall:
    """One request through the corpus app: when its blocking line began, when it ended."""

    method: str
    path: str
    began: float | None = None
    ended: float | None = None


_STALL: ContextVar[Stall | None] = ContextVar("blocking_corpus_stall", default=None)


class Recorder:
    """Raw ASGI: records a `Stall` per HTTP request, in ``lab.stalls`` once it ends."""

    def __init__(self, app: ASGIApp, lab: Lab) -> None:
        self.app = app
        self.lab = lab

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        stall = Stall(scope["method"], scope["path"])
        token = _STALL.set(stall)
        try:
            await self.app(scope, receive, send)
        finally:
            stall.ended = time.monotonic()
            _STALL.reset(token)
            self.lab.stalls.append(stall)


# -- slow servers on 127.0.0.1 --------------------------------------------------------------


class _LateTCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class _LateReply(socketserver.BaseRequestHandler):
    """Answers one line, ``STALL`` seconds after the client connected."""

    def handle(self) -> None:
        time.sleep(STALL)
        with contextlib.suppress(OSError):
            self.request.sendall(b"late\n")


class _LateHTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True


class _LateHTTP(http.server.BaseHTTPRequestHandler):
    """``GET /?delay=seconds`` answers 200 after ``delay`` (default ``STALL``)."""

    def do_GET(self) -> None:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        time.sleep(float(query.get("delay", [str(STALL)])[0]))
        body = b"late"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return None


# -- calibration --------------------------------------------------------------------------


def _timed(run: Callable[[Any], object], value: Any) -> float:
    started = time.perf_counter()
    run(value)
    return time.perf_counter() - started


def _fit(
    run: Callable[[Any], object],
    make: Callable[[int], Any] = lambda n: n,
    *,
    start: int = 1,
    exponent: float = 1.0,
    verify: bool = False,
) -> int:
    """The n at which ``run(make(n))`` takes about `STALL` (only ``run`` is timed; a little
    more in fact, so that machine noise rarely makes a case too short to be reported).

    Probes double n until one takes an eighth of that (the best of two there), then a
    power law, time ~ n ** exponent, gives n. ``verify`` then times n again (the best of
    two: the case runs warm) and, while it falls short of the aim, grows it by a quarter at
    most, up to four times; it never shrinks it (for costs that grow faster than they seem:
    memory, the collector). Shrinking it after one slow timing once left a pickle case
    blocking 130 ms in CI, under the 150 ms a case must block.
    """
    n = start
    while (took := _timed(run, value := make(n))) < _AIM / 8:
        n *= 2
    took = min(took, _timed(run, value))
    del value
    scale: float = (_AIM / took) ** (1 / exponent)
    n = max(1, math.ceil(n * scale))
    for _ in range(4 if verify else 0):
        value = make(n)
        took = min(_timed(run, value), _timed(run, value))
        del value
        if took >= _AIM:
            break
        n = max(n + 1, math.ceil(n * min(1.25, (_AIM / took) ** (1 / exponent))))
    return n


def _fit_exponential(run: Callable[[int], object], start: int) -> int:
    """The smallest n with ``run(n)`` taking at least `STALL`, for costs that grow by a
    constant factor per step (backtracking, naive recursion)."""
    n = start
    while (took := _timed(run, n)) < _AIM / 16:
        n += 1
    growth: float = _timed(run, n + 1) / took
    steps: float = math.log(_AIM / took) / math.log(max(growth, 1.2))
    return n + max(0, math.ceil(steps))


class _Records:
    """Distinct small dicts, as many as asked for (built once, shared by the cases)."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def __call__(self, n: int) -> list[dict[str, Any]]:
        items = self.items
        items.extend(
            {"id": i, "name": f"user-{i}", "score": i / 7, "tags": ["a", "b"], "ok": i % 2 == 0}
            for i in range(len(items), n)
        )
        return items[:n]


def _flat(n: int) -> list[object]:
    """Strings and numbers, no containers: decoding it gives the collector nothing to do,
    so its cost does not depend on what else the process holds."""
    return [f"user-{i}" if i % 2 else i / 7 for i in range(n)]


def _fib(n: int) -> int:
    return n if n < 2 else _fib(n - 1) + _fib(n - 2)


def _nested(outer: int) -> int:
    total = 0
    for i in range(outer):
        for j in range(1000):
            total += i ^ j
    return total


_LINES = b"2024-06-11T10:00:00,customer-000000,ORDER,42.50,EUR,shipped\n" * 10_000


def _write_lines(path: Path, units: int) -> Path:
    """A CSV-like file of ``units`` times 10,000 lines."""
    with open(path, "wb") as file:
        for _ in range(units):
            file.write(_LINES)
    return path


def _count_lines(path: Path) -> int:
    with open(path) as file:
        return sum(1 for _ in file)


# -- the lab ------------------------------------------------------------------------------


class Lab:
    """Everything the cases need; ``with Lab() as lab:`` starts it and cleans up.

    Attributes:
        sizes: Per-case sizes fitted so the case blocks about `STALL` on this machine.
        stalls: A `Stall` per request the `Recorder` saw, in the order they ended.
    """

    def __init__(self) -> None:
        self.sizes: dict[str, int] = {}
        self.stalls: list[Stall] = []
        self._closers: list[Callable[[], object]] = []

    # -- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> Lab:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        while self._closers:
            self._closers.pop()()

    def _start(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="blocking-corpus-"))
        self._closers.append(lambda: shutil.rmtree(self.dir, ignore_errors=True))
        self.pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="corpus")
        self._closers.append(lambda: self.pool.shutdown(wait=False, cancel_futures=True))

        tcp = _LateTCPServer(("127.0.0.1", 0), _LateReply)
        self._serve(tcp)
        self.late_tcp = ("127.0.0.1", int(tcp.server_address[1]))
        web = _LateHTTPServer(("127.0.0.1", 0), _LateHTTP)
        self._serve(web)
        self.late_http = ("127.0.0.1", int(web.server_address[1]))
        self.late_url = f"http://127.0.0.1:{self.late_http[1]}/"
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

        self._calibrate()

    def _serve(self, server: socketserver.BaseServer) -> None:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()

        def stop() -> None:
            server.shutdown()
            server.server_close()
            thread.join(1)

        self._closers.append(stop)

    def _calibrate(self) -> None:
        # The collector runs as in production, but not over the lab's own big objects.
        gc.collect()
        gc.freeze()
        self._closers.append(gc.unfreeze)
        rng = random.Random(20240611)
        noise = rng.randbytes(8 << 20)
        sizes = self.sizes

        def grow(n: int) -> memoryview:
            nonlocal noise
            while len(noise) < n:
                noise += rng.randbytes(len(noise))
            return memoryview(noise)[:n]

        sizes["sha3"] = _fit(lambda b: hashlib.sha3_512(b).digest(), grow, start=1 << 20)
        sizes["pbkdf2"] = _fit(
            lambda n: hashlib.pbkdf2_hmac("sha256", b"password", b"salt", n), start=10_000
        )
        sizes["scrypt"] = _fit(
            lambda n: hashlib.scrypt(b"password", salt=b"salt", n=2**14, r=8, p=n)
        )
        sizes["zlib"] = _fit(lambda b: zlib.compress(b, 9), grow, start=256 << 10)
        sizes["bz2"] = _fit(bz2.compress, grow, start=64 << 10)
        sizes["lzma"] = _fit(lzma.compress, grow, start=64 << 10)
        self.noise = grow(max(sizes[k] for k in ("sha3", "zlib", "bz2", "lzma")))

        records = _Records()
        sizes["json_dumps"] = _fit(json.dumps, records, start=10_000)
        sizes["pickle_dumps"] = _fit(pickle.dumps, records, start=10_000, verify=True)
        self.records = records(sizes["json_dumps"])
        self.pickle_records = records(sizes["pickle_dumps"])
        sizes["json_loads"] = _fit(json.loads, lambda n: json.dumps(_flat(n)), start=100_000)
        self.json_text = json.dumps(_flat(sizes["json_loads"]))
        sizes["pickle_loads"] = _fit(
            pickle.loads, lambda n: pickle.dumps(_flat(n)), start=100_000, verify=True
        )
        self.pickled = pickle.dumps(_flat(sizes["pickle_loads"]))
        sizes["sorted"] = _fit(
            sorted, lambda n: [rng.random() for _ in range(n)], start=1 << 17, verify=True
        )
        self.floats = [rng.random() for _ in range(sizes["sorted"])]
        gc.freeze()

        sizes["regex"] = _fit_exponential(lambda n: re.match(r"(a|aa)+$", "a" * n + "b"), 20)
        self.backtracking = "a" * sizes["regex"] + "b"
        sizes["sum_range"] = _fit(lambda n: sum(range(n)), start=1 << 20)
        sizes["factorial"] = _fit(math.factorial, start=20_000, exponent=1.7)
        sizes["nested_for"] = _fit(_nested, start=200)
        sizes["fib"] = _fit_exponential(_fib, 20)
        sizes["listcomp"] = _fit(lambda n: [x for x in range(n) if x % 1009 == 0], start=1 << 19)
        sizes["genexpr"] = _fit(lambda n: sum(x * x for x in range(n)), start=1 << 19)

        self.text_file = self.dir / "big.csv"
        sizes["lines"] = _fit(_count_lines, lambda n: _write_lines(self.text_file, n), start=4)
        _write_lines(self.text_file, sizes["lines"])

    # -- what the cases call --------------------------------------------------------------

    def begin(self) -> None:
        """Mark the start of the stall: the next line blocks."""
        stall = _STALL.get()
        if stall is not None:
            stall.began = time.monotonic()

    def data(self, name: str) -> memoryview:
        """Incompressible bytes, as many as case ``name`` needs."""
        return self.noise[: self.sizes[name]]

    def later(self, action: Callable[..., object], *args: object) -> None:
        """Run ``action(*args)`` on another thread, `STALL` seconds from now."""
        timer = threading.Timer(STALL, action, args)
        timer.daemon = True
        timer.start()

    def held_lock(self) -> threading.Lock:
        """A lock that another thread holds for the next `STALL` seconds."""
        lock = threading.Lock()
        held = threading.Event()

        def hold() -> None:
            with lock:
                held.set()
                time.sleep(STALL)

        threading.Thread(target=hold, daemon=True).start()
        held.wait(5)
        return lock


def _connect(address: tuple[str, int]) -> None:
    with contextlib.suppress(OSError):
        socket.create_connection(address, timeout=5).close()


def _write(fd: int, data: bytes) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, data)


# == the blocking corpus ====================================================================
# -- sleeps ---------------------------------------------------------------------------------


async def time_sleep(lab: Lab) -> None:
    lab.begin()
    time.sleep(STALL)  # BLOCKS


async def sleep_alias_bound_at_import(lab: Lab) -> None:
    lab.begin()
    nap(STALL)  # BLOCKS


async def sleep_in_a_sync_helper(lab: Lab) -> None:
    def wait_for_backend() -> None:
        time.sleep(STALL)  # BLOCKS

    lab.begin()
    wait_for_backend()


async def sleep_in_an_awaited_coroutine(lab: Lab) -> None:
    async def fetch_user() -> str:
        time.sleep(STALL)  # BLOCKS
        return "user"

    lab.begin()
    await fetch_user()


async def sleep_after_an_await(lab: Lab) -> None:
    await anyio.sleep(0.01)
    lab.begin()
    time.sleep(STALL)  # BLOCKS


async def many_short_sleeps(lab: Lab) -> None:
    lab.begin()
    for _ in range(20):
        time.sleep(STALL / 20)  # BLOCKS


# -- sockets and HTTP -----------------------------------------------------------------------


async def socket_recv_late_reply(lab: Lab) -> None:
    with socket.create_connection(lab.late_tcp, timeout=5) as sock:
        lab.begin()
        sock.recv(16)  # BLOCKS


async def socket_makefile_readline(lab: Lab) -> None:
    with socket.create_connection(lab.late_tcp, timeout=5) as sock, sock.makefile("rb") as reply:
        lab.begin()
        reply.readline()  # BLOCKS


async def socket_accept_late_client(lab: Lab) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        lab.later(_connect, listener.getsockname()[:2])
        lab.begin()
        connection, _ = listener.accept()  # BLOCKS
        connection.close()


async def socket_recv_until_timeout(lab: Lab) -> None:
    quiet, other = socket.socketpair()
    with quiet, other, contextlib.suppress(TimeoutError):
        quiet.settimeout(STALL)
        lab.begin()
        quiet.recv(1)  # BLOCKS


async def urllib_urlopen(lab: Lab) -> None:
    lab.begin()
    with lab.opener.open(lab.late_url, timeout=5) as reply:  # BLOCKS
        reply.read()


async def http_client_getresponse(lab: Lab) -> None:
    connection = http.client.HTTPConnection(*lab.late_http, timeout=5)
    try:
        connection.request("GET", "/")
        lab.begin()
        connection.getresponse().read()  # BLOCKS
    finally:
        connection.close()


async def select_select(lab: Lab) -> None:
    quiet, other = socket.socketpair()
    with quiet, other:
        lab.begin()
        select.select([quiet], [], [], STALL)  # BLOCKS


async def select_poll(lab: Lab) -> None:
    quiet, other = socket.socketpair()
    with quiet, other:
        poller = select.poll()
        poller.register(quiet, select.POLLIN)
        lab.begin()
        poller.poll(STALL * 1000)  # BLOCKS


async def selectors_select(lab: Lab) -> None:
    quiet, other = socket.socketpair()
    with quiet, other, selectors.DefaultSelector() as selector:
        selector.register(quiet, selectors.EVENT_READ)
        lab.begin()
        selector.select(STALL)  # BLOCKS


async def os_read_pipe_late_writer(lab: Lab) -> None:
    read, write = os.pipe()
    try:
        lab.later(_write, write, b"x")
        lab.begin()
        os.read(read, 1)  # BLOCKS
    finally:
        os.close(read)
        os.close(write)


# -- files --------------------------------------------------------------------------------


async def write_and_fsync(lab: Lab) -> None:
    chunk = lab.noise[: 1 << 20]
    with open(lab.dir / "out.bin", "wb") as file:
        lab.begin()
        until = time.monotonic() + STALL
        while time.monotonic() < until:  # BLOCKS
            file.write(chunk)  # BLOCKS
            os.fsync(file.fileno())  # BLOCKS


async def read_big_file(lab: Lab) -> None:
    lab.begin()
    with open(lab.text_file) as file:
        sum(1 for _ in file)  # BLOCKS


# -- processes ----------------------------------------------------------------------------


async def subprocess_run(lab: Lab) -> None:
    lab.begin()
    subprocess.run(["sleep", str(STALL)], check=True)  # BLOCKS


async def subprocess_run_capture_output(lab: Lab) -> None:
    lab.begin()
    subprocess.run(["sleep", str(STALL)], capture_output=True, check=True)  # BLOCKS


async def subprocess_check_output(lab: Lab) -> None:
    lab.begin()
    subprocess.check_output(["sh", "-c", f"sleep {STALL}; echo done"])  # BLOCKS


async def os_system(lab: Lab) -> None:
    lab.begin()
    os.system(f"sleep {STALL}")  # BLOCKS


async def os_popen_read(lab: Lab) -> None:
    lab.begin()
    with os.popen(f"sleep {STALL}; echo done") as pipe:
        pipe.read()  # BLOCKS


# -- threads and their primitives ---------------------------------------------------------


async def lock_held_by_another_thread(lab: Lab) -> None:
    lock = lab.held_lock()
    lab.begin()
    lock.acquire()  # BLOCKS
    lock.release()


async def event_wait_timeout(lab: Lab) -> None:
    lab.begin()
    threading.Event().wait(STALL)  # BLOCKS


async def condition_wait_timeout(lab: Lab) -> None:
    condition = threading.Condition()
    with condition:
        lab.begin()
        condition.wait(STALL)  # BLOCKS


async def semaphore_acquire_timeout(lab: Lab) -> None:
    lab.begin()
    threading.Semaphore(0).acquire(timeout=STALL)  # BLOCKS


async def queue_get_timeout(lab: Lab) -> None:
    lab.begin()
    with contextlib.suppress(queue.Empty):
        queue.Queue[int]().get(timeout=STALL)  # BLOCKS


async def thread_join(lab: Lab) -> None:
    worker = threading.Thread(target=time.sleep, args=(STALL,))
    worker.start()
    lab.begin()
    worker.join()  # BLOCKS


async def future_result(lab: Lab) -> None:
    lab.begin()
    lab.pool.submit(time.sleep, STALL).result()  # BLOCKS


async def futures_wait(lab: Lab) -> None:
    lab.begin()
    concurrent.futures.wait([lab.pool.submit(time.sleep, STALL)])  # BLOCKS


# -- hashing and compression (C code that releases the GIL) -------------------------------


async def sha3_big_data(lab: Lab) -> None:
    lab.begin()
    hashlib.sha3_512(lab.data("sha3")).hexdigest()  # BLOCKS


async def pbkdf2_password_hash(lab: Lab) -> None:
    lab.begin()
    hashlib.pbkdf2_hmac("sha256", b"password", b"salt", lab.sizes["pbkdf2"])  # BLOCKS


async def scrypt_password_hash(lab: Lab) -> None:
    lab.begin()
    hashlib.scrypt(b"password", salt=b"salt", n=2**14, r=8, p=lab.sizes["scrypt"])  # BLOCKS


async def zlib_compress(lab: Lab) -> None:
    lab.begin()
    zlib.compress(lab.data("zlib"), 9)  # BLOCKS


async def bz2_compress(lab: Lab) -> None:
    lab.begin()
    bz2.compress(lab.data("bz2"))  # BLOCKS


async def lzma_compress(lab: Lab) -> None:
    lab.begin()
    lzma.compress(lab.data("lzma"))  # BLOCKS


# -- serialisation and regexes (C code that holds the GIL) --------------------------------


async def json_dumps_huge(lab: Lab) -> int:
    lab.begin()
    text = json.dumps(lab.records)  # BLOCKS
    return len(text)


async def json_loads_huge(lab: Lab) -> int:
    lab.begin()
    value = json.loads(lab.json_text)  # BLOCKS
    return len(value)


async def pickle_dumps_huge(lab: Lab) -> int:
    lab.begin()
    data = pickle.dumps(lab.pickle_records)  # BLOCKS
    return len(data)


async def pickle_loads_huge(lab: Lab) -> int:
    lab.begin()
    value = pickle.loads(lab.pickled)  # BLOCKS
    return len(value)


async def regex_backtracking(lab: Lab) -> bool:
    lab.begin()
    found = re.match(r"(a|aa)+$", lab.backtracking)  # BLOCKS
    return bool(found)


async def sum_over_range(lab: Lab) -> int:
    lab.begin()
    total = sum(range(lab.sizes["sum_range"]))  # BLOCKS
    return abs(total)


async def sort_big_list(lab: Lab) -> int:
    lab.begin()
    ordered = sorted(lab.floats)  # BLOCKS
    return len(ordered)


async def big_factorial(lab: Lab) -> int:
    lab.begin()
    value = math.factorial(lab.sizes["factorial"])  # BLOCKS
    return abs(value.bit_length())


async def sleep_then_parse_holding_the_gil(lab: Lab) -> int:
    lab.begin()
    time.sleep(0.75 * STALL)  # BLOCKS
    value = json.loads(lab.json_text)  # BLOCKS
    return len(value)


# -- pure-Python CPU work -----------------------------------------------------------------


async def while_loop(lab: Lab) -> None:
    lab.begin()
    until = time.monotonic() + STALL
    spins = 0
    while time.monotonic() < until:  # BLOCKS
        spins += 1  # BLOCKS


async def nested_for_loops(lab: Lab) -> None:
    lab.begin()
    total = 0
    for i in range(lab.sizes["nested_for"]):  # BLOCKS
        for j in range(1000):  # BLOCKS
            total += i ^ j  # BLOCKS


async def naive_recursion(lab: Lab) -> None:
    def fib(n: int) -> int:
        return n if n < 2 else fib(n - 1) + fib(n - 2)  # BLOCKS

    lab.begin()
    fib(lab.sizes["fib"])


async def list_comprehension(lab: Lab) -> None:
    lab.begin()
    multiples = [x for x in range(lab.sizes["listcomp"]) if x % 1009 == 0]  # BLOCKS
    del multiples


async def generator_sum(lab: Lab) -> None:
    lab.begin()
    sum(x * x for x in range(lab.sizes["genexpr"]))  # BLOCKS


async def queue_put_loop(lab: Lab) -> None:
    jobs: queue.Queue[int] = queue.Queue()
    lab.begin()
    until = time.monotonic() + STALL
    while time.monotonic() < until:  # BLOCKS
        jobs.put(1)  # BLOCKS


# -- blocking in tasks the request spawned ------------------------------------------------


async def blocks_in_a_task_group_child(lab: Lab) -> None:
    async def child() -> None:
        lab.begin()
        time.sleep(STALL)  # BLOCKS

    async with anyio.create_task_group() as group:
        group.start_soon(child)


async def blocks_in_a_streaming_body(lab: Lab) -> Response:
    async def body() -> AsyncIterator[bytes]:
        yield b"first "
        lab.begin()
        time.sleep(STALL)  # BLOCKS
        yield b"second"

    return StreamingResponse(body())


async def blocks_in_a_background_task(lab: Lab) -> Response:
    async def send_email() -> None:
        lab.begin()
        time.sleep(STALL)  # BLOCKS

    return PlainTextResponse("ok", background=BackgroundTask(send_email))


# == the legitimate corpus: must never be reported =========================================


async def sleeps_in_a_loop(lab: Lab) -> None:
    for _ in range(6):
        await anyio.sleep(LONG / 6)


async def many_short_awaits(lab: Lab) -> None:
    for _ in range(3000):
        await anyio.sleep(0)


async def to_thread_sleep(lab: Lab) -> None:
    await anyio.to_thread.run_sync(time.sleep, LONG)


async def run_in_threadpool_sleep(lab: Lab) -> None:
    await run_in_threadpool(time.sleep, LONG)


async def to_thread_gil_holding_work(lab: Lab) -> None:
    await anyio.to_thread.run_sync(json.dumps, lab.records)


async def cpu_bursts_beside_a_gil_holding_thread(lab: Lab) -> None:
    # The worker thread's C call holds the GIL for longer than the threshold, so the loop,
    # mid-burst, cannot run either: the loop is starved, but not by its own code.
    async with anyio.create_task_group() as group:
        group.start_soon(partial(anyio.to_thread.run_sync, json.dumps, lab.records))
        for _ in range(10):
            until = time.monotonic() + THRESHOLD / 5
            while time.monotonic() < until:
                pass
            await anyio.sleep(0)


async def streaming_with_awaits(lab: Lab) -> Response:
    async def body() -> AsyncIterator[bytes]:
        for chunk in range(6):
            await anyio.sleep(LONG / 6)
            yield b"chunk %d\n" % chunk

    return StreamingResponse(body())


async def short_cpu_bursts(lab: Lab) -> None:
    for _ in range(60):
        until = time.monotonic() + 0.005
        while time.monotonic() < until:
            pass
        await anyio.sleep(0)


async def bursts_separated_by_checkpoints(lab: Lab) -> None:
    # Each burst is a step of its own, 0.7 thresholds long: with nothing else to run, the
    # loop runs the next one at once, and they must not be timed as one.
    for burst in range(6):
        if burst % 2:
            time.sleep(0.7 * THRESHOLD)
        else:
            until = time.monotonic() + 0.7 * THRESHOLD
            while time.monotonic() < until:
                pass
        await (anyio.lowlevel.checkpoint() if burst % 3 else anyio.sleep(0))


async def background_task_that_awaits(lab: Lab) -> Response:
    async def later() -> None:
        await anyio.sleep(LONG)

    return PlainTextResponse("ok", background=BackgroundTask(later))


async def sync_background_task(lab: Lab) -> Response:
    return PlainTextResponse("ok", background=BackgroundTask(time.sleep, LONG))


async def anyio_path_io(lab: Lab) -> None:
    path = anyio.Path(lab.dir / "async.bin")
    await path.write_bytes(bytes(lab.noise[: 8 << 20]))
    await path.read_bytes()


async def task_group_children(lab: Lab) -> None:
    async def child(delay: float) -> None:
        await anyio.sleep(delay)

    async with anyio.create_task_group() as group:
        for i in range(5):
            group.start_soon(child, LONG * (i + 1) / 5)


def sync_endpoint_sleeps(lab: Lab) -> None:
    time.sleep(LONG)


def sync_endpoint_computes(lab: Lab) -> None:
    until = time.monotonic() + LONG
    while time.monotonic() < until:
        pass


async def event_set_later(lab: Lab) -> None:
    event = anyio.Event()

    async def setter() -> None:
        await anyio.sleep(LONG)
        event.set()

    async with anyio.create_task_group() as group:
        group.start_soon(setter)
        await event.wait()


async def httpx_async_client(lab: Lab) -> None:
    # ``verify=False``: the URL is plain HTTP, and building the default TLS context loads
    # the CA bundle, which really blocks (233 ms for the first client of a process on this
    # VM, 43 ms after): the detector rightly reported it on slow runs.
    async with httpx.AsyncClient(trust_env=False, timeout=5, verify=False) as client:
        reply = await client.get(lab.late_url, params={"delay": LONG})
        reply.raise_for_status()


async def anyio_tcp_late_reply(lab: Lab) -> None:
    async with await anyio.connect_tcp(*lab.late_tcp) as stream:
        await stream.receive()


async def anyio_run_process(lab: Lab) -> None:
    await anyio.run_process(["sleep", str(LONG)])


async def anyio_lock_contention(lab: Lab) -> None:
    lock = anyio.Lock()
    held = anyio.Event()

    async def holder() -> None:
        async with lock:
            held.set()
            await anyio.sleep(LONG)

    async with anyio.create_task_group() as group:
        group.start_soon(holder)
        await held.wait()
        async with lock:
            pass


async def memory_stream_pipeline(lab: Lab) -> None:
    send, receive = anyio.create_memory_object_stream[int]()

    async def producer() -> None:
        async with send:
            for item in range(6):
                await anyio.sleep(LONG / 6)
                await send.send(item)

    async with anyio.create_task_group() as group:
        group.start_soon(producer)
        async with receive:
            async for _ in receive:
                pass


async def move_on_after_long_sleep(lab: Lab) -> None:
    with anyio.move_on_after(LONG):
        await anyio.sleep(10)


async def thread_pool_future_awaited(lab: Lab) -> None:
    future = lab.pool.submit(time.sleep, LONG)
    while not future.done():
        await anyio.sleep(0.01)


async def sleep_just_under_the_threshold(lab: Lab) -> None:
    time.sleep(0.9 * THRESHOLD)


# == the corpus ==============================================================================

CaseFunc = Callable[[Lab], object]
Kind = Literal["blocking_call", "cpu_bound"]


@dataclass(frozen=True)
class Case:
    """One case of the corpus.

    Attributes:
        run: The case: ``async def`` (or, for legitimate cases only, a ``def`` endpoint).
        family: What kind of blocking (or ``"legit"``).
        holds_gil: A C call that holds the GIL: reported only once it returns, at the
            marked line or the line right after (where the code went on).
        kind: The `BlockingEvent.kind` expected (``None``: either is right).
        lines: The marked lines (none for a legitimate case).
    """

    run: CaseFunc
    family: str
    holds_gil: bool = False
    kind: Kind | None = "blocking_call"
    lines: frozenset[int] = field(init=False)
    filename: str = field(init=False)

    def __post_init__(self) -> None:
        source, first = inspect.getsourcelines(self.run)
        marked = frozenset(first + i for i, line in enumerate(source) if MARK in line)
        if self.blocking != bool(marked):
            raise ValueError(f"{self.name}: blocking cases, and only they, mark {MARK!r}")
        object.__setattr__(self, "lines", marked)
        object.__setattr__(self, "filename", inspect.getsourcefile(self.run) or "")

    @property
    def name(self) -> str:
        return self.run.__name__

    @property
    def blocking(self) -> bool:
        return self.family != "legit"

    @property
    def route(self) -> str:
        """The route template the case is mounted at."""
        return f"/{'blocking' if self.blocking else 'legit'}/{self.name}/{{item}}"

    def path(self, item: int = 7) -> str:
        return self.route.replace("{item}", str(item))

    @property
    def expected_lines(self) -> frozenset[int]:
        """Where a report may point: the marked lines (and, for a C call holding the GIL,
        the line right after, where the code went on when the watchdog could look)."""
        if self.holds_gil:
            return self.lines | {line + 1 for line in self.lines}
        return self.lines


def _family(family: str, *runs: CaseFunc, **expected: Any) -> tuple[Case, ...]:
    return tuple(Case(run, family, **expected) for run in runs)


BLOCKING: tuple[Case, ...] = (
    *_family(
        "sleeps",
        time_sleep,
        sleep_alias_bound_at_import,
        sleep_in_a_sync_helper,
        sleep_in_an_awaited_coroutine,
        sleep_after_an_await,
        many_short_sleeps,
    ),
    *_family(
        "sockets, HTTP, select",
        socket_recv_late_reply,
        socket_makefile_readline,
        socket_accept_late_client,
        socket_recv_until_timeout,
        urllib_urlopen,
        http_client_getresponse,
        select_select,
        select_poll,
        selectors_select,
        os_read_pipe_late_writer,
    ),
    *_family("files", write_and_fsync, read_big_file, kind=None),
    *_family(
        "processes",
        subprocess_run,
        subprocess_run_capture_output,
        subprocess_check_output,
        os_system,
        os_popen_read,
    ),
    *_family(
        "threads, locks, futures",
        lock_held_by_another_thread,
        event_wait_timeout,
        condition_wait_timeout,
        semaphore_acquire_timeout,
        queue_get_timeout,
        thread_join,
        future_result,
        futures_wait,
    ),
    *_family(
        "hashing, compression",
        sha3_big_data,
        pbkdf2_password_hash,
        scrypt_password_hash,
        zlib_compress,
        bz2_compress,
        lzma_compress,
    ),
    *_family(
        "C calls holding the GIL",
        json_dumps_huge,
        json_loads_huge,
        pickle_dumps_huge,
        pickle_loads_huge,
        regex_backtracking,
        sum_over_range,
        sort_big_list,
        big_factorial,
        holds_gil=True,
    ),
    *_family("a call, then C code holding the GIL", sleep_then_parse_holding_the_gil),
    *_family(
        "pure-Python CPU",
        while_loop,
        nested_for_loops,
        naive_recursion,
        list_comprehension,
        generator_sum,
        queue_put_loop,
        kind="cpu_bound",
    ),
    *_family(
        "in tasks the request spawned",
        blocks_in_a_task_group_child,
        blocks_in_a_streaming_body,
        blocks_in_a_background_task,
    ),
)

LEGIT: tuple[Case, ...] = _family(
    "legit",
    sleeps_in_a_loop,
    many_short_awaits,
    to_thread_sleep,
    run_in_threadpool_sleep,
    to_thread_gil_holding_work,
    cpu_bursts_beside_a_gil_holding_thread,
    streaming_with_awaits,
    short_cpu_bursts,
    bursts_separated_by_checkpoints,
    background_task_that_awaits,
    sync_background_task,
    anyio_path_io,
    task_group_children,
    sync_endpoint_sleeps,
    sync_endpoint_computes,
    event_set_later,
    httpx_async_client,
    anyio_tcp_late_reply,
    anyio_run_process,
    anyio_lock_contention,
    memory_stream_pipeline,
    move_on_after_long_sleep,
    thread_pool_future_awaited,
    kind=None,
)

#: Not legitimate code, but shorter than the threshold: never to be reported either.
UNDER_THRESHOLD = Case(sleep_just_under_the_threshold, "legit", kind=None)

BY_NAME = {case.name: case for case in (*BLOCKING, *LEGIT, UNDER_THRESHOLD)}

#: The concurrent mixed load: a blocking case of each family whose attribution is not
#: already known to fail alone, and legitimate cases that keep the loop busy meanwhile.
MIXED_BLOCKING = tuple(
    BY_NAME[name]
    for name in (
        "time_sleep",
        "sleep_after_an_await",
        "socket_recv_late_reply",
        "subprocess_run",
        "zlib_compress",
        "json_dumps_huge",
        "sum_over_range",
        "while_loop",
    )
)
MIXED_LEGIT = tuple(
    BY_NAME[name]
    for name in (
        "sleeps_in_a_loop",
        "many_short_awaits",
        "to_thread_sleep",
        "streaming_with_awaits",
        "short_cpu_bursts",
        "task_group_children",
        "sync_endpoint_sleeps",
        "event_set_later",
        "anyio_tcp_late_reply",
        "anyio_lock_contention",
        "memory_stream_pipeline",
        "move_on_after_long_sleep",
    )
)


# -- judging reports ----------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """How the detector did on one request to a blocking case."""

    reports: int
    request: bool = False
    line: bool = False
    gil_label: bool = False
    kind: bool = False
    found: tuple[str, ...] = ()

    @property
    def perfect(self) -> bool:
        return not self.found


def judge(case: Case, method: str, events: Sequence[BlockingEvent]) -> Verdict:
    """Compare the reports made during one request to ``case`` with what is expected:
    exactly one, naming the request (method, path, route), at a marked line, with the
    right GIL label and kind."""
    if not events:
        return Verdict(0, found=("not reported",))
    event = events[0]
    found = [] if len(events) == 1 else [f"{len(events)} reports instead of 1"]
    request = (event.method, event.path, event.route)
    wanted = (method, case.path(), case.route)
    if request != wanted:
        found.append(f"request {event.method} {event.path} (route {event.route})")
    where = event.location
    at = (where.filename, where.lineno) if where is not None else None
    line = at in {(case.filename, n) for n in case.expected_lines}
    if not line:
        shown = f"line {at[1]}" if at and at[0] == case.filename else str(at)
        found.append(f"{shown} instead of {sorted(case.expected_lines)}")
    if event.holds_gil is not case.holds_gil:
        found.append(f"holds_gil={event.holds_gil}")
    kind = case.kind is None or event.kind == case.kind
    if not kind:
        found.append(f"kind {event.kind}")
    return Verdict(
        len(events),
        request=request == wanted,
        line=line,
        gil_label=event.holds_gil is case.holds_gil,
        kind=kind,
        found=tuple(found),
    )


def culprit(stalls: Sequence[Stall], moment: float) -> Stall | None:
    """The request whose blocking line was running at ``moment``: the loop runs one step at
    a time, so it is the latest stall that began before then (if its request had not
    ended)."""
    began = [s for s in stalls if s.began is not None and s.began <= moment]
    if not began:
        return None
    latest = max(began, key=lambda s: s.began or 0.0)
    return latest if latest.ended is not None and latest.ended >= moment else None


def case_of(path: str | None) -> Case | None:
    """The case a corpus path leads to (``/blocking/{name}/{item}``)."""
    parts = (path or "").split("/")
    return BY_NAME.get(parts[2]) if len(parts) == 4 else None


def misattributed(
    stalls: Sequence[Stall], emitted: Sequence[tuple[float, BlockingEvent]]
) -> list[str]:
    """Reports (with the time the watchdog last saw their stall, `Watched.seen`) that name
    another request than the one blocking the loop in the middle of the stall they
    measured, or a wrong route."""
    wrong = []
    for seen_at, event in emitted:
        guilty = culprit(stalls, seen_at - event.duration / 2)
        case = case_of(event.path)
        if guilty is None or guilty.path != event.path:
            wrong.append(f"blamed {event.path} ({event.route}), guilty {guilty and guilty.path}")
        elif case is None or event.route != case.route:
            wrong.append(f"{event.path}: route {event.route} instead of {case and case.route}")
    return wrong


# -- the app ------------------------------------------------------------------------------


def _endpoint(case: Case, lab: Lab) -> Callable[[Request], Any]:
    run = case.run
    if inspect.iscoroutinefunction(run):

        async def endpoint(request: Request) -> Response:
            result = await cast(Awaitable[object], run(lab))
            return result if isinstance(result, Response) else PlainTextResponse(case.name)

        return endpoint

    def sync_endpoint(request: Request) -> Response:
        result = run(lab)
        return result if isinstance(result, Response) else PlainTextResponse(case.name)

    return sync_endpoint


def build_app(lab: Lab, cases: Iterable[Case] = BY_NAME.values()) -> ASGIApp:
    """A Starlette app with every case at ``case.route`` (GET and POST), behind a
    `Recorder`."""
    routes = [Route(c.route, _endpoint(c, lab), methods=["GET", "POST"]) for c in cases]
    return Recorder(Starlette(routes=routes), lab)


# -- watching the corpus ----------------------------------------------------------------------

#: How long to wait for a report once a request is over (it is due before the stall ends; a
#: GIL-holding call: right after), and then for a duplicate.
ARRIVAL = 0.2
QUIET = 0.05


class Watched:
    """A detector around the corpus app: the events ``on_block`` got, and when the watchdog
    emitted each one and the report thread delivered it."""

    def __init__(self, app: ASGIApp) -> None:
        self.delivered: dict[int, float] = {}
        self.events: list[BlockingEvent] = []
        self.detector = BlockingDetectorMiddleware(
            app, threshold=THRESHOLD, on_block=self._on, follow_tasks=True
        )
        self.emitted: list[tuple[float, BlockingEvent]] = []
        #: When the watchdog last saw each reported stall (for a GIL-holding call the loop
        #: thread's own tap: its end), to match reports to stalls.
        self.seen: list[tuple[float, BlockingEvent]] = []
        watchdog = self.detector._watchdog
        report = watchdog._report

        def stamped(event: BlockingEvent) -> None:
            self.emitted.append((time.monotonic(), event))
            self.seen.append((watchdog.seen_at, event))
            report(event)

        watchdog._report = stamped

    def _on(self, event: BlockingEvent) -> None:
        self.delivered[id(event)] = time.monotonic()
        self.events.append(event)

    async def settle(self, expected: int) -> None:
        """Wait (bounded) for ``expected`` reports to be emitted and delivered, then a
        little for any more."""
        with anyio.move_on_after(ARRIVAL):
            while len(self.emitted) < expected or len(self.events) < len(self.emitted):
                await anyio.sleep(0.005)
        await anyio.sleep(QUIET)
