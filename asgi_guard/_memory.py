"""The in-memory rate-limit store behind ``storage="memory://"``.

Why not ``limits``' own async memory storage: it re-scans every key after nearly every hit once
the event loop runs between requests, and it only runs on asyncio. This store is plain
synchronous Python (so it runs under any event loop and is atomic between awaits) with:

* O(1) amortised expiry by *generations*: each table keeps a current and a previous dict; a
  key untouched for a whole generation is dropped with its generation, never scanned for;
* a ``max_keys`` bound per table: when the current generation holds half of it, the previous
  generation is evicted whole. Keys used recently always survive (an LRU approximation in
  O(1)); every evicted key is counted;
* one small value per key (an ``int`` count or a ``float`` timestamp), so a fixed-window or
  token-bucket key costs well under 150 bytes including its dict slot and the key string.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Generic, TypeVar

__all__ = [
    "FixedWindowTable",
    "MemoryTable",
    "MovingWindowTable",
    "SlidingWindowTable",
    "TokenBucketTable",
]

_V = TypeVar("_V")

#: What one ``hit`` returns: (allowed, remaining, reset_after, retry_after).
#: ``reset_after`` is the time until the quota is whole again; ``retry_after`` the time until a
#: request of the same cost can pass (0 when allowed; infinite when the cost exceeds the quota).
HitResult = tuple[bool, int, float, float]


class MemoryTable(Generic[_V]):
    """Keys of one quota (one limit in one namespace), kept in two generations."""

    __slots__ = (
        "amount",
        "cur",
        "evictions",
        "gen_end",
        "half",
        "lifetime",
        "period",
        "prev",
        "prev_size",
    )

    def __init__(self, amount: int, period: float, lifetime: float, max_keys: int | None) -> None:
        self.amount = amount
        self.period = period
        self.lifetime = lifetime
        self.half = max(1, max_keys // 2) if max_keys else 0
        self.cur: dict[str, _V] = {}
        self.prev: dict[str, _V] = {}
        self.prev_size = 0
        self.gen_end = -math.inf
        self.evictions = 0

    def __len__(self) -> int:
        return len(self.cur) + len(self.prev)

    def _get(self, key: str, now: float) -> _V | None:
        """Look ``key`` up in a table whose values expire ``lifetime`` after their last use."""
        if now >= self.gen_end:
            # Everything in ``prev`` was last touched before ``cur`` began, at least one
            # lifetime ago: it has expired and goes without a scan.
            self._turn()
            self.gen_end = now + self.lifetime
        return self._lookup(key, now)

    def _turn(self) -> None:
        """The current generation becomes the previous one; the previous one is dropped."""
        self.prev = self.cur
        self.prev_size = len(self.prev)
        self.cur = {}

    def _lookup(self, key: str, now: float) -> _V | None:
        value = self.cur.get(key)
        if value is None and self.prev:
            value = self.prev.pop(key, None)
            if value is not None:
                left = len(self.prev)
                if left < self.prev_size >> 2:
                    # A dict keeps its table as keys leave; while they move back to the
                    # current generation, copy what is left now and then (amortised O(1)),
                    # so that the two generations never hold two full tables for long.
                    self.prev = dict(self.prev) if left else {}
                    self.prev_size = left
                self._put_new(key, value, now)
        return value

    def _put_new(self, key: str, value: _V, now: float) -> None:
        if self.half and len(self.cur) >= self.half:
            self.evictions += len(self.prev)
            self._turn()
            if self.gen_end != math.inf:
                self.gen_end = now + self.lifetime
        self.cur[key] = value

    def hit(self, key: str, cost: int, now: float, commit: bool = True) -> HitResult:
        """Count ``cost`` against ``key`` (only if allowed and ``commit``) and report."""
        raise NotImplementedError

    def clear(self) -> None:
        """Forget every key."""
        self.cur = {}
        self.prev = {}
        self.prev_size = 0


class FixedWindowTable(MemoryTable[int]):
    """Counts per window; windows are aligned on the clock, so a rollover drops every key."""

    __slots__ = ("window_end",)

    def __init__(self, amount: int, period: float, max_keys: int | None) -> None:
        super().__init__(amount, period, period, max_keys)
        self.gen_end = math.inf
        self.window_end = -math.inf

    def hit(self, key: str, cost: int, now: float, commit: bool = True) -> HitResult:
        if now >= self.window_end:
            self.window_end = (now // self.period + 1) * self.period
            self.cur = {}
            self.prev = {}
        count = self.cur.get(key)
        if count is None:
            count = self._lookup(key, now) or 0
            fresh = count == 0
        else:
            fresh = False
        reset = self.window_end - now
        total = count + cost
        if total > self.amount:
            retry = reset if cost <= self.amount else math.inf
            return False, max(0, self.amount - count), reset, retry
        if commit and cost:
            if fresh:
                self._put_new(key, total, now)
            else:
                self.cur[key] = total
        return True, self.amount - total, reset, 0.0


class TokenBucketTable(MemoryTable[float]):
    """GCRA: one theoretical arrival time per key; ``burst`` requests may arrive at once.

    The bucket refills at ``amount / period`` requests per second and holds ``burst``.
    """

    __slots__ = ("interval", "tau")

    def __init__(self, amount: int, period: float, burst: int, max_keys: int | None) -> None:
        interval = period / amount
        tau = interval * burst
        super().__init__(burst, period, tau, max_keys)
        self.interval = interval
        self.tau = tau

    def hit(self, key: str, cost: int, now: float, commit: bool = True) -> HitResult:
        tat = self._get(key, now)
        stored = tat is not None
        if tat is None or tat < now:
            tat = now
        new_tat = tat + cost * self.interval
        if new_tat - now > self.tau + 1e-9:
            remaining = int((self.tau - (tat - now)) / self.interval + 1e-9)
            retry = new_tat - self.tau - now if cost <= self.amount else math.inf
            return False, max(0, remaining), tat - now, retry
        if commit and cost:
            if stored:
                self.cur[key] = new_tat
            else:
                self._put_new(key, new_tat, now)
        remaining = int((self.tau - (new_tat - now)) / self.interval + 1e-9)
        return True, remaining, new_tat - now, 0.0


class SlidingWindowTable(MemoryTable[int]):
    """Sliding window counter: this window's count plus the previous one's, weighted by overlap."""

    __slots__ = ("last", "window_end")

    def __init__(self, amount: int, period: float, max_keys: int | None) -> None:
        super().__init__(amount, period, period, max_keys)
        self.gen_end = math.inf
        self.window_end = -math.inf
        self.last: dict[str, int] = {}

    def hit(self, key: str, cost: int, now: float, commit: bool = True) -> HitResult:
        period = self.period
        if now >= self.window_end:
            end = (now // period + 1) * period
            # The finished window counts as "last" only if it is the one right before this.
            if end - self.window_end == period:
                # A key is in one generation only; if ever in both, the current one wins.
                self.last = self.prev
                self.last.update(self.cur)
            else:
                self.last = {}
            self.cur = {}
            self.prev = {}
            self.window_end = end
        count = self._lookup(key, now) or 0
        previous = self.last.get(key, 0) if self.last else 0
        left = self.window_end - now
        used = previous * left / period + count
        if used + cost > self.amount:
            budget = self.amount - count - cost
            if budget >= 0:
                retry = left - budget * period / previous
            elif cost > self.amount:
                retry = math.inf
            else:
                retry = left + period - (self.amount - cost) * period / count
            return False, max(0, int(self.amount - used)), left + period, max(retry, 0.0)
        if commit and cost:
            if count:
                self.cur[key] = count + cost
            else:
                self._put_new(key, cost, now)
        return True, int(self.amount - used - cost), left + period, 0.0


class MovingWindowTable(MemoryTable["deque[float]"]):
    """A log of hit times per key, kept for one period (like ``limits``' moving window)."""

    __slots__ = ()

    def __init__(self, amount: int, period: float, max_keys: int | None) -> None:
        super().__init__(amount, period, period, max_keys)

    def hit(self, key: str, cost: int, now: float, commit: bool = True) -> HitResult:
        log = self._get(key, now)
        horizon = now - self.period
        if log is not None:
            while log and log[0] <= horizon:
                log.popleft()
        used = len(log) if log else 0
        if used + cost > self.amount:
            if log is None or cost > self.amount:
                retry = self.period if cost <= self.amount else math.inf
                return False, self.amount - used, self.period, retry
            # The request fits once enough of the oldest entries have aged out.
            retry = log[used + cost - self.amount - 1] + self.period - now
            return False, self.amount - used, log[-1] + self.period - now, retry
        if commit and cost:
            if log is None:
                log = deque()
                self._put_new(key, log, now)
            log.extend([now] * cost)
        reset = log[-1] + self.period - now if log else 0.0
        return True, self.amount - used - cost, reset, 0.0
