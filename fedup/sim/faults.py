"""What goes wrong in a simulation: slow links, dropped connections, partitions, crashes,
slow peers.

Values only; :mod:`fedup.sim.runner` and :mod:`fedup.sim.network` apply them.
Peers are named by their index in the simulation; ring positions ``(lap, hop)``
are those of :mod:`fedup.protocol.laps` (``hop`` counts live members).
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from fedup.sim.network import Link

__all__ = ["Cut", "Drop", "Faults", "Kill", "Link", "Slow"]


@attrs.frozen
class Kill:
    """Stop peer ``peer`` (as a crash) once ring position ``hop`` of lap ``lap`` was trained.

    If ``peer`` is the member that trained it, it dies holding the model,
    before handing it on; otherwise it dies while another member holds it.
    With ``restart_after``, the peer is started again that many seconds later, with
    the same identity and state directory (it resumes its run from its run-state
    file: docs/reliability.md).
    """

    peer: int
    lap: int = 0
    hop: int = 0
    restart_after: float | None = None
    training: bool = False
    """Die while training that hop itself (``peer`` must be the member at that
    position), before it ends: the hop's work is lost, not its model."""
    delay: float = 0.0
    """Seconds after the trigger before the kill (with a slow link: die mid-transfer);
    ``restart_after`` counts from the kill."""
    stage: str | None = None
    """Die instead when this peer's formation first reaches this stage (a
    :class:`~fedup.protocol.formation_events.Stage` value, e.g. ``"leading"``: it
    called the members and waits for their answers); ``lap`` and ``hop`` are then
    ignored.  It fires once, on the first :class:`~fedup.peer.events.FormationStage`
    event of ``peer`` with that stage."""


@attrs.frozen
class Drop:
    """Break the next connection ``src`` opens to ``dst`` after ``after_bytes`` bytes.

    Armed once ring position ``hop`` of lap ``lap`` was trained (``lap=None``:
    from the start).  When ``src`` trained that hop and ``dst`` is its
    successor, the connection dropped is the one carrying the model.
    """

    src: int
    dst: int
    lap: int | None = None
    hop: int = 0
    after_bytes: int = 16 * 1024


@attrs.frozen
class Cut:
    """Cut peers ``peers`` off from the others for ``duration`` seconds (a partition).

    Starts once ring position ``hop`` of lap ``lap`` was trained, as if the links
    of the cut peers' hosts went down: connections between a cut peer and one on
    the other side break at once (both ends get :class:`trio.BrokenResourceError`)
    and dials across the cut fail as unreachable; peers on the same side still
    reach each other.  After ``duration`` seconds the cut heals (dials go through
    again; the connections it broke stay broken).
    """

    peers: tuple[int, ...]
    lap: int
    hop: int
    duration: float
    delay: float = 0.0
    """Seconds after the trigger before the cut (with slow links: after a custody
    acknowledgement got through, or half-way through the next hand-over)."""


@attrs.frozen
class Slow:
    """Peer ``peer`` takes ``delay`` more seconds for each hop it trains (a slow host)."""

    peer: int
    delay: float


@attrs.frozen
class Faults:
    """What goes wrong in a simulation (nothing by default)."""

    link: Link = attrs.field(factory=Link)
    """Every directed link without an entry in ``links``."""
    links: Mapping[tuple[int, int], Link] = attrs.field(factory=dict)
    """Directed ``(sender, receiver)`` links that differ."""
    kills: tuple[Kill, ...] = ()
    drops: tuple[Drop, ...] = ()
    cuts: tuple[Cut, ...] = ()
    slow: tuple[Slow, ...] = ()
