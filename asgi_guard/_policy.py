"""Rate-limit policies: what is counted, per what key, how."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from limits import RateLimitItem, parse_many
from limits.util import SEPARATORS, SINGLE_EXPR
from starlette.types import Scope

from ._errors import ConfigurationError
from ._keys import KeyFunc

__all__ = ["CostFunc", "LimitSpec", "Policy", "Quota", "Strategy", "as_policies"]

Strategy = Literal["fixed-window", "moving-window", "sliding-window-counter", "token-bucket"]
STRATEGIES: tuple[str, ...] = (
    "fixed-window",
    "moving-window",
    "sliding-window-counter",
    "token-bucket",
)
#: A request's cost computed from its scope (before the body is read); may be async.
CostFunc = Callable[[Scope], "int | Awaitable[int]"]


@dataclass(frozen=True)
class Quota:
    """One limit of a policy: ``amount`` per ``period`` seconds, under a header name."""

    name: str
    amount: int
    period: int
    item: RateLimitItem = field(compare=False, repr=False)
    burst: int

    @property
    def window(self) -> int:
        """The window advertised in ``RateLimit-Policy`` (``w``), in seconds."""
        if self.burst == self.amount:
            return self.period
        return max(1, math.ceil(self.period * self.burst / self.amount))


def _parse(limit: str) -> list[RateLimitItem]:
    if not isinstance(limit, str) or not limit.strip():
        raise ConfigurationError(
            f"a limit must be a non-empty string such as '10/minute', got {limit!r}"
        )
    try:
        items = parse_many(limit)
    except ValueError as exc:
        raise ConfigurationError(
            f"cannot parse the limit {limit!r}: use limits notation such as "
            f"'10/second', '100 per minute' or '10/second;1000/hour'"
        ) from exc
    for item in items:
        if item.amount <= 0:
            raise ConfigurationError(f"the limit {limit!r} must allow at least one request")
    # limits reads a period of zero ("10/0 minutes") as one; it is a mistake, not a minute.
    for part in SEPARATORS.split(limit):
        match = SINGLE_EXPR.match(part)
        if match is not None and match.group(3) is not None and int(match.group(3)) == 0:
            raise ConfigurationError(f"the limit {limit!r} has a period of zero: {part.strip()!r}")
    slugs = [_slug(item) for item in items]
    repeated = sorted({s for s in slugs if slugs.count(s) > 1})
    if repeated:
        raise ConfigurationError(
            f"the limit {limit!r} repeats {', '.join(repeated)}: each limit of a policy is "
            f"one quota, give it once"
        )
    return items


def _slug(item: RateLimitItem) -> str:
    return f"{item.amount}-per-{item.get_expiry()}s"


@dataclass(frozen=True, eq=False)
class Policy:
    """A named rate-limit policy: one or more limits counted under one key.

    A named policy counts once per `RateLimiter`, wherever it is used: in two rules of one
    middleware, or in dependencies and a middleware given the same ``limiter=``,
    ``Policy("1000/hour", name="api")`` is one quota of 1000 per hour for all of them. An
    unnamed limit counts per place (per rule or per route).

    Args:
        limit: ``limits`` notation, one or several limits: ``"10/second;1000/hour"``.
        name: The policy name used in the ``RateLimit`` headers and in ``violated-policies``.
            Several limits get ``name-<amount>-per-<seconds>s``.
        strategy: ``"fixed-window"`` (default), ``"moving-window"``,
            ``"sliding-window-counter"`` or ``"token-bucket"`` (GCRA).
        key: What to count per: a function of the ASGI scope (sync or async). ``None`` uses
            the middleware's (or dependency's) key, by default the client IP.
        cost: How much one request consumes: an int or a function of the scope.
        burst: Token bucket only: how many requests may arrive at once (default: the amount).
        dry_run: Decide and report, but never reject (shadow mode).
        on_storage_error: ``"allow"`` lets requests through while the storage fails,
            ``"deny"`` answers them 503.

    Examples:
        >>> api = Policy("100/minute;1000/hour", name="api")
        >>> [q.name for q in api.quotas]
        ['api-100-per-60s', 'api-1000-per-3600s']
    """

    limit: str
    name: str | None = None
    strategy: Strategy = "fixed-window"
    key: KeyFunc | None = None
    cost: int | CostFunc = 1
    burst: int | None = None
    dry_run: bool = False
    on_storage_error: Literal["allow", "deny"] = "allow"
    quotas: tuple[Quota, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        items = _parse(self.limit)
        if self.strategy not in STRATEGIES:
            raise ConfigurationError(
                f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}"
            )
        if self.name is not None and not isinstance(self.name, str):
            raise ConfigurationError(f"a policy name must be a str, got {type(self.name).__name__}")
        if self.name is not None and (
            not self.name
            or not self.name.isascii()
            or '"' in self.name
            or "\\" in self.name
            or not self.name.isprintable()
        ):
            raise ConfigurationError(
                "a policy name must be printable ASCII without quotes or backslashes: "
                f"{self.name!r}"
            )
        if self.burst is not None:
            if self.strategy != "token-bucket":
                raise ConfigurationError("burst= applies only to strategy='token-bucket'")
            if isinstance(self.burst, bool) or not isinstance(self.burst, int) or self.burst < 1:
                raise ConfigurationError(f"burst must be a positive int, got {self.burst!r}")
        if isinstance(self.cost, bool) or not (
            (isinstance(self.cost, int) and self.cost >= 1) or callable(self.cost)
        ):
            raise ConfigurationError(f"cost must be an int >= 1 or a callable, got {self.cost!r}")
        if self.key is not None and not callable(self.key):
            raise ConfigurationError(f"key must be a callable taking the scope, got {self.key!r}")
        if not isinstance(self.dry_run, bool):
            raise ConfigurationError(f"dry_run must be True or False, got {self.dry_run!r}")
        if self.on_storage_error not in ("allow", "deny"):
            raise ConfigurationError("on_storage_error must be 'allow' or 'deny'")
        base = self.name
        quotas = []
        for item in items:
            if base is not None and len(items) == 1:
                name = base
            elif base is not None:
                name = f"{base}-{_slug(item)}"
            else:
                name = _slug(item)
            burst = self.burst if self.burst is not None else item.amount
            quotas.append(Quota(name, item.amount, item.get_expiry(), item, burst))
        object.__setattr__(self, "quotas", tuple(quotas))


LimitSpec = str | Policy | Sequence[str | Policy]


def as_policies(spec: LimitSpec | None, *, option: str = "limit") -> tuple[Policy, ...]:
    """Normalise a ``limit=`` argument into policies."""
    if spec is None:
        return ()
    if isinstance(spec, (str, Policy)):
        spec = [spec]
    elif not isinstance(spec, Sequence):
        raise ConfigurationError(
            f"{option}= takes a limit string, a Policy or a list of them, got {type(spec).__name__}"
        )
    policies = []
    for entry in spec:
        if isinstance(entry, Policy):
            policies.append(entry)
        elif isinstance(entry, str):
            policies.append(Policy(entry))
        else:
            raise ConfigurationError(
                f"{option}= takes limit strings or Policy objects, got {type(entry).__name__}"
            )
    names = [q.name for p in policies for q in p.quotas]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigurationError(
            f"two limits in {option}= share the header name(s) {duplicates}: name your policies"
        )
    return tuple(policies)
