"""Putting the board, the display and the page around a running peer (used by ``start``).

:class:`PeerView` follows a peer's events onto a board for as long as the peer
lives, keeps the list of output files current and redraws the display.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import trio

from fedup.config import DEFAULT_LIMITS, Limits
from fedup.peer.events import EventHub
from fedup.ui.board import RunBoard
from fedup.ui.display import TerminalDisplay
from fedup.ui.folder import LINKED_FILES
from fedup.ui.follow import follow

__all__ = ["REFRESH_SECONDS", "PeerView"]

REFRESH_SECONDS = 0.5
"""How often the display is redrawn (the clock moves) and the output files looked for."""


class PeerView:
    """The board of one running peer, fed by a bounded subscription to its events."""

    def __init__(
        self,
        board: RunBoard,
        *,
        folder: Callable[[], Path | None],
        display: TerminalDisplay | None = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self.board = board
        self.folder = folder
        self.display = display
        self.limits = limits
        self._followed = trio.Event()
        self._refreshing = trio.CancelScope()

    def start(self, nursery: trio.Nursery, hub: EventHub) -> None:
        """Follow ``hub``'s events (until it closes) and keep the files and display fresh
        (until :meth:`finish`)."""
        events = hub.subscribe(self.limits.ui_event_buffer)

        async def following() -> None:
            try:
                await follow(self.board, hub.peer, events)
            finally:
                self._followed.set()

        nursery.start_soon(following)
        nursery.start_soon(self._refresh)

    async def finish(self) -> None:
        """After the peer closed (its hub with it): take the events still queued, list the
        files, mark the board final and stop refreshing."""
        await self._followed.wait()  # the hub closed its channel: this drains and ends
        self._refreshing.cancel()
        self._list_files()
        self.board.close()
        if self.display is not None:
            self.display.refresh(force=True)

    def _list_files(self) -> None:
        directory = self.folder()
        if directory is not None:
            self.board.set_files(name for name in LINKED_FILES if (directory / name).is_file())

    async def _refresh(self) -> None:
        with self._refreshing:
            while True:
                self._list_files()
                if self.display is not None:
                    self.display.refresh(force=True)
                await trio.sleep(REFRESH_SECONDS)
