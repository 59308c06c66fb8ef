"""Rules: different limits per route template and method, decided before routing."""

from __future__ import annotations

import ipaddress

from fastapi import FastAPI
from starlette.types import Scope

from asgi_guard import RateLimitMiddleware, Rule

INTERNAL = ipaddress.ip_network("10.0.0.0/8")


def from_internal_network(scope: Scope) -> bool:
    """An exempt predicate: our own services (connecting from 10.0.0.0/8) are never limited."""
    client = scope.get("client")
    try:
        return client is not None and ipaddress.ip_address(client[0]) in INTERNAL
    except ValueError:
        return False


app = FastAPI()
app.add_middleware(
    RateLimitMiddleware,
    # Every request that no rule matches: 100 per minute per client.
    limit="100/minute",
    # Rules are tried in order; the first that matches replaces the default limit.
    rules=[
        # Only POST: GET /login falls through to the default limit.
        Rule("/login", limit="5/minute", methods=["POST"]),
        # A route template: /users/1 and /users/2 count together, 10 per minute in all.
        Rule("/users/{user_id:int}", limit="10/minute"),
        # per_path: every report counts apart, 3 per minute each.
        Rule("/reports/{name}", limit="3/minute", per_path=True),
        # limit=None: a whole subtree without limits.
        Rule("/static/{rest:path}", limit=None),
    ],
    # Never limited: exact paths, path templates and predicates of the scope.
    exempt=["/health", from_internal_network],
)


@app.get("/login")
async def login_form() -> dict[str, str]:
    return {"form": "login"}


@app.post("/login")
async def login() -> dict[str, bool]:
    return {"logged_in": True}


@app.get("/users/{user_id}")
async def read_user(user_id: int) -> dict[str, int]:
    return {"user_id": user_id}


@app.get("/reports/{name}")
async def read_report(name: str) -> dict[str, str]:
    return {"report": name}


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/static/{rest:path}")
async def static_file(rest: str) -> dict[str, str]:
    return {"file": rest}
