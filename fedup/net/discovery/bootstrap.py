"""Discovery beyond one LAN: ask configured peers (``--bootstrap HOST:PORT``) whom they know.

mDNS stops at the LAN.  A *bootstrap address* is any member reachable over
TCP (another site, a cloud host); ``docs/protocol-bootstrap.md`` is the
specification of the exchange, this module its implementation.

**The requester** (:class:`BootstrapDiscovery`) polls each bootstrap address
every ``interval`` seconds (the first time at once; sooner while the address has
not answered yet or its answers bring new peers, see :data:`QUICK_INTERVAL`).
One poll:

1. dial the address with no expected peer: we do not know its ID, and the
   handshake authenticates whoever answers (its network and network key too);
2. take the record the peer sent in the handshake (``channel.remote_record``);
3. send ``GetPeers`` and read one ``PeerList`` reply, within ``exchange_timeout``;
4. judge the answering peer's record and every listed envelope with the same
   :class:`~fedup.net.discovery.base.DiscoveryCore` rules as an mDNS sighting
   (signature, peer ID, protocol version, network name and key, freshness),
   each under the source ``via HOST:PORT: <peer ID>``; an entry that does not
   verify is kept as a refused sighting under ``via HOST:PORT: entry <i>``;
5. a source of this address absent from the new answer is removed (``lost``,
   ``cause=expired``, unless another source still vouches for the same record).

An address that fails ``failures_before_lost`` polls in a row, for at least
``failures_before_lost * interval`` since it last answered, has all its
sources removed (expired); it keeps being polled, and its peers are found
again when it answers.  Every failure is counted in :attr:`~BootstrapDiscovery.failures`
by reason and logged once per (address, reason) until the address answers
again; nothing ends the poll loop but leaving the ``async with`` block.

Bootstrap is pull-based: :meth:`~BootstrapDiscovery.announce` only remembers
our record (our own record is never reported as a peer).  Our record reaches
others in the handshake when they dial us.  A node that serves as a bootstrap
for others calls :meth:`~BootstrapDiscovery.observe_inbound` with the record of
every peer that dialed it, so that it can tell the next requester about them;
such a peer is reported lost ``inbound_ttl`` after its last connection.

**The responder** is :func:`answer_peer_list`, called by a peer's connection
handler after it read a ``GetPeers`` request.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager

import attrs
import trio

from fedup.config import DEFAULT_LIMITS, Limits
from fedup.errors import (
    ConfigError,
    ConnectionLostError,
    LocalProtocolError,
    PeerTimeoutError,
    RemoteProtocolError,
)
from fedup.net.channel import SecureChannel
from fedup.net.discovery.base import (
    Counters,
    Discovery,
    DiscoveryCore,
    DiscoveryEvent,
    EventKind,
    LostCause,
)
from fedup.net.framed import FramedStream
from fedup.net.groups import collapse_single_exception
from fedup.net.transport import DialError, Transport
from fedup.protocol.announce import NetworkScope, RejectReason
from fedup.protocol.handshake import AbortCode, HandshakeError
from fedup.protocol.messages import (
    MAX_PEER_LIST,
    GetPeers,
    PeerList,
    Refuse,
    decode_message,
    encode_message,
)
from fedup.protocol.peer_id import PeerId
from fedup.protocol.records import Address, PeerRecordBook, SignedPeerRecord, verify_peer_record

__all__ = [
    "DEFAULT_FAILURES_BEFORE_LOST",
    "DEFAULT_INTERVAL",
    "NO_RECORD",
    "QUICK_INTERVAL",
    "BootstrapDiscovery",
    "BootstrapEntry",
    "answer_peer_list",
    "bootstrap_entries",
    "build_peer_list",
    "request_peer_list",
    "source_name",
]

log = logging.getLogger("fedup.discovery.bootstrap")

DEFAULT_INTERVAL = 30.0
"""Seconds between two polls of one bootstrap address: a new member is known
across sites within half a minute, and 3 missed polls (90 s) report its peers
lost, about as fast as mDNS's 120 s record TTL; one poll costs a handshake."""

QUICK_INTERVAL = 1.0
"""Seconds before the next poll when an address has not answered yet or its last
answer brought a peer we did not know: peers usually start together, and a
member that polls its bootstrap just before the others dial it would otherwise
wait a whole ``interval`` to hear of them.  The wait then doubles at each poll
up to ``interval``, so a quiet federation costs no more handshakes than before."""

DEFAULT_FAILURES_BEFORE_LOST = 3
"""Polls in a row an address may fail before its peers are reported lost: one
lost connection or a restart of the bootstrap peer does not make peers flap."""

NO_RECORD = "no-record"
"""Rejection counter: the answering peer sent no signed record in the handshake."""

_HANDSHAKE_REJECTIONS = {
    AbortCode.WRONG_NETWORK.value: RejectReason.OTHER_NETWORK,
    AbortCode.WRONG_NETWORK_KEY.value: RejectReason.OTHER_NETWORK_KEY,
}
_KNOWN_ABORTS = frozenset(code.value for code in AbortCode)
_SELF_DIAL = f"handshake-{AbortCode.SELF_DIAL.value}"
_LIST_HEAD = 3  # CBOR head of the records array: at most 3 bytes for up to 65535 items
_ITEM_HEAD = 3  # CBOR head of one byte string of at most 65535 bytes


# --- pure: what a list says, and what to answer -------------------------------------


def source_name(address: Address, what: PeerId | str) -> str:
    """The discovery source of a record learned from ``address``.

    ``via 10.0.0.2:4100: <peer ID>`` for a record that verified,
    ``via 10.0.0.2:4100: entry 3`` for a list entry that did not.
    """
    return f"via {address}: {what.text if isinstance(what, PeerId) else what}"


@attrs.frozen
class BootstrapEntry:
    """One record to judge, as a bootstrap's answer gave it."""

    envelope: bytes
    """The signed envelope, exactly as received."""
    addresses: tuple[Address, ...]
    """Its signed addresses (empty when the envelope did not verify)."""
    seq: int = -1
    """Its ``seq`` (-1 when it did not verify)."""


def bootstrap_entries(
    address: Address,
    remote: SignedPeerRecord | None,
    records: Iterable[bytes],
    *,
    local_peer: PeerId | None,
    limits: Limits = DEFAULT_LIMITS,
) -> dict[str, BootstrapEntry]:
    """The sources one answer from ``address`` holds, each with the entry to judge.

    ``remote`` is the record of the peer that answered (from the handshake),
    ``records`` the envelopes of its ``PeerList``.  Each envelope is verified
    here only to name its source after its peer; the full rules are applied by
    the :class:`DiscoveryCore`.  Records of ``local_peer`` are left out; of two
    records of one peer the higher ``seq`` is kept (the handshake's on a tie).
    Never raises for any ``records``.
    """
    entries: dict[str, BootstrapEntry] = {}

    def add(signed: SignedPeerRecord) -> None:
        if signed.peer_id == local_peer:
            return
        source = source_name(address, signed.peer_id)
        held = entries.get(source)
        if held is None or signed.record.seq > held.seq:
            entries[source] = BootstrapEntry(
                signed.envelope, signed.record.addresses, signed.record.seq
            )

    if remote is not None:
        add(remote)
    for index, envelope in enumerate(records):
        try:
            signed = verify_peer_record(envelope, limits=limits)
        except RemoteProtocolError:
            entries[source_name(address, f"entry {index}")] = BootstrapEntry(bytes(envelope), ())
            continue
        add(signed)
    return entries


def build_peer_list(
    discovery_peers: Mapping[PeerId, SignedPeerRecord],
    local_record: SignedPeerRecord | None,
    *,
    exclude: PeerId | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> PeerList:
    """The ``PeerList`` answering a ``GetPeers``: our record first, then the known peers.

    Envelopes are forwarded byte for byte.  Peers come in the mapping's order;
    ``exclude`` (the requester) and duplicates of our own peer are left out.
    The list is cut at :data:`~fedup.protocol.messages.MAX_PEER_LIST` records
    and where its encoding would exceed ``limits.max_message_size``; a record
    larger than ``limits.max_record_size`` (which no peer would accept) is skipped.
    """
    budget = limits.max_message_size - len(encode_message(PeerList(()))) - _LIST_HEAD
    chosen: list[bytes] = []
    candidates: list[SignedPeerRecord] = [] if local_record is None else [local_record]
    local_peer = None if local_record is None else local_record.peer_id
    candidates += [
        signed
        for peer, signed in discovery_peers.items()
        if peer != exclude and peer != local_peer and signed.peer_id == peer
    ]
    for signed in candidates:
        if len(chosen) >= MAX_PEER_LIST:
            break
        size = len(signed.envelope)
        if not 0 < size <= limits.max_record_size:
            continue
        if size + _ITEM_HEAD > budget:
            break
        budget -= size + _ITEM_HEAD
        chosen.append(signed.envelope)
    return PeerList(tuple(chosen))


# --- I/O: one exchange ----------------------------------------------------------------


def _framed(channel_or_framed: SecureChannel | FramedStream, limits: Limits) -> FramedStream:
    if isinstance(channel_or_framed, FramedStream):
        return channel_or_framed
    return FramedStream(
        channel_or_framed,
        peer=channel_or_framed.remote_peer.text,
        limits=limits,
        max_frame_size=limits.max_message_size,
    )


async def answer_peer_list(
    channel_or_framed: SecureChannel | FramedStream,
    discovery_peers: Mapping[PeerId, SignedPeerRecord],
    local_record: SignedPeerRecord | None,
    *,
    limits: Limits = DEFAULT_LIMITS,
) -> int:
    """Answer a ``GetPeers`` request already read from an authenticated connection.

    Sends one ``PeerList`` frame built by :func:`build_peer_list` from our
    ``local_record`` and the verified ``discovery_peers`` (for example
    ``mdns.peers() | bootstrap.peers()``), leaving out the requester when the
    connection is a :class:`SecureChannel` (or a :class:`FramedStream` over one).
    Returns the number of records sent.

    Raises :class:`~fedup.errors.PeerTimeoutError` when the requester does not
    take the frame within ``Limits.frame_timeout`` and
    :class:`~fedup.errors.ConnectionLostError` when the connection is gone.
    """
    framed = _framed(channel_or_framed, limits)
    stream = framed.stream
    requester = stream.remote_peer if isinstance(stream, SecureChannel) else None
    reply = build_peer_list(discovery_peers, local_record, exclude=requester, limits=limits)
    await framed.send_frame(encode_message(reply))
    return len(reply.records)


async def request_peer_list(
    channel: SecureChannel, *, limits: Limits = DEFAULT_LIMITS, timeout: float | None = None
) -> PeerList:
    """Send ``GetPeers`` on ``channel`` and return the ``PeerList`` it answers.

    The whole exchange has ``timeout`` seconds (default ``Limits.handshake_timeout``);
    the reply is read as one frame of at most ``Limits.max_message_size`` bytes.
    The envelopes in the reply are *not* verified here.  Raises, naming the
    peer: :class:`~fedup.errors.PeerTimeoutError` (no answer in time),
    :class:`~fedup.errors.ConnectionLostError` (closed, reset),
    :class:`~fedup.protocol.framing.FrameError` (oversized frame) and
    :class:`~fedup.errors.RemoteProtocolError` (a malformed reply, another
    message, a refusal).
    """
    timeout = limits.handshake_timeout if timeout is None else timeout
    peer = channel.remote_peer.text
    framed = _framed(channel, limits)
    try:
        with trio.fail_after(timeout):
            await framed.send_frame(encode_message(GetPeers()))
            reply = decode_message(await framed.receive_frame(), limits=limits)
    except trio.TooSlowError:
        raise PeerTimeoutError(
            f"did not answer the peer-list request within {timeout:g} s", peer=peer
        ) from None
    except RemoteProtocolError as exc:
        if exc.peer is None:
            raise exc.with_peer(peer) from None
        raise
    if isinstance(reply, Refuse):
        raise RemoteProtocolError(f"refused the peer-list request: {reply.reason!r}", peer=peer)
    if not isinstance(reply, PeerList):
        raise RemoteProtocolError(
            f"answered the peer-list request with a {reply.TYPE!r} message", peer=peer
        )
    return reply


def _failure_reason(exc: BaseException) -> str:
    """A short, bounded name for why a poll failed (the counter and log key)."""
    if isinstance(exc, HandshakeError):
        code = exc.code if exc.code in _KNOWN_ABORTS else "other"
        return f"handshake-{code}"
    if isinstance(exc, DialError):
        return "unreachable"
    if isinstance(exc, PeerTimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionLostError):
        return "connection-lost"
    if isinstance(exc, RemoteProtocolError):
        return "bad-reply"
    return "bug"


# --- the backend ----------------------------------------------------------------------


class _Target:
    """What the poll loop remembers of one bootstrap address."""

    def __init__(self, address: Address) -> None:
        self.address = address
        self.failures = 0
        """Polls failed in a row."""
        self.entries: dict[str, BootstrapEntry] = {}
        """What the last answer held, by source (empty after the peers were reported lost)."""
        self.logged: set[str] = set()
        """Failure reasons logged since the address last answered."""
        self.no_record = False
        """The last answering peer sent no record (counted once until one comes)."""
        self.answered_at = -math.inf
        """Trio time of the last answer."""
        self.peer: PeerId | None = None
        """The peer that answered last."""


class BootstrapDiscovery(Discovery):
    """Discovery by polling bootstrap addresses over the transport; open with :meth:`open`."""

    def __init__(
        self,
        transport: Transport,
        core: DiscoveryCore,
        addresses: Sequence[Address],
        *,
        interval: float,
        quick_interval: float,
        failures_before_lost: int,
        exchange_timeout: float,
        inbound_ttl: float,
    ) -> None:
        super().__init__(core)
        self._transport = transport
        self._targets = {a: _Target(a) for a in dict.fromkeys(addresses)}
        if not 0 < quick_interval <= interval:
            raise ConfigError("bootstrap quick_interval must be in (0, interval]")
        self._interval = interval
        self._quick_interval = quick_interval
        self._failures_before_lost = failures_before_lost
        self._exchange_timeout = exchange_timeout
        self._inbound_ttl = inbound_ttl
        self._inbound: dict[str, float] = {}  # source -> trio time it expires
        self._inbound_added = trio.Event()
        self._failures = Counters()

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        transport: Transport,
        addresses: Sequence[Address],
        *,
        scope: NetworkScope,
        local_peer: PeerId,
        limits: Limits | None = None,
        interval: float = DEFAULT_INTERVAL,
        quick_interval: float = QUICK_INTERVAL,
        failures_before_lost: int = DEFAULT_FAILURES_BEFORE_LOST,
        exchange_timeout: float | None = None,
        inbound_ttl: float | None = None,
        book: PeerRecordBook | None = None,
        max_sources: int | None = None,
    ) -> AsyncIterator[BootstrapDiscovery]:
        """Poll ``addresses`` in the background until the block is left.

        ``scope`` is the network whose peers are accepted, ``local_peer`` our
        own peer ID (never reported).  ``limits`` defaults to the transport's.
        ``exchange_timeout`` bounds the ``GetPeers``/``PeerList`` exchange after
        the handshake (default ``Limits.bootstrap_exchange_timeout``); ``inbound_ttl``
        is how long a peer passed to :meth:`observe_inbound` stays without a
        new connection (default ``interval * failures_before_lost``).
        ``quick_interval`` is the first wait while peers are arriving (see
        :data:`QUICK_INTERVAL`; equal to ``interval``: a fixed schedule).
        ``max_sources`` defaults to room for a full list from every address.

        Raises :class:`~fedup.errors.ConfigError` for an ``interval``,
        timeout or TTL that is not a positive number, or a
        ``failures_before_lost`` below 1.  Errors of the polls are never raised.
        """
        limits = transport.limits if limits is None else limits
        exchange_timeout = (
            limits.bootstrap_exchange_timeout if exchange_timeout is None else exchange_timeout
        )
        inbound_ttl = interval * failures_before_lost if inbound_ttl is None else inbound_ttl
        for name, value in (
            ("interval", interval),
            ("quick_interval", quick_interval),
            ("exchange_timeout", exchange_timeout),
            ("inbound_ttl", inbound_ttl),
        ):
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"bootstrap {name} must be a positive number of seconds")
        if failures_before_lost < 1:
            raise ConfigError("bootstrap failures_before_lost must be at least 1")
        if max_sources is None:
            max_sources = max(
                limits.max_discovery_sources, len(set(addresses)) * (MAX_PEER_LIST + 1)
            )
        core = DiscoveryCore(
            scope=scope,
            limits=limits,
            local_peer=local_peer,
            book=book,
            max_sources=max_sources,
            logger=log,
        )
        self = cls(
            transport,
            core,
            addresses,
            interval=interval,
            quick_interval=min(quick_interval, interval),
            failures_before_lost=failures_before_lost,
            exchange_timeout=exchange_timeout,
            inbound_ttl=inbound_ttl,
        )
        try:
            with collapse_single_exception():
                async with trio.open_nursery() as nursery:
                    for target in self._targets.values():
                        nursery.start_soon(self._poll, target)
                    nursery.start_soon(self._expire_inbound)
                    try:
                        yield self
                    finally:
                        nursery.cancel_scope.cancel()
        finally:
            self._close_subscribers()

    # --- announcing: only remembered ---------------------------------------------------

    async def announce(self, signed: SignedPeerRecord) -> None:
        """Remember our record (bootstrap is pull-based: nothing is sent).

        Raises :class:`~fedup.errors.LocalProtocolError` for a record of
        another peer than ``local_peer``, or one not newer than the last.
        """
        if signed.peer_id != self._core.local_peer:
            raise LocalProtocolError("announce our own record (of local_peer)")
        if self._local is not None and signed.record.seq <= self._local.record.seq:
            raise LocalProtocolError("an announced record must be newer than the previous one")
        self._local = signed
        await trio.lowlevel.checkpoint()

    async def withdraw(self) -> None:
        """Forget our record (nothing is sent)."""
        self._local = None
        await trio.lowlevel.checkpoint()

    # --- queries ----------------------------------------------------------------------

    @property
    def addresses(self) -> tuple[Address, ...]:
        """The bootstrap addresses polled (duplicates removed)."""
        return tuple(self._targets)

    @property
    def failures(self) -> dict[str, int]:
        """Failed polls by reason (``unreachable``, ``timeout``, ``handshake-busy``, ...)."""
        return self._failures.snapshot()

    def consecutive_failures(self, address: Address) -> int:
        """Polls of ``address`` failed in a row now (0 once it answers)."""
        return self._targets[address].failures

    # --- inbound connections --------------------------------------------------------------

    def observe_inbound(self, signed: SignedPeerRecord) -> None:
        """Note the record of a peer that connected to us (``channel.remote_record``).

        It is judged like any sighting, under the source ``inbound: <peer ID>``,
        and reported lost (expired) ``inbound_ttl`` after its last connection;
        so a node serving as a bootstrap can tell each requester about the others.
        """
        source = f"inbound: {signed.peer_id.text}"
        events = self._observe(source, BootstrapEntry(signed.envelope, signed.record.addresses))
        if self._core.sighting(source) is not None:
            self._inbound.pop(source, None)  # keep the dict ordered by expiry
            self._inbound[source] = trio.current_time() + self._inbound_ttl
            self._inbound_added.set()
        self._publish(events)

    async def _expire_inbound(self) -> None:
        while True:
            if not self._inbound:
                await self._inbound_added.wait()
                self._inbound_added = trio.Event()
                continue
            await trio.sleep_until(next(iter(self._inbound.values())))
            now = trio.current_time()
            while self._inbound:
                source, expires = next(iter(self._inbound.items()))
                if expires > now:
                    break
                del self._inbound[source]
                self._publish(self._core.remove(source, cause=LostCause.EXPIRED))

    # --- the poll loop ------------------------------------------------------------------

    async def _poll(self, target: _Target) -> None:
        """Poll at once, then every ``interval``; sooner while peers are still arriving.

        The wait is ``quick_interval`` after an answer that made a new peer
        known (verified) and doubles from there; an address that never answered
        is retried the same way.  Once an address has answered, a failed poll
        waits the full ``interval``, and its peers are reported lost only when
        ``failures_before_lost`` polls in a row failed *and* as many intervals
        passed since it last answered: the quick phase does not make them go
        sooner.
        """
        backoff = self._quick_interval
        while True:
            started = trio.current_time()
            news = await self._poll_once(target)
            if news:
                wait, backoff = self._quick_interval, 2 * self._quick_interval
            elif target.failures and target.peer is not None:
                wait = self._interval
            else:
                wait, backoff = backoff, 2 * backoff
            await trio.sleep_until(started + min(wait, self._interval))

    async def _poll_once(self, target: _Target) -> bool:
        """One poll; whether its answer named a peer the last answer did not."""
        # RemoteProtocolError is the peer's doing; anything else is a bug of ours, logged
        # with its traceback ("bug"), but it must not stop the loop either.
        try:
            remote_peer, remote, records = await self._fetch(target.address)
        except Exception as exc:
            self._failed(target, _failure_reason(exc), exc)
            return False
        try:
            return self._answered(target, remote_peer, remote, records)
        except Exception as exc:
            self._failed(target, "bug", exc)
            return False

    async def _fetch(
        self, address: Address
    ) -> tuple[PeerId, SignedPeerRecord | None, tuple[bytes, ...]]:
        channel = await self._transport.dial(address, expected_peer=None)
        try:
            reply = await request_peer_list(
                channel, limits=self._core.limits, timeout=self._exchange_timeout
            )
        finally:
            with trio.move_on_after(self._core.limits.close_notify_timeout):
                await channel.aclose()
        return channel.remote_peer, channel.remote_record, reply.records

    def _failed(self, target: _Target, reason: str, exc: BaseException) -> None:
        target.failures += 1
        self._failures.add(reason)
        if reason not in target.logged:
            target.logged.add(reason)
            rejection = _HANDSHAKE_REJECTIONS.get(reason.removeprefix("handshake-"))
            if rejection is not None:
                self._core.rejections.add(rejection)
            if reason == "bug":
                log.error("bootstrap %s: poll failed", target.address, exc_info=exc)
            else:
                # Listing ourselves is ordinary: every node may share one bootstrap list.
                level = logging.INFO if reason == _SELF_DIAL else logging.WARNING
                log.log(
                    level,
                    "bootstrap %s: %s: %s (polling again every %g s)",
                    target.address,
                    reason,
                    exc,
                    self._interval,
                )
        silent = trio.current_time() - target.answered_at
        if (
            target.failures >= self._failures_before_lost
            and silent >= self._failures_before_lost * self._interval
            and target.entries
        ):
            log.warning(
                "bootstrap %s failed %d polls in a row; its peers are reported lost (%d source(s))",
                target.address,
                target.failures,
                len(target.entries),
            )
            events: list[DiscoveryEvent] = []
            for source in target.entries:
                events += self._core.remove(source, cause=LostCause.EXPIRED)
            target.entries = {}
            self._publish(events)

    def _answered(
        self,
        target: _Target,
        remote_peer: PeerId,
        remote: SignedPeerRecord | None,
        records: tuple[bytes, ...],
    ) -> bool:
        if target.failures:
            log.info(
                "bootstrap %s answers again after %d failed poll(s)",
                target.address,
                target.failures,
            )
        elif target.peer != remote_peer:
            log.info("bootstrap %s is peer %s", target.address, remote_peer)
        target.failures = 0
        target.logged.clear()
        target.peer = remote_peer
        if remote is None and not target.no_record:
            self._core.rejections.add(NO_RECORD)
            log.warning(
                "bootstrap %s (peer %s) sent no peer record in the handshake; "
                "only the peers it lists are used",
                target.address,
                remote_peer,
            )
        target.no_record = remote is None
        core = self._core
        entries = bootstrap_entries(
            target.address, remote, records, local_peer=core.local_peer, limits=core.limits
        )
        events: list[DiscoveryEvent] = []
        for source in target.entries.keys() - entries.keys():
            events += core.remove(source, cause=LostCause.EXPIRED)
        for source, entry in entries.items():
            held = target.entries.get(source)
            if held is not None and held.envelope == entry.envelope:
                if core.sighting(source) is not None:
                    continue  # judged already: not counted or logged again
            events += self._observe(source, entry)
        target.entries = entries
        target.answered_at = trio.current_time()
        self._publish(events)
        # Only a verified new peer counts: unverifiable entries cannot keep us polling fast.
        return any(e.kind is EventKind.FOUND for e in events)

    def _observe(self, source: str, entry: BootstrapEntry) -> list[DiscoveryEvent]:
        """Judge one envelope by the mDNS rules; its signed addresses are the advertised ones."""
        observed = self._core.observe_envelope(
            source, entry.envelope, entry.addresses, now=trio.current_time()
        )
        return list(observed.events)
