"""asgi_guard: pure ASGI guards for FastAPI, Starlette and any ASGI app.

The public API is exactly ``__all__``; every other module is private. FastAPI dependency
factories live in `fastapi`.
"""

from __future__ import annotations

from ._adaptive import LimitAlgorithm
from ._algorithms import AIMD, Adaptive, Fixed, Gradient2, Vegas
from ._blocking import BlockingEvent
from ._clock import Clock, ManualClock, MonotonicClock
from ._deadline import deadline, httpx_timeout, outbound_timeout, remaining
from ._errors import ConfigurationError, GuardError, RateLimitExceeded, RequestRejected
from ._events import (
    Event,
    EventHandler,
    LoadSheddingEvent,
    RateLimitEvent,
    StorageEvent,
    TimeoutEvent,
)
from ._keys import KeyFunc, client_ip, header_key
from ._limiter import QuotaState, RateLimitDecision, RateLimiter
from ._policy import Policy
from ._problem import Rejection
from .blocking import BlockingCallError, BlockingDetectorMiddleware
from .ratelimit import QUOTA_EXCEEDED, TEMPORARY_REDUCED_CAPACITY, RateLimitMiddleware, Rule
from .shedding import LoadSheddingMiddleware
from .timeout import TimeoutMiddleware

__all__ = [
    "AIMD",
    "Adaptive",
    "BlockingCallError",
    "BlockingDetectorMiddleware",
    "BlockingEvent",
    "Clock",
    "ConfigurationError",
    "Event",
    "EventHandler",
    "Fixed",
    "Gradient2",
    "GuardError",
    "KeyFunc",
    "LimitAlgorithm",
    "LoadSheddingEvent",
    "LoadSheddingMiddleware",
    "ManualClock",
    "MonotonicClock",
    "Policy",
    "QUOTA_EXCEEDED",
    "QuotaState",
    "RateLimitDecision",
    "RateLimitEvent",
    "RateLimitExceeded",
    "RateLimitMiddleware",
    "RateLimiter",
    "Rejection",
    "RequestRejected",
    "Rule",
    "StorageEvent",
    "TEMPORARY_REDUCED_CAPACITY",
    "TimeoutEvent",
    "TimeoutMiddleware",
    "Vegas",
    "client_ip",
    "deadline",
    "header_key",
    "httpx_timeout",
    "outbound_timeout",
    "remaining",
]
