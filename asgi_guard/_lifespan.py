"""A guard's own task for the app's lifespan, stopped before the server hears that shutdown
is done.

A server may cancel the lifespan as soon as it receives ``lifespan.shutdown.complete``
(Hypercorn does, an event-loop iteration or two later, and reports the cancellation as a
crash of its worker). So once the message has gone on, the guards must return at once: their
tasks are stopped, and awaited, before it goes, and they run outside any task group, whose
exit would pause once per guard (anyio's task group checkpoints on exit even with no task
left: two guards stacked finished in time, three did not).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ._deadline import current_loop, spawn_task

__all__ = ["SHUTDOWN_DONE", "run_lifespan"]

#: The messages after which a server may end the lifespan at once.
SHUTDOWN_DONE = frozenset({"lifespan.shutdown.complete", "lifespan.shutdown.failed"})

#: A guard's task: it calls ``task_status.started()`` once it serves, then runs until
#: cancelled.
Task = Callable[..., Awaitable[Any]]


class _Status:
    """What a task calls ``started()`` on (as anyio's ``TaskStatus``)."""

    __slots__ = ("_event",)

    def __init__(self, event: anyio.Event) -> None:
        self._event = event

    def started(self, value: object = None) -> None:
        self._event.set()


async def run_lifespan(
    app: ASGIApp,
    scope: Scope,
    receive: Receive,
    send: Send,
    task: Task,
) -> None:
    """Run ``app``'s lifespan with ``task`` beside it: started before the app's startup,
    stopped (and awaited) before the server receives ``lifespan.shutdown.complete`` (or
    ``failed``), and in any case when the app returns. An error the task raises before it
    has started is raised here; one it raises later, once the app has returned."""
    task_scope = anyio.CancelScope()
    started = anyio.Event()
    stopped = anyio.Event()
    failure: list[Exception] = []

    async def serve() -> None:
        try:
            with task_scope:
                await task(task_status=_Status(started))
        except Exception as exc:
            failure.append(exc)
        finally:
            stopped.set()
            started.set()

    async def lifespan_send(message: Message) -> None:
        if message["type"] in SHUTDOWN_DONE and not stopped.is_set():
            task_scope.cancel()
            await stopped.wait()
        await send(message)

    handle = spawn_task(current_loop(), serve)  # kept: the loop keeps tasks only weakly
    try:
        await started.wait()
        if failure:
            raise failure[0]
        await app(scope, receive, lifespan_send)
    finally:
        if not stopped.is_set():  # no shutdown message (a failed startup, an error)
            task_scope.cancel()
            with anyio.CancelScope(shield=True):
                await stopped.wait()
        del handle
    if failure:
        raise failure[0]
