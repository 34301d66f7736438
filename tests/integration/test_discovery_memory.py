"""The in-memory discovery backend: same verification and events as mDNS, no network."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from fedup.cli import build_parser
from fedup.commands import peers
from fedup.errors import ConfigError, LocalProtocolError
from fedup.identity import Identity
from fedup.net.discovery import (
    DiscoveryEvent,
    EventKind,
    LostCause,
    MemoryDiscovery,
    MemoryDiscoveryHub,
    NetworkScope,
    choose_interfaces,
    lan_interfaces,
)
from fedup.protocol.announce import encode_txt_rdata
from fedup.protocol.records import Address, PeerRecord, SignedPeerRecord, network_key_id
from tests.conftest import make_identities

SCOPE = NetworkScope("lenders")


def record_of(
    ident: Identity, seq: int = 1, host: str | None = None, network: str = "lenders"
) -> SignedPeerRecord:
    n = ident.public_key[0] % 200 + 1
    addr = Address(host or f"10.0.0.{n}", 4100)
    return PeerRecord(ident.peer_id, seq, (addr,), network).seal(ident)


@asynccontextmanager
async def members(
    hub: MemoryDiscoveryHub, idents: list[Identity], *, announce: bool = True
) -> AsyncIterator[list[MemoryDiscovery]]:
    async with AsyncExitStack() as stack:
        out = []
        for ident in idents:
            d = await stack.enter_async_context(
                MemoryDiscovery.open(hub, scope=SCOPE, local_peer=ident.peer_id)
            )
            if announce:
                await d.announce(record_of(ident))
            out.append(d)
        yield out


def drain(channel: trio.MemoryReceiveChannel[DiscoveryEvent]) -> list[tuple[str, str]]:
    events: list[tuple[str, str]] = []
    while True:
        try:
            e = channel.receive_nowait()
        except trio.WouldBlock:
            return events
        events.append((str(e.kind), e.peer_id.short))


async def test_found_updated_lost() -> None:
    hub = MemoryDiscoveryHub()
    a, b, c = make_identities(3)
    async with members(hub, [a]) as (da,):
        events = da.subscribe()
        async with members(hub, [b, c]) as (db, dc):
            await trio.testing.wait_all_tasks_blocked()
            assert set(da.peers()) == {b.peer_id, c.peer_id}
            assert set(db.peers()) == {a.peer_id, c.peer_id}  # b joined after a: replayed
            assert a.peer_id not in da.peers()  # never ourselves
            assert drain(events) == [("found", b.peer_id.short), ("found", c.peer_id.short)]

            await db.announce(record_of(b, seq=2, host="10.9.9.9"))
            await trio.testing.wait_all_tasks_blocked()
            assert drain(events) == [("updated", b.peer_id.short)]
            assert da.peers()[b.peer_id].record.addresses == (Address("10.9.9.9", 4100),)
            with pytest.raises(LocalProtocolError):
                await db.announce(record_of(b, seq=2))

            await dc.withdraw()
            await trio.testing.wait_all_tasks_blocked()
            assert drain(events) == [("lost", c.peer_id.short)]
            assert set(da.peers()) == {b.peer_id}
        await trio.testing.wait_all_tasks_blocked()
        assert drain(events) == [("lost", b.peer_id.short)]  # b left: goodbye
        assert da.peers() == {}
        assert da.rejections == {}


async def test_expiry_then_return_vs_goodbye_then_replay() -> None:
    hub = MemoryDiscoveryHub()
    a, b = make_identities(2)
    async with members(hub, [a]) as (da,):
        events = da.subscribe()
        signed = record_of(b, seq=3)
        hub.publish("b-host", encode_txt_rdata(signed.envelope), signed.record.addresses)
        hub.remove("b-host", cause=LostCause.EXPIRED)
        await trio.testing.wait_all_tasks_blocked()
        # the same record after an expiry: the peer is back
        hub.publish("b-host", encode_txt_rdata(signed.envelope), signed.record.addresses)
        await trio.testing.wait_all_tasks_blocked()
        kinds = []
        while True:
            try:
                e = events.receive_nowait()
            except trio.WouldBlock:
                break
            kinds.append((e.kind, e.cause))
        assert kinds == [
            (EventKind.FOUND, None),
            (EventKind.LOST, LostCause.EXPIRED),
            (EventKind.FOUND, None),
        ]
        # after a goodbye, a replay of the same record is stale
        hub.remove("b-host")
        hub.publish("replayer", encode_txt_rdata(signed.envelope), signed.record.addresses)
        await trio.testing.wait_all_tasks_blocked()
        assert da.peers() == {}
        assert da.rejections == {"stale-seq": 1}


async def test_forged_announcements_are_refused_and_counted() -> None:
    hub = MemoryDiscoveryHub()
    a, b = make_identities(2)
    async with members(hub, [a, b]) as (da, db):
        await db.announce(record_of(b, seq=5))
        await trio.testing.wait_all_tasks_blocked()
        events = da.subscribe()
        current = db.local_record
        assert current is not None
        # 1. b's current record copied, announced from the attacker's address
        hub.publish("copy", encode_txt_rdata(current.envelope), [Address("10.6.6.6", 4100)])
        # 2. a bad signature
        forged = bytearray(current.envelope)
        forged[-3] ^= 0x40
        hub.publish("badsig", encode_txt_rdata(bytes(forged)), current.record.addresses)
        # 3. b's old record replayed from b's own address
        old = record_of(b, seq=1)
        hub.publish("replay", encode_txt_rdata(old.envelope), old.record.addresses)
        # 4. garbage, and a record of another network
        hub.publish("junk", {"v": "1", "r0": "!!"}, current.record.addresses)
        other = record_of(make_identities(3)[2], network="hospitals")
        hub.publish("other", encode_txt_rdata(other.envelope), other.record.addresses)
        await trio.testing.wait_all_tasks_blocked()

        assert da.rejections == {
            "address-mismatch": 1,
            "bad-signature": 1,
            "bad-txt": 1,
            "other-network": 1,
            "stale-seq": 1,
        }
        assert set(da.peers()) == {b.peer_id}
        assert da.peers()[b.peer_id] == current
        assert drain(events) == []  # refusals are never membership events
        by_source = {s.source: s for s in da.sightings()}
        assert by_source["copy"].reason == "address-mismatch" and not by_source["copy"].verified
        assert by_source["copy"].to_json()["addresses"] == ["10.6.6.6:4100"]
        assert by_source["badsig"].peer_id is None
        assert by_source["replay"].to_json()["seq"] == 1
        verified = [s for s in da.sightings() if s.verified]
        assert [s.peer_id for s in verified] == [b.peer_id]


async def test_delivery_delay_in_virtual_time(autojump_clock: trio.testing.MockClock) -> None:
    hub = MemoryDiscoveryHub(delay=0.25)
    a, b = make_identities(2)
    async with members(hub, [a], announce=False) as (da,):
        start = trio.current_time()
        async with members(hub, [b]):
            with trio.fail_after(5):
                await da.wait_for(lambda peers: b.peer_id in peers)
            assert trio.current_time() - start == pytest.approx(0.25)


async def test_delay_function_orders_per_member(autojump_clock: trio.testing.MockClock) -> None:
    slow = {"fedup-1": 2.0}
    hub = MemoryDiscoveryHub(delay=lambda source, member: slow.get(member, 0.1))
    idents = make_identities(3)
    async with members(hub, idents) as ds:
        start = trio.current_time()
        with trio.fail_after(10):
            await ds[1].wait_for(lambda peers: len(peers) == 2)
        fast = trio.current_time() - start
        with trio.fail_after(10):
            await ds[0].wait_for(lambda peers: len(peers) == 2)
        assert fast == pytest.approx(0.1)
        assert trio.current_time() - start == pytest.approx(2.0)


async def test_slow_subscriber_drops_are_counted() -> None:
    hub = MemoryDiscoveryHub()
    idents = make_identities(6)
    async with members(hub, idents[:1]) as (da,):
        events = da.subscribe(max_buffer=2)
        async with members(hub, idents[1:]):
            await trio.testing.wait_all_tasks_blocked()
            assert len(da.peers()) == 5
            assert da.drops == {"events": 3}
            assert len(drain(events)) == 2


async def test_event_channel_ends_when_closed() -> None:
    hub = MemoryDiscoveryHub()
    (a,) = make_identities(1)
    async with MemoryDiscovery.open(hub, scope=SCOPE) as d:
        events = d.subscribe()
        await d.announce(record_of(a))
        assert list(hub.announcements) == [d.source]
    assert [e async for e in events] == []
    assert hub.announcements == {}  # leaving withdrew the announcement


async def test_deterministic_event_order() -> None:
    async def run() -> list[list[tuple[str, str]]]:
        hub = MemoryDiscoveryHub()
        idents = make_identities(5)
        async with members(hub, idents, announce=False) as ds:
            channels = [d.subscribe() for d in ds]
            for d, ident in zip(ds, idents, strict=True):
                await d.announce(record_of(ident))
            await ds[2].withdraw()
            await trio.testing.wait_all_tasks_blocked()
            return [drain(c) for c in channels]

    assert await run() == await run()


# --- fedup-peer peers: parsing and output (the browsing itself is in tests/lan) -----------


def test_peers_command_parser_and_output(tmp_path: Path) -> None:
    parser = build_parser()  # the peers command as fedup-peer registers it
    args = parser.parse_args(["peers"])
    assert (args.timeout, args.json, args.interface, args.loopback) == (3.0, False, None, False)
    assert args.func is peers.run
    args = parser.parse_args(
        ["peers", "--timeout", "0.5", "--json", "--interface", "eth0", "--interface", "10.0.0.1",
         "--network", "lenders", "--network-key-file", str(tmp_path / "k")]
    )  # fmt: skip
    assert args.interface == ["eth0", "10.0.0.1"] and args.timeout == 0.5
    for bad in (["--timeout", "0"], ["--timeout", "x"], ["--timeout", "99999"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["peers", *bad])

    (tmp_path / "k").write_text("ab" * 32 + "\n")
    (tmp_path / "k").chmod(0o600)  # a key file others can read is refused (test_files.py)
    assert peers.read_network_key(tmp_path / "k") == bytes.fromhex("ab" * 32)
    (tmp_path / "raw").write_bytes(b"\x07" * 32)
    (tmp_path / "raw").chmod(0o600)
    assert peers.read_network_key(tmp_path / "raw") == b"\x07" * 32
    (tmp_path / "bad").write_text("nope")
    (tmp_path / "bad").chmod(0o600)
    with pytest.raises(ConfigError, match="64 hex digits"):
        peers.read_network_key(tmp_path / "bad")
    with pytest.raises(ConfigError, match="cannot read"):
        peers.read_network_key(tmp_path / "missing")
    assert peers._scope(args).key_id == network_key_id(bytes.fromhex("ab" * 32))
    assert peers._scope(parser.parse_args(["peers"])) == NetworkScope(None, None, any_key=True)


async def test_peers_command_formats_sightings() -> None:
    hub = MemoryDiscoveryHub()
    a, b = make_identities(2)
    async with MemoryDiscovery.open(hub, scope=SCOPE) as d:
        good = record_of(b)
        hub.publish("b", encode_txt_rdata(good.envelope), good.record.addresses)
        hub.publish("evil", encode_txt_rdata(good.envelope), [Address("10.6.6.6", 1)])
        mine = record_of(a)
        hub.publish("me", encode_txt_rdata(mine.envelope), mine.record.addresses)
        await trio.testing.wait_all_tasks_blocked()
        sightings = d.sightings()
    rows = json.loads(peers.format_json(sightings, a.peer_id))
    verified = sorted([(a.peer_id.text, True, None, True), (b.peer_id.text, True, None, False)])
    assert [(r["peer_id"], r["verified"], r["reason"], r["self"]) for r in rows] == [
        *verified,
        (b.peer_id.text, False, "address-mismatch", False),
    ]
    table = peers.format_table(sightings, a.peer_id, ["10.0.0.1"], 3.0)
    lines = table.splitlines()
    assert lines[0].split() == ["PEER", "ID", "ADDRESSES", "NETWORK", "STATUS"]
    assert any("(this peer)" in line for line in lines)
    assert any("refused: address-mismatch" in line and "10.6.6.6:1" in line for line in lines)
    assert lines[-1] == "2 verified, 1 refused; browsed 3 s on 10.0.0.1"


def test_interface_choice_without_network() -> None:
    assert choose_interfaces(loopback=True) == ["127.0.0.1"]
    assert choose_interfaces(["127.0.0.1"]) == ["127.0.0.1"]
    assert choose_interfaces(["lo"]) == ["127.0.0.1"]  # by name
    with pytest.raises(ConfigError, match="::1"):
        choose_interfaces(["::1"])
    with pytest.raises(ConfigError, match="IPv6"):
        choose_interfaces(["fe80::1"])
    with pytest.raises(ConfigError, match="no interface named"):
        choose_interfaces(["no-such-if0"])
    with pytest.raises(ConfigError, match="not an address of this host"):
        choose_interfaces(["192.0.2.254"])
    with pytest.raises(ConfigError, match="not both"):
        choose_interfaces(["lo"], loopback=True)
    assert all(ip != "127.0.0.1" for _, ip in lan_interfaces())  # never loopback by default
