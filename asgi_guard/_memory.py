"""The in-memory rate-limit store behind ``storage="memory://"``.

Why not ``limits``' own async memory storage: it re-scans every key after nearly every hit once
the event loop runs between requests, and it only runs on asyncio. This store is plain
synchronous Python (so it runs under any event loop and is atomic between awaits) with:

* O(1) amortised expiry by *generations*: each table keeps a current and a previous
  generation; a key untouched for a whole generation is dropped with its generation, never
  scanned for;
* a ``max_keys`` bound per table: when the current generation holds half of it, the previous
  generation is evicted whole. Keys used recently always survive (an LRU approximation in
  O(1)); every evicted key is counted;
* for the fixed window and the token bucket, the two strategies that need one number per key,
  a flat table (`FlatTable`): open addressing over one array of 64-bit words, a key's hash
  beside its value. A hit at a million keys then reads one place in memory where a dict reads
  four (its index, its entry, the stored key string, the value), and a key costs 32-64 bytes
  per generation instead of about 115. The key string itself is not kept: two keys whose
  64-bit hashes are equal share a count (for a million live keys, a chance of about three in
  a hundred million that any two do; ``hash()`` of a string is seeded per process unless
  ``PYTHONHASHSEED`` is set);
* the sliding window and the moving window keep dicts (`MemoryTable`): their values are a
  pair of counts or a log of hit times.
"""

from __future__ import annotations

import contextlib
import math
import mmap
from collections import deque
from typing import Generic, TypeVar

__all__ = [
    "FixedWindowTable",
    "FlatTable",
    "MemoryTable",
    "MovingWindowTable",
    "SlidingWindowTable",
    "Table",
    "TokenBucketTable",
]

_V = TypeVar("_V")

#: What one ``hit`` returns: (allowed, remaining, reset_after, retry_after).
#: ``reset_after`` is the time until the quota is whole again; ``retry_after`` the time until a
#: request of the same cost can pass (0 when allowed; infinite when the cost exceeds the quota).
#: ``remaining`` and ``reset_after`` describe the quota after the hit, so a hit that is not
#: counted (refused, or ``commit=False``) reports them as they are, as Redis does.
HitResult = tuple[bool, int, float, float]


class Table:
    """The keys of one quota (one limit in one namespace) in memory."""

    __slots__ = ("amount", "evictions", "gen_end", "half", "lifetime", "period")

    def __init__(self, amount: int, period: float, lifetime: float, max_keys: int | None) -> None:
        self.amount = amount
        self.period = period
        self.lifetime = lifetime
        self.half = max(1, max_keys // 2) if max_keys else 0
        self.gen_end = -math.inf
        self.evictions = 0

    def __len__(self) -> int:
        raise NotImplementedError

    def hit(self, key: str, cost: int, now: float, commit: bool = True) -> HitResult:
        """Count ``cost`` against ``key`` (only if allowed and ``commit``) and report.

        With ``commit=False`` nothing is counted: ``allowed`` says whether the hit would
        fit, and ``remaining`` and ``reset_after`` are the quota's state without it.
        """
        raise NotImplementedError

    def clear(self) -> None:
        """Forget every key."""
        raise NotImplementedError


class MemoryTable(Table, Generic[_V]):
    """Keys of one quota kept in two generations of dicts, a value of any kind per key."""

    __slots__ = ("cur", "prev", "prev_size")

    def __init__(self, amount: int, period: float, lifetime: float, max_keys: int | None) -> None:
        super().__init__(amount, period, lifetime, max_keys)
        self.cur: dict[str, _V] = {}
        self.prev: dict[str, _V] = {}
        self.prev_size = 0

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

    def clear(self) -> None:
        self.cur = {}
        self.prev = {}
        self.prev_size = 0


#: A slot whose key moved to a newer array (CPython's ``hash()`` never returns -1). A slot
#: never used holds 0, so a key whose hash is 0 is stored as 1.
_MOVED = -1
_MIN_SLOTS = 8
#: Arrays from this size on are mapped from the OS: zeroed lazily, page by page, and returned
#: whole when dropped, so a new generation costs nothing until it is used.
_MAPPED_BYTES = 1 << 20
#: Words of a growing table's old array copied into the new one per key inserted: four slots,
#: twice the pace that finishes the copy before the new array is half full.
_COPY_STEP = 8


def _slots_for(keys: int) -> int:
    """The smallest array (a power of two, at least twice ``keys``) that holds ``keys``."""
    slots = _MIN_SLOTS
    while slots < 2 * keys:
        slots <<= 1
    return slots


def _words(slots: int) -> tuple[memoryview[int], memoryview[float]]:
    """A zeroed array of ``slots`` slots of two 64-bit words, viewed as ints and as floats."""
    size = slots * 16
    buffer: bytearray | mmap.mmap
    if size >= _MAPPED_BYTES:
        # Private: a forked worker gets its own copy on write, as it would of a dict.
        private = getattr(mmap, "MAP_PRIVATE", None)
        buffer = mmap.mmap(-1, size) if private is None else mmap.mmap(-1, size, flags=private)
        advice = getattr(mmap, "MADV_HUGEPAGE", None)
        if advice is not None:
            with contextlib.suppress(OSError):  # a kernel without transparent huge pages
                buffer.madvise(advice)
    else:
        buffer = bytearray(size)
    raw = memoryview(buffer)
    return raw.cast("q"), raw.cast("d")


def _probe(words: memoryview[int], h: int) -> int:
    """Where the key of hash ``h`` is in ``words``, or -1."""
    mask = len(words) - 2
    i = h & mask
    s = words[i]
    while s != h:
        if not s:
            return -1
        i = (i + 2) & mask
        s = words[i]
    return i


class FlatTable(Table):
    """Keys of one quota as 64-bit hashes beside one 64-bit value each, in generations.

    A slot is two words of an array (``q`` as ints, ``d`` as floats, the same memory): the
    key's hash at an even index ``i`` and its value at ``i + 1``; a key lives at the first
    free slot from ``hash & mask`` on (linear probing, at most half the slots used). A key is
    in one array only: the current one, the old array of a current generation that is growing
    (copied a few slots per insertion, so no request pays for the whole copy), or one of the
    previous generation's, from which a key in use moves back on its first hit.
    """

    __slots__ = ("count", "d", "mask", "prev", "prev_count", "q", "room", "src", "src_at", "used")

    def __init__(self, amount: int, period: float, lifetime: float, max_keys: int | None) -> None:
        super().__init__(amount, period, lifetime, max_keys)
        #: Keys of the current generation, and of the previous one that have not moved back.
        self.count = 0
        self.prev_count = 0
        self.prev: list[memoryview[int]] = []
        self.src: memoryview[int] | None = None
        self.src_at = 0
        self._fresh(_MIN_SLOTS)

    def __len__(self) -> int:
        return self.count + self.prev_count

    def _fresh(self, slots: int) -> None:
        """Start an empty current array of ``slots`` slots."""
        self.q, self.d = _words(slots)
        self.mask = (slots - 1) << 1
        self.room = slots >> 1
        self.used = 0

    def _turn(self) -> None:
        """The current generation becomes the previous one; the previous one is dropped."""
        self.prev = [self.q] if self.src is None else [self.q, self.src]
        self.prev_count = self.count
        self.src = None
        self.count = 0
        # Room for every key to come back without growing.
        self._fresh(_slots_for(self.prev_count))

    def _restart(self) -> None:
        """Drop every key, expecting as many as the current generation held."""
        self.prev = []
        self.prev_count = 0
        self.src = None
        slots = _slots_for(self.count)
        self.count = 0
        self._fresh(slots)

    def _free_slot(self, h: int) -> int:
        """The first free slot for hash ``h`` in the current array (its key is not there)."""
        q = self.q
        mask = self.mask
        i = h & mask
        while q[i]:
            i = (i + 2) & mask
        return i

    def _find(self, h: int, now: float) -> int:
        """The slot of a key missing from the current array, after moving it there from an
        older array; -1 if it is nowhere."""
        src = self.src
        if src is not None:
            j = _probe(src, h)
            if j >= 0:
                return self._move(src, j, h)
        for old in self.prev:
            j = _probe(old, h)
            if j >= 0:
                word = old[j + 1]
                old[j] = _MOVED
                self.prev_count -= 1
                i = self._put(h, now)
                self.q[i + 1] = word
                return i
        return -1

    def _put(self, h: int, now: float) -> int:
        """Add the key of hash ``h`` (in no array) to the current generation; its slot."""
        if self.half and self.count >= self.half:
            self.evictions += self.prev_count
            self._turn()
            if self.gen_end != math.inf:
                self.gen_end = now + self.lifetime
        elif self.used >= self.room:
            self._grow()
        i = self._free_slot(h)
        self.q[i] = h
        self.used += 1
        self.count += 1
        if self.src is not None:
            self._copy()
        return i

    def _move(self, src: memoryview[int], j: int, h: int) -> int:
        """Move the key of hash ``h`` at slot ``j`` of the growing table's old array ``src``
        into the current array; its slot there."""
        i = self._free_slot(h)
        q = self.q
        q[i] = h
        q[i + 1] = src[j + 1]
        src[j] = _MOVED
        self.used += 1
        return i

    def _grow(self) -> None:
        """Start an array twice as large; the full one is copied into it as keys arrive."""
        # The previous copy has ended: it moves four slots per key added, so the old array
        # (half full) is copied before the new one, twice as large, is half full.
        assert self.src is None
        self.src = self.q
        self.src_at = 0
        self._fresh(len(self.q))

    def _copy(self) -> None:
        """Copy the next few slots of the growing table's old array into the current one."""
        src = self.src
        assert src is not None
        start = self.src_at
        end = min(start + _COPY_STEP, len(src))
        for j in range(start, end, 2):
            h = src[j]
            if h and h != _MOVED:
                self._move(src, j, h)
        if end == len(src):
            self.src = None
        else:
            self.src_at = end

    def clear(self) -> None:
        self.count = 0
        self._restart()


class FixedWindowTable(FlatTable):
    """Counts per window; windows are aligned on the clock, so a rollover drops every key."""

    __slots__ = ("window_end",)

    def __init__(self, amount: int, period: float, max_keys: int | None) -> None:
        super().__init__(amount, period, period, max_keys)
        self.gen_end = math.inf
        self.window_end = -math.inf

    def hit(self, key: str, cost: int, now: float, commit: bool = True) -> HitResult:
        if now >= self.window_end:
            self.window_end = (now // self.period + 1) * self.period
            self._restart()
        # The probe of the current array is written out here and in TokenBucketTable.hit:
        # a method call per hit would cost more than the probe itself.
        h = hash(key) or 1
        q = self.q
        mask = self.mask
        i = h & mask
        s = q[i]
        while s != h:
            if not s:
                i = self._find(h, now)
                q = self.q
                break
            i = (i + 2) & mask
            s = q[i]
        count: int = q[i + 1] if i >= 0 else 0
        reset = self.window_end - now
        total = count + cost
        if total > self.amount:
            retry = reset if cost <= self.amount else math.inf
            return False, max(0, self.amount - count), reset, retry
        if not commit:
            return True, self.amount - count, reset, 0.0
        if cost:
            if i < 0:
                i = self._put(h, now)
                q = self.q
            q[i + 1] = total
        return True, self.amount - total, reset, 0.0


class TokenBucketTable(FlatTable):
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
        if now >= self.gen_end:
            # Everything in the previous generation was last touched before the current one
            # began, at least one lifetime ago: its buckets are full again, it goes unscanned.
            self._turn()
            self.gen_end = now + self.lifetime
        h = hash(key) or 1
        q = self.q
        mask = self.mask
        i = h & mask
        s = q[i]
        while s != h:
            if not s:
                i = self._find(h, now)
                break
            i = (i + 2) & mask
            s = q[i]
        tat: float = self.d[i + 1] if i >= 0 else now
        if tat < now:
            tat = now
        new_tat = tat + cost * self.interval
        if new_tat - now > self.tau + 1e-9:
            remaining = int((self.tau - (tat - now)) / self.interval + 1e-9)
            retry = new_tat - self.tau - now if cost <= self.amount else math.inf
            return False, max(0, remaining), tat - now, retry
        if not commit:
            return True, int((self.tau - (tat - now)) / self.interval + 1e-9), tat - now, 0.0
        if cost:
            if i < 0:
                i = self._put(h, now)
            self.d[i + 1] = new_tat
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
        if not commit:
            return True, int(self.amount - used), left + period, 0.0
        if cost:
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
        if not commit:
            return True, self.amount - used, log[-1] + self.period - now if log else 0.0, 0.0
        if cost:
            if log is None:
                log = deque()
                self._put_new(key, log, now)
            log.extend([now] * cost)
        reset = log[-1] + self.period - now if log else 0.0
        return True, self.amount - used - cost, reset, 0.0
