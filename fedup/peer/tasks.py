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
from collections.abc import Callable
from typing import TypeVar

import attrs
import trio

from fedup.learn.schema import FeatureSchema
from fedup.learn.task import Task
from fedup.peer.source import TaskSource, model_digest
from fedup.protocol.view import RunSettings

__all__ = ["TaskBuilder"]

log = logging.getLogger("fedup.peer")
T = TypeVar("T")
ZERO = b"\0" * 32


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

    def settings_for(self, schema: FeatureSchema | None, base: RunSettings) -> RunSettings:
        """``base`` with the model and schema digests filled in (builds the task)."""
        task = self.task_for(schema, base)
        return attrs.evolve(
            base,
            model_digest=model_digest(task, base.seed),
            schema_digest=bytes.fromhex(schema.digest()) if schema is not None else ZERO,
        )
