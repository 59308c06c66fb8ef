"""Flat error hierarchy shared by every guard."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from starlette.exceptions import HTTPException

from ._problem import QUOTA_EXCEEDED

__all__ = ["ConfigurationError", "GuardError", "RateLimitExceeded"]


class GuardError(Exception):
    """Base class of every error raised by asgi_guard itself."""


class ConfigurationError(GuardError, ValueError):
    """A guard was configured with options that cannot work.

    Raised at construction (or, for a dependency that needs its middleware, at the first
    request) with a message that names the option and the fix.
    """


class RateLimitExceeded(HTTPException):
    """Raised by the ``rate_limit`` dependency when a request is over its quota.

    It is an ``HTTPException`` subclass, so FastAPI answers it without a custom handler;
    the middleware answers directly instead of raising.

    Attributes:
        violated_policies: The names of the policies that rejected the request.
        retry_after: Seconds after which a retry can succeed.
        problem_type: The problem ``type`` URI for a problem+json rendering.
    """

    def __init__(
        self,
        *,
        violated_policies: Sequence[str],
        retry_after: int,
        headers: Mapping[str, str] | None = None,
        problem_type: str = QUOTA_EXCEEDED,
    ) -> None:
        super().__init__(status_code=429, detail="Too Many Requests", headers=dict(headers or {}))
        self.violated_policies = tuple(violated_policies)
        self.retry_after = retry_after
        self.problem_type = problem_type
