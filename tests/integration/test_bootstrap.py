"""Bootstrap discovery (``--bootstrap HOST:PORT``): polls over the transport, every record verified.

Most tests run the peers over a MemoryNetwork under pytest-trio's
``autojump_clock`` and assert exact virtual times; one runs over loopback TCP.
The bootstrap side is a small connection handler that reads one request frame,
decodes ``GetPeers`` and calls ``answer_peer_list``, as a peer's handler does.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from fedup.config import DEFAULT_LIMITS, Limits
from fedup.errors import ConfigError, LocalProtocolError, PeerTimeoutError
from fedup.identity import Identity
from fedup.net.channel import SecureChannel
from fedup.net.discovery.base import DiscoveryEvent
from fedup.net.discovery.bootstrap import (
    BootstrapDiscovery,
    answer_peer_list,
    bootstrap_entries,
    build_peer_list,
    request_peer_list,
    source_name,
)
from fedup.net.framed import FramedStream
from fedup.net.transport import Credentials, Handler, MemoryNetwork, TcpTransport
from fedup.protocol.announce import NetworkScope
from fedup.protocol.envelope import seal_envelope
from fedup.protocol.messages import (
    MAX_PEER_LIST,
    GetPeers,
    PeerList,
    Refuse,
    decode_message,
    encode_message,
)
from fedup.protocol.peer_id import PeerId
from fedup.protocol.records import (
    PEER_RECORD_DOMAIN,
    PEER_RECORD_TYPE,
    Address,
    PeerRecord,
    SignedPeerRecord,
)
from fedup.protocol.refusal import RefusalCode
from tests.conftest import make_identities

NET = "lenders"
SCOPE = NetworkScope(NET)
INTERVAL = 30.0
LOGGER = "fedup.discovery.bootstrap"

A, B, C, D, E, F, G = make_identities(7)


def addr(ident: Identity) -> Address:
    """Each test identity listens at its own fixed memory address."""
    return Address(f"10.0.0.{ident.public_key[0] % 200 + 1}", 4100)


def record_of(ident: Identity, *, seq: int = 1, network: str = NET) -> SignedPeerRecord:
    return PeerRecord(ident.peer_id, seq, (addr(ident),), network).seal(ident)


Reply = Callable[[FramedStream], Awaitable[None]]


def answering(
    known: Callable[[], Mapping[PeerId, SignedPeerRecord]], local: SignedPeerRecord | None
) -> Reply:
    async def reply(framed: FramedStream) -> None:
        await answer_peer_list(framed, known(), local, limits=framed.limits)

    return reply


def responder(
    reply: Reply, *, on_connect: Callable[[SecureChannel], None] | None = None
) -> Handler:
    """A connection handler: read one request, check it is GetPeers, ``reply``."""

    async def handler(channel: SecureChannel) -> None:
        if on_connect is not None:
            on_connect(channel)
        limits = DEFAULT_LIMITS
        framed = FramedStream(
            channel,
            peer=channel.remote_peer.text,
            limits=limits,
            max_frame_size=limits.max_message_size,
        )
        request = decode_message(await framed.receive_frame(), limits=limits)
        assert isinstance(request, GetPeers)
        await reply(framed)

    return handler


@asynccontextmanager
async def bootstrap_peer(
    net: MemoryNetwork,
    ident: Identity,
    known: Mapping[PeerId, SignedPeerRecord] | None = None,
    *,
    network: str = NET,
    reply: Reply | None = None,
    send_record: bool = True,
) -> AsyncIterator[SignedPeerRecord]:
    """Run ``ident`` as a bootstrap at ``addr(ident)`` answering with ``known`` (read live)."""
    record = record_of(ident, network=network)
    local = record if send_record else None
    transport = net.transport(Credentials(ident, network, None, local))
    peers = {} if known is None else known
    handler = responder(reply or answering(lambda: peers, local))
    async with transport.listen(addr(ident), handler):
        yield record


def requester(
    net: MemoryNetwork, ident: Identity, bootstraps: list[Identity], **kwargs: Any
) -> AbstractAsyncContextManager[BootstrapDiscovery]:
    """``ident`` polling the bootstraps' addresses every INTERVAL seconds (no quick phase)."""
    transport = net.transport(Credentials(ident, NET, None, record_of(ident)))
    return BootstrapDiscovery.open(
        transport,
        [addr(b) for b in bootstraps],
        scope=SCOPE,
        local_peer=ident.peer_id,
        **{"interval": INTERVAL, "quick_interval": INTERVAL, **kwargs},
    )


def logged(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    """This module's log records that mention ``text``."""
    return [r for r in caplog.records if r.name == LOGGER and text in r.getMessage()]


class Recorder:
    """Collects (seconds since start, kind, peer, cause) of every event of a discovery."""

    def __init__(self, start: float) -> None:
        self.start = start
        self.events: list[tuple[float, str, PeerId, str | None]] = []

    async def run(self, channel: trio.MemoryReceiveChannel[DiscoveryEvent]) -> None:
        async for e in channel:
            cause = None if e.cause is None else str(e.cause)
            self.events.append((trio.current_time() - self.start, str(e.kind), e.peer_id, cause))

    def take(self) -> list[tuple[float, str, PeerId, str | None]]:
        out, self.events = self.events, []
        return out


# --- learning peers --------------------------------------------------------------------


async def test_learns_the_bootstrap_and_the_peers_it_knows(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork()
    known = {p.peer_id: record_of(p) for p in (C, D, A)}  # A is us: never reported back
    async with bootstrap_peer(net, B, known) as b_record, requester(net, A, [B]) as disc:
        start = trio.current_time()
        with trio.fail_after(1):
            await disc.wait_for(lambda peers: len(peers) == 3)
        assert trio.current_time() == start  # the first poll is immediate
        peers = disc.peers()
        assert set(peers) == {B.peer_id, C.peer_id, D.peer_id}
        assert peers[B.peer_id].envelope == b_record.envelope  # the exact bytes, forwarded
        assert peers[C.peer_id].envelope == known[C.peer_id].envelope
        sightings = disc.sightings()
        assert all(s.verified for s in sightings)
        assert {s.source for s in sightings} == {source_name(addr(B), p.peer_id) for p in (B, C, D)}
        assert source_name(addr(B), C.peer_id) == f"via {addr(B)}: {C.peer_id.text}"
        assert disc.rejections == {} and disc.failures == {}


async def test_later_lists_update_and_expire_peers(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork()
    known = {p.peer_id: record_of(p) for p in (C, D)}
    async with bootstrap_peer(net, B, known), requester(net, A, [B]) as disc:
        start = trio.current_time()
        rec = Recorder(start)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rec.run, disc.subscribe())
            await trio.sleep(1)
            assert sorted((t, k, p) for t, k, p, _ in rec.take()) == sorted(
                (0.0, "found", p.peer_id) for p in (B, C, D)
            )
            known[C.peer_id] = record_of(C, seq=2)  # C moved on
            del known[D.peer_id]  # D is no longer known to B
            await trio.sleep(INTERVAL)
            assert rec.take() == [
                (INTERVAL, "lost", D.peer_id, "expired"),
                (INTERVAL, "updated", C.peer_id, None),
            ]
            assert disc.peers()[C.peer_id].record.seq == 2
            await trio.sleep(INTERVAL)  # the same list again: nothing happens
            assert rec.take() == []
            nursery.cancel_scope.cancel()


async def test_forged_entries_are_refused_and_counted_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork()
    good = record_of(D)
    tampered = record_of(C).envelope.replace(NET.encode(), b"lendert")  # signature breaks
    assert tampered != record_of(C).envelope
    # E's record, signed by F: well signed, but it names another peer
    claims_e = PeerRecord(E.peer_id, 1, (addr(E),), NET).to_cbor()
    mismatch = seal_envelope(
        F.sign,
        F.public_key,
        domain=PEER_RECORD_DOMAIN,
        payload_type=PEER_RECORD_TYPE,
        payload=claims_e,
    ).to_cbor()
    other_network = record_of(G, network="hospitals").envelope
    oversized = b"\x00" * (DEFAULT_LIMITS.max_record_size + 1)
    envelopes = (tampered, good.envelope, mismatch, oversized, other_network)

    async def hostile(framed: FramedStream) -> None:
        await framed.send_frame(encode_message(PeerList(envelopes)))

    async with bootstrap_peer(net, B, reply=hostile), requester(net, A, [B]) as disc:
        with trio.fail_after(1):
            await disc.wait_for(lambda peers: len(peers) == 2)
        expected = {
            "bad-record": 1,
            "bad-signature": 1,
            "other-network": 1,
            "peer-id-mismatch": 1,
        }
        assert disc.rejections == expected
        assert set(disc.peers()) == {B.peer_id, D.peer_id}
        assert disc.peers()[D.peer_id] == good
        refused = {s.source: s for s in disc.sightings() if not s.verified}
        assert refused[source_name(addr(B), "entry 0")].reason == "bad-signature"
        assert refused[source_name(addr(B), "entry 2")].reason == "peer-id-mismatch"
        assert refused[source_name(addr(B), G.peer_id)].reason == "other-network"
        await trio.sleep(3 * INTERVAL)  # three more polls with the same list
        assert disc.rejections == expected  # judged once, not once per poll
        assert set(disc.peers()) == {B.peer_id, D.peer_id}


async def test_a_bootstrap_of_another_network_is_refused(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    net = MemoryNetwork()
    async with (
        bootstrap_peer(net, B, {C.peer_id: record_of(C)}, network="hospitals"),
        requester(net, A, [B]) as disc,
    ):
        await trio.sleep(2.5 * INTERVAL)  # polls at 0, 30 and 60 s
        assert disc.peers() == {}
        assert disc.failures == {"handshake-wrong-network": 3}
        assert disc.rejections == {"other-network": 1}
        assert disc.consecutive_failures(addr(B)) == 3
        warnings = logged(caplog, "wrong-network")
        assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING


async def test_a_bootstrap_without_a_record_still_lists_peers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork()
    known = {C.peer_id: record_of(C)}
    async with bootstrap_peer(net, B, known, send_record=False), requester(net, A, [B]) as disc:
        await trio.sleep(2.5 * INTERVAL)
        assert set(disc.peers()) == {C.peer_id}
        assert disc.rejections == {"no-record": 1}  # once, not once per poll
        assert disc.failures == {}


# --- failures, loss and return ---------------------------------------------------------


async def test_dead_bootstrap_is_retried_lost_and_found_again(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    net = MemoryNetwork()
    known = {C.peer_id: record_of(C)}
    async with requester(net, A, [B], failures_before_lost=3) as disc:
        start = trio.current_time()
        rec = Recorder(start)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rec.run, disc.subscribe())
            async with AsyncExitStack() as b_running:
                await b_running.enter_async_context(bootstrap_peer(net, B, known))
                await trio.sleep(1)
                assert {(t, k, p) for t, k, p, _ in rec.take()} == {
                    (0.0, "found", B.peer_id),
                    (0.0, "found", C.peer_id),
                }
            # B is gone: polls at 30 and 60 s fail quietly, the one at 90 s reports loss
            await trio.sleep(2 * INTERVAL)
            assert rec.take() == []
            assert disc.consecutive_failures(addr(B)) == 2
            await trio.sleep(INTERVAL)
            assert sorted(rec.take()) == sorted(
                [
                    (3 * INTERVAL, "lost", B.peer_id, "expired"),
                    (3 * INTERVAL, "lost", C.peer_id, "expired"),
                ]
            )
            assert disc.peers() == {}
            await trio.sleep(INTERVAL)  # still retried (120 s): nothing more to report
            assert rec.take() == [] and disc.consecutive_failures(addr(B)) == 4
            unreachable = logged(caplog, "unreachable")
            assert len(unreachable) == 1  # logged once per (address, reason)

            async with bootstrap_peer(net, B, known):  # back at ~121 s
                await trio.sleep(INTERVAL)
                assert {(t, k, p) for t, k, p, _ in rec.take()} == {
                    (5 * INTERVAL, "found", B.peer_id),
                    (5 * INTERVAL, "found", C.peer_id),
                }
                assert disc.consecutive_failures(addr(B)) == 0
                assert disc.failures == {"unreachable": 4}
                assert len(logged(caplog, "answers again")) == 1
            nursery.cancel_scope.cancel()


async def test_one_dead_bootstrap_does_not_hide_a_peer_another_lists(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork()
    c = record_of(C)
    async with (
        bootstrap_peer(net, D, {C.peer_id: c}),
        requester(net, A, [B, D], failures_before_lost=1) as disc,
    ):
        async with bootstrap_peer(net, B, {C.peer_id: c}):
            await trio.sleep(1)
            assert set(disc.peers()) == {B.peer_id, C.peer_id, D.peer_id}
        await trio.sleep(INTERVAL)  # B fails once: its sources go, C stays (D lists it)
        assert set(disc.peers()) == {C.peer_id, D.peer_id}


async def test_hostile_responders_fail_the_poll_and_never_the_loop(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork()

    async def refuse(framed: FramedStream) -> None:
        await framed.send_frame(encode_message(Refuse(bytes(16), RefusalCode.BUSY, "not now")))

    async def too_long(framed: FramedStream) -> None:
        await framed.send_frame(encode_message(PeerList((b"x",) * (MAX_PEER_LIST + 1))))

    async def silent(framed: FramedStream) -> None:
        await trio.sleep_forever()

    async with (
        bootstrap_peer(net, B, reply=refuse),
        bootstrap_peer(net, C, reply=too_long),
        bootstrap_peer(net, D, reply=silent),
        bootstrap_peer(net, E, {G.peer_id: record_of(G)}),
        requester(net, A, [B, C, D, E]) as disc,
    ):
        await trio.sleep(INTERVAL - 1)
        assert disc.failures == {"bad-reply": 2, "timeout": 1}
        assert set(disc.peers()) == {E.peer_id, G.peer_id}


async def test_the_exchange_has_a_deadline(autojump_clock: trio.testing.MockClock) -> None:
    net = MemoryNetwork()

    async def silent(framed: FramedStream) -> None:
        await trio.sleep_forever()

    async with bootstrap_peer(net, B, reply=silent):
        channel = await net.transport(Credentials(A, NET)).dial(addr(B))
        start = trio.current_time()
        with pytest.raises(PeerTimeoutError, match="within 4 s") as info:
            await request_peer_list(channel, timeout=4.0)
        assert trio.current_time() - start == 4.0
        assert info.value.peer == B.peer_id.text
        await channel.aclose()


# --- ourselves --------------------------------------------------------------------------


async def test_self_is_never_reported(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    net = MemoryNetwork()
    sent: list[int] = []

    async def counting(framed: FramedStream) -> None:
        known = {p.peer_id: record_of(p) for p in (A, C)}
        sent.append(await answer_peer_list(framed, known, record_of(B), limits=framed.limits))

    # A's own address is in its bootstrap list (a shared list), and B knows A
    async with (
        bootstrap_peer(net, A, {}),
        bootstrap_peer(net, B, reply=counting),
        requester(net, A, [A, B]) as disc,
    ):
        await trio.sleep(1)
        assert set(disc.peers()) == {B.peer_id, C.peer_id}
        assert all(s.peer_id != A.peer_id for s in disc.sightings())
        assert sent == [2]  # B left the requester (A) out of its answer: B and C
        assert disc.failures == {"handshake-self-dial": 1}
        self_dial = logged(caplog, "self-dial")
        assert [r.levelno for r in self_dial] == [logging.INFO]

        await disc.announce(record_of(A, seq=2))
        assert disc.local_record == record_of(A, seq=2)
        with pytest.raises(LocalProtocolError):
            await disc.announce(record_of(A, seq=2))  # not newer
        with pytest.raises(LocalProtocolError):
            await disc.announce(record_of(C, seq=9))  # not ours
        await disc.withdraw()
        assert disc.local_record is None
        assert A.peer_id not in disc.peers()


def test_entries_leave_out_self_and_keep_the_newest() -> None:
    b1, b2, a = record_of(B), record_of(B, seq=2), record_of(A)
    entries = bootstrap_entries(
        addr(B), b1, [b1.envelope, a.envelope, b2.envelope, b"junk"], local_peer=A.peer_id
    )
    assert set(entries) == {source_name(addr(B), B.peer_id), source_name(addr(B), "entry 3")}
    assert entries[source_name(addr(B), B.peer_id)].envelope == b2.envelope
    assert entries[source_name(addr(B), "entry 3")].addresses == ()


# --- the responder's bounds ----------------------------------------------------------------


def test_peer_list_is_bounded_in_count_and_size() -> None:
    idents = [Identity(i.to_bytes(2, "big") * 16) for i in range(MAX_PEER_LIST + 20)]
    records = {i.peer_id: record_of(i) for i in idents}
    local = record_of(A)
    full = build_peer_list(records, local)
    assert len(full.records) == MAX_PEER_LIST
    assert full.records[0] == local.envelope  # our own record first, then the mapping's order
    assert full.records[1:] == tuple(
        r.envelope for r in list(records.values())[: MAX_PEER_LIST - 1]
    )
    assert decode_message(encode_message(full)) == full

    small = Limits(max_message_size=4 * 1024)
    cut = build_peer_list(records, local, limits=small)
    assert 0 < len(cut.records) < MAX_PEER_LIST
    assert len(encode_message(cut)) <= small.max_message_size
    assert decode_message(encode_message(cut), limits=small) == cut

    excluded = build_peer_list(records, None, exclude=idents[0].peer_id)
    assert records[idents[0].peer_id].envelope not in excluded.records
    assert build_peer_list({}, None) == PeerList(())


async def test_answer_peer_list_sends_one_bounded_frame() -> None:
    idents = [Identity(i.to_bytes(2, "big") * 16) for i in range(MAX_PEER_LIST + 5)]
    records = {i.peer_id: record_of(i) for i in idents}
    left, right = trio.testing.memory_stream_pair()
    ours = FramedStream(left, peer="requester")
    theirs = FramedStream(right, peer="bootstrap")
    assert await answer_peer_list(ours, records, record_of(A)) == MAX_PEER_LIST
    reply = decode_message(await theirs.receive_frame())
    assert isinstance(reply, PeerList) and len(reply.records) == MAX_PEER_LIST


async def test_bad_settings_are_refused() -> None:
    net = MemoryNetwork()
    for kwargs in ({"interval": 0.0}, {"failures_before_lost": 0}, {"exchange_timeout": -1.0}):
        with pytest.raises(ConfigError):
            async with requester(net, A, [B], **kwargs):
                pass


# --- a bootstrap node that remembers who dialed it ----------------------------------------


async def test_hub_introduces_its_callers_and_forgets_silent_ones(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A1 and A2 (say, two sites) both bootstrap from hub B, which tells each about the other."""
    net = MemoryNetwork()
    b_record = record_of(B)
    b_transport = net.transport(Credentials(B, NET, None, b_record))
    async with BootstrapDiscovery.open(
        b_transport, [], scope=SCOPE, local_peer=B.peer_id, interval=INTERVAL, inbound_ttl=100.0
    ) as hub:

        def remember(channel: SecureChannel) -> None:
            if channel.remote_record is not None:
                hub.observe_inbound(channel.remote_record)

        handler = responder(answering(hub.peers, b_record), on_connect=remember)
        async with b_transport.listen(addr(B), handler), requester(net, C, [B]) as dc:
            start = trio.current_time()
            rec = Recorder(start)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(rec.run, dc.subscribe())
                await trio.sleep(1)
                async with requester(net, D, [B]) as dd:  # polls B at 1 s and 31 s
                    await trio.sleep(1)
                    assert set(dd.peers()) == {B.peer_id, C.peer_id}
                    assert set(hub.peers()) == {C.peer_id, D.peer_id}
                    await trio.sleep(INTERVAL - 1)
                    assert set(dc.peers()) == {B.peer_id, D.peer_id}  # C's poll at 30 s
                    await trio.sleep(45 - 31)
                # D stopped at 45 s; B forgets it at 31 + 100 = 131 s; C's poll at 150 s drops it
                await trio.sleep(151 - 45)
                events = rec.take()
                assert (INTERVAL, "found", D.peer_id, None) in events
                assert events[-1] == (150.0, "lost", D.peer_id, "expired")
                assert set(hub.peers()) == {C.peer_id}
                nursery.cancel_scope.cancel()


# --- over real sockets --------------------------------------------------------------------


async def test_bootstrap_over_loopback_tcp() -> None:
    c_record = record_of(C)  # C's address is not reachable; it is only listed
    b_transport = TcpTransport(Credentials(B, NET))

    async def serve_tcp(framed: FramedStream) -> None:
        local = b_transport.credentials.local_record
        await answer_peer_list(framed, {C.peer_id: c_record}, local, limits=framed.limits)

    async with b_transport.listen(Address("127.0.0.1", 0), responder(serve_tcp)) as listener:
        (bound,) = listener.addresses
        b_record = PeerRecord(B.peer_id, 1, (bound,), NET).seal(B)
        b_transport.credentials = attrs.evolve(b_transport.credentials, local_record=b_record)
        a_transport = TcpTransport(Credentials(A, NET))
        async with BootstrapDiscovery.open(
            a_transport, [bound], scope=SCOPE, local_peer=A.peer_id, interval=0.5
        ) as disc:
            with trio.fail_after(10):
                await disc.wait_for(lambda peers: len(peers) == 2)
            assert disc.peers() == {B.peer_id: b_record, C.peer_id: c_record}
            assert disc.failures == {}


# --------------------------------------------------------------------------
# The quick phase: peers usually start together


async def test_a_peer_arriving_soon_after_the_first_poll_is_heard_of_within_seconds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork()
    known = {C.peer_id: record_of(C)}
    async with bootstrap_peer(net, B, known), requester(net, A, [B], quick_interval=1.0) as disc:
        start = trio.current_time()
        rec = Recorder(start)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rec.run, disc.subscribe())
            await trio.sleep(5)
            assert {(t, k) for t, k, _, _ in rec.take()} == {(0.0, "found")}
            known[D.peer_id] = record_of(D)  # D dials B at 5 s
            # polls at 0 (news), 1, 3 (waits 1, 2, 4 s), then 7 s: D is heard of 2 s later
            await trio.sleep(2.5)
            assert rec.take() == [(7.0, "found", D.peer_id, None)]
            # news again: the next polls come 1, 2, 4, ... s later, capped at INTERVAL
            known[E.peer_id] = record_of(E)  # at 7.5 s
            await trio.sleep(1)
            assert rec.take() == [(8.0, "found", E.peer_id, None)]
            nursery.cancel_scope.cancel()


async def test_an_address_not_up_yet_is_retried_quickly(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = MemoryNetwork()
    async with requester(net, A, [B], quick_interval=1.0) as disc:
        start = trio.current_time()
        rec = Recorder(start)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rec.run, disc.subscribe())
            await trio.sleep(10)  # polls at 0, 1, 3, 7 fail (waits 1, 2, 4, 8 s)
            assert disc.consecutive_failures(addr(B)) == 4
            async with bootstrap_peer(net, B, {}):
                await trio.sleep(6)
                assert rec.take() == [(15.0, "found", B.peer_id, None)]
            nursery.cancel_scope.cancel()


async def test_once_answered_a_failing_address_is_polled_every_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The quick phase must not make a bootstrap that stopped answering lose its peers
    # sooner: they go once 3 polls in a row failed and 3 intervals passed since it answered.
    net = MemoryNetwork()
    async with requester(net, A, [B], quick_interval=1.0, failures_before_lost=3) as disc:
        start = trio.current_time()
        rec = Recorder(start)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rec.run, disc.subscribe())
            async with bootstrap_peer(net, B, {C.peer_id: record_of(C)}):
                await trio.sleep(0.5)
            assert len(rec.take()) == 2  # B and C found at 0 s; B stops at 0.5 s
            await trio.sleep(1 + 2 * INTERVAL)  # fails at 1, 31 and 61 s: only 61 s silent
            assert rec.take() == [] and disc.consecutive_failures(addr(B)) == 3
            await trio.sleep(INTERVAL)  # fails at 91 s: 3 intervals since the answer
            assert sorted(rec.take()) == sorted(
                [
                    (1 + 3 * INTERVAL, "lost", B.peer_id, "expired"),
                    (1 + 3 * INTERVAL, "lost", C.peer_id, "expired"),
                ]
            )
            nursery.cancel_scope.cancel()


async def test_unverifiable_entries_do_not_keep_the_polls_quick(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A bootstrap listing a new forged entry in every answer: only verified new peers
    # count as news, so the polls still slow down to one per INTERVAL.
    net = MemoryNetwork()
    polls: list[float] = []
    forged = record_of(C).envelope.replace(NET.encode(), b"lendert")  # signature breaks

    async def forging(framed: FramedStream) -> None:
        polls.append(trio.current_time())
        # one more forged entry each time: a source ("entry <i>") never seen before
        await framed.send_frame(encode_message(PeerList((forged,) * len(polls))))

    async with bootstrap_peer(net, B, reply=forging), requester(net, A, [B], quick_interval=1.0):
        start = trio.current_time()
        await trio.sleep(3 * INTERVAL)
    assert [t - start for t in polls] == [0, 1, 3, 7, 15, 31, 61]
