"""Path matching shared by the guards: exempt paths and predicates, route templates."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable

from starlette.routing import PARAM_REGEX, compile_path
from starlette.types import Scope

from ._errors import ConfigurationError
from ._keys import _is_async_callable

__all__ = [
    "ExemptSpec",
    "Exemptions",
    "check_template",
    "compile_template",
    "matched_route",
    "route_path",
    "route_template",
]

#: A path (exact, or a Starlette route template) or a predicate on the scope.
ExemptSpec = str | Callable[[Scope], bool]


def check_template(path: str, what: str) -> None:
    """Refuse a path whose braces are not all route parameters: Starlette would take
    ``"/x/{a"`` literally, which is never what was meant."""
    if ("{" in path or "}" in path) and any(c in PARAM_REGEX.sub("", path) for c in "{}"):
        raise ConfigurationError(
            f"{what} {path!r} has a '{{' or '}}' outside a parameter such as '{{name}}' "
            f"or '{{name:int}}'"
        )


def compile_template(template: str) -> re.Pattern[str]:
    """The regex of a Starlette route template, or `ConfigurationError`."""
    try:
        regex, _, _ = compile_path(template)
    except (ValueError, AssertionError) as exc:
        raise ConfigurationError(f"cannot compile the path template {template!r}: {exc}") from exc
    return regex


def route_path(scope: Scope) -> str:
    """The path as the app routes it: ``scope["path"]`` without the ``root_path`` in front.

    Behind ``uvicorn --root-path /api``, or in an app mounted at ``/api``, a request for
    ``/health`` arrives as ``path="/api/health"`` with ``root_path="/api"``; Starlette and
    FastAPI route it as ``/health``, and so do the guards' rules, exempt paths and
    priorities. (The middlewares call this only when a ``root_path`` is set.) The path of
    the root itself (``/api``) is ``"/"`` here, where Starlette's routing sees ``""`` and
    redirects to ``/api/``: an exempt ``"/"`` covers both.
    """
    path: str = scope["path"]
    root: str = scope.get("root_path") or ""
    if root and path.startswith(root):
        rest = path[len(root) :]
        if not rest:
            return "/"
        if rest[0] == "/":
            return rest
    return path


def _included_route(scope: Scope) -> object:
    """FastAPI's record of the matched route as a router included it (its ``path_format``
    has the include prefixes), or ``None``. Recent FastAPI includes routers lazily: the
    route in ``scope["route"]`` is the router's own, its template without the prefix."""
    fastapi_scope = scope.get("fastapi")
    if fastapi_scope.__class__ is not dict:
        return None
    included = fastapi_scope.get("effective_route_context")
    if included is None or getattr(included, "original_route", None) is not scope.get("route"):
        return None  # another route's (a mount's, before the mounted app routed)
    return included


def matched_route(scope: Scope) -> object:
    """What stands for the route the app matched: FastAPI's record of it as included (one
    per inclusion, so a router included twice gives two), else ``scope["route"]``."""
    included = _included_route(scope)
    return included if included is not None else scope.get("route")


def route_template(scope: Scope) -> str | None:
    """The template of the route the app matched (``"/users/{id}"``), once it has routed,
    with the prefixes of the routers FastAPI included it under (``"/v1/users/{id}"``)."""
    route = matched_route(scope)
    template = getattr(route, "path_format", None) or getattr(route, "path", None)
    return template if isinstance(template, str) and template else None


class Exemptions:
    """Which requests a guard leaves alone: exact paths, templates, predicates.

    A predicate that raises counts as "not exempt"; the first such error is logged.
    """

    __slots__ = ("_checks", "_failed", "_logger", "_patterns", "_what", "needs_check", "paths")

    def __init__(self, exempt: Iterable[ExemptSpec], logger: logging.Logger, what: str) -> None:
        if isinstance(exempt, str) or callable(exempt):
            exempt = [exempt]
        elif isinstance(exempt, bytes) or not isinstance(exempt, Iterable):
            raise ConfigurationError(
                f"exempt takes a list of paths and predicates (() for none), got {exempt!r}"
            )
        paths = set()
        self._patterns: list[re.Pattern[str]] = []
        self._checks: list[Callable[[Scope], bool]] = []
        for entry in exempt:
            if isinstance(entry, str):
                if not entry.startswith("/"):
                    raise ConfigurationError(f"exempt paths start with '/': {entry!r}")
                check_template(entry, "the exempt path")
                if "{" in entry:
                    self._patterns.append(compile_template(entry))
                else:
                    paths.add(entry)
            elif callable(entry):
                if _is_async_callable(entry):
                    raise ConfigurationError(
                        f"exempt predicates are called on every request and must be plain "
                        f"functions, not async: {entry!r}"
                    )
                self._checks.append(entry)
            else:
                raise ConfigurationError(f"exempt takes paths and predicates, got {entry!r}")
        #: The exact paths, for a set lookup on the hot path.
        self.paths = frozenset(paths)
        #: Whether anything beyond the exact paths must be checked.
        self.needs_check = bool(self._patterns or self._checks)
        self._failed = False
        self._logger = logger
        self._what = what

    def __call__(self, scope: Scope, path: str) -> bool:
        if path in self.paths or any(p.match(path) for p in self._patterns):
            return True
        for check in self._checks:
            try:
                if check(scope):
                    return True
            except Exception as exc:
                if not self._failed:
                    self._failed = True
                    self._logger.error(
                        "an exempt predicate raised %s; such requests are %s as usual",
                        type(exc).__name__,
                        self._what,
                        exc_info=exc,
                    )
        return False
