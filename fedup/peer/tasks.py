"""Building a peer's task and the settings digests, once, and off the event loop.

Encoding a table's rows, building a model and its optimizer state can take
seconds (the first optimizer of a process imports much of torch).  A peer
must never block its trio loop that long: it is answering other peers and
closing connections on deadlines.  :class:`TaskBuilder` caches what it built
and :meth:`TaskBuilder.run` runs the work in a worker thread when the peer
trains in threads (the simulator, on a virtual clock, runs it inline).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import attrs
import trio

from fedup.learn.ring import FederationStats
from fedup.learn.schema import FeatureSchema
from fedup.learn.task import Task
from fedup.peer.source import TaskSource, model_digest
from fedup.protocol.view import MembershipView, RunSettings

__all__ = ["Started", "TaskBuilder", "federation_stats"]

log = logging.getLogger("fedup.peer")
T = TypeVar("T")
ZERO = b"\0" * 32
THREAD_START_WAIT = 0.01
"""Seconds the event loop waits at most for a worker thread it started to begin."""


class TaskBuilder:
    """The task a source makes under a schema and settings, built once."""

    def __init__(self, source: TaskSource, *, in_thread: bool) -> None:
        self.source = source
        self.in_thread = in_thread
        self._task: tuple[tuple[str | None, RunSettings], Task] | None = None
        self._summary: dict[str, object] | None = None
        self._summary_made = False

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` in a worker thread (or inline, off-thread mode), then a checkpoint."""
        if self.in_thread:
            return await trio.to_thread.run_sync(fn, *args)
        result = fn(*args)
        await trio.lowlevel.checkpoint()
        return result

    def start(self, fn: Callable[[], T]) -> Started[T]:
        """``fn()`` started now in a worker thread (off-thread mode: run when awaited).

        Unlike :meth:`run`, the thread starts before this returns, without waiting
        for the event loop's next turn: a member that took a blob starts training it
        at once, and the blob's ACK and the sender's bookkeeping overlap with it."""
        return Started(fn, in_thread=self.in_thread)

    def summary(self) -> dict[str, object] | None:
        """The source's data summary (computed once)."""
        if not self._summary_made:
            self._summary = self.source.summary()
            self._summary_made = True
        return self._summary

    def task_for(self, schema: FeatureSchema | None, settings: RunSettings) -> Task:
        """The task under ``schema`` and ``settings`` (the digests do not matter), built once.

        Building under a new schema logs the local columns the schema leaves out (not
        every member has them, so the federation does not use them)."""
        key = (
            schema.digest() if schema is not None else None,
            attrs.evolve(settings, model_digest=ZERO, schema_digest=ZERO),
        )
        if self._task is None or self._task[0] != key:
            if schema is not None and (self._task is None or self._task[0][0] != key[0]):
                unused = self.source.unused_columns(schema)
                if unused:
                    log.info(
                        "the federation does not use my columns %s: not every member has them",
                        ", ".join(repr(n) for n in unused),
                    )
            self._task = (key, self.source.build(schema, settings))
        return self._task[1]

    def for_view(self, view: MembershipView) -> tuple[FeatureSchema | None, Task]:
        """The merged schema of ``view`` as this member reads it, and the run's task."""
        schema = self.source.parse_schema(view.schema)
        return schema, self.task_for(schema, view.settings)

    def settings_for(self, schema: FeatureSchema | None, base: RunSettings) -> RunSettings:
        """``base`` with the model and schema digests filled in (builds the task)."""
        task = self.task_for(schema, base)
        return attrs.evolve(
            base,
            model_digest=model_digest(task, base.seed),
            schema_digest=bytes.fromhex(schema.digest()) if schema is not None else ZERO,
        )


def federation_stats(schema: FeatureSchema | None, members: int) -> FederationStats:
    """The federation's counts a hop's budget needs, from the view's merged schema (a
    custom task shares no counts: the union's size is not known, 0)."""
    if schema is None:
        return FederationStats(members, 0, 0)
    return FederationStats(members, schema.n_rows, schema.n_positive)


class Started(Generic[T]):
    """Work started by :meth:`TaskBuilder.start`; ``await result()`` for its value.

    In a worker thread (``trio.lowlevel.start_thread_soon``), its outcome handed
    back to the event loop through the run's token.  Waiting for it is shielded
    from cancellation, as ``trio.to_thread.run_sync`` waits by default: the work
    touches the task's model, so nothing else may train it until it is over.
    """

    def __init__(self, fn: Callable[[], T], *, in_thread: bool) -> None:
        self._fn: Callable[[], T] | None = fn
        self._done = trio.Event()
        self._outcome: Any = None
        if not in_thread:
            return
        self._fn = None
        token = trio.lowlevel.current_trio_token()

        def deliver(result: Any) -> None:  # in the worker thread
            try:
                token.run_sync_soon(self._settle, result)
            except trio.RunFinishedError:
                pass  # the event loop is gone, and nobody waits for this any more

        begun = threading.Event()

        def work() -> T:  # in the worker thread
            begun.set()
            return fn()

        trio.lowlevel.start_thread_soon(work, deliver)
        # Let the worker take the interpreter lock and begin before this thread goes on:
        # otherwise, in a process that runs other peers too, it can wait for the lock
        # until this thread blocks or the switch interval (5 ms) ends.  Bounded, so a
        # starved machine delays the event loop by at most this much.
        begun.wait(THREAD_START_WAIT)

    def _settle(self, result: Any) -> None:
        self._outcome = result
        self._done.set()

    async def result(self) -> T:
        """The work's return value (or its exception, raised here); awaited once."""
        if self._fn is not None:  # off-thread mode: the work runs now, inline
            fn, self._fn = self._fn, None
            inline = fn()
            await trio.lowlevel.checkpoint()
            return inline
        with trio.CancelScope(shield=True):
            await self._done.wait()
        threaded: T = self._outcome.unwrap()
        return threaded
