"""Middleware order: CORS outside the guards, so that a 429 carries CORS headers too."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from asgi_guard import RateLimitMiddleware

app = FastAPI()

# Each add_middleware wraps everything added before it: the last one added is the
# outermost and sees the request first. The guards go first (innermost of the two) ...
app.add_middleware(RateLimitMiddleware, limit="5/minute")
# ... and CORS last (outermost), so the browser can read the guards' rejections as well.
app.add_middleware(
    CORSMiddleware,
    allow_origins=["https://app.example.com"],
    allow_methods=["*"],
    expose_headers=["RateLimit", "RateLimit-Policy", "Retry-After"],
)


@app.get("/data")
async def data() -> dict[str, int]:
    return {"value": 42}
