"""FastAPI dependency factories: tighten or add a guard on one route, router or app.

Importing this module needs FastAPI (``pip install asgi-guard[fastapi]``); the rest of
``asgi_guard`` needs only Starlette.
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator, Sequence

from fastapi import Request, Response
from fastapi.requests import HTTPConnection
from fastapi.responses import JSONResponse
from starlette.exceptions import WebSocketException
from starlette.types import Receive, Scope, Send

from ._algorithms import Fixed
from ._deadline import _check_seconds
from ._errors import ConfigurationError, RateLimitExceeded, RequestRejected
from ._events import EventHandler
from ._keys import KeyFunc
from ._limiter import RateLimiter
from ._paths import matched_route, route_template
from ._policy import LimitSpec
from ._problem import QUOTA_EXCEEDED, TEMPORARY_REDUCED_CAPACITY, Rejection, can_deny
from ._record import FIELDS_KEY, LEGACY_KEY, SCOPE_KEY, get_record
from ._shedding import ConcurrencyLimiter, Permit, Waiter, check_queue_options, class_index
from .ratelimit import (
    HeaderMode,
    LegacyValues,
    RateLimitMiddleware,
    _BoundPolicy,
    _Plan,
    legacy_fields,
    legacy_values,
    policy_header_value,
    ratelimit_header_value,
    retry_after_seconds,
    storage_rejection,
    tightness,
)
from .shedding import _replaying, _watched_turn

logger = logging.getLogger("asgi_guard")

__all__ = [
    "BulkheadDependency",
    "RateLimitDependency",
    "TimeoutDependency",
    "bulkhead",
    "rate_limit",
    "rejection_handler",
    "timeout",
]


async def _unreachable(scope: Scope, receive: Receive, send: Send) -> None:  # pragma: no cover
    raise RuntimeError("the rate_limit dependency never calls an app")


class RateLimitDependency:
    """A configured rate limit for FastAPI's ``Depends``; build it with `rate_limit`."""

    def __init__(
        self,
        limit: LimitSpec,
        *,
        key: KeyFunc | None,
        limiter: RateLimiter | None,
        headers: HeaderMode,
        retry_after_jitter: float,
        problem_type: str,
        on_event: EventHandler | Sequence[EventHandler],
    ) -> None:
        if not limit:
            raise ConfigurationError("rate_limit() needs a limit, e.g. rate_limit('5/minute')")
        # The middleware's engine does the deciding; the dependency only adapts it to a
        # route: one plan per route, built on first use.
        self._core = RateLimitMiddleware(
            _unreachable,
            limit=limit,
            key=key,
            limiter=limiter,
            headers=headers,
            retry_after_jitter=retry_after_jitter,
            problem_type=problem_type,
            on_event=on_event,
        )
        assert self._core._default is not None
        self._policies = tuple(b.policy for b in self._core._default.bound)
        #: By route (its original route object's id and its template): the route object
        #: (kept, so that its id is never another's) and its plan.
        self._plans: dict[tuple[int, str], tuple[object, _Plan]] = {}
        #: ``RateLimit-Policy`` of a plan less the policies a middleware decided already,
        #: by plan and skipped policies (a few per route).
        self._partial_headers: dict[tuple[int, ...], bytes | None] = {}
        self.limiter = self._core.limiter
        self.limiter._dependents = True  # a middleware on it notes what it counted

    @property
    def stats(self) -> dict[str, int]:
        """Counters: ``allowed``, ``rejected``, ``dry_run``, ``storage_errors``."""
        return self._core.stats

    def _plan_for(self, scope: Scope) -> _Plan:
        # One plan per route (routes are finite; a concrete path or a mount prefix with
        # parameters would grow without bound), named by its template and methods: the
        # route as included, so a router included under two prefixes counts twice.
        route = matched_route(scope)
        template = route_template(scope) or "*"
        # FastAPI builds its records of included routes anew when a router's routes change:
        # a route is its original route object and its template (one per inclusion).
        original = getattr(route, "original_route", route)
        ident = (id(original), template)
        entry = self._plans.get(ident)
        if entry is not None and entry[0] is original:
            return entry[1]
        methods = getattr(route, "methods", None)
        label = f"{','.join(sorted(methods))} {template}" if methods else template
        namespace = f"route:{label}"
        owner = (id(self), ident)
        claims = self.limiter._claims.get(namespace, ())
        if not self.limiter.is_memory and any(
            isinstance(other, tuple) and other[1] != ident for other in claims
        ):
            # Numbered by first use, which differs between processes: one process's
            # "route:GET /items#2" would be another's "route:GET /items".
            logger.warning(
                "two routes are both %r for an unnamed rate_limit on %s: their counters are "
                "numbered in the order they are first used, which other processes may not "
                "share; name the policy (Policy(..., name=...)) or give each its own limiter",
                namespace,
                self.limiter.uri,
            )
        plan = self._core._plan(self._policies, namespace, template, False, owner=owner)
        self._plans[ident] = (original, plan)
        return plan

    def _policy_header_without(
        self, plan: _Plan, skipped: tuple[_BoundPolicy, ...]
    ) -> bytes | None:
        """The plan's ``RateLimit-Policy`` without ``skipped`` (formatted once)."""
        ident = (id(plan), *map(id, skipped))
        if ident not in self._partial_headers:
            quotas = [
                q
                for b in plan.bound
                if b not in skipped and not b.policy.dry_run
                for q in b.policy.quotas
            ]
            self._partial_headers[ident] = (
                policy_header_value(quotas).encode("latin-1") if quotas else None
            )
        return self._partial_headers[ident]

    async def __call__(self, connection: HTTPConnection, response: Response) -> None:
        core = self._core
        scope = connection.scope
        plan = self._plan_for(scope)
        # A named policy a middleware (or another dependency) on the same limiter counted
        # this request against already is skipped: it counts once per request.
        allowed, states, storage_denied, skipped = await core._evaluate(
            scope, plan, scope["path"], connection, again=False
        )
        if storage_denied:
            get_record(scope).refused = True  # an outer load shedder does not learn from it
            core._report_storage_denied(connection, plan)  # type: ignore[arg-type]
            _refuse_websocket(scope, "Service Unavailable")
            raise RequestRejected(storage_rejection())
        mode = core.headers
        shown = [s for s in states if not s.dry_run]
        policy_header = plan.policy_header
        if skipped and policy_header is not None:
            policy_header = self._policy_header_without(plan, skipped)
        ietf = mode in ("ietf", "both") and bool(shown) and policy_header is not None
        policy_value = policy_header.decode("latin-1") if ietf and policy_header else ""
        state_value = ratelimit_header_value(shown) if ietf else ""
        legacy = legacy_values(shown) if mode in ("legacy", "both") and shown else None
        # Behind a middleware that sends the same fields, it writes them into the response
        # it sends, a 429 raised here included: one RateLimit list for the app's and the
        # route's quotas, and legacy fields for the tightest of them.
        headers: dict[str, str] = {}
        if ietf:
            entries: list[tuple[str, str]] | None = scope.get(FIELDS_KEY)
            if entries is not None:
                entries.append((policy_value, state_value))
            else:
                headers["RateLimit-Policy"] = policy_value
                headers["RateLimit"] = state_value
        if legacy is not None:
            tightest: list[LegacyValues | None] | None = scope.get(LEGACY_KEY)
            if tightest is not None:
                tightest.append(legacy)
            elif _tighter_than_shown(legacy, response):
                # Without a middleware, the fields an earlier dependency set stay if they
                # describe a tighter quota: they show the tightest of the route's quotas.
                headers.update((k.decode(), v.decode()) for k, v in legacy_fields(*legacy))
        if not allowed:
            core.stats["rejected"] += 1
            get_record(scope).refused = True  # an outer load shedder does not learn from it
            enforced = [s for s in states if not s.allowed and not s.dry_run]
            retry = retry_after_seconds(
                max(s.retry_after for s in enforced), core.retry_after_jitter
            )
            core._report_rejection(connection, plan, [s.name for s in enforced], retry)  # type: ignore[arg-type]
            _refuse_websocket(scope, "Too Many Requests")
            for name in ("RateLimit-Policy", "RateLimit"):
                # The entries of dependencies that admitted the request before this one are
                # on the response FastAPI drops for the 429: carry them over.
                earlier = response.headers.get(name)
                if earlier and name in headers:
                    headers[name] = f"{earlier}, {headers[name]}"
            raise RateLimitExceeded(
                violated_policies=[s.name for s in enforced],
                retry_after=retry,
                headers={"Retry-After": str(retry), **headers} if retry else headers,
                problem_type=core.problem_type,
            )
        core.stats["allowed"] += 1
        for name, value in headers.items():
            _merge(response, name, value)


def _refuse_websocket(scope: Scope, reason: str) -> None:
    """Close a refused WebSocket handshake with 1008 where the server cannot send an HTTP
    denial response (as the middleware does); where it can, the HTTPException raised
    next is answered as one."""
    if scope["type"] == "websocket" and not can_deny(scope):
        raise WebSocketException(code=1008, reason=reason)


def _tighter_than_shown(legacy: LegacyValues, response: Response) -> bool:
    """Whether ``legacy`` is tighter than the ``X-RateLimit-*`` fields ``response`` has
    (fewer requests remaining; as many, and a later reset), or it has none."""
    shown = response.headers
    try:
        values = (0, int(shown["x-ratelimit-remaining"]), int(shown["x-ratelimit-reset"]))
    except (KeyError, ValueError):
        return True
    return tightness(legacy) < tightness(values)


def _merge(response: Response, name: str, value: str) -> None:
    existing = response.headers.get(name)
    if existing and name.lower() in ("ratelimit", "ratelimit-policy"):
        value = f"{existing}, {value}"
    response.headers[name] = value


def rate_limit(
    limit: LimitSpec,
    *,
    key: KeyFunc | None = None,
    limiter: RateLimiter | None = None,
    headers: HeaderMode = "ietf",
    retry_after_jitter: float = 0.0,
    problem_type: str = QUOTA_EXCEEDED,
    on_event: EventHandler | Sequence[EventHandler] = (),
) -> RateLimitDependency:
    """A FastAPI dependency that rate-limits the routes it is attached to.

    Use it per route, per router or per app; handlers keep their signatures. Unnamed limits
    count per route (``/users/{id}`` is one route whatever the id); a named
    `Policy` is one quota for every route counted by the same limiter: every route of one
    dependency object, or of several given the same ``limiter=``. A request is counted
    once against a named policy: if a `RateLimitMiddleware` (or another dependency) on
    the same limiter counted it under the same key, the dependency skips that policy.

    WebSocket routes are limited too: a refused handshake gets the 429 as an HTTP denial
    response where the server supports it, and a close with code 1008 otherwise.

    Args:
        limit: Limits or policies, as for `RateLimitMiddleware`.
        key: Whom to count per: a function of the request (a ``Request`` is also a mapping
            over the ASGI scope, so scope key functions such as `client_ip`
            work unchanged). Default: the client IP.
        limiter: A `RateLimiter` to share (with a middleware, or with
            other processes through Redis). Default: a private in-memory limiter.
        headers: ``"ietf"``, ``"legacy"``, ``"both"`` or ``"none"``. Behind a
            ``RateLimitMiddleware`` that sends rate-limit headers, the entries join the
            middleware's (legacy headers then describe the tightest quota of both); alone
            they are set on the response FastAPI builds from the handler's return value.
        retry_after_jitter: Up to this many random seconds added to ``Retry-After``.
        problem_type: The problem type reported by `rejection_handler`.
        on_event: Callbacks receiving every rate-limit event.

    Raises:
        RateLimitExceeded: (a 429 ``HTTPException``) when the request is over its quota.

    Examples:
        >>> from fastapi import Depends, FastAPI
        >>> app = FastAPI()
        >>> @app.post("/login", dependencies=[Depends(rate_limit("5/minute"))])
        ... async def login() -> dict[str, bool]:
        ...     return {"ok": True}
    """
    return RateLimitDependency(
        limit,
        key=key,
        limiter=limiter,
        headers=headers,
        retry_after_jitter=retry_after_jitter,
        problem_type=problem_type,
        on_event=on_event,
    )


class TimeoutDependency:
    """A route's deadline for FastAPI's ``Depends``; build it with `timeout`."""

    def __init__(self, seconds: float) -> None:
        _check_seconds(seconds, "timeout")
        self.seconds = float(seconds)

    def __repr__(self) -> str:
        return f"timeout({self.seconds:g})"

    async def __call__(self, connection: HTTPConnection) -> None:
        scope = connection.scope
        if scope["type"] != "http":
            return  # a WebSocket route of a timed router: sessions have no deadline
        record = scope.get(SCOPE_KEY)
        if record is not None and record.timeout_exempt:
            return  # the middleware exempts this path; exempt wins
        budget = record.budget if record is not None else None
        where = f"{scope.get('method', '')} {route_template(scope) or scope.get('path', '')}"
        if budget is None:
            raise ConfigurationError(
                f"{self!r} on {where} needs TimeoutMiddleware around the app: "
                "app.add_middleware(TimeoutMiddleware, timeout=..., max_timeout=...)"
            )
        if self.seconds > budget.max_timeout:
            raise ConfigurationError(
                f"{self!r} on {where} is longer than the TimeoutMiddleware allows "
                f"(max_timeout={budget.max_timeout:g}); raise its max_timeout to allow it"
            )
        budget.set_timeout(self.seconds)


def timeout(seconds: float) -> TimeoutDependency:
    """A FastAPI dependency that sets the deadline of the routes it is attached to.

    The deadline still counts from the request's arrival. Tighter than the
    `TimeoutMiddleware` default is always allowed; looser only up to the middleware's
    ``max_timeout``. A caller's deadline header, when honoured, still applies.

    Args:
        seconds: The route's budget, from arrival to deadline.

    Raises:
        ConfigurationError: At construction for a zero, negative or non-finite value; at
            the first request when no `TimeoutMiddleware` guards the app, or when
            ``seconds`` exceeds its ``max_timeout``.

    Examples:
        >>> from fastapi import Depends, FastAPI
        >>> app = FastAPI()
        >>> @app.get("/search", dependencies=[Depends(timeout(0.5))])
        ... async def search() -> list[str]:
        ...     return []
    """
    return TimeoutDependency(seconds)


class BulkheadDependency:
    """A route's concurrency limit for FastAPI's ``Depends``; build it with `bulkhead`.

    Attributes:
        limiter: Its engine, for metrics: ``inflight``, ``queued``, ``counts``.
    """

    def __init__(
        self, max_concurrency: int, *, max_queue: int, queue_timeout: float | None
    ) -> None:
        if (
            not isinstance(max_concurrency, int)
            or isinstance(max_concurrency, bool)
            or max_concurrency < 1
        ):
            raise ConfigurationError(
                "bulkhead takes a whole number >= 1 of concurrent requests, "
                f"got {max_concurrency!r}"
            )
        if max_queue is None:
            raise ConfigurationError("max_queue must be a whole number >= 0, got None")
        check_queue_options(max_queue, queue_timeout)
        self.max_concurrency = max_concurrency
        self.limiter = ConcurrencyLimiter(
            Fixed(max_concurrency),
            max_queue=max_queue,
            queue_timeout=None if queue_timeout is None else float(queue_timeout),
        )

    def __repr__(self) -> str:
        return f"bulkhead({self.max_concurrency})"

    async def __call__(self, connection: HTTPConnection) -> AsyncIterator[None]:
        scope = connection.scope
        record = scope.get(SCOPE_KEY)
        priority = _CRITICAL
        deadline = None
        if record is not None:
            if record.priority is not None:
                priority = record.priority
            if record.budget is not None:
                deadline = record.budget.deadline_at
        limiter = self.limiter
        permit = limiter.try_acquire(priority)
        if permit is None:
            queued = limiter.enqueue(priority, deadline)
            if not isinstance(queued, Waiter):
                outcome: Permit | str | None = queued
            elif isinstance(connection, Request):
                outcome, read = await _watched_turn(limiter, queued, scope, connection._receive)
                if read:
                    # What the watch read reaches the endpoint first: FastAPI hands every
                    # dependency and the endpoint this one Request object.
                    connection._receive = _replaying(read, connection._receive)
            else:
                outcome = await limiter.turn(queued)
            if not isinstance(outcome, Permit):
                # None: the client went away while it waited; the answer reaches nobody.
                reason = outcome or "disconnected"
                get_record(scope).refused = True  # an outer load shedder does not learn from it
                _refuse_websocket(scope, "Service Unavailable")
                raise RequestRejected(
                    Rejection(
                        status=503,
                        type=TEMPORARY_REDUCED_CAPACITY,
                        title="Route temporarily at capacity",
                        detail=f"{route_template(scope) or scope.get('path')} is serving "
                        "as many requests as it may; retry later.",
                        # Jittered over whole seconds, so that the refused do not all
                        # come back at once (as the middleware's).
                        headers=(("Retry-After", _RETRY_AFTER[random.random() < 0.5]),),
                        extensions={"reason": reason},
                        guard="bulkhead",
                    )
                )
            permit = outcome
        try:
            yield
        finally:
            limiter.release(permit)


_CRITICAL = class_index("critical")
_RETRY_AFTER = ("1", "2")


def bulkhead(
    max_concurrency: int, *, max_queue: int = 0, queue_timeout: float | None = None
) -> BulkheadDependency:
    """A FastAPI dependency that limits how many requests the routes it guards serve at once.

    One bulkhead object is one limit: attach the same object to several routes to share
    it, or build one per route. Past the limit, requests wait in a queue of ``max_queue``
    (first in, first out; managed like `LoadSheddingMiddleware`'s, higher priority classes
    first when that middleware classified the request) and the rest are refused with a
    `RequestRejected` (503, ``temporary-reduced-capacity``, a ``Retry-After`` of 1 or 2 s
    at random); register `rejection_handler` to answer in problem+json. A request behind
    a `TimeoutMiddleware` is never kept waiting past what its deadline allows. A queued
    HTTP request whose client disconnects leaves the queue at once and never reaches the
    endpoint (what the wait read of its body, the endpoint gets first). On a WebSocket
    route a refused handshake is closed with 1008 where the server cannot send a denial
    response, and an accepted WebSocket holds its place for its whole session.

    Args:
        max_concurrency: Requests served at once.
        max_queue: Requests that may wait for a place (0: none wait).
        queue_timeout: The longest a request waits (default: 100 ms; 200 ms for a class
            while lower classes arrive too; less once a queue stands).

    Raises:
        ConfigurationError: A limit below 1, a negative queue, a queue timeout without a
            queue.

    Examples:
        >>> from fastapi import Depends, FastAPI
        >>> app = FastAPI()
        >>> @app.get("/report", dependencies=[Depends(bulkhead(2, max_queue=4))])
        ... async def report() -> dict[str, str]:
        ...     return {"status": "ready"}
    """
    return BulkheadDependency(max_concurrency, max_queue=max_queue, queue_timeout=queue_timeout)


async def rejection_handler(request: Request, exc: Exception) -> Response:
    """Render a `RequestRejected` (such as `RateLimitExceeded`) as RFC 9457 problem+json.

    Register it once for every guard dependency:
    ``app.add_exception_handler(RequestRejected, rejection_handler)``. Without it FastAPI
    answers ``{"detail": ...}`` with the same status and headers.
    """
    if not isinstance(exc, RequestRejected):  # pragma: no cover - registered for it only
        raise exc
    rejection = exc.rejection
    return JSONResponse(
        rejection.problem(),
        status_code=rejection.status,
        headers=exc.headers,
        media_type="application/problem+json",
    )
