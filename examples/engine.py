"""The engine alone: ``RateLimiter.hit`` outside any web framework, on a manual clock.

The middleware and the dependency drive this same engine. Use it directly to throttle
background jobs or outbound calls, and with a :class:`~asgi_guard.ManualClock` to test time
without sleeping. Every error asgi_guard raises is a ``GuardError``; bad configuration is a
``ConfigurationError`` (also a ``ValueError``), raised when the object is built.
"""

from __future__ import annotations

import anyio

from asgi_guard import (
    Clock,
    ConfigurationError,
    ManualClock,
    MonotonicClock,
    Policy,
    QuotaState,
    RateLimitDecision,
    RateLimiter,
)


def policy_from_settings(text: str) -> Policy:
    """Parse a limit from configuration; a typo fails here, at startup, not per request."""
    try:
        return Policy(text, name="jobs")
    except ConfigurationError as exc:
        raise SystemExit(f"invalid JOBS_LIMIT {text!r}: {exc}") from exc


def make_limiter(clock: Clock | None = None) -> RateLimiter:
    """An in-memory limiter on ``clock`` (by default the monotonic clock)."""
    return RateLimiter(clock=clock if clock is not None else MonotonicClock())


def describe(decision: RateLimitDecision) -> str:
    """One line per decision, from the state of each quota."""
    state: QuotaState = decision.quotas[0]
    if decision.allowed:
        return f"allowed, {state.remaining} of {state.limit} left for {state.reset_after:.0f}s"
    return f"refused by {', '.join(decision.violated)}, retry in {decision.retry_after:.0f}s"


async def run_jobs(limiter: RateLimiter, clock: ManualClock, policy: Policy) -> list[str]:
    """Submit four jobs for one tenant, wait out the window, submit one more."""
    lines = []
    for _ in range(4):
        lines.append(describe(await limiter.hit(policy, "tenant-42")))
    clock.advance(60)  # no sleep: the manual clock moves only when told to
    lines.append(describe(await limiter.hit(policy, "tenant-42")))
    return lines


async def main() -> None:
    clock = ManualClock()
    limiter = make_limiter(clock)
    policy = policy_from_settings("3/minute")
    for line in await run_jobs(limiter, clock, policy):
        print(line)


if __name__ == "__main__":
    anyio.run(main)
