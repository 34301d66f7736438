"""What a peer tells the world while it runs: a stream of small event values.

The simulator subscribes to them instead of reconstructing what happened (it
kills a peer once a given hop was trained, and marks when each lap began); a
live view can do the same.  :meth:`EventHub.watch` calls a function at once, in
the peer's own task, for every event (the simulator's fault injection relies on
that order); :meth:`EventHub.subscribe` hands events over a bounded channel and
counts what a slow reader missed, never blocking the peer.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import trio

from fedup.protocol.lifecycle import Life
from fedup.protocol.peer_id import PeerId
from fedup.protocol.records import Address
from fedup.protocol.refusal import RefusalCode
from fedup.protocol.view import RunSettings

__all__ = [
    "DeclaredDead",
    "EventHub",
    "Excluded",
    "Failed",
    "Finished",
    "FormationStage",
    "Formed",
    "HandedOver",
    "HopTrained",
    "LapClosed",
    "LapNoted",
    "LifeChanged",
    "PeerEvent",
    "Refused",
    "Resumed",
    "TakenBack",
    "Training",
]


@attrs.frozen
class LifeChanged:
    state: Life


@attrs.frozen
class FormationStage:
    """Formation moved to ``stage`` (settling, leading, following, ...)."""

    stage: str
    leader: PeerId | None
    """The leader we follow or offered to (ourselves when leading), if any."""


@attrs.frozen
class Formed:
    run_id: bytes
    epoch: int
    leader: PeerId
    members: tuple[PeerId, ...]
    """In ring order."""
    addresses: tuple[tuple[Address, ...], ...] = ()
    """Each member's addresses from its signed record in the view, in ring order."""
    settings: RunSettings | None = None
    """The run's settings, as the view fixes them."""


@attrs.frozen
class RoundTrained:
    """This peer evaluated and trained its part of parallel round ``round`` (the parallel
    mode: :mod:`fedup.peer.parallel_driver`), in ``seconds``, before the round's
    all-reduce."""

    round: int
    samples: int
    seconds: float
    evaluation: float = 0.0
    """Of ``seconds``, those spent evaluating the round's model (the hybrid mode reports
    them: its sub-rings evaluate at once, then train in sequence)."""


@attrs.frozen
class Training:
    """This peer holds the model and trains (or, in the last lap, evaluates) hop
    (``lap``, ``hop``) now."""

    lap: int
    hop: int


@attrs.frozen
class HopTrained:
    """This peer trained hop (``lap``, ``hop``); ``good`` is False if it handed on the last
    good state instead of a bad one it produced."""

    lap: int
    hop: int
    samples: int
    train_loss: float
    seconds: float
    good: bool = True


@attrs.frozen
class LapClosed:
    """The federated validation loss of ``lap`` became known here."""

    lap: int
    loss: float
    best_lap: int


@attrs.frozen
class LapNoted:
    """The federated results of ``lap`` became known here.  Every member notes every lap
    once, from the lap history that travels with the model (:class:`LapClosed` comes
    only from the member that closed the lap)."""

    lap: int
    loss: float
    accuracy: float
    auc: float
    """NaN when it cannot be computed (a task that is not binary)."""
    samples: int
    """Training samples processed by the federation up to the end of that lap."""


@attrs.frozen
class HandedOver:
    kind: str
    to: PeerId
    lap: int
    hop: int
    """``to`` holds the model for this position (lap, hop) now."""
    size: int


@attrs.frozen
class DeclaredDead:
    dead: PeerId
    by: PeerId
    cause: str
    epoch: int


@attrs.frozen
class TakenBack:
    """``peer``, counted as dead, was taken back into the run by ``by``."""

    peer: PeerId
    by: PeerId
    epoch: int


@attrs.frozen
class Resumed:
    """This peer was restarted and resumed its run from its saved state."""

    run_id: bytes
    phase: str
    """Where it resumed: ``training`` (a hop it held), ``handing``, ``waiting``, ``done``."""


@attrs.frozen
class Excluded:
    by: PeerId
    why: str


@attrs.frozen
class Refused:
    """We refused something ``offender`` sent (or a hand-over of ours was refused)."""

    offender: PeerId
    code: RefusalCode
    reason: str


@attrs.frozen
class Finished:
    stop_reason: str
    ended_by: PeerId | None
    model_sha256: str


@attrs.frozen
class Failed:
    reason: str


PeerEvent = (
    LifeChanged
    | FormationStage
    | Formed
    | Training
    | RoundTrained
    | HopTrained
    | LapClosed
    | LapNoted
    | HandedOver
    | DeclaredDead
    | TakenBack
    | Resumed
    | Excluded
    | Refused
    | Finished
    | Failed
)

Watcher = Callable[[PeerId, float, PeerEvent], None]


class EventHub:
    """Where a peer publishes its events."""

    def __init__(self, peer: PeerId) -> None:
        self.peer = peer
        self._watchers: list[Watcher] = []
        self._channels: list[trio.MemorySendChannel[tuple[float, PeerEvent]]] = []
        self.missed = 0
        """Events a subscriber's full channel could not take."""

    def watch(self, watcher: Watcher) -> None:
        """Call ``watcher(peer, time, event)`` for every later event, at once (keep it quick)."""
        self._watchers.append(watcher)

    def subscribe(self, buffer: int = 1024) -> trio.MemoryReceiveChannel[tuple[float, PeerEvent]]:
        """A channel of ``(time, event)`` for every later event; a full channel misses some."""
        send, receive = trio.open_memory_channel[tuple[float, PeerEvent]](buffer)
        self._channels.append(send)
        return receive

    def emit(self, event: PeerEvent) -> None:
        now = trio.current_time()
        for watcher in self._watchers:
            watcher(self.peer, now, event)
        for send in list(self._channels):
            try:
                send.send_nowait((now, event))
            except trio.WouldBlock:
                self.missed += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._channels.remove(send)

    def close(self) -> None:
        for send in self._channels:
            send.close()
        self._channels.clear()
