"""Strict mode: known blocking calls raise when made on the event loop thread.

The watchdog sees only stalls longer than its threshold; in tests and development, strict
mode also catches the short ones: while it is on, the usual blocking calls of the standard
library raise `BlockingCallError` when called on the event loop's thread, whatever their
duration. Patching functions is process-wide, so one strict detector runs at a time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import queue
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from ._blocking import package_dir
from ._errors import ConfigurationError, GuardError

__all__ = ["BlockingCallError", "KNOWN_CALLS", "StrictCalls"]


class BlockingCallError(GuardError):
    """A known blocking call was made on the event loop thread while strict mode was on.

    Its message names the call, the request being served, and what to do instead.

    Examples:
        >>> import anyio, time
        >>> from asgi_guard import BlockingDetectorMiddleware
        >>> async def main() -> str:
        ...     detector = BlockingDetectorMiddleware(lambda *args: None, strict=True)
        ...     async with detector.watching():
        ...         try:
        ...             time.sleep(0.001)  # any duration
        ...         except BlockingCallError as error:
        ...             return str(error).partition(":")[0]
        ...     return "not raised"
        >>> anyio.run(main)
        'time.sleep() blocks the event loop (outside requests)'
    """


_MARK = "__asgi_guard_strict__"


#: Callers whose waits are their own business: starting a thread waits on an Event, a
#: subprocess.run waits on its Popen, event loops and thread pools hand work over. The
#: async libraries by their installed directories: an app's own directory may be named
#: ``trio`` or ``anyio`` too.
_INTERNAL = tuple(
    os.path.join(os.path.dirname(module.__file__ or ""), name)
    for module, name in (
        (threading, "threading.py"),
        (subprocess, "subprocess.py"),
        (queue, "queue.py"),
        (asyncio, ""),
        (concurrent.futures, ""),
    )
) + tuple(path for path in map(package_dir, ("anyio", "trio", "sniffio")) if path)


def _internal(filename: str) -> bool:
    return filename.startswith(_INTERNAL)


def _blocking_socket(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    # asyncio drives non-blocking sockets (timeout 0) from the loop: those are fine.
    return bool(args) and args[0].gettimeout() != 0.0


def _blocking_wait(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    block = kwargs.get("block", args[1] if len(args) > 1 else True)
    timeout = kwargs.get("timeout", args[2] if len(args) > 2 else None)
    return bool(block) and timeout != 0


def _blocking_put(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    block = kwargs.get("block", args[2] if len(args) > 2 else True)
    timeout = kwargs.get("timeout", args[3] if len(args) > 3 else None)
    return bool(block) and timeout != 0 and args[0].maxsize > 0


def _blocking_event_wait(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    timeout = kwargs.get("timeout", args[1] if len(args) > 1 else None)
    return timeout != 0


def _blocking_select(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    timeout = kwargs.get("timeout", args[3] if len(args) > 3 else None)
    return timeout != 0


def _always(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    return True


#: The calls strict mode watches: name -> (owner, attribute, "does this call block?").
KNOWN_CALLS: dict[str, tuple[Any, str, Callable[[tuple[Any, ...], dict[str, Any]], bool]]] = {
    "time.sleep": (time, "sleep", _always),
    "os.system": (os, "system", _always),
    "subprocess.run": (subprocess, "run", _always),
    "subprocess.call": (subprocess, "call", _always),
    "subprocess.check_call": (subprocess, "check_call", _always),
    "subprocess.check_output": (subprocess, "check_output", _always),
    "subprocess.Popen.wait": (subprocess.Popen, "wait", _always),
    "subprocess.Popen.communicate": (subprocess.Popen, "communicate", _always),
    "select.select": (select, "select", _blocking_select),
    "socket.create_connection": (socket, "create_connection", _always),
    "socket.getaddrinfo": (socket, "getaddrinfo", _always),
    "socket.socket.connect": (socket.socket, "connect", _blocking_socket),
    "socket.socket.accept": (socket.socket, "accept", _blocking_socket),
    "socket.socket.recv": (socket.socket, "recv", _blocking_socket),
    "socket.socket.recv_into": (socket.socket, "recv_into", _blocking_socket),
    "socket.socket.send": (socket.socket, "send", _blocking_socket),
    "socket.socket.sendall": (socket.socket, "sendall", _blocking_socket),
    "threading.Event.wait": (threading.Event, "wait", _blocking_event_wait),
    "queue.Queue.get": (queue.Queue, "get", _blocking_wait),
    "queue.Queue.put": (queue.Queue, "put", _blocking_put),
}


class StrictCalls:
    """Patches `KNOWN_CALLS` to raise on one thread, and restores them."""

    def __init__(self, allow: Iterable[str], describe: Callable[[], str]) -> None:
        allow = [allow] if isinstance(allow, str) else list(allow)
        unknown = [name for name in allow if name not in KNOWN_CALLS]
        if unknown:
            raise ConfigurationError(
                f"allow= takes names of known blocking calls; unknown: {unknown}. "
                f"Known: {sorted(KNOWN_CALLS)}"
            )
        self.allow = frozenset(allow)
        self.used: set[str] = set()
        self._describe = describe
        self._thread: int | None = None
        self._saved: list[tuple[Any, str, Any, bool]] = []

    @property
    def active(self) -> bool:
        return bool(self._saved)

    def start(self, thread: int) -> None:
        if self._saved:
            return
        if getattr(time.sleep, _MARK, False):
            raise ConfigurationError(
                "another strict BlockingDetectorMiddleware is running; strict mode patches "
                "process-wide functions, so run one at a time (in a test the pytest plugin "
                "checks, the plugin's is running: mark the test "
                "@pytest.mark.asgi_guard_blocking(strict=False))"
            )
        self._thread = thread
        for name, (owner, attribute, blocks) in KNOWN_CALLS.items():
            original = getattr(owner, attribute)
            # A method inherited from a C base class is not in the owner's own __dict__:
            # restoring it means deleting the wrapper, not copying the method down.
            own = attribute in vars(owner)
            self._saved.append((owner, attribute, vars(owner).get(attribute), own))
            setattr(owner, attribute, self._wrap(name, original, blocks))

    def stop(self) -> None:
        while self._saved:
            owner, attribute, original, own = self._saved.pop()
            if own:
                setattr(owner, attribute, original)
            else:
                delattr(owner, attribute)

    def unused(self) -> list[str]:
        """Allowed calls that were never made on the loop thread."""
        return sorted(self.allow - self.used)

    def _wrap(
        self,
        name: str,
        original: Callable[..., Any],
        blocks: Callable[[tuple[Any, ...], dict[str, Any]], bool],
    ) -> Callable[..., Any]:
        guard = self

        @functools.wraps(original)
        def strict(*args: Any, **kwargs: Any) -> Any:
            if (
                threading.get_ident() == guard._thread
                and blocks(args, kwargs)
                and not _internal(sys._getframe(1).f_code.co_filename)
            ):
                if name in guard.allow:
                    guard.used.add(name)
                else:
                    raise BlockingCallError(
                        f"{name}() blocks the event loop ({guard._describe()}): await an "
                        f"async equivalent, run it with anyio.to_thread.run_sync(), or allow "
                        f"it with allow=[{name!r}]"
                    )
            return original(*args, **kwargs)

        setattr(strict, _MARK, True)
        return strict
