"""Client identity: whom a limit counts per (client IP, a header, your own function)."""

from __future__ import annotations

from collections.abc import Mapping

import anyio.lowlevel
from fastapi import Depends, FastAPI
from starlette.types import Scope

from asgi_guard import KeyFunc, Policy, RateLimitMiddleware, Rule, client_ip, header_key
from asgi_guard.fastapi import rate_limit

# Behind a reverse proxy, every request comes from the proxy's address. Trust the
# X-Forwarded-For header the proxy appends to from the proxies' networks only: anybody else
# can send it too (a proxy that writes Forwarded or X-Real-IP instead: headers=["forwarded"]).
# IPv6 clients are counted per /64 network by default.
by_ip = client_ip(trusted_proxies=["127.0.0.1", "10.0.0.0/8"])

# API clients by their key; requests without the header fall back to the client IP.
by_api_key: KeyFunc = header_key("x-api-key", fallback=by_ip)


class Sessions:
    """Stands in for a session store or a database behind an async client."""

    def __init__(self, accounts: Mapping[str, str]) -> None:
        self._accounts = dict(accounts)

    async def account_for(self, token: str) -> str | None:
        await anyio.lowlevel.checkpoint()  # a real store would do I/O here
        return self._accounts.get(token)


sessions = Sessions({"token-alice": "alice", "token-bob": "bob"})


async def by_account(scope: Scope) -> str:
    """A custom async key function: the account behind the bearer token.

    Key functions take the ASGI scope (in a ``rate_limit`` dependency, the ``Request``, which
    reads the same way). If one raises or returns no string, the request is counted under its
    socket peer address and the failure is logged once.
    """
    for name, value in scope.get("headers", ()):
        if name == b"authorization" and value.startswith(b"Bearer "):
            account = await sessions.account_for(value[7:].decode("latin-1"))
            if account is not None:
                return f"account:{account}"
    return by_ip(scope)  # no valid token: by client IP


app = FastAPI()
app.add_middleware(
    RateLimitMiddleware,
    limit="100/minute",
    key=by_ip,
    rules=[Rule("/api/{rest:path}", limit=Policy("5/minute", name="api", key=by_api_key))],
)


@app.get("/")
async def index() -> dict[str, str]:
    return {"page": "index"}


@app.get("/api/{rest:path}")
async def api(rest: str) -> dict[str, str]:
    return {"resource": rest}


@app.get("/me", dependencies=[Depends(rate_limit("3/minute", key=by_account))])
async def me() -> dict[str, str]:
    return {"page": "me"}
