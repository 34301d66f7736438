"""The terminal display of a run (rich), and its plain counterpart off a terminal.

On a terminal, :class:`TerminalDisplay` keeps one live panel at the bottom of
stderr: the members and the ring with where the model is, the lap (of the
maximum), the newest federated validation loss, the best lap, the patience
left, the elapsed time and an estimate of the time left.  Log records print
above it, except the per-hop progress of ``fedup.federation`` at info level,
which the panel shows instead (``--log-level debug`` prints those too).

Off a terminal (a pipe, CI, a service), nothing redraws: :func:`log_laps`
logs one plain line per lap result on the ``fedup.progress`` logger, next to
the peers' own one-line-per-event log.

Both only read a :class:`~fedup.ui.board.RunBoard`; neither waits on anything.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import IO, Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from fedup.ui.board import Figures, LapPoint, Member, RunBoard, clock_text, lap_name

__all__ = ["PROGRESS_LOGGER", "TerminalDisplay", "log_laps", "on_terminal", "render"]

PROGRESS_LOGGER = "fedup.progress"
"""The logger of the plain lap lines."""

MEMBER_ROWS = 12
"""Members listed in the panel at most (a simulation can have hundreds): the ones around
the model come first."""
SPARK_WIDTH = 40
"""Lap results in the loss sparkline (the newest)."""
SPARK = "▁▂▃▄▅▆▇█"
BAR_WIDTH = 48


def on_terminal() -> bool:
    """Whether stderr is a terminal a live display can redraw (not ``TERM=dumb``)."""
    return sys.stderr.isatty() and os.environ.get("TERM", "") not in ("dumb", "unknown")


def log_laps(board: RunBoard, logger: logging.Logger | None = None) -> None:
    """Log one info line per lap result of ``board`` (the plain, off-terminal progress)."""
    log = logger or logging.getLogger(PROGRESS_LOGGER)

    def line(point: LapPoint, text: str) -> None:
        log.info("%s", text)

    board.on_lap(line)


# --- drawing -----------------------------------------------------------------------------


def _sparkline(values: Sequence[float]) -> str:
    """One block per value, from the lowest to three times the median's height above it
    (the first laps' losses, far above the rest, would flatten it: they show full)."""
    finite = sorted(v for v in values if math.isfinite(v))
    if not finite:
        return ""
    lo, median = finite[0], finite[len(finite) // 2]
    hi = min(finite[-1], lo + 3 * (median - lo)) if median > lo else finite[-1]
    span = hi - lo or 1.0
    out = []
    for v in values:
        if not math.isfinite(v):
            out.append(" ")
        else:
            out.append(SPARK[max(0, min(len(SPARK) - 1, int((v - lo) / span * len(SPARK))))])
    return "".join(out)


def _bar(p: Figures, width: int = BAR_WIDTH) -> Text:
    done = round(p.fraction * width)
    return Text.assemble(("━" * done, "cyan"), ("━" * (width - done), "grey35"))


def _headline(board: RunBoard, p: Figures) -> Text:
    text = Text()
    if board.stop_reason is not None and board.laps:
        last = max(q.lap for q in board.laps)
        text.append(f"finished: {board.stop_reason}", style="bold")
        if last >= 0:
            text.append(f" after laps 0 to {last}")
        ended = board.members.get(board.ended_by or "")
        if ended is not None:
            text.append(f", ended by {ended.short}")
    elif p.lap is None:
        text.append(board.stage, style="bold")
    elif p.max_laps is not None and p.lap >= p.max_laps:
        text.append(f"lap {p.lap}", style="bold")
        text.append(f": evaluating the last lap's output (after {p.max_laps} of {p.max_laps})")
    else:
        text.append(f"lap {p.lap}", style="bold")
        if p.max_laps is not None:
            text.append(f" ({p.lap + 1} of at most {p.max_laps})")
    if board.timed:
        text.append(f"   elapsed {clock_text(p.elapsed)}")
    if p.eta is not None:
        text.append(f"   at most ~{clock_text(p.eta)} more")
    return text


def _losses(p: Figures) -> Text:
    text = Text()
    if p.last_lap is None:
        text.append("federated validation loss: after the first lap", style="dim")
        return text
    text.append("federated validation loss ")
    text.append(f"{p.last_lap.loss:.4f}", style="bold cyan")
    text.append(f" ({lap_name(p.last_lap.lap)})")
    if p.best is not None:
        text.append("   best ")
        text.append(f"{lap_name(p.best.lap)}", style="bold green")
        text.append(f" ({p.best.loss:.4f})")
    if p.patience_left is not None:
        text.append(f"   patience {p.patience_left} of {p.patience} left")
    return text


def _place(board: RunBoard) -> str:
    place = board.place
    if place is None:
        return ""
    if place.doing == "final":
        return "the final model is saved" if board.stage == "finished" else ""
    holder = board.members.get(place.holder or "")
    name = holder.short if holder is not None else (place.holder or "?")
    verb = {"training": "trains", "trained": "trained", "sent": "was handed"}[place.doing]
    what = "evaluates" if board.max_laps is not None and place.lap >= board.max_laps else verb
    if place.doing == "sent":
        return f"model: {name} {what} it for lap {place.lap} hop {place.hop}"
    return f"model: {name} {what} lap {place.lap} hop {place.hop}"


def _member_rows(board: RunBoard) -> list[Member]:
    members = list(board.members.values())
    if len(members) <= MEMBER_ROWS:
        return members
    holder = board.place.holder if board.place is not None else None
    at = next((i for i, m in enumerate(members) if m.peer_id == holder), 0)
    start = max(0, min(at - MEMBER_ROWS // 2, len(members) - MEMBER_ROWS))
    return members[start : start + MEMBER_ROWS]


def _ring(board: RunBoard) -> RenderableType:
    table = Table(box=None, pad_edge=False, show_header=True, header_style="dim")
    table.add_column("", width=1)
    table.add_column("#", justify="right")
    table.add_column("member")
    table.add_column("addresses")
    table.add_column("last hop loss", justify="right")
    table.add_column("")
    holder = board.place.holder if board.place is not None else None
    index = {p: i for i, p in enumerate(board.members)}
    for m in _member_rows(board):
        mark, style = "●", ""
        if m.peer_id == holder:
            mark, style = "◉", "bold yellow"
        if m.dead is not None:
            mark, style = "✕", "red"
        notes = []
        if m.peer_id == board.me:
            notes.append("this peer")
        if m.peer_id == board.leader:
            notes.append("leader")
        if m.dead is not None:
            notes.append(f"dead: {m.dead}")
        if m.excluded is not None:
            notes.append("excluded")
        if m.finished:
            notes.append("saved the model")
        last = next((h for h in reversed(m.hops) if math.isfinite(h.loss)), None)
        table.add_row(
            Text(mark, style=style),
            str(index[m.peer_id]),
            Text(m.short, style=style),
            escape(", ".join(m.addresses[:2]) + (" …" if len(m.addresses) > 2 else "")),
            f"{last.loss:.4f}" if last is not None else "",
            escape(", ".join(notes)),
        )
    hidden = len(board.members) - table.row_count
    parts: list[RenderableType] = [table]
    if hidden > 0:
        parts.append(Text(f"  … and {hidden} more members", style="dim"))
    return Group(*parts)


def render(board: RunBoard) -> RenderableType:
    """The panel for ``board`` as it is now."""
    p = board.progress()
    rows: list[RenderableType] = [_headline(board, p)]
    if p.max_laps:
        rows.append(_bar(p))
    rows.append(_losses(p))
    if board.laps:
        recent = sorted(board.laps, key=lambda q: q.lap)[-SPARK_WIDTH:]
        spark = _sparkline([q.loss for q in recent])
        rows.append(
            Text.assemble(
                ("loss by lap ", "dim"),
                (spark, "cyan"),
                (f"  ({lap_name(recent[0].lap)} to {lap_name(recent[-1].lap)})", "dim"),
            )
        )
    if board.members:
        alive = sum(1 for m in board.members.values() if m.dead is None)
        rows.append(Text(""))
        rows.append(
            Text(
                f"ring of {len(board.members)} members ({alive} alive), in order; "
                + (_place(board) or "waiting for the model"),
                style="dim",
            )
        )
        rows.append(_ring(board))
    elif board.addresses:
        rows.append(Text(f"this peer listens on {', '.join(board.addresses)}", style="dim"))
    for peer, reason in list(board.failures.items())[:3]:
        who = board.members[peer].short if peer in board.members else peer[-8:]
        rows.append(Text(f"failed on {who}: {reason}", style="red"))
    run = f" · run {board.run_id[:8]}" if board.run_id else ""
    title = f"FedUp{run} · {board.stage}"
    return Panel(Group(*rows), title=title, title_align="left", border_style="blue")


# --- the live panel ----------------------------------------------------------------------


class _AboveTheDisplay(logging.Handler):
    """Prints log records above the live panel (``info: text``), one line each."""

    def __init__(self, console: Console, *, show_progress: bool) -> None:
        super().__init__()
        self.console = console
        self.show_progress = show_progress

    def filter(self, record: logging.LogRecord) -> bool:
        if self.show_progress or record.levelno > logging.INFO:
            return True
        # What the panel shows: hops, laps, the ring, the finish.
        return record.name not in ("fedup.federation", PROGRESS_LOGGER)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = " ".join(record.getMessage().split())
            style = "red" if record.levelno >= logging.ERROR else None
            if record.levelno == logging.WARNING:
                style = "yellow"
            self.console.print(
                Text(f"{record.levelname.lower()}: {text}", style=style or ""),
                soft_wrap=True,
            )
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


class TerminalDisplay:
    """A live panel of ``board`` on ``stream`` (stderr), redrawn by :meth:`refresh`.

    Use it as a context manager: while open, the root logger's handlers are
    replaced by one that prints above the panel (at the same level); they are
    put back when it closes, and the last panel stays on the screen.
    """

    MIN_INTERVAL = 0.1
    """Seconds between two redraws at least (:meth:`refresh` is called per event), unless
    the headline's stage or lap changed: every lap is drawn at least once, however quick."""

    def __init__(
        self,
        board: RunBoard,
        *,
        stream: IO[str] | None = None,
        console: Console | None = None,
    ) -> None:
        self.board = board
        self.console = console or Console(file=stream, stderr=stream is None, highlight=False)
        self._live = Live(
            console=self.console,
            auto_refresh=False,
            transient=False,
            redirect_stdout=False,
            redirect_stderr=False,
            get_renderable=lambda: render(self.board),
        )
        self._last = 0.0
        self._drawn: tuple[object, ...] | None = None
        self._saved: list[logging.Handler] = []

    def __enter__(self) -> TerminalDisplay:
        root = logging.getLogger()
        self._saved = list(root.handlers)
        for handler in self._saved:
            root.removeHandler(handler)
        handler = _AboveTheDisplay(self.console, show_progress=root.level <= logging.DEBUG)
        handler.setLevel(root.level)
        root.addHandler(handler)
        self._handler = handler
        self._live.start(refresh=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self._live.refresh()
            self._live.stop()
        finally:
            root = logging.getLogger()
            root.removeHandler(self._handler)
            for handler in self._saved:
                root.addHandler(handler)

    def refresh(self, *, force: bool = False) -> None:
        """Redraw, at most every :attr:`MIN_INTERVAL` seconds unless ``force`` or the
        headline moved on (a new stage or lap, the end)."""
        now = time.monotonic()
        headline = (self.board.stage, self.board.current_lap(), self.board.stop_reason)
        if force or headline != self._drawn or now - self._last >= self.MIN_INTERVAL:
            self._last = now
            self._drawn = headline
            self._live.refresh()

    def say(self, text: str) -> None:
        """Print a line above the panel."""
        self.console.print(Text(text), soft_wrap=True)
