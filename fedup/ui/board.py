"""What a run looks like from here: one small model that the display and the page draw.

A :class:`RunBoard` is fed by plain method calls: from a running peer's events
(:mod:`fedup.ui.follow`: one peer's, or every simulated peer's), or from a
run's output folder (:mod:`fedup.ui.folder`: a finished run, or the demo's
peers as their files grow).  It keeps only what every member may see
(docs/federation.md, "What is shared"): the members, their addresses, the
ring and where the model is, each lap's federated results, the run's settings
and how it ended; plus the training loss of each hop trained by the members
it was fed (a peer's own hops; in the simulator and the demo, every member's).
It never holds data, data summaries or a member's own validation results.

Laps count from 0 as in the logs and files (lap -1 is the initial model).  The
best lap and the patience left are the stopping rule's own
(:class:`~fedup.protocol.laps.StopState`), replayed over the lap results.

Nothing here waits or does I/O.  Readers draw :meth:`RunBoard.progress` and
:meth:`RunBoard.snapshot`; :meth:`RunBoard.listen` calls a function after
every change and :meth:`RunBoard.on_lap` once per new lap result, with its
one-line description.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs

from fedup.protocol.laps import LapRecord, StopState

__all__ = ["Cursor", "Figures", "HopPoint", "LapPoint", "Member", "ModelPlace", "RunBoard"]


@attrs.frozen
class HopPoint:
    """A hop a member trained: its position and the training loss it reported."""

    lap: int
    hop: int
    loss: float


@attrs.frozen
class LapPoint:
    """The federated results of one lap (the output of lap ``lap``)."""

    lap: int
    loss: float
    accuracy: float
    auc: float
    """NaN when unknown."""
    samples: int


@attrs.define
class Member:
    peer_id: str
    addresses: list[str] = attrs.field(factory=list)
    dead: str | None = None
    """Why the federation counts it as dead, if it does."""
    excluded: str | None = None
    finished: bool = False
    """It saved the final model (known for the members whose events or files we see)."""
    hops: list[HopPoint] = attrs.field(factory=list)

    @property
    def short(self) -> str:
        return "…" + self.peer_id[-8:]


@attrs.frozen
class ModelPlace:
    """Where the model was last known to be."""

    holder: str | None
    """The member holding it (None: the run is over)."""
    lap: int
    hop: int
    doing: str
    """``training`` (the holder trains that hop), ``trained`` (it trained it and hands it
    on), ``sent`` (handed to the holder for that position) or ``final``."""


@attrs.frozen
class Figures:
    """The figures a one-screen summary shows."""

    lap: int | None
    """The lap being trained (evaluated, when ``lap == max_laps``); None before the first."""
    max_laps: int | None
    last_lap: LapPoint | None
    """The newest lap result."""
    best: LapPoint | None
    """The stopping rule's best lap so far."""
    patience: int | None
    patience_left: int | None
    """Judged laps without improvement the rule still allows."""
    elapsed: float
    """Seconds since the board was made (the command started)."""
    eta: float | None
    """Seconds the remaining laps take at most, at the pace so far (the stopping rule
    may end the run sooner); None until a lap was timed."""

    @property
    def fraction(self) -> float:
        """How far the laps are, of the most the run may have (its evaluation lap too)."""
        if self.lap is None or not self.max_laps:
            return 0.0
        return min(1.0, max(0, self.lap) / (self.max_laps + 1))


@attrs.frozen
class Cursor:
    """How much of the append-only lists a viewer has seen (:meth:`RunBoard.update`)."""

    laps: int = 0
    hops: Mapping[str, int] = attrs.field(factory=dict)


def _finite(x: float) -> float | None:
    return x if isinstance(x, int | float) and math.isfinite(x) else None


def clock_text(seconds: float) -> str:
    """``m:ss`` or ``h:mm:ss``."""
    s = max(0, int(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def lap_name(lap: int) -> str:
    return "the initial model" if lap == -1 else f"lap {lap}"


class RunBoard:
    """One run as seen from here; see the module docstring."""

    def __init__(
        self,
        *,
        me: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        timed: bool = True,
    ) -> None:
        self.me = me
        self.timed = timed
        """Whether elapsed time means anything (not for a run read from its files)."""
        self.addresses: list[str] = []
        """This peer's own addresses (before the federation forms)."""
        self.stage = "starting"
        self.run_id: str | None = None
        self.epoch: int | None = None
        self.leader: str | None = None
        self.members: dict[str, Member] = {}
        """In ring order."""
        self.settings: dict[str, Any] = {}
        self.laps: list[LapPoint] = []
        self._lap_numbers: set[int] = set()
        self._newest_lap: int | None = None
        self.stop = StopState()
        self.place: ModelPlace | None = None
        self.stop_reason: str | None = None
        self.ended_by: str | None = None
        self.model_sha256: str | None = None
        self.failures: dict[str, str] = {}
        """Members whose run failed (as they reported it), with the reason."""
        self.files: list[str] = []
        """Output files a viewer may fetch (names in the run's folder)."""
        self.live = True
        """False once nothing will change any more (the run is over, or read from files)."""
        self.version = 0
        self._clock = clock
        self._started = clock()
        self._ended: float | None = None
        self._lap_seen: dict[int, float] = {}
        self._listeners: list[Callable[[], None]] = []
        self._lap_listeners: list[Callable[[LapPoint, str], None]] = []

    # --- who is told ------------------------------------------------------------------

    def listen(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` after every change (keep it quick: it runs in the updater)."""
        self._listeners.append(fn)

    def on_lap(self, fn: Callable[[LapPoint, str], None]) -> None:
        """Call ``fn(lap, line)`` once for every new lap result, with a one-line text."""
        self._lap_listeners.append(fn)

    def _changed(self) -> None:
        self.version += 1
        for fn in list(self._listeners):
            fn()

    # --- updates ----------------------------------------------------------------------

    def started(self, addresses: Iterable[str]) -> None:
        self.addresses = list(addresses)
        self._changed()

    def set_stage(self, stage: str) -> None:
        if stage != self.stage:
            self.stage = stage
            self._changed()

    def formed(
        self,
        *,
        run_id: str,
        epoch: int,
        leader: str,
        members: Sequence[str],
        addresses: Mapping[str, Sequence[str]] | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        """The federation formed (every simulated peer reports it: the first one counts)."""
        if self.run_id == run_id and self.members:
            return
        self.run_id, self.epoch, self.leader = run_id, epoch, leader
        known = addresses or {}
        self.members = {p: Member(p, list(known.get(p, ()))) for p in members}
        if settings:
            self.settings = dict(settings)
        self.stage = "training"
        self._replay()
        self._changed()

    def _member(self, peer: str) -> Member:
        member = self.members.get(peer)
        if member is None:  # a report from a member we were not told about: keep it
            member = self.members[peer] = Member(peer)
        return member

    def training(self, peer: str, lap: int, hop: int) -> None:
        self._moved(ModelPlace(peer, lap, hop, "training"))

    def hop_trained(self, peer: str, lap: int, hop: int, loss: float) -> None:
        """``peer`` trained hop (``lap``, ``hop``); a hop that only evaluated (no training
        samples: its loss is NaN) is no point of the curves."""
        if math.isfinite(loss):
            self._member(peer).hops.append(HopPoint(lap, hop, loss))
        self._moved(ModelPlace(peer, lap, hop, "trained"))

    def handed_over(self, to: str, kind: str, lap: int, hop: int) -> None:
        if kind == "final":
            return  # the final model goes to every member: the place is "final" already
        self._moved(ModelPlace(to, lap, hop, "sent"))

    def _moved(self, place: ModelPlace) -> None:
        current = self.place
        if current is None or (place.lap, place.hop) >= (current.lap, current.hop):
            if current is None or current.doing != "final":
                self.place = place
        self._lap_seen.setdefault(place.lap, self._clock())
        self._changed()

    def lap_noted(self, point: LapPoint) -> None:
        """A lap's federated results (each lap counts once, whoever reports it)."""
        if point.lap in self._lap_numbers:
            return
        newest = self._newest_lap
        self._lap_numbers.add(point.lap)
        self.laps.append(point)
        self._newest_lap = point.lap if newest is None else max(newest, point.lap)
        if newest is None or point.lap > newest:  # the usual case: judge just this lap
            self.stop = self._judge(self.stop, point)
        else:  # out of order (a member that learns old laps late): judge them all again
            self._replay()
        self._lap_seen.setdefault(point.lap + 1, self._clock())
        line = self.lap_line(point)
        self._changed()
        for fn in list(self._lap_listeners):
            fn(point, line)

    def _replay(self) -> None:
        """The stopping rule's state: the laps judged in order, as the ring judges them."""
        state = StopState()
        for p in sorted(self.laps, key=lambda p: p.lap):
            state = self._judge(state, p)
        self.stop = state

    def _judge(self, state: StopState, p: LapPoint) -> StopState:
        tolerance = float(self.settings.get("tolerance", 0.0))
        record = LapRecord(p.lap, p.loss, p.accuracy, p.auc, 0, p.samples)
        return state.judge(record, tolerance=tolerance)[0]

    def declared_dead(self, peer: str, cause: str) -> None:
        self._member(peer).dead = cause
        self._changed()

    def taken_back(self, peer: str) -> None:
        member = self._member(peer)
        member.dead = None
        member.excluded = None
        self._changed()

    def excluded(self, peer: str, why: str) -> None:
        self._member(peer).excluded = why
        self._changed()

    def finished(self, peer: str, stop_reason: str, ended_by: str | None, sha256: str) -> None:
        self._member(peer).finished = True
        self.stop_reason = self.stop_reason or stop_reason
        self.ended_by = self.ended_by or ended_by
        self.model_sha256 = self.model_sha256 or sha256
        self.stage = "finished"
        self._ended = self._ended or self._clock()
        if self.place is None or self.place.doing != "final":
            lap = self.place.lap if self.place is not None else 0
            self.place = ModelPlace(None, lap, 0, "final")
        self._changed()

    def failed(self, peer: str, reason: str) -> None:
        self.failures[peer] = reason
        if peer == self.me:
            self.stage = "failed"
        self._changed()

    def set_files(self, names: Iterable[str]) -> None:
        names = list(names)
        if names != self.files:
            self.files = names
            self._changed()

    def close(self) -> None:
        """Nothing will change any more."""
        if self.live:
            self.live = False
            self._ended = self._ended or self._clock()
            self._changed()

    # --- views ------------------------------------------------------------------------

    @property
    def max_laps(self) -> int | None:
        value = self.settings.get("max_laps")
        return int(value) if value is not None else None

    @property
    def patience(self) -> int | None:
        value = self.settings.get("patience")
        return int(value) if value is not None else None

    def best(self) -> LapPoint | None:
        best = self.stop.best_lap
        return next((p for p in self.laps if p.lap == best), None)

    def current_lap(self) -> int | None:
        """The lap being trained: where the model is, or after the newest result."""
        laps = [p.lap + 1 for p in self.laps]
        if self.place is not None:
            laps.append(self.place.lap)
        if not laps:
            return None
        lap = max(laps)
        return min(lap, self.max_laps) if self.max_laps is not None else lap

    def progress(self) -> Figures:
        now = self._ended if self._ended is not None else self._clock()
        lap = self.current_lap()
        patience = self.patience
        left = max(0, patience - self.stop.stale) if patience is not None else None
        return Figures(
            lap=lap,
            max_laps=self.max_laps,
            last_lap=max(self.laps, key=lambda p: p.lap) if self.laps else None,
            best=self.best(),
            patience=patience,
            patience_left=left,
            elapsed=now - self._started,
            eta=self._eta(lap, now),
        )

    def _eta(self, lap: int | None, now: float) -> float | None:
        """At the pace since lap 0 began: what the laps up to ``max_laps`` (and the
        evaluation lap after them) take at most."""
        if lap is None or self.max_laps is None or self._ended is not None:
            return None
        first = self._lap_seen.get(0)
        started = self._lap_seen.get(lap)
        if first is None or started is None or lap <= 0 or started <= first:
            return None
        per_lap = (started - first) / lap
        remaining = (self.max_laps + 1 - lap) * per_lap - (now - started)
        return max(0.0, remaining)

    def lap_line(self, point: LapPoint) -> str:
        """One line for a lap result: its loss, the best lap, patience, time."""
        p = self.progress()
        of = ""
        if p.max_laps is not None and 0 <= point.lap < p.max_laps:
            of = f" ({point.lap + 1} of at most {p.max_laps})"
        text = f"{lap_name(point.lap)}{of}: federated validation loss {point.loss:.4f}"
        if math.isfinite(point.accuracy):
            text += f", accuracy {point.accuracy:.1%}"
        if math.isfinite(point.auc):
            text += f", AUC {point.auc:.3f}"
        if p.best is not None:
            text += f"; best so far {lap_name(p.best.lap)} ({p.best.loss:.4f})"
        if p.patience_left is not None:
            text += f", patience {p.patience_left} of {p.patience} left"
        if self.timed:
            text += f"; {clock_text(p.elapsed)} elapsed"
        if p.eta is not None:
            text += f", at most {clock_text(p.eta)} more"
        return text

    def snapshot(self) -> dict[str, Any]:
        """Everything, JSON-ready (non-finite numbers as null)."""
        return self.update(Cursor())[0]

    def update(self, since: Cursor) -> tuple[dict[str, Any], Cursor]:
        """What changed for a viewer at ``since``: every field, but only the lap results
        and hops it has not seen (``laps`` and each member's ``hops`` are appended to, in
        order); and the viewer's new cursor."""
        p = self.progress()
        members = []
        hops_seen: dict[str, int] = {}
        for m in self.members.values():
            start = since.hops.get(m.peer_id, 0)
            start = start if start <= len(m.hops) else 0
            hops_seen[m.peer_id] = len(m.hops)
            members.append(
                {
                    "id": m.peer_id,
                    "short": m.short,
                    "addresses": m.addresses,
                    "me": m.peer_id == self.me,
                    "dead": m.dead,
                    "excluded": m.excluded,
                    "finished": m.finished,
                    "hops_from": start,
                    "hops": [[h.lap, h.hop, _finite(h.loss)] for h in m.hops[start:]],
                }
            )
        place = self.place
        best = p.best
        laps_from = since.laps if since.laps <= len(self.laps) else 0
        value = {
            "version": self.version,
            "live": self.live,
            "me": self.me,
            "addresses": self.addresses,
            "stage": self.stage,
            "run_id": self.run_id,
            "epoch": self.epoch,
            "leader": self.leader,
            "members": members,
            "model": attrs.asdict(place) if place is not None else None,
            "laps_from": laps_from,
            "laps": [
                [q.lap, _finite(q.loss), _finite(q.accuracy), _finite(q.auc)]
                for q in self.laps[laps_from:]
            ],
            "progress": {
                "lap": p.lap,
                "max_laps": p.max_laps,
                "best_lap": best.lap if best is not None else None,
                "best_loss": _finite(best.loss) if best is not None else None,
                "patience": p.patience,
                "patience_left": p.patience_left,
                "elapsed": p.elapsed if self.timed else None,
                "eta": p.eta,
            },
            "settings": self.settings,
            "outcome": {
                "stop_reason": self.stop_reason,
                "ended_by": self.ended_by,
                "model_sha256": self.model_sha256,
                "failures": self.failures,
            },
            "files": self.files,
        }
        return value, Cursor(len(self.laps), hops_seen)
