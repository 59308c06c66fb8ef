from fastapi import Depends, FastAPI

from asgi_guard import RateLimitMiddleware, RequestRejected
from asgi_guard.fastapi import rate_limit, rejection_handler

app = FastAPI()
app.add_middleware(RateLimitMiddleware, limit="100/minute")  # every request, per client IP
app.add_exception_handler(RequestRejected, rejection_handler)  # dependencies' 429: problem+json


@app.post("/login", dependencies=[Depends(rate_limit("5/minute"))])  # this route: tighter
async def login() -> dict[str, bool]:
    return {"ok": True}
