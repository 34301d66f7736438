"""The simulator: real peers in one process, faults, reproducibility, the CLI and its report.

The simulations run under pytest-trio's ``autojump_clock`` (virtual time: settle
periods, link delays and timeouts cost no real time) with small synthetic lenders.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import itertools
import json
import logging
import math
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from fedup.cli import _common as cli_common
from fedup.commands import simulate as simulate_command
from fedup.commands.verify import verify_model
from fedup.config import DEFAULT_LIMITS
from fedup.learn.loans import generate_lender, lender_seed
from fedup.peer import TabularSource
from fedup.peer import events as ev
from fedup.protocol.peer_id import PeerId
from fedup.protocol.view import RunSettings
from fedup.sim import (
    Drop,
    Faults,
    Kill,
    Link,
    SimResult,
    SimSettings,
    Slow,
    run_simulation,
    sim_identity,
)
from fedup.sim import simulate as run_simulate
from fedup.sim.network import LinkStream, _Connection, _Pipe
from fedup.sim.runner import GC_FIRST_THRESHOLD
from fedup.sim.wallclock import LinkModel, critical_path

RUN = RunSettings(max_laps=4, patience=4)
HOP_LATENCIES = 3
"""One-way trips a hop waits for: the blob header, its ACCEPT, the chunks and END (the ACK
travels back while the receiver trains).  One connection per neighbour: no dial and no
handshake per hop (the landed code waited five)."""
"""One-way latencies on the critical path of a hop: the handshake's three messages
(the third carries the blob request and header), the receiver's accept, the data."""


def lenders(n: int, rows: int = 300) -> list[TabularSource]:
    return [
        TabularSource(generate_lender(lender_seed(0, i), rows).table, target="default")
        for i in range(n)
    ]


def ring_order(n: int, seed: int = 0) -> list[int]:
    """Simulation indices in ring order (ascending peer ID)."""
    ids = [sim_identity(seed, i).peer_id for i in range(n)]
    return sorted(range(n), key=lambda i: ids[i])


async def simulate(tmp_path: Path, n: int = 4, **kw: Any) -> SimResult:
    settings = SimSettings(run=RUN, **kw)
    with trio.fail_after(10_000):  # virtual seconds: a hung peer fails the test
        return await run_simulation(lenders(n), tmp_path, settings)


def lap_times(result: SimResult) -> list[float]:
    return [b.clock - a.clock for a, b in itertools.pairwise(result.laps)]


# --- a whole run ---------------------------------------------------------------------


async def test_every_peer_ends_with_the_same_model(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    result = await simulate(tmp_path, n=5)
    assert [p.error for p in result.peers] == [None] * 5
    summaries = [p.summary for p in result.peers if p.summary is not None]
    assert len(summaries) == 5
    digest = result.model_sha256
    assert digest is not None and {s.model_sha256 for s in summaries} == {digest}
    for s in summaries:
        assert hashlib.sha256((Path(s.out_dir) / "model.safetensors").read_bytes()).hexdigest() == (
            digest
        )
        assert s.members == sorted(p.peer_id for p in result.peers)
        assert s.dead == [] and s.laps == RUN.max_laps and s.stop_reason == "max-laps"
    assert len({tuple(s.federated_val_loss) for s in summaries}) == 1
    assert [m.lap for m in result.laps] == list(range(RUN.max_laps))
    assert all(p.hops == RUN.max_laps for p in result.peers)
    assert all(p.bytes_sent > 100_000 and p.bytes_received > 100_000 for p in result.peers)
    assert result.weights_sha256 is not None and result.schema is not None


async def test_the_same_seed_gives_the_same_model(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    first = await simulate(tmp_path / "a", seed=7)
    again = await simulate(tmp_path / "b", seed=7)
    other = await simulate(tmp_path / "c", seed=8)
    assert first.weights_sha256 is not None
    assert again.weights_sha256 == first.weights_sha256
    assert again.model_sha256 is not None and again.model_sha256 == first.model_sha256
    assert other.weights_sha256 != first.weights_sha256
    losses = [
        [p.summary.federated_val_loss for p in r.peers if p.summary is not None]
        for r in (first, again)
    ]
    assert losses[0] == losses[1]
    assert [p.peer_id for p in first.peers] == [p.peer_id for p in again.peers]
    # The file also names the run ID, which the leader draws at random.
    assert first.model_sha256 is not None and again.model_sha256 is not None


# --- faults ----------------------------------------------------------------------------


async def test_a_killed_peer_is_skipped_and_listed_dead(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """The member at ring position 2 dies right after training lap 1, holding the model."""
    victim = ring_order(4)[2]
    result = await simulate(tmp_path, faults=Faults(kills=(Kill(victim, lap=1, hop=2),)))
    dead = result.peers[victim]
    assert dead.summary is None and dead.error == "killed"
    assert dead.hops == 2  # lap 0 and lap 1, never handed on
    survivors = [p for p in result.peers if p.index != victim]
    assert all(p.summary is not None for p in survivors), [p.error for p in survivors]
    assert result.model_sha256 is not None
    for p in survivors:
        assert p.summary is not None
        assert p.summary.dead == [dead.peer_id]
        assert p.summary.laps == RUN.max_laps
    assert not (dead.out_dir / "summary.json").exists()


async def test_latency_costs_the_expected_virtual_time_and_changes_nothing_else(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    latency = 0.02
    plain = await simulate(tmp_path / "plain")
    slow_links = await simulate(tmp_path / "slow", faults=Faults(link=Link(latency=latency)))
    assert lap_times(plain) == [0.0] * (RUN.max_laps - 1)  # training takes no virtual time
    expected = 4 * HOP_LATENCIES * latency
    first, *later = lap_times(slow_links)
    assert first > expected  # the first lap dials each neighbour once (the handshakes)
    assert later == pytest.approx([expected] * (RUN.max_laps - 2))
    assert slow_links.clock_seconds > plain.clock_seconds + RUN.max_laps * expected
    assert slow_links.weights_sha256 == plain.weights_sha256


@pytest.mark.parametrize("link", [Link(latency=0.02), Link(latency=0.01, bandwidth=2e6)])
async def test_the_modelled_critical_path_is_the_virtual_clock_when_computing_is_free(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, link: Link
) -> None:
    """Training takes no virtual time: with every hop's computing set to zero, the modelled
    critical path is the virtual time at which the last member saved the final model
    (exactly on latency alone; with bandwidth the model leaves out the frames around the
    blob, about 1 kB a hand-over, so it is a little short)."""
    start = trio.current_time()
    saved: list[float] = []

    def watch(index: int, peer: PeerId, at: float, event: ev.PeerEvent) -> None:
        if isinstance(event, ev.Finished):
            saved.append(at - start)

    settings = SimSettings(run=RUN, faults=Faults(link=link))
    with trio.fail_after(10_000):
        result = await run_simulation(lenders(4), tmp_path, settings, watch=watch)
    assert len(saved) == 4
    timeline = result.timeline
    free = attrs.evolve(timeline, hops=tuple(attrs.evolve(h, compute=0.0) for h in timeline.hops))
    path = critical_path(free, LinkModel(link=link))
    assert path.formation == result.formed
    assert path.hops == 4 * (RUN.max_laps + 1) + 1  # the laps, the evaluation lap, the end
    if math.isinf(link.bandwidth):
        assert path.total == pytest.approx(max(saved))
    else:
        assert 0.98 * max(saved) < path.total < max(saved)
    measured = critical_path(timeline, LinkModel(link=link))
    assert measured.compute == pytest.approx(sum(h.compute for h in timeline.hops))
    assert measured.compute > 0 and measured.total == pytest.approx(path.total + measured.compute)


async def test_a_slow_peer_delays_every_lap_by_its_delay(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    plain = await simulate(tmp_path / "plain")
    slowed = await simulate(tmp_path / "slowed", faults=Faults(slow=(Slow(1, 2.5),)))
    assert lap_times(slowed) == pytest.approx([2.5] * (RUN.max_laps - 1))
    assert slowed.weights_sha256 == plain.weights_sha256


async def test_a_dropped_transfer_is_retried_and_nobody_is_skipped(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """The connection carrying the model from position 1 to 2 in lap 0 is cut mid-blob;
    the sender tries once more, so the receiver is not declared dead."""
    order = ring_order(4)
    src, dst = order[1], order[2]
    result = await simulate(tmp_path, faults=Faults(drops=(Drop(src, dst, lap=0, hop=1),)))
    assert [(s, d) for s, d, _ in result.dropped] == [(src, dst)]
    assert all(p.summary is not None for p in result.peers), [p.error for p in result.peers]
    assert all(p.summary is not None and p.summary.dead == [] for p in result.peers)
    assert result.model_sha256 is not None


def check_excluded(result: SimResult, victim: int, why: str) -> None:
    """``victim`` was counted as dead by the others while alive, trained no more, and
    still ended with the federation's model."""
    assert [p.error for p in result.peers] == [None] * len(result.peers)
    excluded = result.peers[victim].summary
    assert excluded is not None and excluded.excluded is not None
    assert why in excluded.excluded  # it learnt who declared it dead, and why
    assert excluded.dead == [result.peers[victim].peer_id]  # the same list as everyone's
    digest = result.model_sha256
    assert digest is not None and excluded.model_sha256 == digest
    model = Path(excluded.out_dir) / "model.safetensors"
    assert hashlib.sha256(model.read_bytes()).hexdigest() == digest
    heads = set()
    for p in result.peers:
        if p.index != victim:
            assert p.summary is not None and p.summary.excluded is None
            assert p.summary.dead == [result.peers[victim].peer_id]
            assert p.summary.model_sha256 == digest and p.summary.laps == RUN.max_laps
        # every member's provenance verifies, the excluded one's too (its own last hop
        # is not in the run's chain: it checked the final model's chain whole)
        assert p.summary is not None
        _, verified = verify_model(Path(p.summary.out_dir))
        assert [n.dead.text for n in verified.dead.notices] == [result.peers[victim].peer_id]
        heads.add(verified.chain.head)
    assert len(heads) == 1


async def test_a_member_slower_than_the_hop_timeout_is_excluded_but_gets_the_model(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """Position 2 takes longer than ``hop_timeout`` to hand its first model on: its
    predecessor hands its own copy on after ``hop_timeout``, with a dead notice naming
    it.  It trains no more, and the final model (whose dead chain tells it why) reaches
    it from the member that ended the run, before its slow hop is even over."""
    victim = ring_order(4)[2]
    delay = DEFAULT_LIMITS.hop_timeout + 100
    result = await simulate(tmp_path, faults=Faults(slow=(Slow(victim, delay),)))
    check_excluded(result, victim, "dead (timed-out)")
    assert result.peers[victim].hops == 1
    assert DEFAULT_LIMITS.hop_timeout <= result.clock_seconds < delay  # nobody waited for it


async def test_a_member_whose_hand_overs_break_twice_is_tried_again_not_declared_dead(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """Both first attempts to hand position 2 its first model break half-way: a broken
    connection is not a dead member, so the sender dials again and the third attempt
    goes through.  Nobody is counted as dead (the landed code excluded it)."""
    order = ring_order(4)
    src, victim = order[1], order[2]
    twice = (Drop(src, victim, lap=0, hop=1),) * 2
    result = await simulate(tmp_path, faults=Faults(drops=twice))
    assert [(s, d) for s, d, _ in result.dropped] == [(src, victim)] * 2
    assert all(p.summary is not None and p.summary.dead == [] for p in result.peers)
    assert result.peers[victim].hops == RUN.max_laps
    assert result.model_sha256 is not None


# --- the network ----------------------------------------------------------------------


def _pair(link: Link, cut_after: int | None = None) -> tuple[LinkStream, LinkStream]:
    conn = _Connection(cut_after, lambda: None)
    there, back = _Pipe(link), _Pipe(link)
    conn.pipes = [there, back]
    return LinkStream(conn, there, back), LinkStream(conn, back, there)


async def test_link_streams_behave_as_trio_streams(autojump_clock: trio.testing.MockClock) -> None:
    async def plain() -> tuple[LinkStream, LinkStream]:
        return _pair(Link())

    async def shaped() -> tuple[LinkStream, LinkStream]:
        return _pair(Link(latency=0.01, bandwidth=1e6))

    await trio.testing.check_two_way_stream(plain, None)
    await trio.testing.check_two_way_stream(shaped, None)


async def test_a_link_delays_and_paces_and_a_drop_breaks_both_ends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a, b = _pair(Link(latency=0.5, bandwidth=1000.0))
    start = trio.current_time()
    await a.send_all(b"x" * 2000)  # the sender is held while its bytes are serialised
    assert trio.current_time() - start == pytest.approx(2.0)
    assert await b.receive_some() == b"x" * 2000
    assert trio.current_time() - start == pytest.approx(2.5)  # + latency

    a, b = _pair(Link(latency=1.0))
    await a.send_all(b"hello")
    with trio.move_on_after(0.5):  # a receive cancelled while the bytes are in flight
        await b.receive_some()
    assert await b.receive_some() == b"hello"  # loses nothing

    a, b = _pair(Link(), cut_after=10)
    with pytest.raises(trio.BrokenResourceError):
        await a.send_all(b"y" * 20)
    with pytest.raises(trio.BrokenResourceError):
        await b.receive_some()
    with pytest.raises(trio.BrokenResourceError):
        await b.send_all(b"z")


# --- the command line and its report -----------------------------------------------------


def run_cli(argv: list[str]) -> int:
    """``fedup-peer simulate`` as ``fedup.cli`` registers it."""
    parser = argparse.ArgumentParser(prog="fedup-peer")
    sub = parser.add_subparsers(dest="command", required=True)
    simulate_command.add_parser(sub, common=cli_common)
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


METRICS = {"val_loss", "roc_auc", "accuracy", "epochs", "wall_seconds", "bytes_sent"}


def test_cli_writes_a_report_with_baselines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sim"
    argv = ["simulate", "--peers", "3", "--rows", "300", "--max-laps", "3", "--patience", "3"]
    code = run_cli([*argv, "--baselines", "--json", "--out", str(out)])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    report = json.loads((out / "report.json").read_text())
    assert printed == report
    assert report["peers"] == 3 and report["partition"] == "lender"
    assert report["simulation"]["finished"] == 3
    assert report["simulation"]["model_sha256"] and report["simulation"]["weights_sha256"]
    for name in ("federated", "centralized", "fedavg", "hybrid", "local_only"):
        entry = report[name]
        assert {"val_loss", "roc_auc", "accuracy", "n"} <= set(entry["union"])
        assert METRICS <= set(entry["mean"])
        assert len(entry["per_peer"]) == 3
        for peer in entry["per_peer"]:
            assert METRICS | {"n"} <= set(peer)
            assert 0 < peer["val_loss"] < 5 and 0 <= peer["accuracy"] <= 1
            assert peer["epochs"] >= 0 and peer["wall_seconds"] >= 0
    # Every model is scored on the same held-out rows.
    n_val = [d["val_rows"] for d in report["data"]]
    for name in ("federated", "centralized", "fedavg", "hybrid"):
        assert report[name]["union"]["n"] == sum(n_val)
        assert [p["n"] for p in report[name]["per_peer"]] == n_val
    assert all(p["bytes_sent"] > 100_000 for p in report["federated"]["per_peer"])
    assert all(p["bytes_sent"] > 0 for p in report["centralized"]["per_peer"])
    assert all(p["bytes_sent"] == 0 for p in report["local_only"]["per_peer"])
    assert all("union" in p for p in report["local_only"]["per_peer"])
    check_time_to_quality(report, [json.loads((p / "summary.json").read_text())
                                   for p in sorted((out / "peers").iterdir())])  # fmt: skip
    peers = sorted((out / "peers").iterdir())
    assert len(peers) == 3 and all((p / "summary.json").exists() for p in peers)


def check_time_to_quality(report: dict[str, Any], summaries: list[dict[str, Any]]) -> None:
    """Each model's cost in the report agrees with the rest of the report."""
    cost = report["time_to_quality"]
    central_loss = report["centralized"]["union"]["val_loss"]
    assert cost["centralized_val_loss"] == central_loss
    assert cost["target_val_loss"] == pytest.approx(1.01 * central_loss)
    path = cost["critical_path"]
    parts = ("formation_seconds", "compute_seconds", "transfer_seconds", "final_seconds")
    assert all(path[k] >= 0 for k in parts) and path["compute_seconds"] > 0
    models = cost["models"]
    assert set(models) == {"federated", "centralized", "fedavg", "hybrid", "local_only"}
    fed, cen, loc = models["federated"], models["centralized"], models["local_only"]
    assert fed["modelled_wall_seconds"] == pytest.approx(sum(path[k] for k in parts))
    assert fed["real_wall_seconds"] == report["simulation"]["wall_seconds"]
    assert fed["data_passes"] == report["federated"]["mean"]["epochs"]
    assert fed["bytes_sent_per_peer"] == report["federated"]["mean"]["bytes_sent"]
    # The federation's first lap within the target, at the modelled time that lap ended.
    summary = summaries[0]
    losses = dict(zip(summary["federated_laps"], summary["federated_val_loss"], strict=True))
    within = [lap for lap, loss in sorted(losses.items()) if loss <= cost["target_val_loss"]]
    assert fed["target_lap"] == (within[0] if within else None)
    if within:
        assert fed["modelled_seconds_to_target"] == path["lap_end_seconds"][str(within[0])]
        assert fed["modelled_seconds_to_target"] <= fed["modelled_wall_seconds"]
    # Centralized comes within 1% of its own final loss, on its own clock: one machine.
    assert cen["modelled_wall_seconds"] == cen["real_wall_seconds"] > 0
    assert cen["target_lap"] is not None
    assert 0 <= cen["modelled_seconds_to_target"] <= cen["modelled_wall_seconds"]
    assert cen["bytes_sent_per_peer"] == report["centralized"]["mean"]["bytes_sent"]
    # FedAvg: every round's slowest member plus its all-reduce; the model's bytes per round.
    par, clock = models["fedavg"], cost["fedavg_clock"]
    assert par["modelled_wall_seconds"] == pytest.approx(
        clock["compute_seconds"] + clock["allreduce_seconds"]
    )
    assert 0 < clock["compute_seconds"] <= par["real_wall_seconds"]
    assert par["data_passes"] == report["fedavg"]["mean"]["epochs"]
    peers = report["peers"]
    per_round = 2 * (peers - 1) / peers * clock["model_bytes"]
    assert (clock["rounds"] - 1) * per_round < par["bytes_sent_per_peer"]
    assert par["bytes_sent_per_peer"] < clock["rounds"] * per_round * 1.01
    if par["target_lap"] is not None:
        ends = clock["round_end_seconds"]
        assert par["modelled_seconds_to_target"] == ends[str(par["target_lap"])]
    # Hybrid: every round's slowest sub-ring chain and its all-reduce; more bytes than
    # FedAvg's all-reduces alone (the relay carries the model and Adam's state).
    hyb, hclock = models["hybrid"], cost["hybrid_clock"]
    assert hyb["modelled_wall_seconds"] == pytest.approx(
        hclock["compute_seconds"] + hclock["allreduce_seconds"]
    )
    assert 0 < hclock["compute_seconds"] <= hyb["real_wall_seconds"]
    assert hyb["bytes_sent_per_peer"] > (hclock["rounds"] - 1) * per_round
    if hyb["target_lap"] is not None:
        assert (
            hyb["modelled_seconds_to_target"] == hclock["round_end_seconds"][str(hyb["target_lap"])]
        )
    # Local-only: every peer on its own machine at once; no single model to time.
    assert 0 < loc["modelled_wall_seconds"] <= loc["real_wall_seconds"]
    assert loc["bytes_sent_per_peer"] == 0 and loc["target_lap"] is None


def test_cli_rejects_a_bad_fault_and_a_bad_partition(tmp_path: Path) -> None:
    from fedup.errors import FedupError

    with pytest.raises(FedupError, match="not one of the 2 simulated peers"):
        run_cli(
            ["simulate", "--peers", "2", "--rows", "200", "--kill", "5:0:0", "--out", str(tmp_path)]
        )
    with pytest.raises(FedupError, match="unknown partition"):
        run_cli(["simulate", "--peers", "2", "--partition", "bogus", "--out", str(tmp_path)])


# --- honest endings and one connection per neighbour ------------------------------------


async def test_a_run_whose_only_other_member_dies_at_once_does_not_end_ok(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """The second of two members dies as soon as the first hop is trained: the leader
    can reach nobody, finishes alone with the untrained model, and its summary says so
    (``ok`` false, ``members-lost``, ended by itself); ``start`` would exit 3."""
    from fedup.commands.start import EXIT_NOT_OK, exit_code

    order = ring_order(2)
    leader, other = order
    result = await simulate(tmp_path, n=2, faults=Faults(kills=(Kill(other, lap=0, hop=0),)))
    summary = result.peers[leader].summary
    assert summary is not None
    assert summary.stop_reason == "members-lost" and not summary.ok
    assert summary.best_lap < 0 and summary.ended_by == summary.peer_id
    assert exit_code(summary) == EXIT_NOT_OK
    # what it saved is sealed by itself, after the hop it trained
    _, verified = verify_model(Path(summary.out_dir))
    assert verified.seal.origin.text == summary.peer_id
    assert [s.signer.text for s in verified.chain.statements()] == [summary.peer_id]


async def test_each_member_dials_its_successor_once_for_the_whole_run(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """One connection per neighbour: every blob and every ``passed`` of the run travel
    over one link per ring neighbour (the landed code dialled and shook hands for each
    blob and each ``passed``).  Besides the links, the coordinator (the lowest) dialled
    each member once for the draw, and the drawn leader each member once for its call."""
    n = 4
    result = await simulate(tmp_path, n=n)
    assert result.model_sha256 is not None
    order = ring_order(n)
    summary = result.peers[0].summary
    assert summary is not None
    [leader] = [i for i in range(n) if sim_identity(0, i).peer_id.text == summary.leader]
    links = {(order[k], order[(k + 1) % n]) for k in range(n)}
    draw = {(order[0], member) for member in order[1:]}
    calls = {(leader, member) for member in order if member != leader}
    expected = {
        pair: int(pair in links) + int(pair in draw) + int(pair in calls)
        for pair in links | draw | calls
    }
    assert dict(result.connections) == expected


def test_the_simulator_tunes_the_collector_only_while_it_runs(tmp_path: Path) -> None:
    seen: list[tuple[int, int, int]] = []
    before = gc.get_threshold()
    sources = lenders(2)

    class Watching(TabularSource):
        def summary(self) -> dict[str, object]:
            seen.append(gc.get_threshold())
            return super().summary()

    watched = [Watching(s.table, target=s.target) for s in sources]
    result = run_simulate(watched, tmp_path, SimSettings(run=RunSettings(max_laps=1, patience=1)))
    assert len(result.finished_peers) == 2
    assert seen and all(t[0] == max(before[0], GC_FIRST_THRESHOLD) for t in seen)
    assert gc.get_threshold() == before


def test_members_in_one_process_each_save_their_own_whole_provenance(tmp_path: Path) -> None:
    """The simulator encodes the run's provenance once (:func:`shared_process`), yet every
    member's folder holds its own private ``provenance.cbor`` (a file of its own, not a
    link to another's) that ``fedup-peer verify`` accepts, naming every member's hops."""
    settings = SimSettings(run=RunSettings(max_laps=2, patience=2))
    result = run_simulate(lenders(4), tmp_path, settings)
    assert [p.error for p in result.peers] == [None] * 4
    files = [Path(p.out_dir) / "provenance.cbor" for p in result.peers]
    assert len({f.read_bytes() for f in files}) == 1
    assert len({f.stat().st_ino for f in files}) == 4
    assert all(f.stat().st_nlink == 1 and f.stat().st_mode & 0o777 == 0o600 for f in files)
    for p in result.peers:
        assert p.summary is not None
        model, verified = verify_model(p.out_dir)
        assert model == p.out_dir / "model.safetensors"
        assert verified.seal.model.hex() == p.summary.model_sha256 == result.model_sha256
        assert verified.chain.count == (settings.run.max_laps + 1) * 4 + 1
        shares = {s.peer.text: s for s in verified.shares()}
        assert set(shares) == {q.peer_id for q in result.peers}
        laps = settings.run.max_laps + 1  # and the hop that closed the last one
        assert sorted(s.hops for s in shares.values()) == [laps, laps, laps, laps + 1]


# --- what two members can work out about each other ------------------------------------


async def test_two_members_are_told_before_training_what_each_can_work_out(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from fedup.peer.custody_driver import TWO_MEMBERS_LEFT
    from fedup.peer.formation_driver import TWO_MEMBERS

    with caplog.at_level(logging.INFO, logger="fedup"):
        await simulate(tmp_path / "two", n=2)
    lines = [r.getMessage() for r in caplog.records]
    warned = [i for i, m in enumerate(lines) if m == TWO_MEMBERS]
    assert len(warned) == 2  # each member, once
    first_hop = next(i for i, m in enumerate(lines) if "trained " in m)
    assert max(warned) < first_hop  # both told before anyone trained
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fedup"):
        await simulate(tmp_path / "four", n=4)
    assert TWO_MEMBERS not in caplog.text and TWO_MEMBERS_LEFT not in caplog.text


async def test_members_are_told_when_deaths_leave_two(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from fedup.peer.custody_driver import TWO_MEMBERS_LEFT

    victim = ring_order(3)[2]
    with caplog.at_level(logging.WARNING, logger="fedup"):
        result = await simulate(tmp_path, n=3, faults=Faults(kills=(Kill(victim, lap=1, hop=2),)))
    survivors = [p for p in result.peers if p.index != victim]
    assert all(p.summary is not None for p in survivors)
    assert caplog.text.count(TWO_MEMBERS_LEFT) == 2  # each survivor, once
