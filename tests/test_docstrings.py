"""The examples in the docstrings (which the API reference shows) run as written."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import asgi_guard

MODULES = sorted(
    m.name for m in pkgutil.iter_modules(asgi_guard.__path__) if m.name != "pytest_plugin"
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(f"asgi_guard.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, report=True)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed"


def test_the_public_modules_have_examples() -> None:
    """The modules the reference documents carry runnable examples."""
    attempted = {
        name: doctest.testmod(importlib.import_module(f"asgi_guard.{name}")).attempted
        for name in ("blocking", "fastapi", "ratelimit", "shedding", "timeout", "_algorithms")
    }
    assert all(attempted.values()), attempted
