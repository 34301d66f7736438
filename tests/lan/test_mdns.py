"""Real mDNS between processes, inside network namespaces created by the test.

SAFETY: every process here runs in a namespace from the ``netns`` fixture
(tests/lan/conftest.py); nothing multicasts on the machine's interfaces.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from fedup.identity import Identity
from fedup.protocol.announce import encode_txt_rdata
from fedup.protocol.records import Address, PeerRecord
from tests.conftest import make_identities
from tests.lan.conftest import REPO, Netns, Node

pytestmark = pytest.mark.netns

TTL = 3  # seconds: small record TTLs so that a silent host expires quickly


def seed_of(ident: Identity) -> str:
    return ident.seed.hex()


def start_peer(netns: Netns, ns: str, ident: Identity, options: str) -> Node:
    """Start ``tests/lan/mdns_node.py peer`` in ``ns`` as ``ident`` with ``options``."""
    return netns.start(ns, "peer", "--seed", seed_of(ident), *options.split())


def live_peers(node: Node) -> set[str]:
    """The peers a node considers live, from the events it printed so far."""
    live: set[str] = set()
    for line in node.seen:
        event = line.get("event")
        if event in ("found", "updated"):
            live.add(str(line["peer"]))
        elif event == "lost":
            live.discard(str(line["peer"]))
    return live


def wait_live(node: Node, expected: set[str], timeout: float) -> None:
    node.wait_for(lambda _line: live_peers(node) == expected, timeout)


def test_five_peers_on_loopback_in_one_namespace(netns: Netns) -> None:
    ns = netns.add("lo")  # only 'ip link set lo up': 127.0.0.1 multicast needs nothing else
    idents = make_identities(5)
    nodes = [
        start_peer(netns, ns, ident, f"--port {4101 + i} --host 127.0.0.1 --loopback --ttl {TTL}")
        for i, ident in enumerate(idents)
    ]
    everyone = {i.peer_id.text for i in idents}
    started = time.monotonic()
    for node, ident in zip(nodes, idents, strict=True):
        ready = node.wait_for(lambda line: bool(line.get("ready")), 20)
        assert ready["peer"] == ident.peer_id.text
        assert ready["interfaces"] == ["127.0.0.1"]
    for node, ident in zip(nodes, idents, strict=True):
        wait_live(node, everyone - {ident.peer_id.text}, 10)
    assert time.monotonic() - started < 20
    for node, ident in zip(nodes, idents, strict=True):
        stats = node.stats()
        assert stats["rejections"] == {} and stats["drops"] == {}
        assert set(stats["peers"]) == everyone - {ident.peer_id.text}
        assert all(s["verified"] for s in stats["sightings"])

    # a goodbye is seen at once
    nodes[0].stop()
    gone = idents[0].peer_id.text
    for node in nodes[1:]:
        line = node.wait_for(lambda line: line.get("event") == "lost" and line["peer"] == gone, 5)
        assert line["cause"] == "goodbye"

    # a newer record with a new address is an update, not a new peer
    nodes[1].send("update 127.0.0.1 127.0.0.2")
    moved = idents[1].peer_id.text
    for node in nodes[2:]:
        line = node.wait_for(
            lambda line: line.get("event") == "updated" and line["peer"] == moved, 8
        )
        assert sorted(line["addrs"]) == ["127.0.0.1:4102", "127.0.0.2:4102"]


def test_three_hosts_on_a_bridge_and_a_cut_cable(netns: Netns) -> None:
    hosts = netns.hosts_on_a_bridge(3)
    idents = make_identities(3)
    nodes = []
    for (ns, addr), ident in zip(hosts, idents, strict=True):
        # default interface choice: the host's LAN interface, not loopback
        nodes.append(start_peer(netns, ns, ident, f"--host {addr} --ttl {TTL}"))
    everyone = {i.peer_id.text for i in idents}
    for node, (_, addr) in zip(nodes, hosts, strict=True):
        assert node.wait_for(lambda line: bool(line.get("ready")), 20)["interfaces"] == [addr]
    for node, ident in zip(nodes, idents, strict=True):
        wait_live(node, everyone - {ident.peer_id.text}, 10)
    found = [line for line in nodes[0].seen if line.get("event") == "found"]
    assert sorted(a for line in found for a in line["addrs"]) == [
        "10.77.0.2:4100",
        "10.77.0.3:4100",
    ]

    # live peers keep each other's records fresh: nothing expires over several TTLs
    time.sleep(3 * TTL)
    for node, ident in zip(nodes, idents, strict=True):
        stats = node.stats()
        assert set(stats["peers"]) == everyone - {ident.peer_id.text}
        assert not [line for line in node.seen if line.get("event") == "lost"]

    # host 3's cable is pulled at the switch: no goodbye; its records must expire
    cut_at = time.monotonic()
    netns.cut(3)
    silent = idents[2].peer_id.text
    for node in nodes[:2]:
        line = node.wait_for(
            lambda line: line.get("event") == "lost" and line["peer"] == silent, TTL + 5
        )
        assert line["cause"] == "expired"
    noticed = time.monotonic() - cut_at
    assert noticed < TTL + 5
    for node, ident in zip(nodes[:2], idents[:2], strict=True):
        assert live_peers(node) == everyone - {ident.peer_id.text, silent}

    # plugged back in: found again (the record is unchanged, and that is fine after an expiry)
    subprocess.run(["ip", "-n", netns.hub, "link", "set", "port3", "up"], check=True, timeout=10)
    for node in nodes[:2]:
        node.wait_for(
            lambda line: (
                line.get("event") == "found"
                and line["peer"] == silent
                and float(line["t"]) > cut_at
            ),
            15,
        )


def test_forged_announcements_are_refused_and_counted(netns: Netns) -> None:
    ns = netns.add("lan")
    victim_id, listener_id = make_identities(2)
    victim = start_peer(netns, ns, victim_id, "--port 4101 --host 127.0.0.1 --loopback")
    listener = start_peer(netns, ns, listener_id, "--port 4102 --host 127.0.0.1 --loopback")
    ready = victim.wait_for(lambda line: bool(line.get("ready")), 20)
    wait_live(listener, {victim_id.peer_id.text}, 10)
    current = bytes.fromhex(str(ready["envelope"]))

    bad_sig = bytearray(current)
    bad_sig[-3] ^= 0x40  # inside the signature
    old = PeerRecord(victim_id.peer_id, 1, (Address("127.0.0.1", 4101),), "lenders").seal(victim_id)
    forgeries = {
        # the victim's current record, announced from another address
        "evil-copy": (current, "127.0.0.9", 4101, "address-mismatch"),
        # ... and from the victim's address but another port
        "evil-port": (current, "127.0.0.1", 4999, "address-mismatch"),
        "evil-sig": (bytes(bad_sig), "127.0.0.1", 4101, "bad-signature"),
        "evil-replay": (old.envelope, "127.0.0.1", 4101, "stale-seq"),
    }
    forgers = [
        netns.start(
            ns,
            "forge",
            *f"--name {name} --address {host} --port {port}".split(),
            *("--txt", encode_txt_rdata(envelope).hex()),
        )
        for name, (envelope, host, port, _) in forgeries.items()
    ]
    for forger in forgers:
        forger.wait_for(lambda line: bool(line.get("ready")), 20)

    def refused() -> dict[str, str]:
        stats = listener.stats()
        return {
            s["source"].split(".")[0]: s["reason"] for s in stats["sightings"] if not s["verified"]
        }

    deadline = time.monotonic() + 10
    while refused() != {name: f[3] for name, f in forgeries.items()}:
        assert time.monotonic() < deadline, refused()
        time.sleep(0.3)
    stats = listener.stats()
    rejections = stats["rejections"]
    assert set(rejections) == {"address-mismatch", "bad-signature", "stale-seq"}
    assert rejections["address-mismatch"] >= 2
    assert stats["peers"] == [victim_id.peer_id.text]
    assert not [line for line in listener.seen if line.get("event") in ("updated", "lost")]

    # the passive browser (fedup-peer peers) reports the same, and announces nothing
    proc = subprocess.run(
        [
            *("ip", "netns", "exec", ns, sys.executable, "-m", "fedup.cli", "peers"),
            *"--loopback --timeout 3 --json --network lenders".split(),
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "FEDUP_STATE_DIR": "/nonexistent-fedup"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    verified = sorted(r["peer_id"] for r in rows if r["verified"])
    assert verified == sorted([victim_id.peer_id.text, listener_id.peer_id.text])
    reasons = sorted(r["reason"] for r in rows if not r["verified"])
    assert reasons == ["address-mismatch", "address-mismatch", "bad-signature", "stale-seq"]
    assert {"peer_id", "addresses", "network", "verified", "reason"} <= set(rows[0])
    after = listener.stats()
    assert set(after["peers"]) == {victim_id.peer_id.text}
    sources = sorted(s["source"] for s in stats["sightings"])
    assert sorted(s["source"] for s in after["sightings"]) == sources  # nothing new announced
