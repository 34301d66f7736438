"""What goes into the formation machine and what comes out: stages, events and actions.

Values only (frozen attrs classes); :mod:`fedup.protocol.formation` is the machine.
"""

from __future__ import annotations

import enum
from typing import TypeAlias

import attrs

from fedup.protocol.draw import Roster
from fedup.protocol.peer_id import PeerId
from fedup.protocol.refusal import RefusalCode

Reveals: TypeAlias = tuple[tuple[PeerId, bytes], ...]
"""(candidate, nonce) pairs of a draw, ascending by peer ID."""


class Stage(enum.Enum):
    SETTLING = "settling"
    LEADING = "leading"
    """We called the candidates and wait for their answers."""
    PROPOSING = "proposing"
    """We sent a view and wait for the acknowledgements."""
    FOLLOWING = "following"
    """We wait for a lower peer to call us."""
    OFFERED = "offered"
    """We answered a leader's call with our summary and wait for its view."""
    ACKED = "acked"
    """We acknowledged a view and wait for the leader's commit."""
    JOINED = "joined"
    FAILED = "failed"


# --- events ---------------------------------------------------------------------------


@attrs.frozen
class Start:
    """Formation begins (the peer listens and announces)."""


@attrs.frozen
class PeerSeen:
    """A verified candidate appeared (or changed)."""

    peer: PeerId


@attrs.frozen
class PeersSeen:
    """Several verified candidates appeared (or changed) at once: one batch of discovery's
    news, taken as one event (a thousand peers' announcements cost one timer restart)."""

    peers: tuple[PeerId, ...]


@attrs.frozen
class PeerLost:
    peer: PeerId


@attrs.frozen
class TimerFired:
    name: str


@attrs.frozen
class CallArrived:
    """``leader`` dialed us and asks us to join run ``run_id``.

    ``roster``: the digest of the draw roster whose draw chose ``leader`` (the driver
    checked the proof the call carried); None for a coordinator's call.
    """

    leader: PeerId
    run_id: bytes
    roster: bytes | None = None


@attrs.frozen
class OfferArrived:
    """A candidate we called offered its summary, or its draw commitment (``commit``);
    ``problem``: why the offer is unusable."""

    peer: PeerId
    run_id: bytes
    problem: str | None = None
    commit: bytes | None = None


@attrs.frozen
class FollowArrived:
    peer: PeerId
    leader: PeerId


@attrs.frozen
class RefuseArrived:
    peer: PeerId
    code: RefusalCode
    reason: str


@attrs.frozen
class CallFailed:
    """Dialing or calling ``peer`` failed (unreachable, timed out, garbled)."""

    peer: PeerId
    why: str


@attrs.frozen
class ProbeDone:
    """A probe of ``peer`` (a handshake under the network's rules, then close) ended.

    ``alive``: True if the handshake completed, False if it failed (nothing listens
    there, another peer answered, the network key differs, no answer in time), None
    if it proved nothing either way (the peer was busy).
    """

    peer: PeerId
    alive: bool | None
    why: str = ""
    strike: bool = False
    """With ``alive`` None: it may be the peer's fault (a handshake that timed out, a
    connection closed at once), so it counts toward giving up on it; a ``busy`` answer
    does not."""


@attrs.frozen
class ViewReady:
    """The driver admitted the offers and signed a view (after :class:`Propose`)."""

    run_id: bytes
    epoch: int
    digest: bytes
    members: frozenset[PeerId]
    """The members other than us."""
    refused: tuple[tuple[PeerId, str], ...] = ()
    """Candidates whose data do not fit, with the reason."""


@attrs.frozen
class ViewArrived:
    """The leader sent a view; the driver verified it and checked it against our data.

    ``problem`` says why we cannot take it; ``ours`` says whether that is our
    own data's or model's fault (a misfit) rather than the leader's.
    """

    leader: PeerId
    run_id: bytes
    epoch: int
    digest: bytes
    problem: str | None = None
    ours: bool = False
    roster: Roster | None = None
    """The coordinator's draw roster (the driver verified it), instead of a view."""


@attrs.frozen
class AckArrived:
    peer: PeerId
    run_id: bytes
    epoch: int
    digest: bytes
    reveal: bytes | None = None
    """For a roster: the nonce the member revealed."""


@attrs.frozen
class CommitArrived:
    leader: PeerId
    run_id: bytes
    epoch: int
    digest: bytes
    reveals: Reveals | None = None
    """For a roster: every candidate's reveal."""


@attrs.frozen
class ConnectionLost:
    """The connection with ``peer`` (a candidate we called, or our leader) ended."""

    peer: PeerId
    why: str


@attrs.frozen
class RingBlobArrived:
    """A ring blob naming view ``digest`` of run ``run_id`` came from a member ``sender``."""

    sender: PeerId
    run_id: bytes
    digest: bytes


Event: TypeAlias = (
    Start
    | PeerSeen
    | PeersSeen
    | PeerLost
    | TimerFired
    | CallArrived
    | OfferArrived
    | FollowArrived
    | RefuseArrived
    | CallFailed
    | ProbeDone
    | ViewReady
    | ViewArrived
    | AckArrived
    | CommitArrived
    | ConnectionLost
    | RingBlobArrived
)


# --- actions --------------------------------------------------------------------------


@attrs.frozen
class Call:
    """Dial each of ``peers`` and send ``call`` for ``run_id`` (with the proof of the draw
    of ``roster``, a drawn leader's call)."""

    run_id: bytes
    peers: tuple[PeerId, ...]
    roster: bytes | None = None


@attrs.frozen
class Probe:
    """Handshake with each of ``peers`` (then close) and feed :class:`ProbeDone`."""

    peers: tuple[PeerId, ...]


@attrs.frozen
class AnswerOffer:
    """Answer ``leader``'s call with our summary (``draw``: with a fresh draw commitment,
    a coordinator's call)."""

    leader: PeerId
    run_id: bytes
    draw: bool = False


@attrs.frozen
class AnswerFollow:
    """Answer ``caller``: we follow ``leader``, which is lower."""

    caller: PeerId
    run_id: bytes
    leader: PeerId


@attrs.frozen
class Propose:
    """Admit the offers of ``members`` and sign the view of ``epoch`` (answer: ViewReady);
    with ``commits``, sign a draw roster of them instead."""

    run_id: bytes
    epoch: int
    members: frozenset[PeerId]
    commits: tuple[tuple[PeerId, bytes], ...] | None = None


@attrs.frozen
class SendView:
    """Send the view of ``epoch`` to ``peer``."""

    peer: PeerId
    epoch: int


@attrs.frozen
class SendAck:
    leader: PeerId
    run_id: bytes
    epoch: int
    digest: bytes


@attrs.frozen
class SendCommit:
    peer: PeerId
    run_id: bytes
    epoch: int
    digest: bytes
    reveals: Reveals | None = None
    """A roster's commit: every reveal, so each member computes the draw."""
    drawn: PeerId | None = None
    """A roster's commit: the member the draw chose (its commit carries the records)."""


@attrs.frozen
class SendRefuse:
    peer: PeerId
    run_id: bytes
    code: RefusalCode
    reason: str
    inbound: bool = False
    """On the connection ``peer`` opened to call us (else on the one we opened)."""


@attrs.frozen
class Close:
    """We are done with ``peer``'s connection (after anything sent to it)."""

    peer: PeerId
    inbound: bool = False
    """The connection ``peer`` opened to call us (else the one we opened)."""


@attrs.frozen
class Joined:
    """The view (``run_id``, ``epoch``, ``digest``, led by ``leader``) holds: train under it."""

    leader: PeerId
    run_id: bytes
    epoch: int
    digest: bytes


@attrs.frozen
class Failed:
    reason: str


@attrs.frozen
class SetTimer:
    name: str
    seconds: float


@attrs.frozen
class CancelTimer:
    name: str


@attrs.frozen
class Note:
    level: str
    text: str


@attrs.frozen
class Ignored:
    event: str
    stage: Stage
    why: str


Action: TypeAlias = (
    Call
    | Probe
    | AnswerOffer
    | AnswerFollow
    | Propose
    | SendView
    | SendAck
    | SendCommit
    | SendRefuse
    | Close
    | Joined
    | Failed
    | SetTimer
    | CancelTimer
    | Note
    | Ignored
)
