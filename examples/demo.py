"""The demo: a FastAPI app with its guards on, served on http://127.0.0.1:8000.

Run it with ``python examples/demo.py`` and follow the curl commands it prints.

* ``RateLimitMiddleware`` (in memory, the default) limits every request before routing:
  100 per minute per client, ``GET /hello`` 5 per minute and ``POST /login`` 3 per minute by
  rules; ``/health`` is exempt.
* ``/items/{item_id}`` adds a ``rate_limit`` dependency after routing: 2 per minute for all
  items together, answered as problem+json by ``rejection_handler``.
* ``LoadSheddingMiddleware`` lets 64 requests run at once (a fixed cap) and answers the rest
  ``503`` with ``Retry-After``; ``/report`` has a ``bulkhead`` of one: a second report at the
  same time is refused.
* ``TimeoutMiddleware`` gives every request 5 seconds: ``/slow`` takes 10 and is answered
  ``504`` at the deadline; ``/slow?seconds=1`` is in time, and ``timeout(2.0)`` makes ``/search``
  tighter.
"""

from __future__ import annotations

import anyio
from fastapi import Depends, FastAPI

from asgi_guard import (
    LoadSheddingMiddleware,
    RateLimitMiddleware,
    RequestRejected,
    Rule,
    TimeoutMiddleware,
    remaining,
)
from asgi_guard.fastapi import (
    BulkheadDependency,
    RateLimitDependency,
    bulkhead,
    rate_limit,
    rejection_handler,
    timeout,
)

HOST = "127.0.0.1"
PORT = 8000

CURL_COMMANDS = f"""\
asgi_guard demo on http://{HOST}:{PORT} (Ctrl+C to stop); its routes are listed at
http://{HOST}:{PORT}/docs. In another terminal:

  # GET /hello allows 5 per minute: the 6th answer is 429 Too Many Requests
  for i in $(seq 1 6); do curl -si http://{HOST}:{PORT}/hello | head -1; done

  # the whole 429: Retry-After, RateLimit headers, an application/problem+json body
  curl -si http://{HOST}:{PORT}/hello

  # POST /login allows 3 per minute (a Rule in the middleware): the 4th is 429
  for i in $(seq 1 4); do curl -si -X POST http://{HOST}:{PORT}/login | head -1; done

  # /items/{{item_id}} allows 2 per minute for all items (a dependency): the 3rd is 429
  for i in $(seq 1 3); do curl -si http://{HOST}:{PORT}/items/$i | head -1; done

  # /health is exempt: never 429
  for i in $(seq 1 10); do curl -si http://{HOST}:{PORT}/health | head -1; done

  # every request has 5 s: /slow takes 10 and gets 504 Gateway Timeout after 5
  curl -si http://{HOST}:{PORT}/slow

  # /search has its own 2 s deadline (a timeout dependency)
  curl -si "http://{HOST}:{PORT}/search?seconds=3"

  # /report runs one at a time (a bulkhead): a second one meanwhile is 503 with Retry-After
  curl -s http://{HOST}:{PORT}/report > /dev/null & sleep 0.2; curl -si http://{HOST}:{PORT}/report
"""

#: Tighter than the middleware's limits, checked after routing: per route, per client.
items_limit: RateLimitDependency = rate_limit("2/minute")
#: One report at a time, whoever asks.
report_bulkhead: BulkheadDependency = bulkhead(1)

app = FastAPI(title="asgi_guard demo")
app.add_exception_handler(RequestRejected, rejection_handler)
# In the order the docs recommend (each added middleware wraps the ones before it): the
# shedder innermost, the deadline outside it (waiting in its queue counts), and the rate
# limiter outermost, whose refusals are the cheapest and take no place in the shedder.
app.add_middleware(LoadSheddingMiddleware, limit=64)
app.add_middleware(TimeoutMiddleware, timeout=5.0)
app.add_middleware(
    RateLimitMiddleware,
    limit="100/minute",
    rules=[
        Rule("/hello", limit="5/minute", methods=["GET"]),
        Rule("/login", limit="3/minute", methods=["POST"]),
    ],
    exempt=["/health"],
)


@app.get("/hello")
async def hello() -> dict[str, str]:
    return {"hello": "world"}


@app.post("/login")
async def login() -> dict[str, bool]:
    return {"logged_in": True}


@app.get("/items/{item_id}", dependencies=[Depends(items_limit)])
async def read_item(item_id: int) -> dict[str, int]:
    return {"item_id": item_id}


@app.get("/slow")
async def slow(seconds: float = 10.0) -> dict[str, float | None]:
    await anyio.sleep(seconds)
    return {"slept": seconds, "seconds_left": remaining()}


@app.get("/search", dependencies=[Depends(timeout(2.0))])
async def search(seconds: float = 0.1) -> dict[str, float]:
    await anyio.sleep(seconds)
    return {"searched_for": seconds}


@app.get("/report", dependencies=[Depends(report_bulkhead)])
async def report() -> dict[str, str]:
    await anyio.sleep(1.0)  # an expensive report
    return {"report": "ready"}


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


def main() -> None:
    """Serve the demo on 127.0.0.1:8000 and print what to curl."""
    import uvicorn

    print(CURL_COMMANDS, flush=True)
    uvicorn.run(app, host=HOST, port=PORT)


if __name__ == "__main__":
    main()
