"""In-memory discovery: many peers in one trio run, for the simulator and tests.

A :class:`MemoryDiscoveryHub` plays the LAN.  Each :class:`MemoryDiscovery`
announces through it exactly what mDNS would carry (the TXT RDATA of
:func:`~fedup.protocol.announce.encode_txt_rdata` and the advertised
addresses) and judges what it receives with the same
:class:`~fedup.net.discovery.base.DiscoveryCore`, so verification, events and
counters are those of the mDNS backend.

Deterministic: notices are delivered to members in the order they joined,
and each member handles its notices in order.  With ``delay`` every delivery
takes that long (virtual time under ``trio.testing.MockClock``).
:meth:`MemoryDiscoveryHub.publish` with arbitrary bytes injects forged
announcements; :meth:`MemoryDiscoveryHub.remove` with
``cause=LostCause.EXPIRED`` models a peer that vanished without a goodbye.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

import attrs
import trio

from fedup.config import DEFAULT_LIMITS, Limits
from fedup.errors import LocalProtocolError
from fedup.net.discovery.base import (
    Discovery,
    DiscoveryCore,
    DiscoveryEvent,
    LostCause,
    Shared,
)
from fedup.net.groups import collapse_single_exception
from fedup.protocol.announce import NetworkScope, encode_txt_rdata
from fedup.protocol.peer_id import PeerId
from fedup.protocol.records import Address, PeerRecordBook, SignedPeerRecord

DEFAULT_INBOX_SIZE = 4096
"""Notices queued per member before further ones are dropped (counted as ``notices``)."""

BATCH = 256
"""Notices handled per wake-up at most (their events are published together)."""

Delay = float | Callable[[str, str], float]
"""Seconds per delivery, or a function of (source, receiving member) giving them."""


@attrs.frozen(eq=False)
class _Notice:
    deliver_at: float | None
    source: str
    txt: object  # None for a removal
    advertised: tuple[Address, ...]
    cause: LostCause | None
    shared: Shared | None = None
    """What the members that observe this one notice share (:meth:`DiscoveryCore.observe`);
    None for a notice made for one member."""


class MemoryDiscoveryHub:
    """A shared in-memory "LAN" that members announce on and browse."""

    def __init__(self, *, delay: Delay = 0.0) -> None:
        self.delay = delay
        self._announcements: dict[str, tuple[object, tuple[Address, ...]]] = {}
        self._shared: dict[str, _Notice] = {}
        """Without delays: the one notice of each announcement, for every member (those
        that join later too), so that they share what follows from it."""
        self._members: dict[str, MemoryDiscovery] = {}
        self._names = itertools.count(1)

    def new_source(self, prefix: str = "fedup") -> str:
        """A fresh, deterministic source name (``fedup-1``, ``fedup-2``, ...)."""
        return f"{prefix}-{next(self._names)}"

    @property
    def announcements(self) -> dict[str, tuple[object, tuple[Address, ...]]]:
        """What is announced now, by source: (TXT, advertised addresses)."""
        return dict(self._announcements)

    def publish(
        self,
        source: str,
        txt: object,
        advertised: Sequence[Address],
    ) -> None:
        """Announce (or re-announce) ``txt`` from ``source`` to every member.

        ``txt`` is not checked: tests inject forged or malformed announcements here.
        """
        entry = (txt, tuple(advertised))
        self._announcements[source] = entry
        if self._undelayed:  # one notice serves every member
            notice = self._shared[source] = _Notice(None, source, txt, entry[1], None, {})
            for member in list(self._members.values()):
                member._deliver(notice)
            return
        for member in list(self._members.values()):
            member._deliver(self._notice(source, member, txt, entry[1], None))

    def remove(self, source: str, *, cause: LostCause = LostCause.GOODBYE) -> None:
        """``source`` stops announcing: a goodbye, or (``EXPIRED``) its records time out."""
        self._shared.pop(source, None)
        if self._announcements.pop(source, None) is None:
            return
        for member in list(self._members.values()):
            member._deliver(self._notice(source, member, None, (), cause))

    def _notice(
        self,
        source: str,
        member: MemoryDiscovery,
        txt: object,
        advertised: tuple[Address, ...],
        cause: LostCause | None,
    ) -> _Notice:
        delay = self.delay(source, member.source) if callable(self.delay) else self.delay
        deliver_at = trio.current_time() + delay if delay > 0 else None
        return _Notice(deliver_at, source, txt, advertised, cause)

    @property
    def _undelayed(self) -> bool:
        return not callable(self.delay) and self.delay <= 0

    def _join(self, member: MemoryDiscovery) -> None:
        self._members[member.source] = member
        for source, (txt, advertised) in self._announcements.items():
            shared = self._shared.get(source) if self._undelayed else None
            member._deliver(shared or self._notice(source, member, txt, advertised, None))

    def _leave(self, member: MemoryDiscovery) -> None:
        self._members.pop(member.source, None)


class MemoryDiscovery(Discovery):
    """A member of a :class:`MemoryDiscoveryHub`; same interface as ``MdnsDiscovery``."""

    def __init__(
        self, hub: MemoryDiscoveryHub, core: DiscoveryCore, source: str, inbox_size: int
    ) -> None:
        super().__init__(core)
        self.hub = hub
        self.source = source
        """The name this member announces under (its "instance name")."""
        core.own_sources.add(source)
        self._inbox: collections.deque[_Notice] = collections.deque()
        """Notices not yet handled: a plain queue and one wake-up (a trio channel costs
        a few microseconds per notice, and a simulation delivers N^2 of them)."""
        self._inbox_size = inbox_size
        self._queued = trio.Event()
        """Set when a notice is queued; :meth:`_run` waits for it when the inbox is empty."""

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        hub: MemoryDiscoveryHub,
        *,
        scope: NetworkScope,
        local_peer: PeerId | None = None,
        source: str | None = None,
        limits: Limits = DEFAULT_LIMITS,
        book: PeerRecordBook | None = None,
        max_sources: int | None = None,
        inbox_size: int = DEFAULT_INBOX_SIZE,
    ) -> AsyncIterator[MemoryDiscovery]:
        """Join ``hub`` and browse it until the block is left (then withdraw, if announced).

        ``scope`` is the network whose peers are accepted; ``local_peer`` our
        own peer ID (ignored when seen; also set by :meth:`announce`).
        """
        core = DiscoveryCore(
            scope=scope, limits=limits, local_peer=local_peer, book=book, max_sources=max_sources
        )
        self = cls(hub, core, source or hub.new_source(), inbox_size)
        hub._join(self)
        try:
            with collapse_single_exception():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._run)
                    try:
                        yield self
                    finally:
                        nursery.cancel_scope.cancel()
        finally:
            hub._leave(self)
            if self._local is not None:
                hub.remove(self.source)
            self._close_subscribers()

    async def announce(self, signed: SignedPeerRecord) -> None:
        if self._local is not None and signed.record.seq <= self._local.record.seq:
            raise LocalProtocolError("an announced record must be newer than the previous one")
        txt = encode_txt_rdata(signed.envelope, limits=self._core.limits)
        self._core.local_peer = signed.peer_id
        self._local = signed
        self.hub.publish(self.source, txt, signed.record.addresses)
        await trio.lowlevel.checkpoint()

    async def withdraw(self) -> None:
        if self._local is not None:
            self._local = None
            self.hub.remove(self.source)
        await trio.lowlevel.checkpoint()

    def _deliver(self, notice: _Notice) -> None:
        if len(self._inbox) >= self._inbox_size:
            self._core.drops.add("notices")
            return
        self._inbox.append(notice)
        self._queued.set()

    async def _run(self) -> None:
        inbox = self._inbox
        while True:
            while not inbox:
                await self._queued.wait()
                self._queued = trio.Event()
            # Everything queued, up to a batch, after one wake-up.
            batch = [inbox.popleft() for _ in range(min(len(inbox), BATCH))]
            now = trio.current_time()  # the clock stands still until the next await
            events: list[DiscoveryEvent] = []  # published once per batch, in order
            for notice in batch:
                if notice.deliver_at is not None and notice.deliver_at > now:
                    self._publish(events)
                    events = []
                    await trio.sleep_until(notice.deliver_at)
                    now = trio.current_time()
                if notice.cause is not None:
                    events += self._core.remove(notice.source, cause=notice.cause)
                else:
                    observation = self._core.observe(
                        notice.source, notice.txt, notice.advertised, now=now, shared=notice.shared
                    )
                    events += observation.events
            self._publish(events)
            await trio.lowlevel.checkpoint()
