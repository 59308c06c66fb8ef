"""The HTTP scope the in-process benchmarks drive their apps with."""

from __future__ import annotations

from typing import Any


def http_scope(path: str = "/", client: str = "127.0.0.1") -> dict[str, Any]:
    """A fresh GET scope for ``path`` from ``client``, as uvicorn would build it."""
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1:8000"), (b"user-agent", b"bench"), (b"accept", b"*/*")],
        "client": (client, 1234),
        "server": ("127.0.0.1", 8000),
    }
