"""Strangers on the LAN against a real federation (in memory, virtual clock).

A stranger has no membership and, here, no network key: all it can do is open
connections.  The run must finish with the model it would have had anyway, in at
most twice the virtual time of the same run without the stranger.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from pathlib import Path

import pytest
import trio
import trio.testing

from fedup.identity import Identity
from fedup.net.framed import FramedStream
from fedup.net.transport import Credentials, DialError, MemoryNetwork, upgrade_outbound
from fedup.peer import Peer, RunSummary
from fedup.peer.config import DEFAULT_NETWORK
from fedup.peer.events import Formed, PeerEvent
from fedup.protocol.announce import encode_txt_rdata
from fedup.protocol.draw import DrawProof, Roster, commitment, reveal_of
from fedup.protocol.messages import Call, Message, Offer, Refuse, decode_message, encode_message
from fedup.protocol.peer_id import PeerId
from fedup.protocol.records import Address, PeerRecord, next_seq
from fedup.protocol.refusal import RefusalCode
from fedup.sim.world import MemoryWorld
from tests.integration.test_federation import (
    check_same_model,
    identities,
    run_federation,
    weights_digest,
)
from tests.integration.test_hostile import RUN

FLOODER = "10.66.66.66"
IDLE_CONNECTIONS = 70
"""The issue's flood: 70 idle connections from one host filled every slot of the landed code."""


async def hold_idle_connections(network: MemoryNetwork, address: Address) -> None:
    """Keep one idle connection from FLOODER open to ``address``, reopening it when closed."""
    while True:
        try:
            stream = await network.connect(address, source=FLOODER)
        except DialError:
            await trio.sleep(0.05)
            continue
        try:
            while await stream.receive_some():
                pass  # never answer; wait for the listener to close us
        except trio.BrokenResourceError:
            pass
        await trio.aclose_forcefully(stream)
        await trio.sleep(0.01)


async def authenticate_then_flood(network: MemoryNetwork, address: Address) -> None:
    """On an open network anyone completes a handshake: do so once, then flood."""
    stream = await network.connect(address, source=FLOODER)
    creds = Credentials(Identity(b"\x66" * 32), DEFAULT_NETWORK)
    channel = await upgrade_outbound(stream, peer=str(address), credentials=creds)
    await channel.aclose()
    async with trio.open_nursery() as nursery:
        for _ in range(IDLE_CONNECTIONS):
            nursery.start_soon(hold_idle_connections, network, address)


async def federate(tmp_path: Path, *, flood: str | None) -> tuple[list[RunSummary], float]:
    ids = identities(3)
    world = MemoryWorld()
    start = trio.current_time()
    async with trio.open_nursery() as flooders:

        def opening(peer: Peer) -> None:
            for address in peer.addresses:
                if flood == "authenticated":
                    flooders.start_soon(authenticate_then_flood, world.network, address)
                elif flood == "stranger":
                    for _ in range(IDLE_CONNECTIONS):
                        flooders.start_soon(hold_idle_connections, world.network, address)

        results = await run_federation(tmp_path, ids, world=world, on_open=opening, run=RUN)
        took = trio.current_time() - start
        flooders.cancel_scope.cancel()
    summaries = [results[i.peer_id.text] for i in ids]
    assert all(isinstance(s, RunSummary) and s.ok for s in summaries), summaries
    done = [s for s in summaries if isinstance(s, RunSummary)]
    assert all(s.best_lap >= 0 for s in done)
    check_same_model(done)
    return done, took


@pytest.mark.parametrize("flood", ["stranger", "authenticated"])
async def test_a_connection_flood_from_one_host_does_not_stall_the_run(
    autojump_clock: trio.testing.MockClock,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    flood: str,
) -> None:
    base, base_time = await federate(tmp_path / "base", flood=None)
    with caplog.at_level(logging.INFO, logger="fedup"):
        flooded, took = await federate(tmp_path / "flooded", flood=flood)
    assert took <= 2 * base_time, (took, base_time)
    assert weights_digest(flooded[0]) == weights_digest(base[0])
    assert "(max_handshakes_per_host)" in caplog.text  # the flood was there, and refused


# --- fake candidates ---------------------------------------------------------------------


def fakes_below(honest: list[Identity], n: int) -> list[Identity]:
    """``n`` identities whose peer IDs are lower than every honest one (few tries needed)."""
    lowest = min(i.peer_id for i in honest)
    found: list[Identity] = []
    for k in itertools.count():
        ident = Identity(hashlib.sha256(b"fake-%d" % k).digest())
        if ident.peer_id < lowest:
            found.append(ident)
            if len(found) == n:
                return found
    raise AssertionError("unreachable")


async def formation_times(tmp_path: Path, fakes: list[Identity]) -> tuple[float, list[RunSummary]]:
    """When the last member formed the federation (virtual seconds), and the summaries."""
    ids = identities(3)
    world = MemoryWorld()
    for k, fake in enumerate(fakes):  # signed, with the network's public fingerprint
        record = PeerRecord(
            fake.peer_id, next_seq(), (Address(f"10.99.0.{k + 1}", 4000),), DEFAULT_NETWORK, None
        ).seal(fake)
        world.hub.publish(f"fake-{k}", encode_txt_rdata(record.envelope), record.record.addresses)
    start = trio.current_time()
    formed: dict[PeerId, float] = {}

    def opening(peer: Peer) -> None:
        def note(who: PeerId, at: float, event: PeerEvent) -> None:
            if isinstance(event, Formed):
                formed[who] = at - start

        peer.events.watch(note)

    results = await run_federation(tmp_path, ids, world=world, on_open=opening, run=RUN)
    summaries = [results[i.peer_id.text] for i in ids]
    assert all(isinstance(s, RunSummary) and s.ok for s in summaries), summaries
    assert set(formed) == {i.peer_id for i in ids}
    return max(formed.values()), [s for s in summaries if isinstance(s, RunSummary)]


async def test_fake_candidates_with_the_sniffed_fingerprint_cost_one_settle_interval(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Three signed records with peer IDs below every member's, pointing at nothing (the
    landed code made every member wait 60 s per fake for it to call)."""
    clean, base = await formation_times(tmp_path / "clean", [])
    fakes = fakes_below(identities(3), 3)
    with caplog.at_level(logging.INFO, logger="fedup"):
        took, faked = await formation_times(tmp_path / "faked", fakes)
    settle = 1.0  # tests.integration.test_federation.config
    assert took <= clean + settle + 0.5, (took, clean)
    assert weights_digest(faked[0]) == weights_digest(base[0])
    assert all(s.members == base[0].members for s in faked)  # no fake is a member
    for fake in fakes:
        assert f"candidate {fake.peer_id} failed its probe" in caplog.text


def ground_below(ids: list[Identity]) -> Identity:
    """A key ground until its peer ID sorts below every one of ``ids`` (cheap here: a
    real grinder aims for many leading zero bits, which buys exactly as much)."""
    lowest = min(i.peer_id for i in ids)
    for n in itertools.count():
        ident = Identity(hashlib.sha256(b"grind %d" % n).digest())
        if ident.peer_id < lowest:
            return ident
    raise AssertionError("unreachable")


async def call_with(
    network: MemoryNetwork, address: Address, caller: Identity, call: Call
) -> Message:
    """Dial ``address`` as ``caller`` on the open network, send ``call``, return the reply."""
    stream = await network.connect(address, source="10.77.77.77")
    creds = Credentials(caller, DEFAULT_NETWORK)
    channel = await upgrade_outbound(stream, peer=str(address), credentials=creds)
    framed = FramedStream(channel, peer=str(address))
    await framed.send_frame(encode_message(call))
    reply = decode_message(await framed.receive_frame())
    await trio.aclose_forcefully(channel)
    return reply


async def test_an_id_grinder_does_not_lead_and_sees_no_data_summary(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """The issue's grinder: a key ground for the lowest ID, a real member of the run. It
    coordinates the draw (the lowest does) but the draw chooses the leader: the grinder
    learns commitments and nonces, and every data summary goes to the drawn leader. A
    call that shows a draw of the grinder's own making (it signed the roster and chose
    every nonce in it) is refused, and a plain call gets a commitment, never a summary."""
    honest = identities(3)
    grinder = ground_below(honest)
    ids = [grinder, *honest]
    world = MemoryWorld()
    peers: dict[str, Peer] = {}
    replies: list[Message] = []

    async def attack(address: Address) -> None:
        await trio.sleep(0.5)  # before anyone settled (settle is 1 s)
        run = b"\x01" * 16
        accomplice = Identity(b"\x99" * 32)  # a key of its own, for a draw it rigs
        nonces = hashlib.sha512(b"mine").digest()
        for n in itertools.count():  # grind the accomplice's nonce: the draw is its own
            nonces = hashlib.sha512(b"mine %d" % n).digest()
            commits = ((accomplice.peer_id, commitment(nonces)),)
            signed = Roster(run, 0, grinder.peer_id, commits).seal(grinder)
            proof = DrawProof(signed.envelope, {accomplice.peer_id: reveal_of(nonces, 0)})
            if DrawProof.check(proof.to_cbor())[1] == grinder.peer_id:
                break
        forged = Call(run, proof.to_cbor(), signed.digest)  # a valid proof of its own draw
        replies.append(await call_with(world.network, address, grinder, forged))
        replies.append(await call_with(world.network, address, grinder, Call(run)))

    async with trio.open_nursery() as nursery:

        def opening(peer: Peer) -> None:
            peers[peer.peer_id.text] = peer
            if peer.peer_id == honest[0].peer_id:
                nursery.start_soon(attack, peer.addresses[0])

        results = await run_federation(tmp_path, ids, world=world, on_open=opening, leader=2)
    done = [results[i.peer_id.text] for i in ids]
    assert all(isinstance(s, RunSummary) and s.ok for s in done), done
    summaries = [s for s in done if isinstance(s, RunSummary)]
    check_same_model(summaries)
    assert {s.leader for s in summaries} == {ids[2].peer_id.text} != {grinder.peer_id.text}
    assert peers[grinder.peer_id.text].formation.summaries_from == set()  # none ever came
    assert peers[ids[2].peer_id.text].formation.summaries_from == {
        i.peer_id for i in ids if i is not ids[2]
    }
    forged, plain = replies
    assert isinstance(forged, Refuse) and forged.code is RefusalCode.COMMITTED, forged
    assert "did not reveal for" in forged.reason
    assert isinstance(plain, Offer) and plain.summary is None and plain.commit is not None
