"""The rate-limit engine: decides, with no knowledge of ASGI."""

from __future__ import annotations

import asyncio
import logging
import math
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import anyio
from limits.aio import strategies as aio_strategies
from limits.aio.storage import (
    RedisClusterStorage,
    RedisSentinelStorage,
    RedisStorage,
    Storage,
)
from limits.errors import ConfigurationError as LimitsConfigurationError
from limits.storage import storage_from_string

from ._clock import Clock, MonotonicClock
from ._errors import ConfigurationError
from ._events import EventHandler, StorageEvent, _CallbackGuard, emit
from ._memory import (
    FixedWindowTable,
    HitResult,
    MemoryTable,
    MovingWindowTable,
    SlidingWindowTable,
    TokenBucketTable,
)
from ._policy import Policy, Quota

__all__ = ["QuotaState", "RateLimitDecision", "RateLimiter"]

logger = logging.getLogger("asgi_guard.ratelimit")

_MEMORY_SCHEMES = ("memory", "async+memory")
_REMOTE_SCHEMES = {
    "redis": "async+redis",
    "rediss": "async+redis",
    "redis+unix": "async+redis",
    "redis+cluster": "async+redis+cluster",
    "redis+sentinel": "async+redis+sentinel",
    "valkey": "async+valkey",
    "valkeys": "async+valkey",
    "valkey+unix": "async+valkey",
    "valkey+cluster": "async+valkey+cluster",
    "valkey+sentinel": "async+valkey+sentinel",
    "memcached": "async+memcached",
}

# GCRA in one atomic step, on the server's clock so that every process agrees.
_GCRA_LUA = """
if redis.replicate_commands then pcall(redis.replicate_commands) end
local interval = tonumber(ARGV[1])
local tau = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new_tat = tat + cost * interval
if new_tat - now > tau + 1e-9 then
  return {0, tostring(tat - now), tostring(new_tat - tau - now)}
end
redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.ceil((new_tat - now) * 1000) + 1)
return {1, tostring(new_tat - now), '0'}
"""


@dataclass(frozen=True)
class QuotaState:
    """The state of one quota after a request was counted (or refused).

    Attributes:
        name: The quota's name in the RateLimit headers.
        limit: How many requests (cost units) the quota allows per window.
        window: The window in seconds.
        remaining: What is left in the current window after this request.
        reset_after: Seconds until the quota is whole again.
        allowed: Whether this quota admitted the request.
        retry_after: Seconds until a request of the same cost would pass (0 if allowed).
        dry_run: The quota belongs to a dry-run policy: it never rejects.
    """

    name: str
    limit: int
    window: int
    remaining: int
    reset_after: float
    allowed: bool
    retry_after: float
    dry_run: bool = False


@dataclass(frozen=True)
class RateLimitDecision:
    """What `hit` decided.

    Attributes:
        allowed: Whether the request may proceed.
        quotas: The state of every quota that was evaluated.
        storage_error: The storage failed; ``allowed`` then follows ``on_storage_error``.
    """

    allowed: bool
    quotas: tuple[QuotaState, ...]
    storage_error: bool = False

    @property
    def violated(self) -> tuple[str, ...]:
        """Names of the enforced quotas that refused the request."""
        return tuple(q.name for q in self.quotas if not q.allowed and not q.dry_run)

    @property
    def retry_after(self) -> float:
        """Seconds until every violated quota would admit the request again."""
        return max(
            (q.retry_after for q in self.quotas if not q.allowed and not q.dry_run), default=0.0
        )


def _redact(uri: str) -> str:
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urllib.parse.urlunsplit(parts._replace(netloc=user + netloc))


class RateLimiter:
    """The rate-limit engine, shared by middlewares and dependencies that pass it.

    Args:
        storage: ``"memory://"`` (the default: this package's own in-process store) or a
            ``limits`` storage URI for many processes: ``"redis://127.0.0.1:6379"``,
            ``"redis+cluster://..."``, ``"redis+sentinel://..."``, ``"valkey://..."``,
            ``"memcached://127.0.0.1:11211"``. Remote storages run on asyncio only.
        max_keys: In memory: the most keys one quota keeps; past half of it the least
            recently used half is evicted (and counted in `evictions`). ``None`` for
            no bound.
        timeout: Seconds a remote storage call may take before it counts as failed.
        storage_options: Extra keyword arguments for the ``limits`` storage.
        clock: The clock of the memory store (tests pass a `ManualClock`).
        on_event: Callbacks for `StorageEvent` (outage started, outage ended).

    Examples:
        >>> limiter = RateLimiter()            # in memory
        >>> shared = RateLimiter("redis://127.0.0.1:6379", timeout=0.1)
    """

    def __init__(
        self,
        storage: str = "memory://",
        *,
        max_keys: int | None = 1_000_000,
        timeout: float = 0.05,
        storage_options: dict[str, Any] | None = None,
        clock: Clock | None = None,
        on_event: EventHandler | Sequence[EventHandler] = (),
    ) -> None:
        if not isinstance(storage, str):
            raise ConfigurationError(f"storage must be a URI string, got {type(storage).__name__}")
        scheme = urllib.parse.urlsplit(storage).scheme.lower() if "://" in storage else ""
        if max_keys is not None and (
            isinstance(max_keys, bool) or not isinstance(max_keys, int) or max_keys < 2
        ):
            raise ConfigurationError(f"max_keys must be an int >= 2 or None, got {max_keys!r}")
        if not isinstance(timeout, (int, float)) or not (0 < timeout < math.inf):
            raise ConfigurationError(
                f"timeout must be a positive number of seconds, got {timeout!r}"
            )
        self.uri = _redact(storage)
        self.max_keys = max_keys
        self.timeout = float(timeout)
        self.clock: Clock = clock if clock is not None else MonotonicClock()
        self._handlers: tuple[EventHandler, ...] = (
            (on_event,) if callable(on_event) else tuple(on_event)
        )
        self._callback_guard = _CallbackGuard()
        self._tables: dict[tuple[str, str, str], MemoryTable[Any]] = {}
        self._storage: Storage | None = None
        self._strategies: dict[str, aio_strategies.RateLimiter] = {}
        self._gcra: Any = None
        self._down = False
        if scheme in _MEMORY_SCHEMES:
            self.is_memory = True
            return
        self.is_memory = False
        target = _REMOTE_SCHEMES.get(scheme) or (scheme if scheme.startswith("async+") else None)
        if target is None:
            known = ", ".join(sorted({"memory", *_REMOTE_SCHEMES}))
            raise ConfigurationError(
                f"unknown storage URI {self.uri!r}: the scheme must be one of {known}"
            )
        try:
            self._storage = storage_from_string(
                target + storage[len(scheme) :], **(storage_options or {})
            )  # type: ignore[assignment]
        except LimitsConfigurationError as exc:
            raise ConfigurationError(
                f"cannot use storage {self.uri!r}: {exc}. The client library comes with "
                f"'pip install asgi-guard[redis]' or 'asgi-guard[memcached]'"
            ) from exc
        except Exception as exc:
            raise ConfigurationError(f"cannot use storage {self.uri!r}: {exc}") from exc

    # -- memory ---------------------------------------------------------------------------

    def _table(self, namespace: str, quota: Quota, strategy: str) -> MemoryTable[Any]:
        """The in-memory table that counts ``quota`` in ``namespace`` (memory storage only)."""
        ident = (namespace, quota.name, strategy)
        table = self._tables.get(ident)
        if table is None:
            table = self._new_table(quota, strategy)
            self._tables[ident] = table
        return table

    def _new_table(self, quota: Quota, strategy: str) -> MemoryTable[Any]:
        if strategy == "fixed-window":
            return FixedWindowTable(quota.amount, quota.period, self.max_keys)
        if strategy == "token-bucket":
            return TokenBucketTable(quota.amount, quota.period, quota.burst, self.max_keys)
        if strategy == "sliding-window-counter":
            return SlidingWindowTable(quota.amount, quota.period, self.max_keys)
        return MovingWindowTable(quota.amount, quota.period, self.max_keys)

    @property
    def evictions(self) -> int:
        """Keys the memory store dropped because a quota reached ``max_keys``."""
        return sum(t.evictions for t in self._tables.values())

    @property
    def keys(self) -> int:
        """Keys the memory store holds now (expired ones may linger until their turn)."""
        return sum(len(t) for t in self._tables.values())

    # -- remote ---------------------------------------------------------------------------

    def _check_supported(self, policy: Policy) -> None:
        """Raise `ConfigurationError` if the storage cannot run ``policy``."""
        if self.is_memory:
            return
        storage = self._storage
        if policy.strategy == "token-bucket":
            if not isinstance(storage, (RedisStorage, RedisClusterStorage, RedisSentinelStorage)):
                raise ConfigurationError(
                    "strategy 'token-bucket' needs memory or Redis/Valkey storage, "
                    f"not {self.uri!r}"
                )
            return
        try:
            self._strategy(policy.strategy)
        except NotImplementedError as exc:
            raise ConfigurationError(
                f"storage {self.uri!r} does not support strategy {policy.strategy!r}"
            ) from exc

    def _strategy(self, name: str) -> aio_strategies.RateLimiter:
        strategy = self._strategies.get(name)
        if strategy is None:
            assert self._storage is not None
            cls: type[Any] = {
                "fixed-window": aio_strategies.FixedWindowRateLimiter,
                "moving-window": aio_strategies.MovingWindowRateLimiter,
                "sliding-window-counter": aio_strategies.SlidingWindowCounterRateLimiter,
            }[name]
            strategy = self._strategies[name] = cls(self._storage)
        return strategy

    async def _remote_hit(
        self, namespace: str, quota: Quota, strategy: str, key: str, cost: int
    ) -> HitResult:
        if strategy == "token-bucket":
            if self._gcra is None:
                bridge = self._storage.bridge  # type: ignore[union-attr]
                self._gcra = bridge.get_connection().register_script(_GCRA_LUA)
            interval = quota.period / quota.amount
            redis_key = f"asgi_guard/gcra/{namespace}/{quota.name}/{key}"
            ok, reset, retry = await self._gcra(
                keys=[redis_key], args=[repr(interval), repr(interval * quota.burst), str(cost)]
            )
            reset_after = float(reset)
            remaining = int((interval * quota.burst - reset_after) / interval + 1e-9)
            return bool(int(ok)), max(0, remaining), reset_after, float(retry)
        limiter = self._strategy(strategy)
        item = quota.item
        allowed = await limiter.hit(item, namespace, key, cost=cost)
        stats = await limiter.get_window_stats(item, namespace, key)
        reset_after = max(0.0, stats.reset_time - time.time())
        return allowed, stats.remaining, reset_after, 0.0 if allowed else reset_after

    def _storage_failed(self, exc: BaseException) -> None:
        if self._down:
            return
        self._down = True
        error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        emit(
            StorageEvent("unavailable", self.uri, error),
            self._handlers,
            self._callback_guard,
            logging.WARNING,
            f"rate-limit storage {self.uri} is unavailable ({error}); "
            f"policies now follow their on_storage_error setting",
        )

    def _storage_ok(self) -> None:
        self._down = False
        emit(
            StorageEvent("recovered", self.uri, ""),
            self._handlers,
            self._callback_guard,
            logging.WARNING,
            f"rate-limit storage {self.uri} answers again",
        )

    # -- deciding -------------------------------------------------------------------------

    async def hit(
        self, policy: Policy, key: str, *, cost: int = 1, namespace: str | None = None
    ) -> RateLimitDecision:
        """Count one request of ``cost`` for ``key`` against every quota of ``policy``.

        Args:
            policy: The policy to apply.
            key: The client's identity (what ``policy`` counts per).
            cost: How many units the request consumes.
            namespace: Separates counters of the same policy; defaults to the policy's name
                (or its limit string for an unnamed policy).

        Returns:
            The decision, with the state of every quota. A storage failure never raises;
            the decision has ``storage_error=True`` and follows ``policy.on_storage_error``.

        Examples:
            >>> import anyio
            >>> limiter = RateLimiter()
            >>> policy = Policy("2/minute", name="demo")
            >>> [anyio.run(limiter.hit, policy, "client-1").allowed for _ in range(3)]
            [True, True, False]
        """
        if namespace is None:
            namespace = policy.name if policy.name is not None else policy.limit
        self._check_supported(policy)
        return await self._decide(namespace, policy, key, cost)

    def _check_event_loop(self) -> None:
        """Raise `ConfigurationError` if a remote storage runs outside asyncio.

        ``limits``' async storages are built on asyncio; on trio only the memory store works.
        """
        if self.is_memory:
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise ConfigurationError(
                f"storage {self.uri!r} needs asyncio (limits' async storages are built on it); "
                f"on trio use storage='memory://'"
            ) from None

    async def _decide(
        self, namespace: str, policy: Policy, key: str, cost: int
    ) -> RateLimitDecision:
        """Count one request against ``policy`` in ``namespace`` (see `hit`)."""
        quotas = policy.quotas
        strategy = policy.strategy
        dry = policy.dry_run
        if self.is_memory:
            now = self.clock.now()
            tables = [self._table(namespace, q, strategy) for q in quotas]
            if len(quotas) == 1:
                results = [tables[0].hit(key, cost, now)]
            else:
                results = [t.hit(key, cost, now, commit=False) for t in tables]
                if all(r[0] for r in results):
                    results = [t.hit(key, cost, now) for t in tables]
            return _decision(quotas, results, dry)
        try:
            self._check_event_loop()
            with anyio.fail_after(self.timeout):
                results = [
                    await self._remote_hit(namespace, q, strategy, key, cost) for q in quotas
                ]
        except Exception as exc:
            self._storage_failed(exc)
            return RateLimitDecision(
                policy.on_storage_error == "allow" or dry, (), storage_error=True
            )
        if self._down:
            self._storage_ok()
        return _decision(quotas, results, dry)

    async def aclose(self) -> None:
        """Release the storage's connections (a no-op in memory)."""
        storage = self._storage
        bridge = getattr(storage, "bridge", None)
        client = getattr(bridge, "storage", None)
        close = getattr(client, "aclose", None) or getattr(client, "close", None)
        if close is not None:
            with anyio.move_on_after(1):
                result = close()
                if hasattr(result, "__await__"):
                    await result

    def reset(self) -> None:
        """Forget every in-memory counter (tests; remote storages are left alone)."""
        for table in self._tables.values():
            table.clear()


def _decision(quotas: tuple[Quota, ...], results: list[HitResult], dry: bool) -> RateLimitDecision:
    states = tuple(
        QuotaState(q.name, q.burst, q.window, r[1], r[2], r[0], r[3], dry)
        for q, r in zip(quotas, results, strict=False)
    )
    return RateLimitDecision(dry or all(r[0] for r in results), states)
