"""Real servers for the integration tests: redis-server, memcached, uvicorn and Hypercorn
subprocesses.

Every server listens on 127.0.0.1 on a free port, is ready before a test sees it (it answers
a probe) and keeps its output in a log file that failure messages quote.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT = 15.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def require_binary(name: str, package: str) -> str:
    """The path of ``name``, or skip the test when it is not installed."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(
            f"{name} is not installed; install it (apt-get install {package}) to run the "
            f"integration tests that need a real {name}"
        )
    return path


def ask(port: int, request: bytes, timeout: float = 1.0) -> bytes:
    """Send one plain-text request to a server on 127.0.0.1 and return the first reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        return sock.recv(65536)


class ServerProcess:
    """A server subprocess on 127.0.0.1:``port`` that can be stopped, paused and restarted."""

    def __init__(self, name: str, port: int, log_dir: Path) -> None:
        self.name = name
        self.port = port
        self.log_path = log_dir / f"{name}-{port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def argv(self) -> Sequence[str]:
        raise NotImplementedError

    def env(self) -> Mapping[str, str] | None:
        return None

    def is_ready(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
            return True

    def start(self) -> None:
        """Start the server and return once it answers (or fail with its log)."""
        assert self.process is None, f"{self.name} is already running"
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv(), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=self.env()
            )
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.process = None
                raise RuntimeError(f"{self.name} exited with {code} at startup:\n{self.log()}")
            try:
                if self.is_ready():
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} not ready after {READY_TIMEOUT}s:\n{self.log()}")
            time.sleep(0.02)

    def stop(self, *, graceful: bool = False) -> None:
        """Kill the server (``SIGTERM`` first when ``graceful``) and reap it."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        if graceful:
            process.send_signal(signal.SIGCONT)
            process.terminate()
            try:
                process.wait(5)
                return
            except subprocess.TimeoutExpired:
                pass
        process.kill()
        process.wait(5)

    def pause(self) -> None:
        """Freeze the server (``SIGSTOP``): it keeps its socket but answers nothing."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""


class RedisServer(ServerProcess):
    """``redis-server`` without persistence."""

    def __init__(self, binary: str, port: int, log_dir: Path) -> None:
        super().__init__("redis-server", port, log_dir)
        self.binary = binary

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def argv(self) -> Sequence[str]:
        return [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
        ]  # fmt: skip

    def is_ready(self) -> bool:
        return ask(self.port, b"PING\r\n").startswith(b"+PONG")

    def flush(self) -> None:
        """Forget every key."""
        reply = ask(self.port, b"FLUSHALL\r\n")
        assert reply.startswith(b"+OK"), reply


class MemcachedServer(ServerProcess):
    """``memcached`` without UDP."""

    def __init__(self, binary: str, port: int, log_dir: Path) -> None:
        super().__init__("memcached", port, log_dir)
        self.binary = binary

    @property
    def url(self) -> str:
        return f"memcached://127.0.0.1:{self.port}"

    def argv(self) -> Sequence[str]:
        argv = [self.binary, "-l", "127.0.0.1", "-p", str(self.port), "-U", "0"]
        if os.geteuid() == 0:
            # memcached refuses to run as root unless told which user to be.
            argv += ["-u", "root"]
        return argv

    def is_ready(self) -> bool:
        return ask(self.port, b"version\r\n").startswith(b"VERSION")

    def flush(self) -> None:
        """Forget every key."""
        reply = ask(self.port, b"flush_all\r\n")
        assert reply.startswith(b"OK"), reply


class UvicornServer(ServerProcess):
    """``uvicorn <app>`` run from the project root (so ``tests.apps`` imports)."""

    def __init__(
        self,
        app: str,
        port: int,
        log_dir: Path,
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
    ) -> None:
        super().__init__("uvicorn", port, log_dir)
        self.app = app
        self.extra_env = dict(env or {})
        self.extra_args = list(args)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def argv(self) -> Sequence[str]:
        return [
            sys.executable, "-m", "uvicorn", self.app,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--log-level", "warning",
            "--no-access-log",
            "--lifespan", "on",
            *self.extra_args,
        ]  # fmt: skip

    def env(self) -> Mapping[str, str]:
        return {**os.environ, **self.extra_env}


class HypercornServer(ServerProcess):
    """``hypercorn <app>`` run from the project root, with an asyncio, uvloop or trio worker."""

    def __init__(self, app: str, port: int, log_dir: Path, worker_class: str = "asyncio") -> None:
        super().__init__(f"hypercorn-{worker_class}", port, log_dir)
        self.app = app
        self.worker_class = worker_class

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def argv(self) -> Sequence[str]:
        return [
            sys.executable, "-m", "hypercorn", self.app,
            "--bind", f"127.0.0.1:{self.port}",
            "--worker-class", self.worker_class,
            "--log-level", "warning",
        ]  # fmt: skip

    def is_ready(self) -> bool:
        # An HTTP request, not a bare connection: Hypercorn's first request in a fresh
        # process is slow (0.2 s with the trio worker), which a timing test must not see.
        return ask(self.port, b"GET / HTTP/1.1\r\nHost: probe\r\n\r\n").startswith(b"HTTP/1.1 ")


#: The servers `app_server` runs an app on, by name.
APP_SERVERS = ("uvicorn", "uvicorn-uvloop", "hypercorn-trio")


def app_server(app: str, kind: str, log_dir: Path) -> UvicornServer | HypercornServer:
    """``app`` on one of `APP_SERVERS`, started: uvicorn (asyncio), uvicorn on uvloop, or
    Hypercorn's trio worker; the test is skipped when what it needs is not installed."""
    started: UvicornServer | HypercornServer
    if kind == "uvicorn":
        started = UvicornServer(app, free_port(), log_dir)
    elif kind == "uvicorn-uvloop":
        pytest.importorskip("uvloop", reason="uvloop is not installed")
        started = UvicornServer(app, free_port(), log_dir, args=["--loop", "uvloop"])
    elif kind == "hypercorn-trio":
        pytest.importorskip("hypercorn", reason="hypercorn is not installed")
        pytest.importorskip("trio", reason="trio is not installed")
        started = HypercornServer(app, free_port(), log_dir, worker_class="trio")
    else:
        raise ValueError(f"no such server: {kind!r}; choose from {APP_SERVERS}")
    started.start()
    return started
