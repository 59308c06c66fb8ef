"""LoadSheddingMiddleware: Retry-After is jittered over whole seconds and grows with how much
is being refused."""

from __future__ import annotations

from collections import Counter

import anyio
import pytest

from asgi_guard import LoadSheddingMiddleware

from .asgi_driver import Driven, drive, http_scope, until
from .test_shedding import Gate, start

pytestmark = pytest.mark.anyio


async def retry_afters(shedder: LoadSheddingMiddleware, n: int) -> Counter[int]:
    seen: Counter[int] = Counter()
    for _ in range(n):
        refused = await drive(shedder, http_scope("/x"))
        assert refused.status == 503, refused.sent
        seen[int(refused.headers["retry-after"])] += 1
    return seen


async def test_retry_after_spreads_over_whole_seconds_and_grows_with_refusals() -> None:
    """At the start of shedding the refused are told 1 or 2 s, not all the same; once
    everything is refused, 4 to 8 s, spread over those seconds."""
    gate = Gate()
    shedder = LoadSheddingMiddleware(gate, limit=1, max_queue=0)
    shedder._report = lambda now: None  # type: ignore[method-assign] # the test sets the ratio
    results: dict[str, Driven] = {}
    async with anyio.create_task_group() as group:
        await start(group, shedder, "/hold", results)
        await until(lambda: gate.inside == 1)
        calm = await retry_afters(shedder, 200)
        shedder._refusal_ratio = 1.0  # what the ticker reports after a while of refusing all
        heavy = await retry_afters(shedder, 400)
        gate.open.set()
    assert set(calm) == {1, 2}, calm
    assert set(heavy) == {4, 5, 6, 7, 8}, heavy
    assert min(heavy.values()) >= 400 / 5 / 3, heavy  # roughly uniform


async def test_retry_after_scales_with_its_base() -> None:
    """``retry_after=3``: 3 to 6 s while calm."""
    gate = Gate()
    shedder = LoadSheddingMiddleware(gate, limit=1, max_queue=0, retry_after=3.0)
    shedder._report = lambda now: None  # type: ignore[method-assign] # the ratio stays 0
    results: dict[str, Driven] = {}
    async with anyio.create_task_group() as group:
        await start(group, shedder, "/hold", results)
        await until(lambda: gate.inside == 1)
        calm = await retry_afters(shedder, 200)
        gate.open.set()
    assert set(calm) == {3, 4, 5, 6}, calm
