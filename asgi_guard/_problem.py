"""RFC 9457 ``application/problem+json`` rejections, the one way every guard says no."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = [
    "QUOTA_EXCEEDED",
    "TEMPORARY_REDUCED_CAPACITY",
    "Rejection",
    "can_deny",
    "encode_problem",
    "ResponseFactory",
    "rejection_detail",
    "send_rejection",
]

#: Problem type of a request over its quota (draft-ietf-httpapi-ratelimit-headers).
QUOTA_EXCEEDED = "https://iana.org/assignments/http-problem-types#quota-exceeded"
#: Problem type of a request refused because the service is short of capacity.
TEMPORARY_REDUCED_CAPACITY = (
    "https://iana.org/assignments/http-problem-types#temporary-reduced-capacity"
)


@dataclass(frozen=True)
class Rejection:
    """Why a guard refused a request; what the response to it is built from.

    Attributes:
        status: The HTTP status (429, 503, 504, 408).
        type: The problem type URI.
        title: A short, human-readable summary of the problem type.
        detail: A human-readable explanation specific to this occurrence (never a key or
            client address).
        headers: Extra response headers, such as ``Retry-After``.
        extensions: Extra members of the problem object, such as ``violated-policies``.
        guard: Which guard rejected: ``"rate_limit"``, ...
    """

    status: int
    type: str
    title: str
    detail: str | None = None
    headers: Sequence[tuple[str, str]] = ()
    extensions: Mapping[str, Any] = field(default_factory=dict)
    guard: str = ""

    def problem(self) -> dict[str, Any]:
        """The problem object as a dict (``type``, ``title``, ``status``, ``detail``, ...)."""
        body: dict[str, Any] = {"type": self.type, "title": self.title, "status": self.status}
        if self.detail is not None:
            body["detail"] = self.detail
        body.update(self.extensions)
        return body


#: A user-supplied builder of the rejection response: gets the scope and the rejection and
#: returns any ASGI app, typically a Starlette ``Response``. May be async.
ResponseFactory = Callable[[Scope, Rejection], "ASGIApp | Awaitable[ASGIApp]"]


def _http_headers(
    rejection: Rejection, content_type: bytes, length: int
) -> list[tuple[bytes, bytes]]:
    headers = [(b"content-type", content_type), (b"content-length", str(length).encode())]
    headers.extend((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in rejection.headers)
    return headers


def encode_problem(rejection: Rejection) -> bytes:
    """The ``application/problem+json`` body of ``rejection``, compact."""
    return json.dumps(rejection.problem(), separators=(",", ":")).encode()


def rejection_detail(retry: int) -> str:
    """The ``detail`` of a 429: when to retry, or (``retry`` 0) that retrying cannot help."""
    if not retry:
        return "The request costs more than the whole quota; it cannot be admitted."
    return f"Request quota exceeded; retry after {retry} second{'s' if retry != 1 else ''}."


def can_deny(scope: Scope) -> bool:
    """Whether the server can answer this WebSocket handshake with an HTTP denial response
    (the ``websocket.http.response`` extension); otherwise it can only close it."""
    return "websocket.http.response" in scope.get("extensions", {})


async def send_rejection(
    rejection: Rejection,
    scope: Scope,
    receive: Receive,
    send: Send,
    factory: ResponseFactory | None = None,
) -> None:
    """Answer ``scope`` with ``rejection``, without reading the request body.

    HTTP gets a problem+json response (or the user's ``factory`` response). A WebSocket
    handshake gets an HTTP denial response when the server supports the
    ``websocket.http.response`` extension, and otherwise a close with code 1008.
    """
    websocket = scope["type"] == "websocket"
    if websocket and not can_deny(scope):
        # Without the denial-response extension a handshake can only be closed.
        await send({"type": "websocket.close", "code": 1008, "reason": rejection.title})
        return
    if factory is not None:
        response = factory(scope, rejection)
        if not callable(response):
            response = await response
        await response(scope, receive, send)
        return
    body = encode_problem(rejection)
    if websocket:
        await send(
            {
                "type": "websocket.http.response.start",
                "status": rejection.status,
                "headers": _http_headers(rejection, b"application/problem+json", len(body)),
            }
        )
        await send({"type": "websocket.http.response.body", "body": body})
        return
    await send(
        {
            "type": "http.response.start",
            "status": rejection.status,
            "headers": _http_headers(rejection, b"application/problem+json", len(body)),
        }
    )
    await send({"type": "http.response.body", "body": body})
