"""Small formations on a loaded host, on the real clock: nobody is left out.

The landed code hung a 3-peer library run in 2 of 10 tries on a loaded machine.
Its cause (reproduced 10 of 10 times in a fresh process): the member that joined
first built its ring state on the trio thread, blocking the event loop for more
than ``close_notify_timeout`` while the leader was closing the next member's
connection; that member saw a truncated close, took it as "the proposal was
given up" and went back to forming, while the leader, counting its
acknowledgement, started the ring with it.  The ring stalled for about 121 s and
the member ended with a FormationError after 900 s.

Now the leader sends an explicit ``commit``; a member that acknowledged and then
lost its leader's connection waits for the run's first blob instead of giving
up; and heavy work runs in worker threads.  Here every peer blocks the whole
event loop for 1.2 s at the moment it joins (what a loaded host or the first
torch import does), on the real clock, several times over.
"""

from __future__ import annotations

import time
from pathlib import Path

import attrs
import trio

from fedup.config import DEFAULT_LIMITS
from fedup.identity import Identity
from fedup.learn.loans import generate_lender
from fedup.peer import Peer, PeerConfig, RunSummary, TabularSource
from fedup.peer.events import FormationStage, PeerEvent
from fedup.protocol.peer_id import PeerId
from fedup.protocol.view import RunSettings
from fedup.sim.world import MemoryWorld

LIMITS = attrs.evolve(DEFAULT_LIMITS, close_notify_timeout=1.0, hop_timeout=30.0)
BLOCK = 1.2
"""Seconds each peer holds the event loop when it joins: more than close_notify_timeout."""


def block_when_joined(peer: PeerId, at: float, event: PeerEvent) -> None:
    if isinstance(event, FormationStage) and event.stage == "joined":
        time.sleep(BLOCK)  # blocks the one trio thread every peer shares, as load would


async def one_federation(tmp_path: Path) -> list[RunSummary]:
    ids = sorted((Identity(bytes([i + 1]) * 32) for i in range(3)), key=lambda i: i.peer_id)
    world = MemoryWorld()
    results: dict[int, RunSummary] = {}

    async def run(i: int) -> None:
        cfg = PeerConfig(
            identity=ids[i],
            out_dir=tmp_path / f"p{i}",
            min_peers=3,
            settle=0.2,
            run=RunSettings(max_laps=2, patience=2),
            limits=LIMITS,
            train_in_thread=True,
        )
        source = TabularSource(generate_lender(200 + i, n_rows=300).table, target="default")
        async with Peer.open(cfg, source, world=world) as peer:
            peer.events.watch(block_when_joined)
            results[i] = await peer.train()

    with trio.fail_after(60):  # real seconds: the landed code took 121 s to skip a member
        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(run, i)
    return [results[i] for i in range(3)]


async def test_formations_on_a_blocked_loop_leave_nobody_out(tmp_path: Path) -> None:
    for attempt in range(3):
        summaries = await one_federation(tmp_path / f"run{attempt}")
        assert all(s.ok and s.dead == [] and len(s.members) == 3 for s in summaries)
        assert len({s.model_sha256 for s in summaries}) == 1
