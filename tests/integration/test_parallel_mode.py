"""The parallel mode (``--mode parallel``): real peers in the simulator, every member
training at once and averaging by a ring all-reduce over encrypted channels."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from fedup.config import DEFAULT_LIMITS
from fedup.identity import Identity
from fedup.learn.loans import generate_lender, lender_seed
from fedup.net.framed import FramedStream
from fedup.net.transport import Credentials, upgrade_outbound
from fedup.peer import Peer, RunSummary, TabularSource, parallel_driver
from fedup.peer import events as ev
from fedup.peer.config import DEFAULT_NETWORK
from fedup.peer.parallel_driver import ParallelRun
from fedup.protocol.allreduce_messages import ChunkMessage, Phase
from fedup.protocol.peer_id import PeerId
from fedup.protocol.records import Address
from fedup.protocol.view import RunSettings
from fedup.sim import Faults, Kill, SimResult, SimSettings, run_simulation, sim_identity
from fedup.sim.report import build_report
from fedup.sim.world import MemoryWorld
from tests.integration.test_federation import identities, run_federation

RUN = RunSettings(max_laps=6, patience=6, algorithm="parallel")


def lenders(n: int, rows: int = 300) -> list[TabularSource]:
    return [
        TabularSource(generate_lender(lender_seed(0, i), rows).table, target="default")
        for i in range(n)
    ]


def ring_order(n: int) -> list[int]:
    ids = [sim_identity(0, i).peer_id for i in range(n)]
    return sorted(range(n), key=lambda i: ids[i].raw)


async def simulate(tmp_path: Path, n: int, **kw: Any) -> SimResult:
    with trio.fail_after(10_000):  # virtual seconds: a hung peer fails the test
        return await run_simulation(lenders(n), tmp_path, SimSettings(run=RUN, **kw))


def same(summaries: list[Any], *keys: str) -> None:
    for key in keys:
        assert len({json.dumps(getattr(s, key)) for s in summaries}) == 1, key


def check_rounds_clock(result: SimResult, n: int, mode: str) -> None:
    """The report of a run of 6 training rounds in ``mode`` models its clock from the
    members' measured rounds: formation, computing and transfers add up to it."""
    report = build_report(result, lenders(n))
    assert report["mode"] == mode
    clock = report["time_to_quality"]["rounds_clock"]
    assert clock["rounds"] == 7 and clock["compute_seconds"] > 0
    modelled = report["time_to_quality"]["models"]["federated"]["modelled_wall_seconds"]
    parts = clock["formation_seconds"] + clock["compute_seconds"] + clock["allreduce_seconds"]
    assert modelled == pytest.approx(parts)


async def test_every_member_saves_the_same_model_after_the_same_rounds(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    result = await simulate(tmp_path, 3)
    summaries = [p.summary for p in result.peers]
    assert all(s is not None for s in summaries)
    same(summaries, "model_sha256", "laps", "federated_laps", "federated_val_loss",
         "best_lap", "stop_reason", "members")  # fmt: skip
    first = summaries[0]
    assert first is not None
    # Rounds 0 to 5 train; round 6 only evaluates round 5's output.
    assert first.stop_reason == "max-laps" and first.laps == 6
    assert first.federated_laps == list(range(-1, 6)) and first.dead == []
    assert first.ok and 0 <= first.best_lap <= 5
    assert first.federated_val_loss[first.best_lap + 1] == min(first.federated_val_loss[1:])
    for s in summaries:
        assert s is not None
        folder = Path(s.out_dir)
        model = (folder / "model.safetensors").read_bytes()
        assert hashlib.sha256(model).hexdigest() == s.model_sha256
        lines = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        assert [x["lap"] for x in lines if x["type"] == "lap"] == s.federated_laps
        assert not (folder / "provenance.cbor").exists()  # no hops, no hop statements
        assert s.model_bytes_sent > 0
    # The report models the run's clock from the members' measured rounds.
    check_rounds_clock(result, 3, "parallel")


async def test_a_member_that_dies_is_left_out_and_the_others_finish_alike(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    victim = ring_order(4)[1]
    result = await simulate(tmp_path, 4, faults=Faults(kills=(Kill(victim, lap=2),)))
    assert result.peers[victim].summary is None
    summaries = [p.summary for p in result.peers if p.index != victim]
    assert all(s is not None for s in summaries)
    same(summaries, "model_sha256", "federated_val_loss", "dead")
    first = summaries[0]
    assert first is not None
    assert first.dead == [result.peers[victim].peer_id] and first.stop_reason == "max-laps"


async def test_without_a_majority_the_run_ends_with_an_error_at_every_member(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    order = ring_order(4)
    kills = (Kill(order[0], lap=2), Kill(order[2], lap=2))
    result = await simulate(tmp_path, 4, faults=Faults(kills=kills))
    assert not result.finished_peers
    for p in result.peers:
        if p.index in (order[0], order[2]):
            assert p.error == "killed"
        else:
            assert p.error is not None and "round 2: the all-reduce failed" in p.error
            assert "of the view's 4 members answer" in p.error


async def stranger_sends(
    tmp_path: Path, run: RunSettings, message: bytes, caplog: pytest.LogCaptureFixture, said: str
) -> None:
    """A peer outside the run (with no membership at all) sends ``message`` to a member
    in round 1 of ``run``: its connection is closed at once without a word, with a
    warning naming it and saying ``said``, and the members end alike and well."""
    ids = identities(3)
    stranger = Identity(b"\x77" * 32)
    world = MemoryWorld()
    answers: list[bytes | None] = []

    async def attack(address: Address) -> None:
        stream = await world.network.connect(address, source="10.77.77.77")
        creds = Credentials(stranger, DEFAULT_NETWORK)
        channel = await upgrade_outbound(stream, peer=str(address), credentials=creds)
        framed = FramedStream(channel, peer=str(address))
        await framed.send_frame(message)
        answers.append(await framed.receive_frame_or_eof())
        await trio.aclose_forcefully(channel)

    async with trio.open_nursery() as nursery:

        def opening(peer: Peer) -> None:
            def on_event(who: PeerId, at: float, event: ev.PeerEvent) -> None:
                if isinstance(event, ev.RoundTrained) and event.round == 1:  # mid-run
                    nursery.start_soon(attack, peer.addresses[0])

            if peer.peer_id == ids[0].peer_id:
                peer.events.watch(on_event)

        results = await run_federation(tmp_path, ids, world=world, on_open=opening, run=run)
    summaries = [results[i.peer_id.text] for i in ids]
    assert all(isinstance(s, RunSummary) and s.ok for s in summaries), summaries
    assert len({s.model_sha256 for s in summaries if isinstance(s, RunSummary)}) == 1
    assert answers == [None]  # closed without a word
    assert any(
        stranger.peer_id.text in r.getMessage() and said in r.getMessage() for r in caplog.records
    )


async def test_a_strangers_all_reduce_message_is_refused_and_the_run_goes_on(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """It fills no member's inbox, and the members end as they would have."""
    message = ChunkMessage(bytes(16), 0, 0, 0, Phase.REDUCE_SCATTER, 0, 0, bytes(4))
    long_run = attrs.evolve(RUN, max_laps=30, patience=30)
    said = "an all-reduce message, and is in no run"
    await stranger_sends(tmp_path, long_run, message.encode(), caplog, said)


@pytest.mark.parametrize(
    ("lie", "said"),
    [
        ({"rows": 10**7}, "training rows; the federation has"),  # weight to steer the average
        ({"scale": 1e12}, "beyond 1e+08"),  # huge but finite weights (1e30 once made NaN)
    ],
    ids=["rows", "weights"],
)
async def test_a_member_lying_in_its_contribution_changes_no_model(
    autojump_clock: trio.testing.MockClock,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    lie: dict[str, float],
    said: str,
) -> None:
    """A member of the run that claims 10 million training rows, or sends weights far
    beyond the ring's bound, in every round: the sum hides which member lied, so no
    round's average is used, and every member, it too, ends with the initial model."""
    liar = sim_identity(0, ring_order(3)[1]).peer_id
    honest = ParallelRun._contribution

    def lying(self: ParallelRun, layout: Any, weights: Any, **kw: Any) -> bytes:
        if self.me == liar:  # every round, trained or not (a small hop may take no step)
            kw["rows"] = int(lie.get("rows", 100))
            weights = {k: v * lie.get("scale", 1.0) for k, v in weights.items()}
        return honest(self, layout, weights, **kw)

    monkeypatch.setattr(ParallelRun, "_contribution", lying)
    result = await simulate(tmp_path, 3)
    summaries = [p.summary for p in result.peers]
    assert all(s is not None for s in summaries)
    same(summaries, "model_sha256", "federated_val_loss")
    first = summaries[0]
    assert first is not None
    # Every round judged the same, untouched model: no lap ever improved on the first.
    assert len(set(first.federated_val_loss)) == 1 and first.best_lap == -1
    refused = [r.getMessage() for r in caplog.records if said in r.getMessage()]
    assert len(refused) == 3 * RUN.max_laps  # each member, each training round


SMALL_CHUNKS = attrs.evolve(DEFAULT_LIMITS, max_allreduce_chunk=2048)
"""512 float32 a chunk: the loan MLP's vector (4,417 parameters and the tail) is summed
in several all-reduces per round."""


async def test_a_vector_larger_than_the_chunks_allow_is_summed_in_segments(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    machines: list[tuple[int, int, int]] = []
    real = parallel_driver.AllReduceMachine

    def counted(*args: Any, **kw: Any) -> Any:
        machines.append((kw["round"], kw["attempt"], kw["length"]))
        return real(*args, **kw)

    monkeypatch.setattr(parallel_driver, "AllReduceMachine", counted)
    whole = await simulate(tmp_path / "whole", 3)
    assert {m[1] for m in machines} == {0}  # one all-reduce a round
    length = machines[0][2]
    machines.clear()
    cut = await simulate(tmp_path / "cut", 3, limits=SMALL_CHUNKS)
    # Two members are the fewest a round of three can have: 1,024 elements a segment.
    count = -(-length // 1024)
    assert count == 5
    per_member_round = sorted((a, n) for r, a, n in machines if r == 0)
    assert per_member_round == sorted(
        (s, min(length, (s + 1) * -(-length // count)) - s * -(-length // count))
        for s in range(count)
        for _ in range(3)
    )
    summaries = [p.summary for p in cut.peers]
    assert all(s is not None and s.ok for s in summaries)
    same(summaries, "model_sha256", "federated_val_loss")
    first, reference = summaries[0], whole.peers[0].summary
    assert first is not None and reference is not None
    # The same sums but for float32's order of addition.
    assert first.federated_val_loss == pytest.approx(reference.federated_val_loss, rel=1e-3)


async def test_a_member_that_dies_mid_segments_is_left_out(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """A member killed at round 2 of a run summed in segments: each retry starts again
    from the first segment (a later attempt number than any segment of the failed
    attempt, so a member still in one finds the retry's messages held for it)."""
    victim = ring_order(4)[1]
    faults = Faults(kills=(Kill(victim, lap=2),))
    result = await simulate(tmp_path, 4, faults=faults, limits=SMALL_CHUNKS)
    summaries = [p.summary for p in result.peers if p.index != victim]
    assert all(s is not None for s in summaries)
    same(summaries, "model_sha256", "federated_val_loss", "dead")
    first = summaries[0]
    assert first is not None and first.dead == [result.peers[victim].peer_id]
