"""The in-memory store: limits hold exactly, keys expire by generation, max_keys evicts."""

from __future__ import annotations

import math
import mmap
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asgi_guard._memory import (
    FixedWindowTable,
    HitResult,
    MemoryTable,
    MovingWindowTable,
    SlidingWindowTable,
    Table,
    TokenBucketTable,
)


def _table(strategy: str, amount: int, period: float, max_keys: int | None = None) -> Table:
    if strategy == "fixed":
        return FixedWindowTable(amount, period, max_keys)
    if strategy == "bucket":
        return TokenBucketTable(amount, period, amount, max_keys)
    if strategy == "sliding":
        return SlidingWindowTable(amount, period, max_keys)
    return MovingWindowTable(amount, period, max_keys)


STRATEGIES = ["fixed", "bucket", "sliding", "moving"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_admits_exactly_the_amount_at_one_instant(strategy: str) -> None:
    """At one instant every strategy admits exactly `amount` hits and no more."""
    table = _table(strategy, 5, 10.0)
    results = [table.hit("k", 1, 100.0)[0] for _ in range(8)]
    assert results == [True] * 5 + [False] * 3, results


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_remaining_counts_down_and_retry_is_positive_when_refused(strategy: str) -> None:
    """`remaining` falls by the cost and a refusal carries a positive retry_after."""
    table = _table(strategy, 3, 10.0)
    remaining = [table.hit("k", 1, 50.0)[1] for _ in range(3)]
    assert remaining == [2, 1, 0], remaining
    allowed, _, reset, retry = table.hit("k", 1, 50.0)
    assert not allowed
    assert 0 < retry <= 20.0, retry  # a sliding window can need up to two periods
    assert reset > 0, reset


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_refused_requests_consume_nothing_and_quota_returns(strategy: str) -> None:
    """A refused hit consumes nothing; after retry_after the same hit passes."""
    table = _table(strategy, 2, 10.0)
    assert table.hit("k", 1, 0.0)[0]
    assert table.hit("k", 1, 0.0)[0]
    refused = table.hit("k", 1, 0.0)
    assert not refused[0]
    assert table.hit("k", 1, refused[3] + 1e-6)[0], refused


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_commit_false_only_peeks(strategy: str) -> None:
    """commit=False reports without counting."""
    table = _table(strategy, 1, 10.0)
    assert table.hit("k", 1, 0.0, commit=False)[0]
    assert table.hit("k", 1, 0.0)[0]
    assert not table.hit("k", 1, 0.0)[0]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_commit_false_reports_the_quota_as_it_is(strategy: str) -> None:
    """An uncounted hit reports what remains without it (as Redis does), so a request
    refused by another quota does not show this one spent."""
    table = _table(strategy, 5, 100.0)
    assert table.hit("k", 1, 0.0)[:2] == (True, 4)
    for _ in range(2):
        peek = table.hit("k", 2, 1.0, commit=False)
        assert peek[:2] == (True, 4), peek
    assert table.hit("k", 2, 1.0)[:2] == (True, 2)
    assert table.hit("k", 3, 1.0, commit=False)[:2] == (False, 2)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_cost_larger_than_amount_is_always_refused(strategy: str) -> None:
    """A request that costs more than the whole quota never passes, and never raises."""
    table = _table(strategy, 3, 1.0)
    assert table.hit("k", 4, 0.0)[::3] == (False, math.inf)
    assert table.hit("k", 4, 100.0)[::3] == (False, math.inf)


def test_fixed_window_resets_at_the_aligned_boundary() -> None:
    """Fixed windows are aligned on the clock: counts reset at each multiple of the period."""
    table = FixedWindowTable(2, 10.0, None)
    assert table.hit("k", 1, 15.0) == (True, 1, 5.0, 0.0)
    assert table.hit("k", 1, 19.0)[0]
    allowed, remaining, reset, retry = table.hit("k", 1, 19.9)
    assert (allowed, remaining) == (False, 0)
    assert reset == pytest.approx(0.1)
    assert retry == pytest.approx(0.1)
    assert table.hit("k", 1, 20.0)[0]
    assert len(table) == 1


def test_token_bucket_allows_burst_then_refills_at_rate() -> None:
    """GCRA: `burst` at once, then one per interval."""
    table = TokenBucketTable(10, 1.0, 3, None)  # 10/s, burst 3
    assert [table.hit("k", 1, 0.0)[0] for _ in range(4)] == [True, True, True, False]
    assert not table.hit("k", 1, 0.05)[0]
    assert table.hit("k", 1, 0.1)[0]
    assert not table.hit("k", 1, 0.1)[0]
    assert table.hit("k", 1, 10.0)[1] == 2


def test_sliding_window_weights_the_previous_window() -> None:
    """The previous window's count weighs in proportion to its overlap."""
    table = SlidingWindowTable(10, 10.0, None)
    for _ in range(10):
        assert table.hit("k", 1, 5.0)[0]
    # At 15.0, half the previous window overlaps: 5 used, 5 left.
    results = [table.hit("k", 1, 15.0)[0] for _ in range(6)]
    assert results == [True] * 5 + [False], results
    # Two windows later everything is forgotten.
    assert table.hit("k", 1, 40.0)[1] == 9


def test_moving_window_frees_the_oldest_hit_first() -> None:
    """A moving window frees capacity exactly one period after each hit."""
    table = MovingWindowTable(2, 10.0, None)
    assert table.hit("k", 1, 0.0)[0]
    assert table.hit("k", 1, 5.0)[0]
    refused = table.hit("k", 1, 6.0)
    assert not refused[0]
    assert refused[3] == pytest.approx(4.0), refused
    assert table.hit("k", 1, 10.01)[0]
    assert not table.hit("k", 1, 10.02)[0]


@pytest.mark.parametrize("strategy", ["bucket", "moving"])
def test_idle_keys_expire_by_generation_without_a_scan(strategy: str) -> None:
    """Keys unused for two lifetimes are gone; keys in use survive the rotation."""
    table = _table(strategy, 5, 1.0)
    for i in range(1000):
        table.hit(f"k{i}", 1, 0.0)
    table.hit("hot", 1, 0.0)
    table.hit("hot", 1, 1.5)  # rotation: the 1000 become the previous generation
    table.hit("hot", 1, 3.0)  # second rotation: they are dropped
    assert len(table) == 1, len(table)
    assert table.evictions == 0


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_max_keys_bounds_the_table_and_counts_evictions(strategy: str) -> None:
    """A table never holds more than max_keys keys; evicted keys are counted."""
    table = _table(strategy, 5, 1000.0, max_keys=100)
    for i in range(1000):
        table.hit(f"k{i}", 1, 1.0)
        assert len(table) <= 100
    assert table.evictions >= 800, table.evictions


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_recently_used_keys_survive_eviction(strategy: str) -> None:
    """Under key pressure a key in constant use keeps its count (LRU approximation)."""
    table = _table(strategy, 5, 1000.0, max_keys=20)
    assert table.hit("hot", 5, 1.0)[0]
    for i in range(200):
        table.hit(f"cold{i}", 1, 1.0)
        assert not table.hit("hot", 1, 1.0)[0], i


@settings(max_examples=200, deadline=None)
@given(
    strategy=st.sampled_from(STRATEGIES),
    amount=st.integers(1, 20),
    period=st.sampled_from([1.0, 2.0, 10.0]),
    steps=st.lists(
        st.tuples(st.floats(0, 0.5), st.integers(1, 3), st.sampled_from(["a", "b"])),
        max_size=120,
    ),
)
def test_never_admits_more_than_the_limit(
    strategy: str, amount: int, period: float, steps: list[tuple[float, int, str]]
) -> None:
    """Property: in any span of one period, admitted cost per key never exceeds the amount
    (fixed and sliding windows: never more than the amount per aligned window / 2x over a
    sliding span; token bucket: never more than burst + rate x span)."""
    table = _table(strategy, amount, period)
    now = 0.0
    admitted: dict[str, list[tuple[float, int]]] = {"a": [], "b": []}
    for delta, cost, key in steps:
        now += delta
        if table.hit(key, cost, now)[0]:
            admitted[key].append((now, cost))
    for hits in admitted.values():
        for start, _ in hits:
            in_span = sum(c for t, c in hits if start <= t < start + period)
            if strategy == "moving":
                assert in_span <= amount, (in_span, hits)
            elif strategy == "bucket":
                assert in_span <= amount + amount, (in_span, hits)
            else:
                assert in_span <= 2 * amount, (in_span, hits)
        if strategy == "fixed":
            windows: dict[float, int] = {}
            for t, c in hits:
                windows[t // period] = windows.get(t // period, 0) + c
            assert max(windows.values(), default=0) <= amount, windows


def test_previous_generation_is_compacted_as_keys_move_back() -> None:
    """After a turn, a dict generation is copied small once most keys moved back."""
    table = MovingWindowTable(5, 1.0, None)
    for i in range(1000):
        table.hit(f"k{i}", 1, 0.0)
    table.hit("k0", 1, 1.5)  # turn: the 1000 keys are now the previous generation
    before = table.prev
    for i in range(1, 800):
        table.hit(f"k{i}", 1, 1.5)
    assert table.prev is not before, "a mostly emptied generation keeps its full table"
    assert len(table.prev) == 200, len(table.prev)
    assert len(table) == 1000
    assert all(table.hit(f"k{i}", 1, 1.5)[1] == 3 for i in range(1, 800))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_cost_zero_is_free_and_stores_nothing(strategy: str) -> None:
    """A request of cost 0 passes, consumes nothing and adds no key."""
    table = _table(strategy, 1, 10.0, max_keys=4)
    assert table.hit("free", 0, 0.0)[0]
    assert len(table) == 0
    assert table.hit("k", 1, 0.0)[0]
    assert table.hit("k", 0, 0.0)[0]
    assert not table.hit("k", 1, 0.0)[0]


class _Hashed:
    """A key with a chosen hash, to put keys where the flat tables' probing is tested."""

    def __init__(self, h: int) -> None:
        self.h = h

    def __hash__(self) -> int:
        return self.h


def _fw_model(
    amount: int, period: float, steps: list[tuple[int, int, float, bool]]
) -> list[tuple[bool, int, float, float]]:
    """What a fixed window answers, kept in a plain dict that is emptied at each rollover."""
    counts: dict[int, int] = {}
    window_end = -math.inf
    now = 0.0
    out = []
    for key, cost, dt, commit in steps:
        now += dt
        if now >= window_end:
            window_end = (now // period + 1) * period
            counts = {}
        count = counts.get(key, 0)
        reset = window_end - now
        total = count + cost
        if total > amount:
            retry = reset if cost <= amount else math.inf
            out.append((False, max(0, amount - count), reset, retry))
            continue
        if not commit:
            out.append((True, amount - count, reset, 0.0))
            continue
        if cost:
            counts[key] = total
        out.append((True, amount - total, reset, 0.0))
    return out


def _tb_model(
    amount: int, period: float, steps: list[tuple[int, int, float, bool]]
) -> list[tuple[bool, int, float, float]]:
    """What a token bucket (burst = amount) answers, kept in a plain dict that never forgets."""
    tats: dict[int, float] = {}
    interval = period / amount
    tau = interval * amount
    now = 0.0
    out = []
    for key, cost, dt, commit in steps:
        now += dt
        tat = max(tats.get(key, now), now)
        new_tat = tat + cost * interval
        if new_tat - now > tau + 1e-9:
            remaining = int((tau - (tat - now)) / interval + 1e-9)
            retry = new_tat - tau - now if cost <= amount else math.inf
            out.append((False, max(0, remaining), tat - now, retry))
            continue
        if not commit:
            out.append((True, int((tau - (tat - now)) / interval + 1e-9), tat - now, 0.0))
            continue
        if cost:
            tats[key] = new_tat
        out.append((True, int((tau - (new_tat - now)) / interval + 1e-9), new_tat - now, 0.0))
    return out


def _hits(keys: int, most: int) -> st.SearchStrategy[list[tuple[int, int, float, bool]]]:
    """Hits as (key number, cost, time since the last hit, commit)."""
    return st.lists(
        st.tuples(
            st.integers(0, keys),
            st.integers(0, 3),
            st.sampled_from([0.0, 0.0, 0.001, 0.05, 0.4, 1.3]),
            st.booleans(),
        ),
        max_size=most,
    )


@settings(max_examples=150, deadline=None)
@given(
    strategy=st.sampled_from(["fixed", "bucket"]), amount=st.integers(1, 6), steps=_hits(80, 300)
)
def test_flat_tables_answer_as_a_plain_dict_would(
    strategy: str, amount: int, steps: list[tuple[int, int, float, bool]]
) -> None:
    """Property: growing arrays, generation turns and keys moving back never change an
    answer: a flat table says what a dict of every key's count or arrival time says."""
    table = _table(strategy, amount, 1.0)
    model = (_fw_model if strategy == "fixed" else _tb_model)(amount, 1.0, steps)
    now = 0.0
    for (key, cost, dt, commit), expected in zip(steps, model, strict=True):
        now += dt
        # Integer-named keys: some share a home slot, and growth moves them all.
        assert table.hit(f"key-{key}", cost, now, commit) == expected, (key, now)


def test_a_growing_table_copies_a_few_slots_per_key_and_keeps_every_key() -> None:
    """Growth never copies a whole array at once, and no key or count is lost to it."""
    table = FixedWindowTable(10, 1000.0, None)
    copies = 0
    for i in range(5000):
        before = (table.src, table.src_at)
        assert table.hit(f"k{i}", 1, 1.0)[0]
        if table.src is not None and table.src is before[0]:
            assert table.src_at - before[1] <= 8, "more than four slots copied for one key"
            copies += 1
        assert table.used <= table.room
    assert copies > 100, copies
    assert len(table) == 5000
    assert all(table.hit(f"k{i}", 1, 1.0)[1] == 8 for i in range(5000))


def test_a_generation_that_ends_while_growing_keeps_its_keys() -> None:
    """A turn in the middle of a growth keeps both arrays; their keys' counts hold."""
    table = TokenBucketTable(10, 10.0, 10, None)  # 1/s, burst 10, a generation lasts 10 s
    table.hit("start", 1, 0.0)
    keys: list[str] = []
    while table.src is None or len(keys) < 8:
        keys.append(f"k{len(keys)}")
        assert table.hit(keys[-1], 10, 9.9)[0]  # empties the bucket until t = 19.9
    assert table.src is not None, "no growth in progress"
    assert not table.hit(keys[0], 1, 10.0)[0], "an emptied bucket was forgotten at the turn"
    assert len(table.prev) == 2, table.prev
    assert not any(table.hit(k, 1, 10.0)[0] for k in keys)
    assert len(table) == len(keys) + 1


def test_keys_that_share_a_home_slot_are_found_past_moved_ones() -> None:
    """Probing skips the slot a key moved out of, so its neighbours keep their counts."""
    table = TokenBucketTable(10, 10.0, 10, None)  # 1/s, burst 10, a generation lasts 10 s
    assert table.hit("start", 1, 0.0)[0]
    keys = (_Hashed(2), _Hashed(2 + 16), _Hashed(2 + 32))  # one home slot in 8 slots
    for key in keys:
        assert table.hit(key, 10, 9.0)[0]  # type: ignore[arg-type]  # empty until t = 19
    assert table.hit("other", 1, 10.0)[0]  # a turn: the three are the previous generation
    assert table.hit(keys[1], 0, 10.0)[0]  # type: ignore[arg-type]  # moves it back
    for key in (keys[2], keys[0], keys[1]):
        # One token came back since t = 9: a cost of 2 is refused if the key was found.
        assert not table.hit(key, 2, 10.0)[0], key.h  # type: ignore[arg-type]
        assert table.hit(key, 1, 10.0)[0], key.h  # type: ignore[arg-type]


def test_keys_whose_hashes_are_equal_share_a_count() -> None:
    """The documented limit of a flat table: it keeps hashes, so equal hashes share a count
    (a hash of 0 is kept as 1)."""
    table = FixedWindowTable(2, 10.0, None)
    assert table.hit(_Hashed(0), 1, 0.0)[1] == 1  # type: ignore[arg-type]
    assert table.hit(_Hashed(1), 1, 0.0)[1] == 0  # type: ignore[arg-type]
    assert not table.hit(_Hashed(0), 1, 0.0)[0]  # type: ignore[arg-type]


def test_large_arrays_are_mapped_and_sized_for_the_next_window() -> None:
    """Arrays of a megabyte or more come from the OS; a new window starts with room for as
    many keys as the last one had, and a key costs at most 64 bytes once a growth ends."""
    table = FixedWindowTable(5, 10.0, None)
    assert isinstance(table.q.obj, bytearray)
    for i in range(40_000):
        table.hit(f"k{i}", 1, 1.0)
    assert isinstance(table.q.obj, mmap.mmap)
    while table.src is not None:
        table.hit(f"more{len(table)}", 1, 1.0)
    assert table.q.nbytes / len(table) <= 64, table.q.nbytes / len(table)
    keys = len(table)
    table.hit("k0", 1, 10.0)  # the next window
    assert len(table) == 1
    assert table.room >= keys, (table.room, keys)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_worker_counts_apart_from_its_parent() -> None:
    """Arrays mapped from the OS are private: a forked worker's hits, new keys and growth
    never reach its parent's counts (each process has its own, as with dicts)."""
    table = FixedWindowTable(5, 10.0, None)
    for i in range(40_000):
        table.hit(f"k{i}", 1, 1.0)
    assert isinstance(table.q.obj, mmap.mmap)
    assert table.src is not None, "no growth in progress to share"
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's coverage is not collected
        code = 1
        try:
            ok = all(table.hit(f"k{i}", 4, 1.0)[0] for i in range(40_000))
            ok = ok and all(table.hit(f"new{i}", 1, 1.0)[0] for i in range(40_000))
            code = 0 if ok else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert len(table) == 40_000
    assert all(table.hit(f"k{i}", 1, 1.0)[1] == 3 for i in range(40_000))


class _DictFixedWindow(MemoryTable[int]):
    """The fixed window kept in dict generations: the reference for the flat table's
    eviction, which must drop the same keys at the same hits."""

    __slots__ = ("window_end",)

    def __init__(self, amount: int, period: float, max_keys: int | None) -> None:
        super().__init__(amount, period, period, max_keys)
        self.gen_end = math.inf
        self.window_end = -math.inf

    def hit(self, key: str, cost: int, now: float, commit: bool = True) -> HitResult:
        if now >= self.window_end:
            self.window_end = (now // self.period + 1) * self.period
            self.cur, self.prev = {}, {}
        count = self.cur.get(key)
        fresh = False
        if count is None:
            count = self._lookup(key, now) or 0
            fresh = count == 0
        reset = self.window_end - now
        if count + cost > self.amount:
            retry = reset if cost <= self.amount else math.inf
            return False, max(0, self.amount - count), reset, retry
        if not commit:
            return True, self.amount - count, reset, 0.0
        if cost:
            if fresh:
                self._put_new(key, count + cost, now)
            else:
                self.cur[key] = count + cost
        return True, self.amount - count - cost, reset, 0.0


class _DictTokenBucket(MemoryTable[float]):
    """The token bucket kept in dict generations (burst = amount), the same reference."""

    __slots__ = ("interval",)

    def __init__(self, amount: int, period: float, max_keys: int | None) -> None:
        super().__init__(amount, period, period, max_keys)
        self.interval = period / amount

    def hit(self, key: str, cost: int, now: float, commit: bool = True) -> HitResult:
        stored = self._get(key, now)
        tat = now if stored is None or stored < now else stored
        new_tat = tat + cost * self.interval
        tau = self.lifetime
        if new_tat - now > tau + 1e-9:
            remaining = int((tau - (tat - now)) / self.interval + 1e-9)
            retry = new_tat - tau - now if cost <= self.amount else math.inf
            return False, max(0, remaining), tat - now, retry
        if not commit:
            return True, int((tau - (tat - now)) / self.interval + 1e-9), tat - now, 0.0
        if cost:
            if stored is not None:
                self.cur[key] = new_tat
            else:
                self._put_new(key, new_tat, now)
        return True, int((tau - (new_tat - now)) / self.interval + 1e-9), new_tat - now, 0.0


@settings(max_examples=150, deadline=None)
@given(
    strategy=st.sampled_from(["fixed", "bucket"]),
    amount=st.integers(1, 4),
    max_keys=st.sampled_from([2, 3, 7, 20, 64]),
    steps=_hits(120, 400),
)
def test_flat_tables_evict_as_dict_generations_do(
    strategy: str, amount: int, max_keys: int, steps: list[tuple[int, int, float, bool]]
) -> None:
    """Property: under max_keys a flat table keeps, moves and evicts the same keys at the
    same hits as the dict generations it replaced: same answers, sizes and evictions."""
    table = _table(strategy, amount, 1.0, max_keys)
    reference = (
        _DictFixedWindow(amount, 1.0, max_keys)
        if strategy == "fixed"
        else _DictTokenBucket(amount, 1.0, max_keys)
    )
    now = 0.0
    for key, cost, dt, commit in steps:
        now += dt
        expected = reference.hit(f"key-{key}", cost, now, commit)
        assert table.hit(f"key-{key}", cost, now, commit) == expected, (key, now)
        assert (len(table), table.evictions) == (len(reference), reference.evictions)
