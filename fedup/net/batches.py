"""Reading a memory channel in batches: one wake-up for everything already queued.

A task that handles one item per ``await`` pays a trip through trio's scheduler
for each.  Where items arrive in bursts (a hundred peers' announcements reach
every peer at once in a simulation), :func:`batches` hands over everything that
is already queued, up to ``limit`` items, after a single wake-up.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TypeVar

import trio

__all__ = ["batches"]

T = TypeVar("T")


async def batches(
    receive: trio.MemoryReceiveChannel[T], limit: int = 256
) -> AsyncIterator[list[T]]:
    """Yield lists of 1 to ``limit`` items in arrival order, until the channel ends."""
    if limit < 1:
        raise ValueError("a batch holds at least one item")
    async for first in receive:
        batch = [first]
        while len(batch) < limit:
            try:
                batch.append(receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                break
        yield batch
