"""Apps for the overload benchmarks (``loadgen.py``'s self-check, ``overload.py``).

uvicorn imports them as ``bench._overload_apps:<name>`` (run from the project root), one
worker. ``GET /work`` is a request that costs the server something real: about 2 ms of
CPU in a pure-Python loop (holding the event loop, as a template or a serializer would),
then a 1 ms ``anyio.sleep`` (a fast database call), then a small JSON. The loop's length
is calibrated at import with ``time.thread_time`` so that it takes ``WORK_CPU`` seconds of
this thread's CPU on the machine at hand (the median of a few trials, after a warm-up), or
set by ``OVERLOAD_WORK_ROUNDS`` (so that servers compared with each other burn exactly the
same: a calibration varies by a few percent from one process to the next); ``GET /health``
answers at once and reports the rounds and what they took. ``GET /light`` is ``/work``
without the loop (the 1 ms sleep and the JSON): a request that costs the server only the
framework's CPU, where a guard's own cost stands out.

One worker serves at most ``1 / (WORK_CPU + framework overhead)`` requests a second: the
server used 2.3-2.5 ms of CPU per request on the 2-core VM, so about 400/s (uvicorn
``--loop asyncio``); past that it can only queue.

``unguarded``: the FastAPI app, no guard in front of it. ``pass_through``: the same app
(and a ``GET /state`` route) behind a pure ASGI middleware that only passes each call on,
the floor any middleware stands on.

The guarded variants, for ``overload.py``: the same app behind
``app.add_middleware(LoadSheddingMiddleware, ...)``, with a ``GET /state`` route answering
the middleware's ``state()`` (the limit it ended at, its counts). ``/health`` and
``/state`` are exempt: never shed, never counted. They are built when uvicorn first asks
for them (a module ``__getattr__``), so ``unguarded`` imports without ``asgi_guard``'s
load shedding:

* ``shed_default``: ``limit=None``, the default adaptive algorithm;
* ``shed_unpaced``: the same with ``pace=False`` (admitted requests start unpaced);
* ``shed_fixed``: ``limit=N``, ``N`` from ``SHED_FIXED_LIMIT`` (default 8);
* ``shed_aimd``, ``shed_vegas``, ``shed_gradient2``, ``shed_adaptive``: ``limit=AIMD(**kw)``
  and so on (``shed_adaptive``: the default algorithm with options), ``kw``
  a JSON object from ``SHED_ALGORITHM_KWARGS`` (default ``{}``: the algorithm's defaults);
* ``shed_priority``: ``limit=None``; the class from the ``X-Priority`` header, trusted from
  every client (the benchmark is the gateway), ``sheddable`` without one.

``shed_toggled``, for ``shedding_toggle.py``: one process serving the app behind a switch
(``_toggle.Switched``, counting ``GET /light``) between four modes, each a FastAPI app of
its own: ``none`` (unguarded), ``pass`` (behind `PassThrough`), ``fixed``
(``limit=SHED_FIXED_LIMIT`` or 8) and ``default`` (``limit=None``); the guarded modes take
the ``SHED_*`` options below but ``SHED_TIMINGS``. A guarded mode's ticker runs only in its
own windows (see `ShedSwitched`).

Every ``shed_*`` also takes ``SHED_MAX_QUEUE``, ``SHED_QUEUE_TIMEOUT`` (seconds),
``SHED_MAX_LOOP_LAG`` (seconds) and ``SHED_PACE`` (``0``: ``pace=False``) when set;
otherwise the middleware's defaults. With
``SHED_TIMINGS=<file>``, the middleware also times each refusal on the server, from its
call to the 503, by reason, and rewrites ``<file>.<pid>`` with the quantiles every 200
refusals (the client's refusal latency adds the wait for the event loop before the call):

    python bench/overload.py --capacity 408 --variants default --scenarios rates \
        --rates 2,4 --server-env SHED_TIMINGS=/tmp/refusals
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import anyio
from fastapi import FastAPI, Request, Response
from starlette.types import ASGIApp, Receive, Scope, Send

if TYPE_CHECKING:
    from _toggle import Switched

    from asgi_guard import LoadSheddingMiddleware
else:  # uvicorn imports this module as bench.<name>
    from ._toggle import Switched

#: CPU seconds one ``GET /work`` spends in its loop, and its await.
WORK_CPU = 0.002
WORK_SLEEP = 0.001


def burn(n: int) -> int:
    """A pure-Python loop of ``n`` rounds: CPU time on this thread, holding the GIL."""
    x = 0
    for i in range(n):
        x = (x + i * i) & 0xFFFF
    return x


def _calibrate(target: float, trials: int = 7) -> tuple[int, float]:
    """Rounds of :func:`burn` that take ``target`` CPU seconds, and what they took."""
    n = 20_000
    burn(n)  # warm-up
    per_round = []
    for _ in range(trials):
        t0 = time.thread_time()
        burn(n)
        per_round.append((time.thread_time() - t0) / n)
    rounds = max(1, round(target / statistics.median(per_round)))
    took = []
    for _ in range(3):
        t0 = time.thread_time()
        burn(rounds)
        took.append(time.thread_time() - t0)
    return rounds, statistics.median(took)


def _took(rounds: int, trials: int = 3) -> float:
    """The median CPU seconds ``rounds`` of :func:`burn` take (after a warm-up)."""
    burn(rounds)
    took = []
    for _ in range(trials):
        t0 = time.thread_time()
        burn(rounds)
        took.append(time.thread_time() - t0)
    return statistics.median(took)


if os.environ.get("OVERLOAD_WORK_ROUNDS"):
    WORK_ROUNDS = int(os.environ["OVERLOAD_WORK_ROUNDS"])
    WORK_MEASURED = _took(WORK_ROUNDS)
else:
    WORK_ROUNDS, WORK_MEASURED = _calibrate(WORK_CPU)


def build_app() -> FastAPI:
    """``GET /work`` (about 2 ms of CPU, then a 1 ms sleep), ``GET /light`` (the sleep
    alone) and ``GET /health``."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    @app.get("/work")
    async def work() -> dict[str, Any]:
        x = burn(WORK_ROUNDS)
        await anyio.sleep(WORK_SLEEP)
        return {"ok": True, "x": x}

    @app.get("/light")
    async def light() -> dict[str, Any]:
        await anyio.sleep(WORK_SLEEP)
        return {"ok": True}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "ok": True,
            "work_rounds": WORK_ROUNDS,
            "work_cpu_ms": round(WORK_MEASURED * 1e3, 3),
        }

    return app


unguarded = build_app()


def _plain(value: Any) -> Any:
    """``value`` as JSON can hold it: non-finite floats as strings, other objects by ``str``."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _env_options() -> dict[str, Any]:
    """The middleware options every ``shed_*`` app takes from the environment, when set."""
    options: dict[str, Any] = {}
    if os.environ.get("SHED_MAX_QUEUE"):
        options["max_queue"] = int(os.environ["SHED_MAX_QUEUE"])
    if os.environ.get("SHED_QUEUE_TIMEOUT"):
        options["queue_timeout"] = float(os.environ["SHED_QUEUE_TIMEOUT"])
    if os.environ.get("SHED_MAX_LOOP_LAG"):
        options["max_loop_lag"] = float(os.environ["SHED_MAX_LOOP_LAG"])
    if os.environ.get("SHED_PACE"):
        options["pace"] = os.environ["SHED_PACE"] != "0"
    return options


def _timed(path: str) -> type[LoadSheddingMiddleware]:
    """`LoadSheddingMiddleware` timing its refusals by reason (``SHED_TIMINGS``)."""

    from asgi_guard import LoadSheddingMiddleware
    from asgi_guard._shedding import Refusal

    times: dict[str, list[float]] = {}

    def write() -> None:
        with open(f"{path}.{os.getpid()}", "w") as out:
            for why, values in sorted(times.items()):
                xs = sorted(values)
                n = len(xs)
                out.write(
                    f"{why:14} n={n:6}  p50 {xs[n // 2] * 1e3:6.1f}  p90 "
                    f"{xs[int(n * 0.9)] * 1e3:6.1f}  p99 {xs[int(n * 0.99)] * 1e3:6.1f}  "
                    f"max {xs[-1] * 1e3:6.1f} ms\n"
                )

    class Timed(LoadSheddingMiddleware):
        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            scope["bench.called"] = time.monotonic()
            await super().__call__(scope, receive, send)

        async def _refuse(self, why: Refusal, scope: Scope, receive: Receive, send: Send) -> None:
            took = time.monotonic() - scope["bench.called"]
            times.setdefault(why, []).append(took)
            if sum(map(len, times.values())) % 200 == 0:
                write()
            await super()._refuse(why, scope, receive, send)

    return Timed


def build_guarded(**options: Any) -> FastAPI:
    """The app behind ``LoadSheddingMiddleware(**options)``, plus ``GET /state``."""
    from asgi_guard import LoadSheddingMiddleware

    app = build_app()
    middleware = LoadSheddingMiddleware
    if os.environ.get("SHED_TIMINGS"):
        middleware = _timed(os.environ["SHED_TIMINGS"])

    @app.get("/state")
    async def state(request: Request) -> Response:
        node: Any = request.app.middleware_stack
        while node is not None and not isinstance(node, LoadSheddingMiddleware):
            node = getattr(node, "app", None)
        body = {"state": None} if node is None else {"state": _plain(node.state())}
        return Response(json.dumps(body), media_type="application/json")

    app.add_middleware(
        middleware,
        exempt=("/health", "/state"),
        **{**_env_options(), **options},
    )
    return app


def _algorithm(name: str) -> Any:
    import asgi_guard

    kwargs = json.loads(os.environ.get("SHED_ALGORITHM_KWARGS") or "{}")
    return getattr(asgi_guard, name)(**kwargs)


def _shed_priority() -> FastAPI:
    return build_guarded(
        limit=None,
        priority_header="x-priority",
        trust_priority_header=lambda scope: True,
        default_priority="sheddable",
    )


class PassThrough:
    """A pure ASGI middleware that only passes each call on: what any middleware costs."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


class RefuseAll:
    """A pure ASGI middleware that answers every ``/work`` request at once with the 503 that
    `LoadSheddingMiddleware` sends (the same headers and a body of the same kind), keeping no
    state: what any refusal at that place costs, the floor of a refusal's latency."""

    BODY = json.dumps(
        {
            "type": "https://iana.org/assignments/http-problem-types#temporary-reduced-capacity",
            "title": "Service Unavailable",
            "status": 503,
            "detail": "The service is at capacity and its wait queue is full; retry later.",
        }
    ).encode()

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != "/work":
            await self.app(scope, receive, send)
            return
        body = self.BODY
        await send(
            {
                "type": "http.response.start",
                "status": 503,
                "headers": [
                    (b"content-type", b"application/problem+json"),
                    (b"content-length", b"%d" % len(body)),
                    (b"retry-after", b"1"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _behind(middleware: type[PassThrough] | type[RefuseAll]) -> FastAPI:
    """The app (with ``GET /state``, answering no state) behind ``middleware``."""
    app = build_app()

    @app.get("/state")
    async def state() -> Response:
        return Response(json.dumps({"state": None}), media_type="application/json")

    app.add_middleware(middleware)
    return app


def _guard_of(app: ASGIApp) -> LoadSheddingMiddleware | None:
    """The `LoadSheddingMiddleware` in ``app``'s middleware stack, once it is built."""
    from asgi_guard import LoadSheddingMiddleware

    node: Any = getattr(app, "middleware_stack", None)
    while node is not None and not isinstance(node, LoadSheddingMiddleware):
        node = getattr(node, "app", None)
    return node


class ShedSwitched(Switched):
    """`Switched` between the app unguarded and behind guards whose tickers run only in
    their own mode's windows: entering a guarded mode starts its guard's ticker (once the
    mode's middleware stack is built, by its first request: the warm-up's), leaving it
    cancels the ticker, and the next switch waits for that task to end; both happen
    between a switch's two readings, outside every window. Lifespan never reaches the
    apps (`Switched` answers it): a guard's lifespan would start a ticker of its own,
    which the switch could not stop. Its answers add, summed over the guards, the
    requests admitted and refused so far and how many tickers are running."""

    def __init__(self, modes: Mapping[str, ASGIApp], first: str, *, counted: str) -> None:
        super().__init__(modes, first, counted=counted)
        self._stopping: list[asyncio.Task[Any]] = []

    def on_leave(self, app: ASGIApp) -> None:
        ticker = _ticker_of(_guard_of(app))
        if ticker is not None:
            ticker.cancel()
            self._stopping.append(ticker)

    async def on_enter(self, app: ASGIApp) -> None:
        if self._stopping:
            await asyncio.wait(self._stopping)  # its ``finally`` unbinds the guard
            self._stopping.clear()
        guard = _guard_of(app)
        if guard is not None and _ticker_of(guard) is None:
            guard._start(asyncio.get_running_loop())

    def extra(self) -> dict[str, Any]:
        from typing import get_args

        from asgi_guard._shedding import Refusal

        refused = admitted = tickers = 0
        for app in self.modes.values():
            guard = _guard_of(app)
            if guard is not None:
                counts = guard.limiter.counts
                admitted += counts["admitted"]
                refused += sum(counts[why] for why in get_args(Refusal))
                tickers += _ticker_of(guard) is not None
        return {"admitted": admitted, "refused": refused, "tickers": tickers}


def _ticker_of(guard: LoadSheddingMiddleware | None) -> asyncio.Task[Any] | None:
    """``guard``'s ticker task, if it runs."""
    ticker = getattr(guard, "_ticker", None)
    return ticker if isinstance(ticker, asyncio.Task) and not ticker.done() else None


def _toggled() -> ShedSwitched:
    def behind(middleware: Any, **options: Any) -> FastAPI:
        app = build_app()
        app.add_middleware(middleware, **options)
        return app

    env = _env_options()

    from asgi_guard import LoadSheddingMiddleware

    fixed = int(os.environ.get("SHED_FIXED_LIMIT") or 8)
    return ShedSwitched(
        {
            "none": build_app(),
            "pass": behind(PassThrough),
            "fixed": behind(LoadSheddingMiddleware, **{**env, "limit": fixed}),
            "default": behind(LoadSheddingMiddleware, **{**env, "limit": None}),
        },
        "none",
        counted="/light",
    )


_GUARDED: dict[str, Callable[[], ASGIApp]] = {
    "pass_through": lambda: _behind(PassThrough),
    "refuse_all": lambda: _behind(RefuseAll),
    "shed_default": lambda: build_guarded(limit=None),
    "shed_unpaced": lambda: build_guarded(limit=None, pace=False),
    "shed_fixed": lambda: build_guarded(limit=int(os.environ.get("SHED_FIXED_LIMIT") or 8)),
    "shed_aimd": lambda: build_guarded(limit=_algorithm("AIMD")),
    "shed_vegas": lambda: build_guarded(limit=_algorithm("Vegas")),
    "shed_gradient2": lambda: build_guarded(limit=_algorithm("Gradient2")),
    "shed_adaptive": lambda: build_guarded(limit=_algorithm("Adaptive")),
    "shed_priority": _shed_priority,
    "shed_toggled": _toggled,
}


def __getattr__(name: str) -> ASGIApp:
    """Build a guarded variant on first use (uvicorn's ``getattr`` of the module)."""
    if name not in _GUARDED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    app = _GUARDED[name]()
    globals()[name] = app
    return app
