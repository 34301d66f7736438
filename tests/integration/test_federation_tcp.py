"""A whole federation over real loopback TCP (no mDNS), three peers in one trio run.

The first peer listens on 127.0.0.1 with port 0; the others learn its address only
after it opened and find it through ``bootstrap``.  The first peer learns of the
others when they dial it (a bootstrap poll authenticates them in the handshake), and
they learn of each other from its answer.  Real clock, small settle and few laps.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import attrs
import pytest
import trio

from fedup.config import DEFAULT_LIMITS
from fedup.identity import Identity
from fedup.learn.loans import generate_lender
from fedup.peer import Peer, PeerConfig, RunSummary, TabularSource
from fedup.protocol.records import Address
from fedup.protocol.view import RunSettings

LIMITS = attrs.evolve(
    DEFAULT_LIMITS,
    hop_timeout=20.0,
    formation_timeout=20.0,
    call_timeout=10.0,
    view_timeout=10.0,
)
RUN = RunSettings(max_laps=3, patience=3)


def identities(n: int) -> list[Identity]:
    return sorted((Identity(bytes([i + 1]) * 32) for i in range(n)), key=lambda i: i.peer_id)


def tcp_config(ident: Identity, out: Path, bootstrap: tuple[Address, ...] = ()) -> PeerConfig:
    return PeerConfig(
        identity=ident,
        out_dir=out,
        mdns=False,
        listen=Address("127.0.0.1", 0),
        bootstrap=bootstrap,
        min_peers=3,
        settle=0.3,
        run=RUN,
        limits=LIMITS,
    )


@pytest.mark.parametrize("first", [0, 2], ids=["lowest-first", "highest-first"])
async def test_three_peers_over_loopback_tcp(tmp_path: Path, first: int) -> None:
    """``first`` (a position in ID order) opens first; the others bootstrap from it."""
    ids = identities(3)
    order = [first, *(i for i in range(3) if i != first)]
    sources = [
        TabularSource(generate_lender(100 + i, n_rows=400).table, target="default")
        for i in range(3)
    ]
    results: dict[int, RunSummary] = {}
    started = time.perf_counter()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            first_open = trio.Event()
            first_address: list[Address] = []

            async def run(i: int) -> None:
                boot = () if i == first else (first_address[0],)
                cfg = tcp_config(ids[i], tmp_path / f"p{i}", boot)
                async with Peer.open(cfg, sources[i]) as peer:
                    if i == first:
                        assert all(a.host == "127.0.0.1" and a.port > 0 for a in peer.addresses)
                        first_address.append(peer.addresses[0])
                        first_open.set()
                    results[i] = await peer.train()

            nursery.start_soon(run, order[0])
            await first_open.wait()
            nursery.start_soon(run, order[1])
            nursery.start_soon(run, order[2])
    elapsed = time.perf_counter() - started
    summaries = [results[i] for i in range(3)]
    digests = {s.model_sha256 for s in summaries}
    assert len(digests) == 1
    for s in summaries:
        data = (Path(s.out_dir) / "model.safetensors").read_bytes()
        assert hashlib.sha256(data).hexdigest() == s.model_sha256
        on_disk = json.loads((Path(s.out_dir) / "summary.json").read_text())
        assert on_disk["leader"] == summaries[0].leader  # the one the draw chose
        assert on_disk["members"] == [i.peer_id.text for i in ids]
        assert on_disk["dead"] == [] and on_disk["laps"] == RUN.max_laps
    # Peers that train in threads log a hop once its blob was handed over: every hop
    # trained still has its line, once, written before the run ended.
    hops = [
        (line["lap"], line["hop"])
        for s in summaries
        for line in map(json.loads, (Path(s.out_dir) / "metrics.jsonl").read_text().splitlines())
        if line["type"] == "hop"
    ]
    assert len(hops) == len(set(hops))
    # The trained laps, the evaluation-only lap, and the first member's hop that ends it.
    laps = RUN.max_laps + 1
    assert set(hops) == {(lap, hop) for lap in range(laps) for hop in range(3)} | {(laps, 0)}
    assert len({s.run_id for s in summaries}) == 1
    print(f"3 peers over loopback TCP: {elapsed:.2f} s from start to finish")
