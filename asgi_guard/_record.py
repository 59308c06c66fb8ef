"""The per-request guard record, kept in ``scope["asgi_guard"]``."""

from __future__ import annotations

from starlette.types import Scope

__all__ = ["SCOPE_KEY", "GuardRecord", "get_record"]

SCOPE_KEY = "asgi_guard"


class GuardRecord:
    """What the guards know about one request, shared by middlewares and dependencies.

    Attributes:
        rate_limit_headers: RateLimit header entries added by dependencies after routing,
            written into the response by the rate-limit middleware when it starts.
        rate_limit_middleware: Whether a ``RateLimitMiddleware`` handles this request.
    """

    __slots__ = ("rate_limit_headers", "rate_limit_middleware")

    def __init__(self) -> None:
        self.rate_limit_headers: list[tuple[str, str, str]] | None = None
        self.rate_limit_middleware = False


def get_record(scope: Scope) -> GuardRecord:
    """Return the request's record, creating it on first use."""
    record = scope.get(SCOPE_KEY)
    if record is None:
        record = scope[SCOPE_KEY] = GuardRecord()
    return record  # type: ignore[no-any-return,unused-ignore]
