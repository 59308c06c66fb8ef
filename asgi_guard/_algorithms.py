"""Concurrency limit algorithms: `Fixed`, `AIMD`, `Vegas`, `Gradient2` and `Adaptive`.

Each implements `LimitAlgorithm` (`_adaptive`). The load-shedding engine reads ``limit`` (a
plain ``int`` attribute) before each admission, calls ``on_sample`` when a request that reached
the application ends, and ``on_lag`` from its ticker. None of them keeps a clock: time comes
only as the ``now`` of those calls, so a test drives them with made-up times.

Three ideas borrowed from TCP and Envoy recur:

* *App-limited samples do not grow a limit*: a limit that is not used (fewer than half its
  slots were busy) says nothing about whether more would help (Netflix concurrency-limits).
* *One decrease per round trip*: after a decrease, requests admitted under the old limit still
  come back slow; they must not decrease it again (TCP's one window reduction per RTT).
* *No-load latency is measured, not guessed*: under sustained overload every request queues,
  so no sample shows the no-load latency any more. `Vegas` and `Adaptive` start by running a
  few requests alone and repeat that every few seconds, as Envoy's adaptive concurrency filter
  does, so their baseline neither sticks nor creeps up with the queue.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

from ._adaptive import LimitAlgorithm
from ._errors import ConfigurationError

__all__ = ["AIMD", "Adaptive", "Fixed", "Gradient2", "Vegas", "as_algorithm"]

_INF = math.inf

#: Requests a no-load probe runs alone before it trusts their median latency.
PROBE_SAMPLES = 5
#: Seconds the very first probe waits for them (later probes scale with the baseline).
FIRST_PROBE_TIMEOUT = 1.0
#: `Adaptive`'s latency target is never closer than this to the baseline (seconds): with a
#: sub-millisecond baseline, scheduling noise alone would look like queueing.
MIN_HEADROOM = 0.001
#: Fresh samples an `Adaptive` window needs before it decides (it also decides after ten
#: windows' time with at least one).
MIN_WINDOW_SAMPLES = 5
#: Lag and drops never take `Adaptive` below ``R + STAFFING_MARGIN * sqrt(R)``, where ``R`` is
#: the concurrency its best recent throughput needs at the no-load latency (Little's law).
STAFFING_MARGIN = 1.5
#: `Gradient2` remembers how busy its limit was with a peak that fades by this per sample.
PEAK_DECAY = 0.98
#: `Adaptive`'s capacity estimate (the best recent throughput) loses this share per window.
CAPACITY_DECAY = 0.95
#: Seconds after a decrease during which `Adaptive` grows additively past where it decreased.
SSTHRESH_MEMORY = 2.0


# -- validation ------------------------------------------------------------------------------


def _limit_option(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationError(f"{name} must be an int (a number of requests), not {value!r}")
    if value < 1:
        raise ConfigurationError(f"{name} must be at least 1, not {value}")
    return value


def _bounds(initial: object, min_limit: object, max_limit: object) -> tuple[int, int, int]:
    lo = _limit_option("min_limit", min_limit)
    hi = _limit_option("max_limit", max_limit)
    start = _limit_option("initial", initial)
    if lo > hi:
        raise ConfigurationError(f"min_limit ({lo}) is above max_limit ({hi})")
    if not lo <= start <= hi:
        raise ConfigurationError(
            f"initial ({start}) must lie between min_limit ({lo}) and max_limit ({hi})"
        )
    return start, lo, hi


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigurationError(f"{name} must be a finite number, not {value!r}")
    return float(value)


def _positive(name: str, value: object) -> float:
    number = _number(name, value)
    if number <= 0:
        raise ConfigurationError(f"{name} must be positive (seconds), not {value!r}")
    return number


def _fraction(name: str, value: object, *, one_allowed: bool) -> float:
    number = _number(name, value)
    if not (0 < number < 1 or (one_allowed and number == 1)):
        interval = "(0, 1]" if one_allowed else "(0, 1)"
        raise ConfigurationError(f"{name} must lie in {interval}, not {value!r}")
    return number


def _clamp(value: float, lo: int, hi: int) -> float:
    return lo if value < lo else hi if value > hi else value


# -- the no-load probe shared by Vegas and Adaptive --------------------------------------------


def _jitter(now: float) -> float:
    """A factor in [0.8, 1.2) drawn from the clock: processes probe at different moments,
    and a test that feeds the same times gets the same schedule."""
    return 0.8 + 0.4 * ((math.sin(now * 12.9898) * 43758.5453) % 1.0)


class _Prober:
    """Measures the no-load latency: the owner drops its limit to ``concurrency`` until
    enough requests admitted at that concurrency or less have ended, or a timeout.

    ``concurrency`` is 1 for the first probe; later ones run at half the concurrency the
    measured throughput needs at the old baseline (Little's law), which is below the true
    concurrency, so the requests do not queue, and costs a worker of 16 cores much less than
    running requests one by one. It starts active: a fresh algorithm measures first. Its
    deadline is set by the first sample: an algorithm is built before any clock runs, and
    a server may wait long for its first request.
    """

    __slots__ = (
        "active",
        "concurrency",
        "deadline",
        "interval",
        "needed",
        "next_at",
        "rtts",
        "start",
    )

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.active = True
        self.concurrency = 1
        self.needed = PROBE_SAMPLES
        self.start = -_INF
        self.deadline = math.nan
        self.next_at = _INF
        self.rtts: list[float] = []

    def begin(self, now: float, baseline: float, concurrency: int) -> None:
        self.active = True
        self.concurrency = concurrency
        self.needed = max(PROBE_SAMPLES, 2 * concurrency)
        self.start = now
        # Long enough to drain what the old limit admitted, then run the samples.
        self.deadline = now + 0.05 + 10 * baseline
        self.rtts = []

    def offer(self, now: float, rtt: float, inflight: int, known: bool) -> bool:
        """Take a sample during a probe; True when the probe is over."""
        if self.deadline != self.deadline:
            self.deadline = now + FIRST_PROBE_TIMEOUT
        if inflight <= self.concurrency and now - rtt >= self.start:
            self.rtts.append(rtt)
        return self.expired(now, known)

    def expired(self, now: float, known: bool) -> bool:
        """Whether the probe is over (never before the first sample of the first probe)."""
        n = len(self.rtts)
        return n >= self.needed or (now >= self.deadline and (n > 0 or known))

    def finish(self, now: float) -> float:
        """End the probe; the median latency it saw, or NaN when it saw none."""
        self.active = False
        self.next_at = now + self.interval * _jitter(now)
        rtts = sorted(self.rtts)
        self.rtts = []
        if not rtts:
            return math.nan
        mid = len(rtts) // 2
        return rtts[mid] if len(rtts) % 2 else (rtts[mid - 1] + rtts[mid]) / 2

    def postpone(self, now: float) -> None:
        """The baseline was just confirmed without a probe: no need for one soon."""
        self.next_at = now + self.interval * _jitter(now)


# -- algorithms --------------------------------------------------------------------------------


class Fixed:
    """A constant concurrency limit: what ``limit=<int>`` means.

    Args:
        limit: Requests the application may serve at once, at least 1.

    Examples:
        >>> Fixed(8).limit
        8
    """

    __slots__ = ("limit",)

    def __init__(self, limit: int) -> None:
        #: The concurrency limit (read-only).
        self.limit: int = _limit_option("limit", limit)

    def on_sample(self, now: float, rtt: float, inflight: int, dropped: bool) -> None:
        pass

    def on_lag(self, now: float, lag: float) -> None:
        pass

    def state(self) -> Mapping[str, float]:
        return {"limit": self.limit}

    def __repr__(self) -> str:
        return f"Fixed({self.limit})"


class AIMD:
    """Additive increase, multiplicative decrease, as Netflix's ``AIMDLimit``.

    Each request that ends well while the limit is in use (at least half of it busy) adds 1;
    a drop, or a request slower than ``latency_threshold``, multiplies the limit by
    ``backoff``. Unlike upstream, only one decrease happens per round trip: the requests
    admitted before a decrease do not decrease it again when they come back slow, so a burst
    of slow requests costs one ``backoff``, not one per request.

    AIMD knows no baseline latency: it grows until requests time out or pass the threshold,
    so pick the threshold from what the service must answer within.

    Args:
        initial: The limit before any request has ended.
        min_limit: The limit never goes below this.
        max_limit: The limit never goes above this.
        backoff: The factor in (0, 1) applied on a decrease.
        latency_threshold: Seconds; a request slower than this counts as a drop. ``None``:
            only drops decrease the limit.

    Examples:
        >>> aimd = AIMD(initial=10, latency_threshold=0.5)
        >>> aimd.on_sample(now=1.0, rtt=0.01, inflight=10, dropped=False)
        >>> aimd.limit
        11
        >>> aimd.on_sample(now=2.0, rtt=0.8, inflight=11, dropped=False)
        >>> aimd.limit
        9
    """

    __slots__ = (
        "_decreased_at",
        "_fl",
        "_rtt",
        "backoff",
        "latency_threshold",
        "limit",
        "max_limit",
        "min_limit",
    )

    def __init__(
        self,
        *,
        initial: int = 20,
        min_limit: int = 1,
        max_limit: int = 1000,
        backoff: float = 0.9,
        latency_threshold: float | None = 1.0,
    ) -> None:
        initial, self.min_limit, self.max_limit = _bounds(initial, min_limit, max_limit)
        self.backoff = _fraction("backoff", backoff, one_allowed=False)
        self.latency_threshold = (
            _INF if latency_threshold is None else _positive("latency_threshold", latency_threshold)
        )
        self._fl = float(initial)
        #: The concurrency limit (read-only).
        self.limit: int = initial
        self._decreased_at = -_INF
        self._rtt = 0.0

    def on_sample(self, now: float, rtt: float, inflight: int, dropped: bool) -> None:
        if not 0.0 <= rtt < _INF:
            return
        self._rtt = rtt
        if dropped or rtt > self.latency_threshold:
            if now - rtt >= self._decreased_at:
                self._decreased_at = now
                self._fl = max(self.min_limit, self._fl * self.backoff)
                self.limit = int(self._fl)
        elif 2 * inflight >= self.limit and self._fl < self.max_limit:
            self._fl = min(self.max_limit, self._fl + 1.0)
            self.limit = int(self._fl)

    def on_lag(self, now: float, lag: float) -> None:
        pass

    def state(self) -> Mapping[str, float]:
        return {"limit": self.limit, "rtt": self._rtt}

    def __repr__(self) -> str:
        return f"AIMD(limit={self.limit})"


class Vegas:
    """Delay-based, after TCP Vegas and Netflix's ``VegasLimit``.

    It estimates the queue inside the application as ``limit * (1 - min_rtt / rtt)`` and keeps
    it between ``alpha = 3 * log10(limit)`` and ``beta = 6 * log10(limit)`` (``log10`` at least
    1): under ``log10(limit)`` it grows by ``beta``, under ``alpha`` by ``log10(limit)``, above
    ``beta`` (or on a drop) it shrinks by ``log10(limit)``. The no-load latency ``min_rtt`` is
    the smallest latency seen, measured first by running five requests alone (``learning``
    is true until then: the load-shedding engine lets requests wait up to a second for it,
    rather than refuse them). Every ``probe_interval`` (jittered by ±20%) it is measured
    again: for a few requests' time the limit drops to half the concurrency the current
    throughput needs (Little's law), so those requests do not queue, and their median
    replaces it, upwards too. Upstream's
    re-probe instead takes the next sample as the new no-load latency; under sustained
    overload that sample has queued, so each re-probe lets the limit climb.

    Like every minimum-latency algorithm, it suits routes of similar cost: a cheap route's
    latency becomes the baseline that an expensive route's requests are measured against.

    Args:
        initial: The limit after the first measurement.
        min_limit: The limit never goes below this (the first measurement runs at it).
        max_limit: The limit never goes above this.
        smoothing: In (0, 1]: how much of each step is taken (1: all of it).
        probe_interval: Seconds between re-measurements of the no-load latency.

    Examples:
        >>> vegas = Vegas(initial=10)
        >>> vegas.limit  # measuring the no-load latency first
        1
        >>> for i in range(5):
        ...     vegas.on_sample(now=0.01 * (i + 1), rtt=0.005, inflight=1, dropped=False)
        >>> vegas.limit, vegas.state()["min_rtt"]
        (10, 0.005)
    """

    __slots__ = (
        "_fl",
        "_log",
        "_min_rtt",
        "_probe",
        "_resume",
        "_rtt",
        "_smoothing",
        "learning",
        "limit",
        "max_limit",
        "min_limit",
    )

    def __init__(
        self,
        *,
        initial: int = 20,
        min_limit: int = 1,
        max_limit: int = 1000,
        smoothing: float = 1.0,
        probe_interval: float = 10.0,
    ) -> None:
        initial, self.min_limit, self.max_limit = _bounds(initial, min_limit, max_limit)
        self._smoothing = _fraction("smoothing", smoothing, one_allowed=True)
        self._probe = _Prober(_positive("probe_interval", probe_interval))
        self._resume = float(initial)
        self._fl = float(self.min_limit)
        #: The concurrency limit (read-only).
        self.limit: int = self.min_limit
        #: Whether it is still measuring the no-load latency for the first time, at
        #: ``min_limit`` (read-only): the load-shedding engine lets requests queue for up
        #: to a second meanwhile, rather than refuse what a fresh worker can serve.
        self.learning = True
        self._log = 1.0
        self._min_rtt = _INF
        self._rtt = 0.0

    def on_sample(self, now: float, rtt: float, inflight: int, dropped: bool) -> None:
        if not 0.0 < rtt < _INF:
            return
        self._rtt = rtt
        probe = self._probe
        if probe.active:
            if probe.offer(now, rtt, inflight, self._min_rtt < _INF):
                self._end_probe(now)
            return
        if now >= probe.next_at:
            self._begin_probe(now)
            return
        if rtt < self._min_rtt:
            self._min_rtt = rtt
            return
        fl = self._fl
        log = self._log
        if dropped:
            new = fl - log
        elif 2 * inflight < fl:
            return
        else:
            queue = fl * (1.0 - self._min_rtt / rtt)
            if queue <= log:
                new = fl + 6.0 * log
            elif queue < 3.0 * log:
                new = fl + log
            elif queue > 6.0 * log:
                new = fl - log
            else:
                return
        new = fl + (_clamp(new, self.min_limit, self.max_limit) - fl) * self._smoothing
        self._set(new)

    def _set(self, fl: float) -> None:
        self._fl = fl
        limit = int(fl)
        if limit != self.limit:
            self.limit = limit
            self._log = max(1.0, math.log10(limit))

    def _begin_probe(self, now: float) -> None:
        self._resume = self._fl
        # Little's law: the concurrency the last sample says the current throughput needs.
        needed = self._fl * self._min_rtt / self._rtt  # inf after an absurdly short sample
        concurrency = max(self.min_limit, int(min(self.limit, needed / 2)))
        self._probe.begin(now, self._min_rtt, concurrency)
        self._fl = float(concurrency)
        self.limit = concurrency

    def _end_probe(self, now: float) -> None:
        baseline = self._probe.finish(now)
        if baseline == baseline:
            self._min_rtt = baseline
        self.learning = False
        self._set(self._resume)

    def on_lag(self, now: float, lag: float) -> None:
        # The ticker is the clock that ends a probe when too few requests come to end it.
        probe = self._probe
        if probe.active and probe.expired(now, self._min_rtt < _INF):
            self._end_probe(now)

    def state(self) -> Mapping[str, float]:
        return {
            "limit": self.limit,
            "min_rtt": self._min_rtt if self._min_rtt < _INF else 0.0,
            "rtt": self._rtt,
            "probing": float(self._probe.active),
        }

    def __repr__(self) -> str:
        return f"Vegas(limit={self.limit})"


class Gradient2:
    """Long-term against short-term latency, as Netflix's ``Gradient2Limit``, without its drift.

    Each sample compares its latency with a long-term average (an exponential average over
    ``long_window`` samples): ``gradient = clamp(rtt_tolerance * long_rtt / rtt, 0.5, 1)``,
    then ``limit = limit * gradient + queue_size(limit)``, smoothed by ``smoothing``. While
    latency stays within ``rtt_tolerance`` of the long-term average, the limit grows by the
    queue size; beyond, it shrinks, at most by half. A drop counts as gradient 0.5.

    The upstream flaw: the long-term average learns from every sample. Under sustained
    overload it catches up with the queued latency within a few ``long_window`` samples, the
    gradient returns to 1, and the limit grows by ``queue_size`` with every sample, which
    raises the latency the average then learns: the limit climbs until ``max_limit``.

    The fix: the long-term average learns upward only from samples taken while the limit has
    not been in use for a while (fewer than half its slots busy, over the last few dozen
    samples: a request admitted in a lull still queues behind those admitted before and
    after it), and downward from any sample at or below it. Under sustained overload it can
    therefore only fall, towards the lowest latency the application still shows, so the
    limit settles and stays.
    The cost: when the application really becomes slower under overload, the average learns
    it only once load falls below half the limit; meanwhile the limit holds at the fixed point
    of ``L = L * gradient + queue_size(L)`` (16 with the default ``sqrt`` and a twice slower
    application), it does not collapse.

    Args:
        initial: The starting limit.
        min_limit: The limit never goes below this.
        max_limit: The limit never goes above this.
        smoothing: In (0, 1]: how much of each step is taken.
        rtt_tolerance: At least 1: how much slower than the long-term average a request may
            be before the limit shrinks.
        long_window: Samples the long-term average spans (after a plain average of the first 10).
        queue_size: Headroom added to every step: a number, or a function of the limit.

    Examples:
        >>> gradient = Gradient2(initial=10, smoothing=1.0, queue_size=2)
        >>> for i in range(10):  # the long-term average learns 10 ms
        ...     gradient.on_sample(now=i / 100, rtt=0.010, inflight=2, dropped=False)
        >>> gradient.on_sample(now=1.0, rtt=0.030, inflight=10, dropped=False)
        >>> gradient.limit  # 10 * (1.5 * 10 / 30) + 2
        7
    """

    __slots__ = (
        "_alpha",
        "_fl",
        "_long",
        "_peak",
        "_queue_size",
        "_rtt",
        "_smoothing",
        "_tolerance",
        "_warm",
        "limit",
        "max_limit",
        "min_limit",
    )

    def __init__(
        self,
        *,
        initial: int = 20,
        min_limit: int = 1,
        max_limit: int = 1000,
        smoothing: float = 0.2,
        rtt_tolerance: float = 1.5,
        long_window: int = 600,
        queue_size: int | Callable[[int], float] = math.sqrt,
    ) -> None:
        initial, self.min_limit, self.max_limit = _bounds(initial, min_limit, max_limit)
        self._smoothing = _fraction("smoothing", smoothing, one_allowed=True)
        self._tolerance = _number("rtt_tolerance", rtt_tolerance)
        if self._tolerance < 1:
            raise ConfigurationError(f"rtt_tolerance must be at least 1, not {rtt_tolerance!r}")
        window = _limit_option("long_window", long_window)
        self._alpha = 2.0 / (window + 1)
        self._queue_size = _queue_size_function(queue_size, initial)
        self._fl = float(initial)
        #: The concurrency limit (read-only).
        self.limit: int = initial
        self._long = 0.0
        self._peak = 0.0
        self._warm = 0
        self._rtt = 0.0

    def on_sample(self, now: float, rtt: float, inflight: int, dropped: bool) -> None:
        if not 0.0 < rtt < _INF:
            return
        self._rtt = rtt
        fl = self._fl
        busy = 2 * inflight >= fl
        peak = self._peak * PEAK_DECAY
        if inflight > peak:
            peak = inflight
        self._peak = peak
        long = self._long
        if self._warm < 10:
            self._warm += 1
            long += (rtt - long) / self._warm
        elif rtt <= long or 2 * peak < fl:
            long += (rtt - long) * self._alpha
        if long > 2.0 * rtt:
            # Latency is back to normal after a long overload: forget the overload faster.
            long *= 0.95
        self._long = long
        if not busy:
            return
        if dropped:
            gradient = 0.5
        else:
            gradient = self._tolerance * long / rtt
            gradient = 0.5 if gradient < 0.5 else 1.0 if gradient > 1.0 else gradient
        new = fl * gradient + self._queue_size(self.limit)
        new = fl + (_clamp(new, self.min_limit, self.max_limit) - fl) * self._smoothing
        self._fl = new
        self.limit = int(new)

    def on_lag(self, now: float, lag: float) -> None:
        pass

    def state(self) -> Mapping[str, float]:
        return {"limit": self.limit, "long_rtt": self._long, "rtt": self._rtt}

    def __repr__(self) -> str:
        return f"Gradient2(limit={self.limit})"


def _queue_size_function(
    queue_size: int | Callable[[int], float], initial: int
) -> Callable[[int], float]:
    if isinstance(queue_size, bool):
        raise ConfigurationError("queue_size must be a number or a function of the limit")
    if isinstance(queue_size, (int, float)):
        size = _number("queue_size", queue_size)
        if size < 0:
            raise ConfigurationError(f"queue_size must not be negative, not {queue_size!r}")

        def constant(limit: int) -> float:
            return size

        return constant
    if not callable(queue_size):
        raise ConfigurationError("queue_size must be a number or a function of the limit")
    try:
        probe = float(queue_size(initial))
    except Exception as exc:
        raise ConfigurationError(f"queue_size({initial}) failed: {exc!r}") from exc
    if not 0 <= probe < _INF:
        raise ConfigurationError(f"queue_size({initial}) must be a finite number >= 0")
    return queue_size


class Adaptive:
    """The default: learns the concurrency a worker really has, from latency and loop lag.

    How it works:

    * **Baseline.** It starts at ``min_limit`` until five requests have run alone (or a
      second has passed) and takes their median latency as the no-load latency (``learning``
      is true until then: the load-shedding engine lets requests wait up to a second for
      it, rather than refuse them). Later,
      requests admitted while fewer than half the worker's concurrency was in flight did not
      queue: when a window's worth of them is faster, the baseline follows them down. When
      none has been seen for ``probe_interval`` (sustained load), it measures again: for a
      few requests' time the limit drops to half the concurrency the throughput needs (so
      nothing queues), which costs a fraction of a percent of throughput. When a window's
      worth of them is slower than the target while the limit is not in use and the loop
      keeps up, slower routes are being called than when it was measured: the baseline
      follows them up (else every request would look queued and the limit would fall to
      its floor).
    * **Target.** Latency may grow to ``baseline * tolerance`` (at least 1 ms above the
      baseline): what queueing in a saturated worker adds. On latency alone, a CPU-bound
      worker settles at about ``tolerance`` times its true concurrency.
    * **Windows.** Every ``window`` seconds (with at least 5 samples) it compares the mean
      latency of the requests admitted since its last change with the target; requests
      admitted before a change say nothing about the new limit, so there is one decrease per
      round trip. Above the target the limit shrinks in proportion (``limit * target / rtt``,
      by half at most). Below it, if the limit is in use, it grows halfway towards where
      latency would reach the target (its excess over the baseline growing with the limit),
      by half at most; by 1 when that is less than 1, and then only if latency extrapolated
      to one more request stays under the target: at limit 2 one more is 50% more work. For
      two seconds after a decrease, growth past the decreased limit is additive.
    * **Loop lag.** A mean event-loop lag above ``max_lag`` in a window means the loop's CPU
      is saturated: more requests would only wait for it. CPU-bound handlers raise the lag
      before latency. The limit stops growing and shrinks, by 10% to half.
    * **Floor.** Lag, drops and latency never take the limit below ``R + 1.5 * sqrt(R)``,
      rounded up, where ``R`` is the concurrency the best recent throughput needs at the
      baseline latency (Little's law; the square root is the staffing margin for random
      arrivals): loop noise, rejection work on the loop or timeouts of one slow route
      cannot starve the worker.

    It never goes below ``min_limit`` nor above ``max_limit``, and learns only from requests
    that reached the application.

    Args:
        initial: The limit after the first measurement of the no-load latency.
        min_limit: The limit never goes below this (the first measurement runs at it).
        max_limit: The limit never goes above this.
        tolerance: Above 1: the latency, as a multiple of the no-load latency, at which the
            worker counts as saturated.
        max_lag: Seconds of event-loop lag above which the loop counts as saturated; ``None``
            ignores the lag.
        window: Seconds between decisions.
        probe_interval: Seconds of sustained load after which the no-load latency is
            measured again (jittered by ±20%).

    Examples:
        >>> algorithm = Adaptive(initial=4)
        >>> algorithm.limit, algorithm.learning  # measuring first, at min_limit
        (1, True)
        >>> for i in range(5):  # requests running alone: 3 ms is the no-load latency
        ...     algorithm.on_sample(now=0.003 * (i + 1), rtt=0.003, inflight=1, dropped=False)
        >>> algorithm.limit, algorithm.state()["min_rtt"], algorithm.learning
        (4, 0.003, False)
    """

    __slots__ = (
        "_capacity",
        "_changed_at",
        "_decreased_at",
        "_drops",
        "_fl",
        "_lag",
        "_lag_n",
        "_lag_sum",
        "_max_inflight",
        "_max_lag",
        "_min_rtt",
        "_n",
        "_n_all",
        "_probe",
        "_quiet",
        "_quiet_n",
        "_quiet_sum",
        "_resume",
        "_rtt",
        "_ssthresh",
        "_sum",
        "_throughput",
        "_tolerance",
        "_win_start",
        "_window",
        "learning",
        "limit",
        "max_limit",
        "min_limit",
    )

    def __init__(
        self,
        *,
        initial: int = 20,
        min_limit: int = 1,
        max_limit: int = 1000,
        tolerance: float = 2.0,
        max_lag: float | None = 0.005,
        window: float = 0.1,
        probe_interval: float = 5.0,
    ) -> None:
        initial, self.min_limit, self.max_limit = _bounds(initial, min_limit, max_limit)
        self._tolerance = _number("tolerance", tolerance)
        if self._tolerance <= 1:
            raise ConfigurationError(f"tolerance must be above 1, not {tolerance!r}")
        self._max_lag = _INF if max_lag is None else _positive("max_lag", max_lag)
        self._window = _positive("window", window)
        self._probe = _Prober(_positive("probe_interval", probe_interval))
        self._resume = float(initial)
        self._fl = float(self.min_limit)
        #: The concurrency limit (read-only).
        self.limit: int = self.min_limit
        #: Whether it is still measuring the no-load latency for the first time, at
        #: ``min_limit`` (read-only): the load-shedding engine lets requests queue for up
        #: to a second meanwhile, rather than refuse what a fresh worker can serve.
        self.learning = True
        self._min_rtt = _INF
        self._changed_at = -_INF
        self._win_start = math.nan
        self._rtt = 0.0
        self._lag = 0.0
        self._throughput = 0.0
        self._capacity = 0.0
        self._quiet = 1
        self._ssthresh = _INF
        self._decreased_at = -_INF
        self._reset_window(math.nan)

    def _reset_window(self, now: float) -> None:
        self._win_start = now
        self._n = 0
        self._n_all = 0
        self._sum = 0.0
        self._drops = 0
        self._max_inflight = 0
        self._quiet_n = 0
        self._quiet_sum = 0.0
        self._lag_sum = 0.0
        self._lag_n = 0

    def on_sample(self, now: float, rtt: float, inflight: int, dropped: bool) -> None:
        if not 0.0 < rtt < _INF:
            return
        probe = self._probe
        if probe.active:
            if probe.offer(now, rtt, inflight, self._min_rtt < _INF):
                self._end_probe(now)
            return
        if now >= probe.next_at:
            self._begin_probe(now)
            return
        self._n_all += 1
        if now - rtt < self._changed_at:
            return  # admitted under the previous limit: says nothing about this one
        self._n += 1
        self._sum += rtt
        if dropped:
            self._drops += 1
        if inflight > self._max_inflight:
            self._max_inflight = inflight
        if inflight <= self._quiet:
            self._quiet_n += 1
            self._quiet_sum += rtt
        elapsed = now - self._win_start
        if elapsed >= self._window and (
            self._n >= MIN_WINDOW_SAMPLES or elapsed >= 10 * self._window
        ):
            self._decide(now, elapsed)

    def on_lag(self, now: float, lag: float) -> None:
        if 0.0 <= lag < _INF:
            self._lag_sum += lag
            self._lag_n += 1
        probe = self._probe
        if probe.active and probe.expired(now, self._min_rtt < _INF):
            self._end_probe(now)

    def _decide(self, now: float, elapsed: float) -> None:
        n = self._n
        rtt = self._sum / n
        lag = self._lag_sum / self._lag_n if self._lag_n else 0.0
        throughput = self._n_all / elapsed
        base = self._min_rtt
        tolerance = self._tolerance
        lagging = lag > self._max_lag
        if self._quiet_n >= 3:
            # Requests admitted with fewer in flight than half the worker's concurrency did
            # not queue: they show the no-load latency without a probe.
            quiet = self._quiet_sum / self._quiet_n
            if quiet < base:
                base = self._min_rtt = quiet
            elif (
                quiet > max(base * tolerance, base + MIN_HEADROOM)
                and not lagging
                and 2 * self._max_inflight < self.limit
            ):
                # Even they took longer than the target, while the limit was not in use
                # and the loop kept up: the no-load latency itself has grown (slower
                # routes are called now than when it was measured). Kept, it would make
                # every request look queued and take the limit down to its floor.
                base = self._min_rtt = quiet
            if quiet <= base * tolerance + MIN_HEADROOM:
                self._probe.postpone(now)
        target = base * tolerance
        if target < base + MIN_HEADROOM:
            target = base + MIN_HEADROOM
        fl = self._fl
        new = fl
        if rtt > target:
            new = fl * max(0.5, target / rtt)
        if lagging:
            new = min(new, fl * min(0.9, max(0.5, self._max_lag / lag)))
        if self._drops:
            new = min(new, fl * min(0.9, max(0.5, 1.0 - self._drops / n)))
        capacity = self._capacity * CAPACITY_DECAY
        if throughput > capacity:
            capacity = throughput
        self._capacity = capacity
        self._quiet = max(1, int(capacity * base / 2))
        if new < fl:
            # Square-root staffing: the concurrency the best recent throughput needs at the
            # no-load latency (Little's law), plus a margin for random arrivals.
            needed = capacity * base
            floor = float(math.ceil(needed + STAFFING_MARGIN * math.sqrt(needed)))
            if new < floor:
                new = min(fl, floor)
            if new < fl:
                self._ssthresh = new
                self._decreased_at = now
        elif not lagging and 2 * self._max_inflight >= self.limit:
            excess = rtt - base
            # Where latency would reach the target if its excess grows with the limit.
            step = fl * 0.5 if excess <= 0 else (fl * (target - base) / excess - fl) * 0.5
            if step > fl * 0.5:
                step = fl * 0.5
            if fl >= self._ssthresh:
                if now - self._decreased_at < SSTHRESH_MEMORY:
                    # Close to where the last decrease happened: probe additively.
                    additive = max(1.0, math.sqrt(fl) / 2)
                    if step > additive:
                        step = additive
                else:
                    self._ssthresh = _INF
            if step < 1.0:
                step = 1.0 if rtt + excess / fl <= target else 0.0
            new = fl + step
        new = _clamp(new, self.min_limit, self.max_limit)
        self._fl = new
        limit = int(new)
        if limit != self.limit:
            self.limit = limit
            self._changed_at = now
        self._rtt = rtt
        self._lag = lag
        self._throughput = throughput
        self._reset_window(now)

    def _begin_probe(self, now: float) -> None:
        self._resume = self._fl
        needed = self._capacity * self._min_rtt
        concurrency = max(self.min_limit, int(min(self.limit, needed / 2)))
        self._probe.begin(now, self._min_rtt, concurrency)
        self._fl = float(concurrency)
        self.limit = concurrency

    def _end_probe(self, now: float) -> None:
        baseline = self._probe.finish(now)
        if baseline == baseline:
            self._min_rtt = baseline
        self.learning = False
        self._fl = self._resume
        self.limit = int(self._resume)
        self._changed_at = now
        self._reset_window(now)

    def state(self) -> Mapping[str, float]:
        base = self._min_rtt if self._min_rtt < _INF else 0.0
        return {
            "limit": self.limit,
            "min_rtt": base,
            "target_rtt": max(base * self._tolerance, base + MIN_HEADROOM) if base else 0.0,
            "rtt": self._rtt,
            "lag": self._lag,
            "throughput": self._throughput,
            "probing": float(self._probe.active),
        }

    def __repr__(self) -> str:
        return f"Adaptive(limit={self.limit})"


def as_algorithm(value: int | LimitAlgorithm) -> LimitAlgorithm:
    """What a ``limit=`` option means: an int is a `Fixed` limit, an algorithm is itself.

    Raises:
        ConfigurationError: For a bool, a float, a number below 1, or an object that is not
            a `LimitAlgorithm` or whose ``limit`` is not an int of at least 1.

    Examples:
        >>> as_algorithm(10)
        Fixed(10)
        >>> as_algorithm(Adaptive()).limit
        1
    """
    if isinstance(value, (bool, float, complex)):
        raise ConfigurationError(f"limit must be an int or a limit algorithm, not {value!r}")
    if isinstance(value, int):
        return Fixed(value)
    if not isinstance(value, LimitAlgorithm):
        raise ConfigurationError(
            f"limit must be an int or a limit algorithm (Fixed, AIMD, Vegas, Gradient2, "
            f"Adaptive, or an object with limit, on_sample, on_lag and state), not {value!r}"
        )
    current = value.limit
    if isinstance(current, bool) or not isinstance(current, int) or current < 1:
        raise ConfigurationError(f"{value!r}.limit must be an int of at least 1, not {current!r}")
    return value
