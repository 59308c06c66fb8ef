"""The virtual-time harness of ``bench/shedding_sim.py``: the load-shedding policy run on an
event loop whose clock moves only when the loop would sleep or the simulated application
spends "CPU". Its figures are used to compare rules where the real benchmark's machine
drifts too much; these tests check that the harness means what it says."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def sim() -> Iterator[ModuleType]:
    """The script as a module; the bench modules it imports are forgotten afterwards."""
    path = ROOT / "bench" / "shedding_sim.py"
    before = set(sys.modules)
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(path.parent))  # it imports its neighbour loadgen.py
        spec = importlib.util.spec_from_file_location("shedding_sim", path)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["shedding_sim"] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
        yield module
    for name in set(sys.modules) - before:
        del sys.modules[name]


def costs(sim: Any) -> Any:
    return sim.Costs(arrive=0.00007, work=0.002, sleep=0.001, respond=0.00025, refuse=0.00004)


def test_below_capacity_every_request_is_answered_in_about_its_own_time(sim: Any) -> None:
    c = costs(sim)
    rate = 0.3 * c.most
    run = sim.simulate([(3.0, rate)], c, seed=1)
    assert run.outcomes
    assert all(o.status == 200 for o in run.outcomes)
    # Alone, a request takes its costs and its 1 ms await; queued behind others, longer.
    alone = c.arrive + c.work + c.sleep + c.respond
    latencies = sorted(o.latency for o in run.outcomes)
    assert latencies[0] == pytest.approx(alone, abs=1e-6)
    assert latencies[len(latencies) // 2] < 3 * alone
    # The loop was busy for the CPU the requests cost, and no more.
    assert run.busy == pytest.approx(len(run.outcomes) * (alone - c.sleep), rel=1e-6)
    assert run.counts["queue_full"] == 0


def test_the_same_seed_gives_the_same_run(sim: Any) -> None:
    c = costs(sim)
    runs = [
        sim.simulate([(2.0, 2.5 * c.most)], c, seed=7, drift=0.15, pauses=2.0) for _ in range(2)
    ]
    first, second = ([(o.status, o.latency) for o in run.outcomes] for run in runs)
    assert first == second
    assert any(status == 503 for status, _ in first)


def test_overload_is_shed_and_the_admitted_stay_within_the_objective(sim: Any) -> None:
    c = costs(sim)
    run = sim.simulate([(4.0, 4 * 0.66 * c.most)], c, seed=2)
    f = sim.figures(run, 1.0, 4.0)
    assert f.refused > 0.5
    assert f.p99 < sim.SLO
    assert f.goodput > 0.8 * 0.66 * c.most
    assert run.busy / run.horizon > 0.95  # the worker is saturated, not idle
