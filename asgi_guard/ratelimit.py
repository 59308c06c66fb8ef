"""Rate limiting: `RateLimitMiddleware` and the pieces it shares with the dependency."""

from __future__ import annotations

import logging
import math
import random
import re
from collections.abc import Awaitable, Collection, Iterable, Sequence
from dataclasses import dataclass
from math import ceil as _ceil
from time import monotonic
from typing import Any, Literal, NamedTuple, cast

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._clock import MonotonicClock
from ._errors import ConfigurationError
from ._events import EventHandler, RateLimitEvent, _CallbackGuard, emit, event_handlers
from ._keys import KeyFunc, _is_async_callable, client_ip, peer_address
from ._limiter import QuotaState, RateLimiter
from ._memory import Table
from ._paths import Exemptions, ExemptSpec, check_template, compile_template, route_path
from ._policy import LimitSpec, Policy, Quota, as_policies
from ._problem import (
    QUOTA_EXCEEDED,
    TEMPORARY_REDUCED_CAPACITY,
    Rejection,
    ResponseFactory,
    rejection_detail,
    send_rejection,
)
from ._record import COUNTED_KEY, FIELDS_KEY, LEGACY_KEY, get_record

__all__ = ["QUOTA_EXCEEDED", "TEMPORARY_REDUCED_CAPACITY", "RateLimitMiddleware", "Rule"]

logger = logging.getLogger("asgi_guard.ratelimit")

HeaderMode = Literal["ietf", "legacy", "both", "none"]


@dataclass(frozen=True)
class Rule:
    """Limits for the requests whose path matches a route template (and method).

    Rules are tried in order; the first that matches replaces the middleware's default
    ``limit``. Paths use Starlette's template syntax, so ``"/users/{user_id}"`` matches
    ``/users/1`` and ``/users/2`` and counts them together; ``per_path=True`` counts every
    concrete path apart. ``"/static/{rest:path}"`` matches a whole subtree. Paths are
    matched as the app routes them: in an app mounted at ``/v1`` or served with a
    ``root_path``, ``"/login"`` matches a request for ``/v1/login``.

    Args:
        path: A route template, e.g. ``"/login"`` or ``"/items/{item_id:int}"``.
        limit: Limits or policies for the matching requests; ``None`` exempts them.
        methods: Only these methods (``HEAD`` follows ``GET``); ``None`` for all.
        per_path: Count each concrete path separately instead of the template together.

    Examples:
        >>> Rule("/login", limit="5/minute", methods=["POST"])
        Rule(path='/login', limit='5/minute', methods=['POST'], per_path=False)
    """

    path: str
    limit: LimitSpec | None
    methods: Collection[str] | None = None
    per_path: bool = False


class _BoundPolicy:
    """A policy resolved for one place: its key, cost, namespace and memory tables."""

    __slots__ = ("cost", "counter", "key", "key_async", "namespace", "policy", "tables")

    def __init__(self, policy: Policy, namespace: str, key: KeyFunc, limiter: RateLimiter) -> None:
        self.policy = policy
        self.namespace = namespace
        #: A named policy's counter, less the key, for `COUNTED_KEY`; None when unnamed.
        self.counter = (id(limiter), namespace) if policy.name is not None else None
        self.key = policy.key or key
        self.key_async = _is_async_callable(self.key)
        self.cost = policy.cost
        self.tables = (
            [limiter._table(namespace, q, policy.strategy) for q in policy.quotas]
            if limiter.is_memory
            else None
        )


class _Fast:
    """The straight path of a place with one policy of one quota, in memory, a fixed cost
    and a sync key: what its requests need, read from one object."""

    __slots__ = ("bound", "cost", "counter", "key", "policy_field", "state_format", "table")

    def __init__(self, bound: _BoundPolicy, table: Table, policy_header: bytes | None) -> None:
        self.bound = bound
        self.table = table
        self.key = bound.key
        self.counter = bound.counter
        self.cost = cast(int, bound.cost)
        #: An admitted request's ``RateLimit`` value, formatted with r and t (IETF
        #: headers); with headers="none", empty for no fields at all. None: the general path.
        self.state_format: bytes | None = None
        #: ``RateLimit-Policy``, sent beside the ``RateLimit`` field (only when
        #: ``state_format`` is not empty, which it is only with a policy header).
        self.policy_field = (b"ratelimit-policy", policy_header or b"")


class _Plan:
    """Everything static about one place (the default, a rule, a route)."""

    __slots__ = (
        "awaits",
        "bound",
        "fast",
        "has_dry_run",
        "named",
        "per_path",
        "policy_header",
        "route",
    )

    def __init__(
        self, bound: list[_BoundPolicy], route: str | None, per_path: bool, mode: HeaderMode
    ) -> None:
        self.bound = bound
        self.route = route
        self.per_path = per_path
        self.named = any(b.counter is not None for b in bound)
        #: Whether deciding may await the user's code (an async key or cost function).
        self.awaits = any(b.key_async or _is_async_callable(b.cost) for b in bound)
        enforced = [q for b in bound if not b.policy.dry_run for q in b.policy.quotas]
        self.has_dry_run = any(b.policy.dry_run for b in bound)
        self.policy_header = (
            policy_header_value(enforced).encode("latin-1")
            if mode in ("ietf", "both") and enforced
            else None
        )
        # The common case gets a straight path: one policy, one quota, in memory, a fixed
        # cost and a sync key.
        self.fast: _Fast | None = None
        only = bound[0] if len(bound) == 1 else None
        if (
            only is not None
            and only.tables is not None
            and len(only.tables) == 1
            and isinstance(only.cost, int)
            and not only.key_async
            and not per_path
        ):
            fast = self.fast = _Fast(only, only.tables[0], self.policy_header)
            if mode == "ietf" and not only.policy.dry_run:
                name = only.policy.quotas[0].name.replace("%", "%%")
                fast.state_format = f'"{name}";r=%d;t=%d'.encode("latin-1")
            elif mode == "none":
                fast.state_format = b""


def policy_header_value(quotas: Iterable[Quota]) -> str:
    """The ``RateLimit-Policy`` field value for ``quotas`` (a structured-field list)."""
    return ", ".join(f'"{q.name}";q={q.burst};w={q.window}' for q in quotas)


def ratelimit_header_value(states: Iterable[QuotaState]) -> str:
    """The ``RateLimit`` field value for ``states`` (a structured-field list)."""
    return ", ".join(
        f'"{s.name}";r={max(0, s.remaining)};t={math.ceil(max(0.0, s.reset_after))}' for s in states
    )


#: The values of the legacy fields: limit, remaining, reset (whole seconds).
LegacyValues = tuple[int, int, int]


def legacy_values(states: Sequence[QuotaState]) -> LegacyValues:
    """The limit, remaining and reset (whole seconds) of the tightest of ``states``."""
    tight = min(states, key=lambda s: (s.remaining, -s.reset_after))
    return tight.limit, max(0, tight.remaining), math.ceil(max(0.0, tight.reset_after))


def tightness(values: LegacyValues) -> tuple[int, int]:
    """Orders legacy values, the tightest first: fewest remaining, then the latest reset (as
    `legacy_values` chooses among quotas)."""
    return values[1], -values[2]


def legacy_fields(limit: int, remaining: int, reset: int) -> list[tuple[bytes, bytes]]:
    """``X-RateLimit-Limit/Remaining/Reset`` with these values."""
    return [
        (b"x-ratelimit-limit", str(limit).encode()),
        (b"x-ratelimit-remaining", str(remaining).encode()),
        (b"x-ratelimit-reset", str(reset).encode()),
    ]


def legacy_headers(states: Sequence[QuotaState]) -> list[tuple[bytes, bytes]]:
    """``X-RateLimit-Limit/Remaining/Reset`` for the tightest of ``states``."""
    return legacy_fields(*legacy_values(states))


def retry_after_seconds(retry_after: float, jitter: float) -> int:
    """Whole seconds for ``Retry-After`` (at least 1), plus up to ``jitter`` random seconds;
    0 (no ``Retry-After`` at all) for a request that can never pass."""
    if retry_after == math.inf:
        return 0
    if jitter:
        retry_after += random.uniform(0.0, jitter)
    return max(1, math.ceil(retry_after))


class _Outcome(NamedTuple):
    """What `RateLimitMiddleware._evaluate` decided."""

    allowed: bool
    states: tuple[QuotaState, ...]
    #: Refused because the storage failed and a policy says ``on_storage_error="deny"``.
    storage_denied: bool
    #: Named policies not counted again: the request was counted against them already.
    skipped: tuple[_BoundPolicy, ...]


class RateLimitMiddleware:
    """Rejects requests over their quota with ``429`` before the app reads them.

    Pure ASGI: add it with ``app.add_middleware(RateLimitMiddleware, ...)`` or wrap any ASGI
    callable. Lifespan (and WebSocket when ``websocket=False``) passes through untouched.

    Args:
        app: The ASGI app to guard.
        limit: The default limits, for every request no rule matches: ``"100/minute"``,
            ``"10/second;1000/hour"``, a `Policy` or a list of them.
        rules: Per-route `Rule` objects, tried in order; the first match replaces
            ``limit`` for that request.
        key: Whom to count per, a function of the scope (sync or async) returning a
            non-empty ``str`` (a subclass such as a ``str`` enum counts by its string
            value). Default: `client_ip` (the socket peer). If it raises or returns
            anything else, the request is counted under its socket peer address and the
            error is logged once.
        storage: A storage URI, ``"memory://"`` by default (see `RateLimiter`).
        limiter: A `RateLimiter` to share with dependencies or other middlewares;
            replaces ``storage``.
        exempt: Paths (exact or templates) and predicates ``(scope) -> bool`` never limited.
            Rules and exempt paths match the path as the app routes it, without the
            ``root_path`` of a mounted sub-app or of ``--root-path``.
        headers: ``"ietf"`` (``RateLimit``/``RateLimit-Policy``, the default), ``"legacy"``
            (``X-RateLimit-*``), ``"both"`` or ``"none"``. The fields of the ``rate_limit``
            dependencies behind it join its own.
        retry_after_jitter: Up to this many random seconds are added to ``Retry-After``.
        problem_type: The problem ``type`` URI of the 429 body.
        response: Build your own rejection response: ``(scope, Rejection) -> ASGI app``.
        websocket: Limit WebSocket handshakes too (denied with HTTP 429 where the server
            supports it, else closed with code 1008, which servers send the client as an
            HTTP 403 before the handshake is accepted).
        on_event: Callbacks receiving every `RateLimitEvent`, and the `StorageEvent`s of
            the limiter the middleware builds (with ``limiter=``, pass them to that
            `RateLimiter` instead).

    Examples:
        >>> from starlette.applications import Starlette
        >>> app = Starlette()
        >>> app.add_middleware(RateLimitMiddleware, limit="100/minute",
        ...                    rules=[Rule("/login", limit="5/minute")], exempt=["/health"])
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        limit: LimitSpec | None = None,
        rules: Sequence[Rule] = (),
        key: KeyFunc | None = None,
        storage: str = "memory://",
        limiter: RateLimiter | None = None,
        exempt: Iterable[ExemptSpec] = (),
        headers: HeaderMode = "ietf",
        retry_after_jitter: float = 0.0,
        problem_type: str = QUOTA_EXCEEDED,
        response: ResponseFactory | None = None,
        websocket: bool = True,
        on_event: EventHandler | Sequence[EventHandler] = (),
    ) -> None:
        self.app = app
        if headers not in ("ietf", "legacy", "both", "none"):
            raise ConfigurationError("headers must be 'ietf', 'legacy', 'both' or 'none'")
        if (
            isinstance(retry_after_jitter, bool)
            or not isinstance(retry_after_jitter, (int, float))
            or not (0 <= retry_after_jitter < math.inf)
        ):
            raise ConfigurationError(
                f"retry_after_jitter must be a non-negative number of seconds, "
                f"got {retry_after_jitter!r}"
            )
        if key is not None and not callable(key):
            raise ConfigurationError("key must be a callable taking the ASGI scope")
        if response is not None and not callable(response):
            raise ConfigurationError("response must be a callable (scope, rejection) -> ASGI app")
        if not isinstance(problem_type, str) or not problem_type:
            raise ConfigurationError(f"problem_type must be a URI string, got {problem_type!r}")
        if not isinstance(websocket, bool):
            raise ConfigurationError(f"websocket must be True or False, got {websocket!r}")
        if limiter is not None and not isinstance(limiter, RateLimiter):
            raise ConfigurationError(f"limiter must be a RateLimiter, got {type(limiter).__name__}")
        if limiter is not None and storage != "memory://":
            raise ConfigurationError("pass either storage= or limiter=, not both")
        if isinstance(rules, Rule):
            raise ConfigurationError("rules= takes a list of Rule objects: rules=[Rule(...)]")
        if isinstance(rules, (str, bytes)) or not isinstance(rules, Iterable):
            raise ConfigurationError(
                f"rules= takes a list of Rule objects, got {type(rules).__name__}"
            )
        self._handlers = event_handlers(on_event)
        self.limiter = limiter if limiter is not None else RateLimiter(storage, on_event=on_event)
        self.headers = headers
        self.retry_after_jitter = float(retry_after_jitter)
        self.problem_type = problem_type
        self.response = response
        self.websocket = websocket
        self._callback_guard = _CallbackGuard()
        self._key = key if key is not None else client_ip()
        clock = self.limiter.clock
        # The default clock's method only calls `monotonic`: call it directly.
        self._now = monotonic if clock.__class__ is MonotonicClock else clock.now
        # Whether admitted responses get rate-limit fields (their own or dependencies').
        self._wraps = headers != "none"
        # Whether responses get IETF fields, into which dependencies' entries are merged.
        self._merges = headers in ("ietf", "both")
        # Whether responses get legacy fields, which dependencies' quotas may tighten.
        self._legacy = headers in ("legacy", "both")
        self._key_failed = False
        self._cost_failed = False
        self.stats = {"allowed": 0, "rejected": 0, "dry_run": 0, "storage_errors": 0}

        self._exempt = Exemptions(exempt, logger, "limited")
        self._exempt_paths = self._exempt.paths
        self._exempt_more = self._exempt.needs_check

        default = as_policies(limit)
        self._default = self._plan(default, "default", None, False) if default else None
        self._rules: list[
            tuple[re.Pattern[str] | None, str, frozenset[str] | None, _Plan | None]
        ] = []
        for rule in rules:
            self._add_rule(rule)
        if self._default is None and not self._rules:
            raise ConfigurationError("RateLimitMiddleware needs limit= or rules=")

    # -- configuration --------------------------------------------------------------------

    def _plan(
        self,
        policies: Sequence[Policy],
        namespace: str,
        route: str | None,
        per_path: bool,
        owner: object = None,
    ) -> _Plan:
        bound = []
        # Unnamed limits count per place: two places that would share a namespace in one
        # limiter (two middlewares, two dependencies on one route) get one each.
        place = self.limiter._claim(namespace, owner if owner is not None else id(self))
        for policy in policies:
            self.limiter._check_supported(policy)
            ns = f"policy:{policy.name}" if policy.name is not None else place
            bound.append(_BoundPolicy(policy, ns, self._key, self.limiter))
        return _Plan(bound, route, per_path, self.headers)

    def _add_rule(self, rule: Rule) -> None:
        if not isinstance(rule, Rule):
            raise ConfigurationError(f"rules= takes Rule objects, got {type(rule).__name__}")
        if not isinstance(rule.path, str) or not rule.path.startswith("/"):
            raise ConfigurationError(
                f"a rule path is a route template starting with '/': {rule.path!r}"
            )
        check_template(rule.path, "a rule path")
        if not isinstance(rule.per_path, bool):
            raise ConfigurationError(f"Rule.per_path must be True or False, got {rule.per_path!r}")
        methods = None
        if rule.methods is not None:
            if isinstance(rule.methods, (str, bytes)) or not isinstance(rule.methods, Iterable):
                raise ConfigurationError("Rule.methods takes a list of methods, e.g. ['POST']")
            for method in rule.methods:
                if not isinstance(method, str) or not method:
                    raise ConfigurationError(
                        f"Rule.methods takes method names such as 'POST', got {method!r}"
                    )
            methods = frozenset(m.upper() for m in rule.methods)
            if "GET" in methods:
                methods |= {"HEAD"}
        pattern = compile_template(rule.path) if "{" in rule.path else None
        label = f"{','.join(sorted(methods))} {rule.path}" if methods else rule.path
        policies = as_policies(rule.limit, option="Rule.limit")
        plan = self._plan(policies, f"rule:{label}", rule.path, rule.per_path) if policies else None
        self._rules.append((pattern, rule.path, methods, plan))

    # -- per request ----------------------------------------------------------------------

    def _match(self, scope: Scope, path: str) -> _Plan | None:
        method = scope.get("method", "WEBSOCKET")
        for pattern, template, methods, plan in self._rules:
            if (path == template if pattern is None else pattern.match(path)) and (
                methods is None or method in methods
            ):
                return plan
        return self._default

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http" and (kind != "websocket" or not self.websocket):
            if kind == "lifespan" and not self.limiter.is_memory:
                await self.app(scope, receive, self._lifespan_send(send))
                return
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if scope.get("root_path"):
            path = route_path(scope)
        if path in self._exempt_paths or (self._exempt_more and self._exempt(scope, path)):
            await self.app(scope, receive, send)
            return
        plan = self._match(scope, path) if self._rules else self._default
        if plan is None:
            await self.app(scope, receive, send)
            return

        fast = plan.fast
        headers: list[tuple[bytes, bytes]] | None = None
        if fast is not None:
            try:
                key = fast.key(scope)
                if key.__class__ is not str:
                    if hasattr(key, "__await__"):
                        key = await key
                    if key.__class__ is not str or not key:
                        key = self._odd_key(scope, key)
                elif not key:
                    key = self._odd_key(scope, key)
            except Exception as exc:
                key = self._key_error(scope, exc)
            allowed, remaining, reset, retry = fast.table.hit(key, fast.cost, self._now())
            if (
                fast.counter is not None
                and (allowed or fast.bound.policy.dry_run)
                and self.limiter._dependents
            ):
                # Decided for this request (counted, or a dry run's report made): a
                # dependency on the same limiter leaves it alone.
                _note_counted(scope, fast.counter, key)
            state_format = fast.state_format
            if allowed and state_format is not None:
                headers = (
                    [
                        fast.policy_field,
                        (b"ratelimit", state_format % (remaining, _ceil(reset))),
                    ]
                    if state_format
                    else []
                )
            else:
                policy = fast.bound.policy
                quota = policy.quotas[0]
                dry = policy.dry_run
                states: tuple[QuotaState, ...] = (
                    QuotaState(
                        quota.name, quota.burst, quota.window, remaining, reset, allowed, retry, dry
                    ),
                )
                if not allowed and dry:
                    allowed = True
                    self._report_dry_run(scope, plan, states)
        else:
            if kind == "http" and (plan.awaits or not self.limiter.is_memory):
                # A remote storage, or an async key or cost function, takes time: the
                # request's deadline counts from now.
                noted = get_record(scope)
                if noted.arrival is None:
                    noted.arrival = monotonic()
            allowed, states, error_deny, _ = await self._evaluate(scope, plan, path)
            if error_deny:
                await self._deny_storage(scope, receive, send, plan)
                return

        if not allowed:
            await self._reject(scope, receive, send, plan, states)
            return
        self.stats["allowed"] += 1
        tightest: list[LegacyValues | None] | None = None
        if headers is None:
            headers = self._headers_for(plan, states)
            if self._legacy and kind == "http" and LEGACY_KEY not in scope:
                # Dependencies add their tightest quota here; the legacy fields describe the
                # tightest of all (an outer RateLimitMiddleware that set it already does).
                enforced = [s for s in states if not s.dry_run]
                tightest = scope[LEGACY_KEY] = [legacy_values(enforced) if enforced else None]
        if kind != "http" or not (headers or self._wraps):
            await self.app(scope, receive, send)
            return
        entries: list[tuple[str, str]] | None = None
        if self._merges and FIELDS_KEY not in scope:
            # Dependencies add their entries here, and this middleware merges them (an outer
            # RateLimitMiddleware that set it already does).
            entries = scope[FIELDS_KEY] = []
        fields = headers

        # Not a coroutine function: it hands the message on and returns the awaitable of
        # the send it wraps, so each message costs no coroutine of its own.
        def send_with_headers(message: Message) -> Awaitable[None]:
            if message["type"] == "http.response.start":
                extra = fields
                if entries:
                    extra = _merge_fields(fields, entries)
                if tightest is not None and len(tightest) > 1:
                    extra = _merge_legacy(extra, tightest)
                # A new dict and list: the app may reuse its message (and its headers).
                given = message.get("headers")
                message = dict(message)
                message["headers"] = (
                    given + extra if given.__class__ is list else [*(given or ()), *extra]
                )
            return send(message)

        await self.app(scope, receive, send_with_headers)

    def _lifespan_send(self, send: Send) -> Send:
        """Check the event loop at startup and close the storage at shutdown."""
        limiter = self.limiter

        async def lifespan_send(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                try:
                    await limiter.startup()
                except ConfigurationError as exc:
                    message = {"type": "lifespan.startup.failed", "message": str(exc)}
            elif message["type"] == "lifespan.shutdown.complete":
                await limiter.aclose()
            await send(message)

        return lifespan_send

    def _odd_key(self, scope: Scope, key: object) -> str:
        """The key for what a key function returned that is not a non-empty exact ``str``:
        the string value of a ``str`` subclass (a ``str`` enum), else the socket peer."""
        if isinstance(key, str):
            if key:
                return str.__str__(key)
            return self._key_fallback(scope, "returned an empty string", None)
        return self._key_fallback(scope, f"returned {type(key).__name__} instead of a str", None)

    def _key_error(self, scope: Scope, exc: Exception) -> str:
        return self._key_fallback(scope, f"raised {type(exc).__name__}", exc)

    def _key_fallback(self, scope: Scope, what: str, exc: Exception | None) -> str:
        """Count the request under its socket peer; say so once."""
        if not self._key_failed:
            self._key_failed = True
            logger.error(
                "a rate-limit key function %s; such requests are counted under their "
                "socket peer address",
                what,
                exc_info=exc,
            )
        return peer_address(scope)

    async def _key_for(self, bound: _BoundPolicy, scope: Scope, path: str, per_path: bool) -> str:
        try:
            key: Any = bound.key(scope)
            if (bound.key_async or not isinstance(key, str)) and hasattr(key, "__await__"):
                key = await cast("Awaitable[Any]", key)
            if key.__class__ is not str or not key:
                key = self._odd_key(scope, key)
        except Exception as exc:
            key = self._key_error(scope, exc)
        return f"{path}\x00{key}" if per_path else cast("str", key)

    async def _cost_for(self, bound: _BoundPolicy, scope: Scope) -> int:
        cost = bound.cost
        if isinstance(cost, int):
            return cost
        try:
            value: Any = cost(scope)
            if hasattr(value, "__await__"):
                value = await value
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise TypeError(f"cost must be an int >= 0, got {value!r}")
            return value
        except Exception as exc:
            if not self._cost_failed:
                self._cost_failed = True
                logger.error(
                    "a rate-limit cost function failed (%s); such requests cost 1",
                    type(exc).__name__,
                    exc_info=exc,
                )
            return 1

    async def _evaluate(
        self, scope: Scope, plan: _Plan, path: str, conn: Any = None, *, again: bool = True
    ) -> _Outcome:
        """Decide every policy of ``plan`` for the request of ``scope``.

        Key and cost functions get ``conn`` (the dependency's ``Request``), or the scope.
        A named policy the request was counted against is noted in ``scope``; with
        ``again=False``, one already noted under the same key is skipped, not counted twice.
        """
        limiter = self.limiter
        arg = scope if conn is None else conn
        seen = None if again or not plan.named else scope.get(COUNTED_KEY)
        keys: dict[int, str] = {}
        resolved: list[tuple[_BoundPolicy, str, int]] = []
        skipped: list[_BoundPolicy] = []
        for bound in plan.bound:
            key = keys.get(id(bound.key))
            if key is None:
                key = keys[id(bound.key)] = await self._key_for(bound, arg, path, plan.per_path)
            if seen is not None and bound.counter is not None and (*bound.counter, key) in seen:
                skipped.append(bound)
                continue
            cost = bound.cost
            if not isinstance(cost, int):
                cost = await self._cost_for(bound, arg)
            resolved.append((bound, key, cost))
        allowed = True
        states: list[QuotaState] = []
        counted: list[tuple[tuple[int, str], str]] = []
        if limiter.is_memory:
            # No await from here on: check every policy, then commit only if every enforced
            # one admits, so a refused request consumes no quota anywhere and concurrent
            # requests cannot slip in between the check and the commit.
            now = limiter.clock.now()
            pending = []
            for bound, key, cost in resolved:
                tables = bound.tables or []
                results = [t.hit(key, cost, now, commit=False) for t in tables]
                ok = all(r[0] for r in results)
                if not ok and not bound.policy.dry_run:
                    allowed = False
                pending.append((bound, key, cost, tables, results, ok))
            for bound, key, cost, tables, results, ok in pending:
                if allowed and ok and cost:
                    results = [t.hit(key, cost, now) for t in tables]
                if allowed and bound.counter is not None and (ok or bound.policy.dry_run):
                    counted.append((bound.counter, key))
                dry = bound.policy.dry_run
                states.extend(
                    QuotaState(q.name, q.burst, q.window, r[1], r[2], r[0], r[3], dry)
                    for q, r in zip(bound.policy.quotas, results, strict=True)
                )
        else:
            for bound, key, cost in resolved:
                if not allowed and not bound.policy.dry_run:
                    continue  # refused already: later policies are not counted
                decision = await limiter._decide(bound.namespace, bound.policy, key, cost)
                if decision.storage_error:
                    self.stats["storage_errors"] += 1
                    if not decision.allowed:
                        return _Outcome(False, (), True, ())
                elif not decision.allowed:
                    allowed = False
                elif bound.counter is not None and (
                    bound.policy.dry_run or all(q.allowed for q in decision.quotas)
                ):
                    counted.append((bound.counter, key))
                states.extend(decision.quotas)
        result = tuple(states)
        if plan.has_dry_run and any(s.dry_run and not s.allowed for s in result):
            self._report_dry_run(arg, plan, result)
        if allowed and limiter._dependents:
            # Decided for this request (counted, or a dry run's report made): a dependency
            # on the same limiter leaves them alone.
            for counter, key in counted:
                _note_counted(scope, counter, key)
        return _Outcome(allowed, result, False, tuple(skipped))

    def _headers_for(
        self, plan: _Plan, states: tuple[QuotaState, ...]
    ) -> list[tuple[bytes, bytes]]:
        """The rate-limit fields of a response, from the state of its quotas."""
        enforced = [s for s in states if not s.dry_run]
        out: list[tuple[bytes, bytes]] = []
        mode = self.headers
        if mode in ("ietf", "both"):
            if plan.policy_header:
                out.append((b"ratelimit-policy", plan.policy_header))
            if enforced:
                out.append((b"ratelimit", ratelimit_header_value(enforced).encode("latin-1")))
        if mode in ("legacy", "both") and enforced:
            out.extend(legacy_headers(enforced))
        return out

    def _report_dry_run(self, scope: Scope, plan: _Plan, states: tuple[QuotaState, ...]) -> None:
        self.stats["dry_run"] += 1
        names = tuple(s.name for s in states if s.dry_run and not s.allowed)
        event = RateLimitEvent(
            "dry_run",
            names,
            scope.get("method", "WEBSOCKET"),
            scope["path"],
            plan.route,
            max(s.retry_after for s in states if s.dry_run and not s.allowed),
        )
        emit(
            event,
            self._handlers,
            self._callback_guard,
            logging.INFO,
            f"dry run: {event.method} {event.path} would be rate limited by {', '.join(names)}",
        )

    async def _reject(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        plan: _Plan,
        states: tuple[QuotaState, ...],
    ) -> None:
        self.stats["rejected"] += 1
        get_record(scope).refused = True  # an outer load shedder does not learn from it
        violated = [s for s in states if not s.allowed and not s.dry_run]
        retry = retry_after_seconds(max(s.retry_after for s in violated), self.retry_after_jitter)
        names = [s.name for s in violated]
        headers = [("Retry-After", str(retry))] if retry else []
        headers.extend(
            (k.decode(), v.decode("latin-1")) for k, v in self._headers_for(plan, states)
        )
        self._report_rejection(scope, plan, names, retry)
        rejection = Rejection(
            status=429,
            type=self.problem_type,
            title="Too Many Requests",
            detail=rejection_detail(retry),
            headers=headers,
            extensions={"violated-policies": names},
            guard="rate_limit",
        )
        await send_rejection(rejection, scope, receive, send, self.response)

    def _report_rejection(self, scope: Scope, plan: _Plan, names: list[str], retry: int) -> None:
        """Count a 429 and tell the callbacks (and the DEBUG log)."""
        if self._handlers or logger.isEnabledFor(logging.DEBUG):
            event = RateLimitEvent(
                "rejected",
                tuple(names),
                scope.get("method", "WEBSOCKET"),
                scope["path"],
                plan.route,
                retry,
            )
            emit(
                event,
                self._handlers,
                self._callback_guard,
                logging.DEBUG,
                f"rate limited: {event.method} {event.path} by {', '.join(names)}",
            )

    def _report_storage_denied(self, scope: Scope, plan: _Plan) -> None:
        """Count a 503 of a failing storage and tell the callbacks."""
        self.stats["rejected"] += 1
        names = [q.name for b in plan.bound for q in b.policy.quotas]
        event = RateLimitEvent(
            "storage_denied",
            tuple(names),
            scope.get("method", "WEBSOCKET"),
            scope["path"],
            plan.route,
            1.0,
        )
        emit(event, self._handlers, self._callback_guard)

    async def _deny_storage(self, scope: Scope, receive: Receive, send: Send, plan: _Plan) -> None:
        get_record(scope).refused = True
        self._report_storage_denied(scope, plan)
        await send_rejection(storage_rejection(), scope, receive, send, self.response)


def _merge_fields(
    fields: list[tuple[bytes, bytes]], entries: list[tuple[str, str]]
) -> list[tuple[bytes, bytes]]:
    """Append the entries dependencies recorded to the middleware's RateLimit fields."""
    policy = ", ".join(e[0] for e in entries).encode("latin-1")
    state = ", ".join(e[1] for e in entries).encode("latin-1")
    merged = dict(fields)
    for name, value in ((b"ratelimit-policy", policy), (b"ratelimit", state)):
        merged[name] = merged[name] + b", " + value if name in merged else value
    return list(merged.items())


def _merge_legacy(
    fields: list[tuple[bytes, bytes]], tightest: list[LegacyValues | None]
) -> list[tuple[bytes, bytes]]:
    """The middleware's fields with one set of legacy fields: those of the tightest of its
    own quota (``tightest[0]``, None without one) and the dependencies' behind it."""
    values = min((v for v in tightest if v is not None), key=tightness)
    merged = dict(fields)
    merged.update(legacy_fields(*values))
    return list(merged.items())


def _note_counted(scope: Scope, counter: tuple[int, str], key: str) -> None:
    """Record in the scope that the request was counted against a named policy."""
    counted = scope.get(COUNTED_KEY)
    if counted is None:
        counted = scope[COUNTED_KEY] = set()
    counted.add((*counter, key))


def storage_rejection() -> Rejection:
    """The 503 for a policy with ``on_storage_error="deny"`` while its storage fails."""
    return Rejection(
        status=503,
        type=TEMPORARY_REDUCED_CAPACITY,
        title="Service Unavailable",
        detail="The rate limiter cannot reach its storage; retry shortly.",
        headers=[("Retry-After", "1")],
        guard="rate_limit",
    )
