"""Crash, restart, rejoin: peers killed and started again resume their run (simulator).

Each test runs real peers in one process on trio's virtual clock
(:mod:`fedup.sim`); a killed peer's task is cancelled, as a crash, and with
``restart_after`` it is started again with the same identity and state
directory, from its run-state file.  docs/reliability.md lists what the rules
promise for each case; these tests check exactly that.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import trio
import trio.testing

from fedup.protocol.view import RunSettings
from fedup.sim import Faults, Kill, Link, SimResult, SimSettings, run_simulation
from tests.integration.test_sim import lenders, ring_order

RUN = RunSettings(max_laps=8, patience=8)
SLOW_LINKS = Link(latency=0.5)
"""Training takes no virtual time: links of 0.5 s make a hop last about 1.5 s, so a
peer restarted 5 s after a crash finds its run still going (about 48 s in all)."""


async def simulate(tmp_path: Path, *kills: Kill, n: int = 4, **kw: Any) -> SimResult:
    settings = SimSettings(run=RUN, faults=Faults(link=SLOW_LINKS, kills=kills), **kw)
    with trio.fail_after(20_000):  # virtual seconds: a hung peer fails the test
        return await run_simulation(lenders(n), tmp_path, settings)


def hops_of(result: SimResult, index: int) -> list[dict[str, Any]]:
    """The hop lines of a peer's metrics.jsonl, in order."""
    path = result.peers[index].out_dir / "metrics.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [line for line in lines if line["type"] == "hop"]


def all_alike(result: SimResult) -> str:
    """Every peer finished, ok, with one model file (byte-identical); returns its SHA-256."""
    assert [p.error for p in result.peers] == [None] * len(result.peers)
    digest = result.model_sha256
    assert digest is not None
    for p in result.peers:
        assert p.summary is not None and p.summary.ok, p.summary
        assert p.summary.model_sha256 == digest
        model = Path(p.summary.out_dir) / "model.safetensors"
        assert hashlib.sha256(model.read_bytes()).hexdigest() == digest
        assert not (p.out_dir / "state" / "run-state.cbor").exists()  # the run ended here
    return digest


async def test_a_member_killed_while_waiting_and_restarted_is_taken_back(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """Position 2 dies right after position 1 trained lap 1 (it waits for the model) and
    comes back 5 s later: its predecessor found it unreachable and declared it dead; it
    asks to return, its predecessor takes it back at its next hand-over, and it trains
    again.  Everyone ends with one model; nobody is left dead."""
    victim = ring_order(4)[2]
    result = await simulate(tmp_path, Kill(victim, lap=1, hop=1, restart_after=5.0))
    all_alike(result)
    assert result.peers[victim].restarts == 1
    laps = [h["lap"] for h in hops_of(result, victim)]
    assert laps[:2] == [0, 1] or laps[:1] == [0]
    assert max(laps) >= 3, laps  # it trained again, laps after its restart
    for p in result.peers:
        assert p.summary is not None and p.summary.dead == []  # taken back: nobody dead


async def test_a_member_killed_after_its_hop_hands_on_the_model_it_saved(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """Position 2 dies right after training lap 1, before handing it on, and comes back
    5 s later (well within hop_timeout): it hands on the trained state it saved, and
    nobody is declared dead.  No work lost."""
    victim = ring_order(4)[2]
    result = await simulate(tmp_path, Kill(victim, lap=1, hop=2, restart_after=5.0))
    all_alike(result)
    hops = [(h["lap"], h["hop"]) for h in hops_of(result, victim)]
    assert hops == [(lap, 2) for lap in range(RUN.max_laps + 1)], hops  # each once
    for p in result.peers:
        assert p.summary is not None and p.summary.dead == []


async def test_a_member_killed_while_training_trains_that_hop_again(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """Position 2 dies while training lap 1 and comes back 5 s later: it trains lap 1
    again from the state it saved when it took it, hands it on, and nobody is declared
    dead.  One hop of work lost."""
    victim = ring_order(4)[2]
    result = await simulate(tmp_path, Kill(victim, lap=1, hop=2, restart_after=5.0, training=True))
    all_alike(result)
    hops = [(h["lap"], h["hop"]) for h in hops_of(result, victim)]
    assert hops == [(lap, 2) for lap in range(RUN.max_laps + 1)], hops  # lap 1 logged once
    for p in result.peers:
        assert p.summary is not None and p.summary.dead == []
    assert result.peers[victim].restarts == 1
    assert result.peers[victim].hops == RUN.max_laps  # training hops ended: lap 1 once


async def test_the_same_crash_and_restart_gives_the_same_model(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    victim = ring_order(4)[2]
    kill = Kill(victim, lap=1, hop=1, restart_after=5.0)
    first = await simulate(tmp_path / "a", kill)
    again = await simulate(tmp_path / "b", kill)
    assert first.weights_sha256 is not None and first.weights_sha256 == again.weights_sha256
