"""The package surface: what `import asgi_guard` needs, and what it exports."""

from __future__ import annotations

import subprocess
import sys

import asgi_guard
import asgi_guard.fastapi


def test_import_needs_only_starlette() -> None:
    """`import asgi_guard` works with FastAPI and the Redis/memcached clients unavailable."""
    code = (
        "import sys\n"
        "for name in ('fastapi', 'coredis', 'redis', 'valkey', 'memcachio', 'pymemcache'):\n"
        "    sys.modules[name] = None\n"
        "import asgi_guard\n"
        "app = asgi_guard.RateLimitMiddleware(lambda s, r, se: None, limit='1/second')\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_public_api_is_exactly_all_and_sorted() -> None:
    """`__all__` is sorted, and every name in it exists; nothing private leaks into it."""
    for module in (asgi_guard, asgi_guard.fastapi):
        names = list(module.__all__)
        assert names == sorted(names), names
        assert all(hasattr(module, name) for name in names)
        assert not [n for n in names if n.startswith("_")]


def test_package_is_typed() -> None:
    """The package ships a py.typed marker for type checkers."""
    from pathlib import Path

    assert (Path(asgi_guard.__file__).parent / "py.typed").exists()
