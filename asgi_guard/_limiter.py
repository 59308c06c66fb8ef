"""The rate-limit engine: decides, with no knowledge of ASGI."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import re
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

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
from ._events import EventHandler, StorageEvent, _CallbackGuard, emit, event_handlers
from ._memory import (
    FixedWindowTable,
    HitResult,
    MovingWindowTable,
    SlidingWindowTable,
    Table,
    TokenBucketTable,
)
from ._policy import Policy, Quota

__all__ = ["QuotaState", "RateLimitDecision", "RateLimiter"]

logger = logging.getLogger("asgi_guard.ratelimit")

#: Storage calls one limiter has in flight at once; more wait their turn, untimed.
MAX_IN_FLIGHT = 16
#: Seconds between attempts to reach a storage that is down.
PROBE_INTERVAL = 0.5
#: An outage is declared after this many failed calls in a row ...
DOWN_AFTER_FAILURES = 3
#: ... with no call answered for this long (or twice the timeout, if longer).
DOWN_AFTER_SECONDS = 0.2
#: Seconds the startup probe (which also opens the connection) may take.
STARTUP_TIMEOUT = 1.0

_MEMORY_SCHEMES = ("memory", "async+memory")
_REMOTE_SCHEMES = {
    "redis": "async+redis",
    "rediss": "async+rediss",  # TLS
    "redis+unix": "async+redis+unix",  # a unix socket
    "redis+cluster": "async+redis+cluster",
    "redis+sentinel": "async+redis+sentinel",
    "valkey": "async+valkey",
    "valkeys": "async+valkeys",
    "valkey+unix": "async+valkey+unix",
    "valkey+cluster": "async+valkey+cluster",
    "valkey+sentinel": "async+valkey+sentinel",
    "memcached": "async+memcached",
}

#: Schemes whose URI path is a database number (``redis://host/2``); a unix socket's is the
#: socket's path, a sentinel's the service name.
_DB_PATH_SCHEMES = frozenset({"redis", "rediss", "valkey", "valkeys"})
_DB_PATH = re.compile(r"/\d+")
#: Schemes whose URI names a unix socket (its path), not hosts.
_SOCKET_SCHEMES = frozenset({"redis+unix", "valkey+unix"})
#: storage_options that give the client its connections, so that the URI needs no host.
_CONNECTION_OPTIONS = ("connection_pool", "startup_nodes")

#: The longest namespace or key a remote storage sees; a longer one becomes a digest. limits
#: adds about 30 characters and the limit's digits around the two (``LIMITER/<namespace>/
#: <key>/100/1/minute/expires``), which stays under memcached's 250 bytes.
_MAX_STORAGE_KEY = 100
#: What a namespace or key keeps as is: printable ASCII, less the characters that delimit
#: key names (``/`` in limits', ``{``, ``|`` and ``}`` in ours) and ``%``, the escape.
_PLAIN_STORAGE_KEY = re.compile(rf"[!-$&-.0-z~]{{0,{_MAX_STORAGE_KEY}}}")
_ESCAPED_BYTES = tuple(
    chr(b) if 0x21 <= b <= 0x7E and chr(b) not in "%/{|}" else f"%{b:02X}" for b in range(256)
)

# Redis decides a whole policy (every quota) in one round trip and one atomic step: check
# every quota, commit only if all admit, so a refused request consumes nothing, as in memory.
# Times are in milliseconds; numbers go back as strings because Lua numbers become integers.

# KEYS: one counter per quota. ARGV: cost, then amount and window (ms) per quota.
# Windows start at a key's first hit, as in limits' fixed window.
_FIXED_WINDOW_LUA = """
local cost = tonumber(ARGV[1])
local ok = 1
local counts, ttls = {}, {}
for i = 1, #KEYS do
  local count = tonumber(redis.call('GET', KEYS[i]) or '0')
  local ttl = redis.call('PTTL', KEYS[i])
  if ttl < 0 then
    count = 0
    ttl = tonumber(ARGV[2 * i + 1])
  end
  counts[i], ttls[i] = count, ttl
  if count + cost > tonumber(ARGV[2 * i]) then ok = 0 end
end
if ok == 1 and cost > 0 then
  for i = 1, #KEYS do
    if counts[i] == 0 then
      redis.call('SET', KEYS[i], cost, 'PX', ARGV[2 * i + 1])
      counts[i] = cost
    else
      counts[i] = redis.call('INCRBY', KEYS[i], cost)
    end
  end
end
local out = {ok}
for i = 1, #KEYS do
  out[2 * i] = tostring(counts[i])
  out[2 * i + 1] = tostring(ttls[i])
end
return out
"""

# GCRA on the server's clock, so that every process agrees. KEYS: one TAT per quota.
# ARGV: cost, then emission interval and burst tolerance (ms) per quota.
_TOKEN_BUCKET_LUA = """
if redis.replicate_commands then pcall(redis.replicate_commands) end
local cost = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local ok = 1
local tats, news = {}, {}
for i = 1, #KEYS do
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
  if tat < now then tat = now end
  tats[i] = tat
  news[i] = tat + cost * tonumber(ARGV[2 * i])
  if news[i] - now > tonumber(ARGV[2 * i + 1]) + 1e-6 then ok = 0 end
end
if ok == 1 and cost > 0 then
  for i = 1, #KEYS do
    redis.call('SET', KEYS[i], string.format('%.3f', news[i]), 'PX',
      math.ceil(news[i] - now) + 1)
  end
end
local out = {ok}
for i = 1, #KEYS do
  local tat = tats[i]
  if ok == 1 then tat = news[i] end
  out[2 * i] = string.format('%.3f', tat - now)
  out[2 * i + 1] = string.format('%.3f', news[i] - tonumber(ARGV[2 * i + 1]) - now)
end
return out
"""


class QuotaState(NamedTuple):
    """The state of one quota after a request was counted (or refused).

    Attributes:
        name: The quota's name in the RateLimit headers.
        limit: How many requests (cost units) the quota allows per window.
        window: The window in seconds.
        remaining: What is left in the current window after this request (as it was, when
            the request was refused and so not counted).
        reset_after: Seconds until the quota is whole again.
        allowed: Whether this quota admitted the request.
        retry_after: Seconds until a request of the same cost would pass (0 if allowed,
            ``math.inf`` if its cost exceeds the whole quota, so that it can never pass).
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


def _storage_key(part: str) -> str:
    """``part`` (a namespace or a key) as a remote storage may hold it in a key name.

    Memcached refuses whitespace, control characters and keys over 250 bytes (and its text
    protocol takes CR LF for the end of a command); limits joins namespace and key with
    ``/``; a Redis Cluster hash tag ends at the first ``}``. So the bytes that are not
    printable ASCII, and ``%/{|}``, are percent-escaped, and a result over
    `_MAX_STORAGE_KEY` characters becomes ``%sha256:`` and 32 hex digits (no escape starts
    with ``%s``). Distinct parts stay distinct.

    Examples:
        >>> _storage_key("policy:api"), _storage_key("POST /login"), _storage_key("a/b")
        ('policy:api', 'POST%20%2Flogin', 'a%2Fb')
    """
    if _PLAIN_STORAGE_KEY.fullmatch(part):
        return part
    raw = part.encode("utf-8", "surrogatepass")
    if len(raw) <= _MAX_STORAGE_KEY:
        escaped = "".join([_ESCAPED_BYTES[b] for b in raw])
        if len(escaped) <= _MAX_STORAGE_KEY:
            return escaped
    return "%sha256:" + hashlib.sha256(raw).hexdigest()[:32]


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
        max_keys: In memory: the most keys one quota keeps. When it is full the least
            recently used half is evicted (and counted in `evictions`), so size it at
            about twice the clients active within one period. ``None`` for no bound.
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
        try:
            parts = urllib.parse.urlsplit(storage)
        except ValueError as exc:  # a malformed host ("redis://[::1")
            raise ConfigurationError(f"malformed storage URI: {exc}") from None
        scheme = parts.scheme.lower() if "://" in storage else ""
        if max_keys is not None and (
            isinstance(max_keys, bool) or not isinstance(max_keys, int) or max_keys < 2
        ):
            raise ConfigurationError(f"max_keys must be an int >= 2 or None, got {max_keys!r}")
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, (int, float))
            or not (0 < timeout < math.inf)
        ):
            raise ConfigurationError(
                f"timeout must be a positive number of seconds, got {timeout!r}"
            )
        if clock is not None and not callable(getattr(clock, "now", None)):
            raise ConfigurationError(
                f"clock must have a now() method returning seconds, got {clock!r}"
            )
        if storage_options is not None and not isinstance(storage_options, dict):
            raise ConfigurationError(
                f"storage_options must be a dict of keyword arguments, got "
                f"{type(storage_options).__name__}"
            )
        self.uri = _redact(storage)
        self.max_keys = max_keys
        self.timeout = float(timeout)
        self.clock: Clock = clock if clock is not None else MonotonicClock()
        self._handlers = event_handlers(on_event)
        self._callback_guard = _CallbackGuard()
        self._tables: dict[tuple[str, str, str], Table] = {}
        self._claims: dict[str, list[object]] = {}
        self._named: dict[str, tuple[object, ...]] = {}
        #: Whether a `rate_limit` dependency decides on this limiter too: only then do
        #: requests note the named policies they were counted against, for it to skip.
        self._dependents = False
        self._storage: Storage | None = None
        self._strategies: dict[str, aio_strategies.RateLimiter] = {}
        self._scripts: dict[str, Any] = {}
        self._scripted = False
        self._key_prefix = ""
        self._gate = anyio.Semaphore(MAX_IN_FLIGHT)
        self._next_probe = 0.0
        self._started = False
        self._start_lock = anyio.Lock()
        self._down = False
        self._failures = 0
        self._last_ok = -math.inf
        if scheme in _MEMORY_SCHEMES:
            self.is_memory = True
            return
        self.is_memory = False
        plain = scheme.removeprefix("async+")
        target = _REMOTE_SCHEMES.get(plain)
        if target is None:
            known = ", ".join(sorted({"memory", *_REMOTE_SCHEMES}))
            raise ConfigurationError(
                f"unknown storage URI {self.uri!r}: the scheme must be one of {known}"
            )
        if plain in _SOCKET_SCHEMES:
            if parts.path in ("", "/"):
                raise ConfigurationError(
                    f"storage URI {self.uri!r} names no socket: write its path, such as "
                    f"'{plain}:///run/redis.sock'"
                )
        elif not parts.netloc.rpartition("@")[2] and not any(
            option in (storage_options or {}) for option in _CONNECTION_OPTIONS
        ):
            # The client would try a default host at the first request, or none at all.
            raise ConfigurationError(
                f"storage URI {self.uri!r} names no host: write host:port after '//' "
                f"(several, separated by commas, for a cluster or sentinels)"
                + (
                    "; limits' memcached storage takes no unix socket"
                    if plain == "memcached" and parts.path
                    else ""
                )
            )
        if (
            plain in _DB_PATH_SCHEMES
            and parts.path not in ("", "/")
            and not _DB_PATH.fullmatch(parts.path)
        ):
            # Given to the client as is, "/abc" or "/3x" meant database 0.
            raise ConfigurationError(
                f"storage URI {self.uri!r}: the path names a database number, such as "
                f"'/2', not {parts.path!r}"
            )
        password = parts.password
        try:
            self._storage = storage_from_string(
                target + storage[len(scheme) :], **(storage_options or {})
            )  # type: ignore[assignment]
        except Exception as exc:
            reason = str(exc).replace(password, "***") if password else str(exc)
            hint = ""
            if isinstance(exc, LimitsConfigurationError) and "dependenc" in reason.lower():
                hint = " (install it with 'pip install asgi-guard[redis]' or '[memcached]')"
            raise ConfigurationError(f"cannot use storage {self.uri!r}: {reason}{hint}") from None
        if isinstance(self._storage, (RedisStorage, RedisClusterStorage, RedisSentinelStorage)):
            self._scripted = True
            # storage_options={"key_prefix": ...} keeps apart services sharing one Redis;
            # limits puts it in front of its keys ("LIMITS" by default), we do in front of ours.
            self._key_prefix = self._storage.bridge.key_prefix

    # -- memory ---------------------------------------------------------------------------

    def _table(self, namespace: str, quota: Quota, strategy: str) -> Table:
        """The in-memory table that counts ``quota`` in ``namespace`` (memory storage only)."""
        ident = (namespace, quota.name, strategy)
        table = self._tables.get(ident)
        if table is None:
            table = self._new_table(quota, strategy)
            self._tables[ident] = table
        return table

    def _new_table(self, quota: Quota, strategy: str) -> Table:
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

    def _claim(self, namespace: str, owner: object) -> str:
        """A namespace of ``owner``'s own: ``namespace``, or ``namespace#2``... if taken.

        Places claim in construction order, so every process numbers them alike.
        """
        owners = self._claims.setdefault(namespace, [])
        if owner not in owners:
            owners.append(owner)
        index = owners.index(owner)
        return namespace if index == 0 else f"{namespace}#{index + 1}"

    def _check_supported(self, policy: Policy) -> None:
        """Raise `ConfigurationError` if the storage cannot run ``policy``, or if another
        policy of the same name counts differently in this limiter."""
        if policy.name is not None:
            shape = (policy.strategy, tuple((q.amount, q.period, q.burst) for q in policy.quotas))
            known = self._named.setdefault(policy.name, shape)
            if known != shape:
                raise ConfigurationError(
                    f"two different policies are named {policy.name!r} in one limiter; a "
                    f"name is one quota wherever it is used: rename one of them"
                )
        if self.is_memory:
            return
        if policy.strategy == "token-bucket":
            if not self._scripted:
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

    def _script(self, strategy: str) -> Any:
        script = self._scripts.get(strategy)
        if script is None:
            source = _FIXED_WINDOW_LUA if strategy == "fixed-window" else _TOKEN_BUCKET_LUA
            client = self._storage.bridge.get_connection()  # type: ignore[union-attr]
            script = self._scripts[strategy] = client.register_script(source)
        return script

    async def _remote_policy(
        self, namespace: str, policy: Policy, key: str, cost: int
    ) -> list[HitResult]:
        quotas = policy.quotas
        strategy = policy.strategy
        namespace, key = _storage_key(namespace), _storage_key(key)
        if self._scripted and strategy in ("fixed-window", "token-bucket"):
            # One hash tag for all of a policy's keys: one slot in a Redis Cluster.
            tag = f"{self._key_prefix}:asgi_guard:{{{namespace}|{key}}}"
            keys = [f"{tag}:{q.name}:{strategy}" for q in quotas]
            args: list[str] = [str(cost)]
            if strategy == "fixed-window":
                for q in quotas:
                    args += [str(q.amount), str(q.period * 1000)]
            else:
                for q in quotas:
                    interval = q.period * 1000 / q.amount
                    args += [repr(interval), repr(interval * q.burst)]
            reply = await self._script(strategy)(keys=keys, args=args)
            ok = bool(int(reply[0]))
            results: list[HitResult] = []
            for i, q in enumerate(quotas):
                first, second = float(reply[2 * i + 1]), float(reply[2 * i + 2])
                if strategy == "fixed-window":
                    count, reset = int(first), second / 1000
                    fits = count + (0 if ok else cost) <= q.amount
                    results.append((fits, max(0, q.amount - count), reset, 0.0 if fits else reset))
                else:
                    interval = q.period / q.amount
                    reset, retry = first / 1000, max(0.0, second / 1000)
                    fits = second <= 1e-6
                    remaining = int((interval * q.burst - reset) / interval + 1e-9)
                    results.append((fits, max(0, remaining), reset, 0.0 if fits else retry))
            return results
        results = []
        refused = False
        for q in quotas:
            limiter = self._strategy(strategy)
            item = q.item
            # After a refusal the later quotas are only read, not counted.
            allowed = True if refused else await limiter.hit(item, namespace, key, cost=cost)
            refused = refused or not allowed
            stats = await limiter.get_window_stats(item, namespace, key)
            reset_after = stats.reset_time - time.time()
            if reset_after <= 0 and stats.remaining < q.amount:
                # limits reports "now" when an expiry lands on a window boundary.
                reset_after = float(q.period)
            reset_after = max(0.0, reset_after)
            results.append((allowed, stats.remaining, reset_after, 0.0 if allowed else reset_after))
        return results

    def _storage_failed(self, exc: BaseException, *, certain: bool = False) -> None:
        """Count a failed call; declare an outage once failures are sustained.

        One stall of the event loop (a long GC pause) can time out every call in flight at
        once; that fails those requests (they follow ``on_storage_error``) but is not an
        outage. An outage is several failures in a row with no success for a while, or a
        failed startup probe (``certain``).
        """
        self._failures += 1
        if self._down:
            return
        if not certain and (
            self._failures < DOWN_AFTER_FAILURES
            or anyio.current_time() - self._last_ok < max(2 * self.timeout, DOWN_AFTER_SECONDS)
        ):
            return
        self._down = True
        self._next_probe = anyio.current_time() + PROBE_INTERVAL
        error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        emit(
            StorageEvent("unavailable", self.uri, error),
            self._handlers,
            self._callback_guard,
            logging.WARNING,
            f"rate-limit storage {self.uri} is unavailable ({error}); "
            f"policies now follow their on_storage_error setting",
        )

    def _storage_answered(self) -> None:
        self._failures = 0
        self._last_ok = anyio.current_time()
        if self._down:
            self._storage_ok()

    def _storage_ok(self) -> None:
        self._down = False
        self._failures = 0  # the answer that ended the outage set _last_ok: a stall now is new
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
            cost: How many units the request consumes (an int >= 0).
            namespace: Separates counters of the same policy; defaults to the one the
                middleware and the dependency use for a named policy (so all of them share
                its counters), or the limit string for an unnamed one.

        Returns:
            The decision, with the state of every quota. A storage failure never raises;
            the decision has ``storage_error=True`` and follows ``policy.on_storage_error``.

        Raises:
            ConfigurationError: ``cost`` is not an int >= 0.

        Examples:
            >>> import anyio
            >>> limiter = RateLimiter()
            >>> policy = Policy("2/minute", name="demo")
            >>> [anyio.run(limiter.hit, policy, "client-1").allowed for _ in range(3)]
            [True, True, False]
        """
        if isinstance(cost, bool) or not isinstance(cost, int) or cost < 0:
            raise ConfigurationError(f"cost must be an int >= 0, got {cost!r}")
        if namespace is None:
            # The namespace the middleware and the dependency give a named policy.
            namespace = f"policy:{policy.name}" if policy.name is not None else policy.limit
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

    async def startup(self) -> None:
        """Check a remote storage before the first request (called on lifespan startup).

        An unreachable storage is an outage: it is logged and the policies follow their
        ``on_storage_error``. Anything else (a wrong option, a database that does not exist,
        trio) raises `ConfigurationError`, so that a broken configuration fails the server's
        startup instead of silently never limiting. The probe also opens the connection, so
        that the first requests do not pay for it against the storage timeout.

        Without lifespan, the first request that needs the storage runs the probe; a
        misconfiguration is then logged and treated as an outage (on trio every request
        raises `ConfigurationError`, as remote storages need asyncio).
        """
        if self.is_memory:
            return
        self._check_event_loop()
        assert self._storage is not None
        try:
            with anyio.fail_after(max(self.timeout, STARTUP_TIMEOUT)):
                await self._storage.get("asgi_guard:startup-probe")
        except Exception as exc:
            if not _is_outage(exc):
                raise ConfigurationError(
                    f"storage {self.uri!r} fails: {type(exc).__name__}: {exc}"
                ) from exc
            self._storage_failed(exc, certain=True)
        else:
            self._storage_answered()
        finally:
            self._started = True

    async def _lazy_startup(self) -> None:
        async with self._start_lock:
            if self._started:
                return
            try:
                await self.startup()
            except ConfigurationError as exc:
                self._storage_failed(exc, certain=True)

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
        self._check_event_loop()
        if not self._started:
            await self._lazy_startup()
        probing = False
        if self._down:
            # During an outage one request every PROBE_INTERVAL tries the storage; the others
            # follow on_storage_error at once instead of each waiting for the timeout.
            now = anyio.current_time()
            if now < self._next_probe:
                return _failed(policy)
            self._next_probe = now + PROBE_INTERVAL
            probing = True
        try:
            # The timeout measures the storage, not the queue of calls waiting their turn
            # on this event loop: a burst of requests must not look like an outage.
            async with self._gate:
                if self._down and not probing:
                    return _failed(policy)
                with anyio.fail_after(self.timeout):
                    results = await self._remote_policy(namespace, policy, key, cost)
        except Exception as exc:
            self._storage_failed(exc)
            return _failed(policy)
        self._storage_answered()
        if any(cost > q.burst for q in quotas):
            # Such a request can never pass: no finite time to retry after.
            results = [
                (r[0], r[1], r[2], math.inf if not r[0] and cost > q.burst else r[3])
                for q, r in zip(quotas, results, strict=True)
            ]
        return _decision(quotas, results, dry)

    async def aclose(self) -> None:
        """Release the storage's connections (a no-op in memory)."""
        storage = self._storage
        bridge = getattr(storage, "bridge", None)
        client = getattr(bridge, "storage", None)
        if client is None:
            return
        # redis-py's client closes itself (``aclose``), coredis' only through its pool
        # (``connection_pool.disconnect``); emcache's has ``close``.
        pool = getattr(client, "connection_pool", None)
        for close in (
            getattr(client, "aclose", None) or getattr(client, "close", None),
            getattr(pool, "disconnect", None),
        ):
            if close is not None:
                with anyio.move_on_after(1):
                    result = close()
                    if hasattr(result, "__await__"):
                        await result

    def reset(self) -> None:
        """Forget every in-memory counter (tests; remote storages are left alone)."""
        for table in self._tables.values():
            table.clear()


def _is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` means the storage is unreachable (rather than misconfigured)."""
    seen: BaseException | None = exc
    for _ in range(4):
        if seen is None:
            break
        if isinstance(seen, (OSError, TimeoutError)):
            return True
        name = type(seen).__name__
        if "Connection" in name or "Timeout" in name:
            return True
        seen = getattr(seen, "storage_error", None) or seen.__cause__ or seen.__context__
    return False


def _failed(policy: Policy) -> RateLimitDecision:
    """The decision for ``policy`` when its storage fails: its ``on_storage_error``."""
    return RateLimitDecision(
        policy.on_storage_error == "allow" or policy.dry_run, (), storage_error=True
    )


def _decision(quotas: tuple[Quota, ...], results: list[HitResult], dry: bool) -> RateLimitDecision:
    states = tuple(
        QuotaState(q.name, q.burst, q.window, r[1], r[2], r[0], r[3], dry)
        for q, r in zip(quotas, results, strict=False)
    )
    return RateLimitDecision(dry or all(r[0] for r in results), states)
