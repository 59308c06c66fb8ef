"""Flat error hierarchy shared by every guard."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from starlette.exceptions import HTTPException

from ._problem import QUOTA_EXCEEDED, Rejection, rejection_detail

__all__ = ["ConfigurationError", "GuardError", "RateLimitExceeded", "RequestRejected"]


class GuardError(Exception):
    """Base class of every error raised by asgi_guard itself."""


class ConfigurationError(GuardError, ValueError):
    """A guard was configured with options that cannot work.

    Raised at construction (or, for a dependency that needs its middleware, at the first
    request) with a message that names the option and the fix.
    """


class RequestRejected(HTTPException):
    """Raised by a guard's FastAPI dependency to refuse a request.

    It is an ``HTTPException``, so FastAPI answers it even without a handler (as
    ``{"detail": ...}`` with the status and headers); register
    ``asgi_guard.fastapi.rejection_handler`` to answer in RFC 9457 problem+json, as the
    middlewares do.

    Attributes:
        rejection: What the problem+json response is built from.
    """

    def __init__(self, rejection: Rejection) -> None:
        super().__init__(
            status_code=rejection.status, detail=rejection.title, headers=dict(rejection.headers)
        )
        self.rejection = rejection


class RateLimitExceeded(RequestRejected):
    """Raised by the ``rate_limit`` dependency when a request is over its quota (429).

    Attributes:
        violated_policies: The names of the policies that rejected the request.
        retry_after: Seconds after which a retry can succeed; 0 when the request costs more
            than the whole quota and no retry can.
        problem_type: The problem ``type`` URI of the problem+json rendering.
    """

    def __init__(
        self,
        *,
        violated_policies: Sequence[str],
        retry_after: int,
        headers: Mapping[str, str] | None = None,
        problem_type: str = QUOTA_EXCEEDED,
    ) -> None:
        rejection = Rejection(
            status=429,
            type=problem_type,
            title="Too Many Requests",
            detail=rejection_detail(retry_after),
            headers=list((headers or {}).items()),
            extensions={"violated-policies": list(violated_policies)},
            guard="rate_limit",
        )
        super().__init__(rejection)
        self.violated_policies = tuple(violated_policies)
        self.retry_after = retry_after
        self.problem_type = problem_type
