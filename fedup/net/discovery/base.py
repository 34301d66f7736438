"""What every discovery backend shares: events, sightings, counters and the core.

A backend (real mDNS in :mod:`.mdns`, the in-memory hub in :mod:`.memory`)
only moves notices: "source S announces TXT T from addresses A" and "source
S is gone".  :class:`DiscoveryCore` decides what they mean, without I/O:

* every announcement goes through
  :func:`fedup.protocol.announce.verify_announcement`; a refused one is
  still kept as a :class:`Sighting` (``verified=False`` and the reason),
  counted by reason, and logged once per (source, reason);
* a verified record of a peer not yet live is a ``found`` event, a newer
  record (higher ``seq``) of a live peer is ``updated``, and the
  disappearance of the source a live peer was last seen at is ``lost``
  (``cause`` is ``"goodbye"`` or ``"expired"``).

mDNS content is a hint from anyone on the LAN.  A verified sighting means
"someone holding this peer's key announced these addresses"; the membership
layer admits a peer only after an authenticated handshake.
"""

from __future__ import annotations

import abc
import collections
import enum
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import TypeAlias

import attrs
import trio

from fedup.config import DEFAULT_LIMITS, Limits
from fedup.errors import FedupError
from fedup.protocol.announce import (
    AnnouncementError,
    NetworkScope,
    RejectReason,
    Verified,
    admit_record,
    verify_announcement,
    verify_sighting,
)
from fedup.protocol.peer_id import PeerId
from fedup.protocol.records import Address, PeerRecordBook, SignedPeerRecord

log = logging.getLogger("fedup.discovery")


DEFAULT_EVENT_BUFFER = 4096
"""Events buffered per subscriber before further ones are dropped (and counted)."""

_MAX_LOGGED = 1024  # (source, reason) pairs remembered so each is logged once

# Rejections that look like an attack or a broken peer are warnings; the others
# (another network, an old record still cached) are ordinary on a shared LAN.
_WARN = frozenset(
    {
        RejectReason.BAD_TXT,
        RejectReason.BAD_RECORD,
        RejectReason.BAD_SIGNATURE,
        RejectReason.PEER_ID_MISMATCH,
        RejectReason.ADDRESS_MISMATCH,
        RejectReason.BOOK_FULL,
    }
)


class DiscoveryError(FedupError):
    """Discovery cannot run here: no usable interface, sockets cannot be opened."""


class EventKind(enum.StrEnum):
    FOUND = "found"
    UPDATED = "updated"
    LOST = "lost"


class LostCause(enum.StrEnum):
    GOODBYE = "goodbye"
    """The source withdrew (an mDNS goodbye, TTL 0): its record is withdrawn too."""
    EXPIRED = "expired"
    """The source stopped answering and its records expired (a crash, a cut cable)."""


@attrs.frozen
class DiscoveryEvent:
    """A change in the set of verified peers."""

    kind: EventKind
    """found, updated or lost."""
    peer_id: PeerId
    """The peer, verified from its record's signature."""
    record: SignedPeerRecord
    """The peer's current record (for lost: the last one it had)."""
    source: str
    """Where it was seen: the mDNS service instance name, or the memory source."""
    cause: LostCause | None = None
    """For lost events, why."""


@attrs.frozen
class Sighting:
    """One announcement seen on the network, verified or not."""

    source: str
    """The mDNS service instance name (or memory source) that announced it."""
    advertised: tuple[Address, ...]
    """The addresses the announcement itself gave (A/AAAA with the SRV port)."""
    verified: bool
    """True when every rule passed."""
    reason: RejectReason | None
    """The first rule that failed, or None when verified."""
    detail: str | None
    """What was wrong, in words, or None when verified."""
    record: SignedPeerRecord | None
    """The record when its signature verified (also for some refusals), else None."""
    seen_at: float
    """When it was last evaluated (the backend's clock, seconds)."""

    @property
    def peer_id(self) -> PeerId | None:
        """The peer ID, only when the record's signature verified."""
        return self.record.peer_id if self.record is not None else None

    @property
    def network(self) -> str | None:
        return self.record.record.network if self.record is not None else None

    @property
    def addresses(self) -> tuple[Address, ...]:
        """The signed addresses when verified, else what was advertised."""
        if self.verified and self.record is not None:
            return self.record.record.addresses
        return self.advertised

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict (used by ``fedup-peer peers --json``)."""
        return {
            "peer_id": self.peer_id.text if self.peer_id is not None else None,
            "addresses": [str(a) for a in self.addresses],
            "network": self.network,
            "verified": self.verified,
            "reason": str(self.reason) if self.reason is not None else None,
            "detail": self.detail,
            "source": self.source,
            "seq": self.record.record.seq if self.record is not None else None,
        }


class Counters:
    """Named event counts (rejections by reason, drops by kind)."""

    def __init__(self) -> None:
        self._counts: collections.Counter[str] = collections.Counter()

    def add(self, name: str, n: int = 1) -> None:
        self._counts[str(name)] += n

    def __getitem__(self, name: str) -> int:
        return self._counts[str(name)]

    def snapshot(self) -> dict[str, int]:
        """A copy of the non-zero counts, sorted by name."""
        return {k: v for k, v in sorted(self._counts.items()) if v}

    def total(self) -> int:
        return sum(self._counts.values())


@attrs.frozen
class Observation:
    """What the core made of one announcement."""

    events: tuple[DiscoveryEvent, ...] = ()
    sighting: Sighting | None = None
    retry: bool = False
    """Only for provisional observations: an address mismatch that may be a
    cache in transition; the backend should look again shortly."""


_NOTHING = Observation()
"""An observation that changes nothing (immutable, so one serves every caller)."""

Shared: TypeAlias = dict[object, object]
"""What the observers of one announcement share (:meth:`DiscoveryCore.observe`)."""

_RULES: dict[tuple[NetworkScope, Limits], object] = {}
"""One token per (scope, limits) in use: what a :data:`Shared` dict is keyed by."""
MAX_RULES = 64
"""Tokens kept at most (then forgotten: later observers only share less)."""


def _rules_token(scope: NetworkScope, limits: Limits) -> object:
    """A token standing for ``(scope, limits)``: equal rules give the same token while it
    is kept, different rules never do.  A key of the token hashes and compares without
    the attrs-generated methods of the scope and limits (Python calls, and a simulation
    of N peers observes N^2 announcements)."""
    token = _RULES.get((scope, limits))
    if token is None:
        if len(_RULES) >= MAX_RULES:
            _RULES.clear()
        token = _RULES[(scope, limits)] = object()
    return token


class DiscoveryCore:
    """The pure state of discovery: sightings by source, live peers, counters.

    Not thread-safe and does no I/O; the backends call it from their trio task.
    """

    def __init__(
        self,
        *,
        scope: NetworkScope,
        limits: Limits = DEFAULT_LIMITS,
        local_peer: PeerId | None = None,
        book: PeerRecordBook | None = None,
        max_sources: int | None = None,
        logger: logging.Logger = log,
    ) -> None:
        self.scope = scope
        self.limits = limits
        self.local_peer = local_peer
        """Our own peer ID: announcements of it are ignored."""
        self.own_sources: set[str] = set()
        """Sources we announce ourselves: ignored when seen."""
        self.book = book if book is not None else PeerRecordBook(max_peers=limits.max_known_peers)
        self.max_sources = limits.max_discovery_sources if max_sources is None else max_sources
        self.rejections = Counters()
        self.drops = Counters()
        self._log = logger
        self._sightings: dict[str, Sighting] = {}
        self._verified: dict[PeerId, str | set[str]] = {}
        """The sources whose sighting is verified, by peer (kept by _put and _pop), so
        that a new record supersedes the others without a scan of every source: the
        source itself when it is the only one (the usual case: no set for each of the
        N peers each of N simulated peers knows)."""
        self._live: dict[PeerId, tuple[str, SignedPeerRecord]] = {}
        self._proven: collections.OrderedDict[PeerId, None] = collections.OrderedDict()
        """Peers that completed a handshake with us (most recent last): their sightings
        are the last to make room for newcomers."""
        self._logged: collections.OrderedDict[tuple[str, str], None] = collections.OrderedDict()
        self._token_of: tuple[NetworkScope, Limits, object] | None = None
        """The rules token (:func:`_rules_token`) of ``scope`` and ``limits`` as they were
        when it was taken (both may be replaced)."""

    # --- queries --------------------------------------------------------------------

    def peers(self) -> dict[PeerId, SignedPeerRecord]:
        """The live verified peers and their current records (a copy)."""
        return {peer: signed for peer, (_, signed) in self._live.items()}

    def sightings(self) -> list[Sighting]:
        """Every sighting held, verified or not, ordered by source."""
        return [self._sightings[s] for s in sorted(self._sightings)]

    def sighting(self, source: str) -> Sighting | None:
        return self._sightings.get(source)

    def prove(self, peer: PeerId) -> None:
        """``peer`` completed a handshake with us under the network's rules."""
        self._proven.pop(peer, None)
        self._proven[peer] = None
        if len(self._proven) > self.limits.max_known_peers:
            self._proven.popitem(last=False)

    # --- notices --------------------------------------------------------------------

    def observe(
        self,
        source: str,
        txt: object,
        advertised: Sequence[Address],
        *,
        now: float,
        provisional: bool = False,
        shared: Shared | None = None,
    ) -> Observation:
        """Evaluate an announcement from ``source``; return the events it causes.

        With ``provisional``, an address mismatch is not recorded but answered
        with ``retry=True`` (mDNS caches keep a changed address for a second).
        ``shared`` is a dict that every observer of this very announcement passes (the
        memory hub's one notice for every member): what follows from the announcement
        alone (its verification, the sighting and event values) is made once there.
        """
        if source in self.own_sources:
            return _NOTHING
        key = self._rules() if shared is not None else None
        outcome = shared.get(key) if shared is not None else None
        if not isinstance(outcome, Verified):
            try:
                outcome = verify_announcement(
                    txt,  # type: ignore[arg-type]  # hostile input: the decoder checks the type
                    advertised,
                    scope=self.scope,
                    limits=self.limits,
                )
            except AnnouncementError as err:
                if provisional and err.code is RejectReason.ADDRESS_MISMATCH:
                    return Observation(retry=True)
                return self._observe(source, advertised, err, now=now)
            if shared is not None:  # a success only: an error is raised again by each
                shared[key] = outcome
        return self._observe(source, advertised, outcome, now=now, shared=shared)

    def _rules(self) -> object:
        """The token of our rules (scope and limits) in a :data:`Shared` dict."""
        held = self._token_of
        if held is None or held[0] is not self.scope or held[1] is not self.limits:
            held = self._token_of = (
                self.scope,
                self.limits,
                _rules_token(self.scope, self.limits),
            )
        return held[2]

    def observe_envelope(
        self, source: str, envelope: bytes, advertised: Sequence[Address], *, now: float
    ) -> Observation:
        """As :meth:`observe`, for a signed record that came without a TXT encoding."""
        if source in self.own_sources:
            return _NOTHING
        outcome: Verified | AnnouncementError
        try:
            outcome = verify_sighting(envelope, advertised, scope=self.scope, limits=self.limits)
        except AnnouncementError as err:
            outcome = err
        return self._observe(source, advertised, outcome, now=now)

    def _observe(
        self,
        source: str,
        advertised: Sequence[Address],
        outcome: Verified | AnnouncementError,
        *,
        now: float,
        shared: Shared | None = None,
    ) -> Observation:
        advertised = tuple(advertised)
        evicted: tuple[DiscoveryEvent, ...] = ()
        if source not in self._sightings and len(self._sightings) >= self.max_sources:
            room = self._make_room(newcomer_verified=isinstance(outcome, Verified))
            if room is None:
                self.drops.add("too-many-sources")
                return _NOTHING
            evicted = room
        observation = self._judge(source, advertised, outcome, now=now, shared=shared)
        if evicted:
            return attrs.evolve(observation, events=evicted + observation.events)
        return observation

    def _judge(
        self,
        source: str,
        advertised: tuple[Address, ...],
        outcome: Verified | AnnouncementError,
        *,
        now: float,
        shared: Shared | None = None,
    ) -> Observation:
        try:
            if isinstance(outcome, AnnouncementError):
                raise outcome
            signed = outcome.signed
            peer = signed.record.peer_id
            local = self.local_peer
            if local is not None and peer.raw == local.raw:  # (PeerId's == is a Python call)
                self._pop(source)
                return _NOTHING
            fresh = admit_record(self.book, signed, evictable=self._not_live)
        except AnnouncementError as err:
            return Observation(sighting=self._reject(source, advertised, err, now))
        # The values below depend on the announcement, our rules and the time only:
        # observers of one notice share them (they are immutable).
        key = (self._rules(), now) if shared is not None else None
        known = shared.get(key) if shared is not None else None
        if isinstance(known, Sighting):
            sighting = known
        else:
            sighting = Sighting(source, advertised, True, None, None, signed, now)
            if shared is not None:
                shared[key] = sighting
        if self._put(source, sighting, peer) != source and fresh:
            self._supersede(peer, signed, source)
        live = self._live
        kind: EventKind | None
        if peer not in live:
            kind, tag = EventKind.FOUND, 1
        elif fresh:
            kind, tag = EventKind.UPDATED, 2
        else:  # a repeat of the record we hold, maybe from a second source
            kind, tag = None, 0
        # (tagged by a number: an enum's hash is a Python call)
        observation = shared.get((key, tag)) if shared is not None else None
        if not isinstance(observation, Observation):
            events = () if kind is None else (DiscoveryEvent(kind, peer, signed, source),)
            observation = Observation(events, sighting)
            if shared is not None:
                shared[(key, tag)] = observation
        if kind is None:
            return observation
        live[peer] = (source, signed)
        if self._log.isEnabledFor(logging.INFO):  # addresses are not formatted for nothing
            if kind is EventKind.FOUND:
                self._log.info("found peer %s at %s (%s)", peer, _addrs(signed), source)
            else:
                seq = signed.record.seq
                self._log.info("peer %s updated: seq %d at %s", peer, seq, _addrs(signed))
        return observation

    def remove(self, source: str, *, cause: LostCause) -> list[DiscoveryEvent]:
        """``source`` is gone (a goodbye, or its records expired)."""
        gone = self._pop(source)
        events = []
        for peer, (src, signed) in list(self._live.items()):
            if src != source:
                continue
            other = self._other_source(peer, signed) if cause is LostCause.EXPIRED else None
            if other is not None:
                self._live[peer] = (other, signed)
                continue
            del self._live[peer]
            if cause is LostCause.GOODBYE:
                self.book.forget(peer)  # the record is withdrawn: a replay of it is now stale
                self._withdraw_copies(peer, source)
            self._log.info("lost peer %s (%s, %s)", peer, cause, source)
            events.append(DiscoveryEvent(EventKind.LOST, peer, signed, source, cause))
        if gone is not None and not events:
            self._log.debug("source %s gone (%s)", source, cause)
        return events

    # --- internals ------------------------------------------------------------------

    def _other_source(self, peer: PeerId, signed: SignedPeerRecord) -> str | None:
        for s in self._sightings.values():
            if s.verified and s.record is not None and s.record.envelope == signed.envelope:
                return s.source
        return None

    def _put(
        self, source: str, sighting: Sighting, peer: PeerId | None = None
    ) -> str | set[str] | None:
        """Hold ``sighting`` as ``source``'s (``peer``: its peer ID, when verified); return
        the verified sources of its peer now (None if it is not verified)."""
        if source in self._sightings:
            self._pop(source)
        self._sightings[source] = sighting
        if sighting.verified:
            peer = peer if peer is not None else sighting.peer_id
            if peer is not None:
                sources = self._verified.get(peer)
                if sources is None:
                    self._verified[peer] = source
                    return source
                if isinstance(sources, str):
                    if sources != source:
                        sources = self._verified[peer] = {sources, source}
                    return sources
                sources.add(source)
                return sources
        return None

    def _pop(self, source: str) -> Sighting | None:
        old = self._sightings.pop(source, None)
        peer = old.peer_id if old is not None else None
        if peer is not None:
            sources = self._verified.get(peer)
            if sources == source:
                del self._verified[peer]
            elif isinstance(sources, set):
                sources.discard(source)
                if len(sources) == 1:
                    self._verified[peer] = next(iter(sources))
        return old

    def _verified_sources(self, peer: PeerId) -> set[str]:
        """The sources whose sighting of ``peer`` is verified (a copy)."""
        sources = self._verified.get(peer)
        if sources is None:
            return set()
        return {sources} if isinstance(sources, str) else set(sources)

    def _supersede(self, peer: PeerId, signed: SignedPeerRecord, source: str) -> None:
        """Older records of ``peer`` seen elsewhere no longer count as verified."""
        sources = self._verified.get(peer)
        if sources is None or sources == source:
            return  # the usual case: nothing else to mark (and no text to format)
        self._unverify(peer, f"superseded by seq {signed.record.seq} from {source}", keep=source)

    def _withdraw_copies(self, peer: PeerId, source: str) -> None:
        self._unverify(peer, f"record withdrawn by a goodbye from {source}")

    def _unverify(self, peer: PeerId, detail: str, *, keep: str | None = None) -> None:
        """Every verified sighting of ``peer`` but ``keep``'s is stale from now on."""
        for src in sorted(self._verified_sources(peer) - {keep}):
            stale = attrs.evolve(
                self._sightings[src], verified=False, reason=RejectReason.STALE_SEQ, detail=detail
            )
            self._put(src, stale)

    def victim(self, sources: Iterable[str]) -> str | None:
        """Of ``sources`` (oldest first), the one a backend that tracks names forgets to
        make room: the first unresolved or refused one, else the first verified one of a
        peer that never completed a handshake with us; None if every one is proven."""
        unproven = None
        for source in sources:
            sighting = self._sightings.get(source)
            if sighting is None or not sighting.verified:
                return source
            if unproven is None and sighting.peer_id not in self._proven:
                unproven = source
        return unproven

    def _not_live(self, peer: PeerId) -> bool:
        return peer not in self._live

    def _make_room(self, *, newcomer_verified: bool) -> tuple[DiscoveryEvent, ...] | None:
        """Room for one more source: None if there is none to make, else the events of
        the eviction.  The oldest refused sighting goes first; for a verified newcomer,
        then the oldest verified one of a peer that never completed a handshake with us.
        Peers that did keep their place: signed announcements with the network's public
        fingerprint, which anyone can sniff, cannot push a member out."""
        if len(self._sightings) < self.max_sources:
            return ()
        refused = [s for s in self._sightings.values() if not s.verified]
        if refused:
            self._pop(min(refused, key=lambda s: s.seen_at).source)
            return ()
        if not newcomer_verified:
            return None
        unproven = [s for s in self._sightings.values() if s.peer_id not in self._proven]
        if not unproven:
            return None
        oldest = min(unproven, key=lambda s: s.seen_at)
        self.drops.add("evicted")
        return tuple(self.remove(oldest.source, cause=LostCause.EXPIRED))

    def _reject(
        self, source: str, advertised: tuple[Address, ...], err: AnnouncementError, now: float
    ) -> Sighting:
        self.rejections.add(err.code)
        sighting = Sighting(source, advertised, False, err.code, err.reason, err.record, now)
        self._put(source, sighting)
        key = (source, str(err.code))
        if key not in self._logged:
            self._logged[key] = None
            if len(self._logged) > _MAX_LOGGED:
                self._logged.popitem(last=False)
            level = logging.WARNING if err.code in _WARN else logging.INFO
            where = ", ".join(str(a) for a in advertised[:4]) or "no address"
            self._log.log(
                level,
                "refused announcement from %s (%s): %s (peer %s)",
                source,
                where,
                err,
                err.peer or "unknown",
            )
        return sighting


def _addrs(signed: SignedPeerRecord) -> str:
    return ", ".join(str(a) for a in signed.record.addresses)


class Discovery(abc.ABC):
    """The interface of a discovery backend, and what they share.

    Use a backend as an async context manager (``MdnsDiscovery.open(...)``,
    ``MemoryDiscovery.open(...)``): browsing starts when it is entered and
    everything stops, with goodbyes sent, when it is left.
    """

    def __init__(self, core: DiscoveryCore) -> None:
        self._core = core
        self._subscribers: list[trio.MemorySendChannel[DiscoveryEvent]] = []
        self._changed = trio.Event()
        self._local: SignedPeerRecord | None = None

    # --- announcing -------------------------------------------------------------------

    @abc.abstractmethod
    async def announce(self, signed: SignedPeerRecord) -> None:
        """Announce our record, or replace the announced one with a newer one.

        Raises :class:`~fedup.errors.LocalProtocolError` when ``signed`` is
        not newer than the record already announced, or cannot be announced.
        """

    @abc.abstractmethod
    async def withdraw(self) -> None:
        """Stop announcing (sends goodbyes); no-op when nothing is announced."""

    @property
    def local_record(self) -> SignedPeerRecord | None:
        """The record we announce, or None."""
        return self._local

    # --- what was seen ----------------------------------------------------------------

    def peers(self) -> dict[PeerId, SignedPeerRecord]:
        """The live verified peers (not ourselves) and their current records."""
        return self._core.peers()

    def prove(self, peer: PeerId) -> None:
        """``peer`` completed a handshake with us: keep its sightings when room is short."""
        self._core.prove(peer)

    def sightings(self) -> list[Sighting]:
        """Every announcement held, verified or not (for ``fedup-peer peers``)."""
        return self._core.sightings()

    @property
    def rejections(self) -> dict[str, int]:
        """Refused announcements counted by :class:`RejectReason` value."""
        return self._core.rejections.snapshot()

    @property
    def drops(self) -> dict[str, int]:
        """Things dropped because a bound was reached (queues, sources), by kind."""
        return self._core.drops.snapshot()

    def subscribe(
        self, max_buffer: int = DEFAULT_EVENT_BUFFER
    ) -> trio.MemoryReceiveChannel[DiscoveryEvent]:
        """A channel receiving every later :class:`DiscoveryEvent`.

        When the subscriber falls ``max_buffer`` events behind, further events
        are dropped for it and counted in :attr:`drops` (``events``); the
        snapshot :meth:`peers` stays authoritative.  The channel ends when the
        backend closes.
        """
        send, receive = trio.open_memory_channel[DiscoveryEvent](max_buffer)
        self._subscribers.append(send)
        return receive

    async def wait_for(self, predicate: Callable[[dict[PeerId, SignedPeerRecord]], bool]) -> None:
        """Wait until ``predicate(self.peers())`` holds; bound it with a trio deadline."""
        while not predicate(self.peers()):
            await self._changed.wait()

    # --- for backends -----------------------------------------------------------------

    def _publish(self, events: Sequence[DiscoveryEvent]) -> None:
        if not events:
            return
        for event in events:
            for send in list(self._subscribers):
                try:
                    send.send_nowait(event)
                except trio.WouldBlock:
                    self._core.drops.add("events")
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self._subscribers.remove(send)
        self._changed.set()
        self._changed = trio.Event()

    def _close_subscribers(self) -> None:
        for send in self._subscribers:
            send.close()
        self._subscribers.clear()
        self._changed.set()
