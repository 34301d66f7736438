"""The hybrid mode (``--mode hybrid``): real peers in the simulator, sub-rings that hand
the model (and its optimizer's state) from member to member over encrypted channels,
then the all-reduce among every member."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from fedup.peer.hybrid_driver import HybridRun
from fedup.protocol.peer_id import PeerId
from fedup.protocol.relay import RelayMessage, decode_relay_message
from fedup.sim import Faults, Kill, SimResult, SimSettings, Slow, run_simulation, sim_identity
from tests.integration.test_parallel_mode import RUN as PARALLEL
from tests.integration.test_parallel_mode import (
    check_rounds_clock,
    lenders,
    ring_order,
    same,
    stranger_sends,
)

RUN = attrs.evolve(PARALLEL, algorithm="hybrid", sub_rings=2, sync_laps=2)


async def simulate(tmp_path: Path, n: int, **kw: Any) -> SimResult:
    with trio.fail_after(10_000):  # virtual seconds: a hung peer fails the test
        return await run_simulation(lenders(n), tmp_path, SimSettings(run=RUN, **kw))


def relayed(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


async def test_every_member_saves_the_same_model_trained_by_the_sub_rings(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG", logger="fedup.federation")
    sent: list[tuple[PeerId, int, int]] = []
    honest = HybridRun._messages

    def counted(self: HybridRun, layout: Any, round_: int, hop: int, *a: Any) -> list[bytes]:
        sent.append((self.me, round_, hop))
        return honest(self, layout, round_, hop, *a)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(HybridRun, "_messages", counted)
        result = await simulate(tmp_path, 4)
    summaries = [p.summary for p in result.peers]
    assert all(s is not None for s in summaries)
    same(summaries, "model_sha256", "laps", "federated_laps", "federated_val_loss",
         "best_lap", "stop_reason", "members")  # fmt: skip
    first = summaries[0]
    assert first is not None
    assert first.stop_reason == "max-laps" and first.laps == 6 and first.dead == []
    assert first.ok and first.federated_laps == list(range(-1, 6))
    # Two sub-rings of two, two laps a round: hops 0 1 2 3 each; every hop but the last
    # is handed on, by the trainer the plan names, in each of the 6 training rounds.
    order = [sim_identity(0, i).peer_id for i in ring_order(4)]
    expected = {
        (ring[h % 2], r, h) for ring in (order[:2], order[2:]) for r in range(6) for h in range(3)
    }
    assert sorted(sent, key=str) == sorted(expected, key=str)
    for s in summaries:
        assert s is not None
        model = (Path(s.out_dir) / "model.safetensors").read_bytes()
        assert hashlib.sha256(model).hexdigest() == s.model_sha256
    assert not relayed(caplog, "relay broke")
    # The report models the run's clock from the sub-rings' measured chains.
    check_rounds_clock(result, 4, "hybrid")


async def test_the_model_improves_on_the_initial_one(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Three members: sub-rings of two and of one (whose member hands the model to
    itself, and waits for nobody)."""
    result = await simulate(tmp_path, 3)
    assert not relayed(caplog, "relay broke")
    first = result.peers[0].summary
    assert first is not None
    losses = first.federated_val_loss
    assert min(losses[1:]) < losses[0] and first.best_lap >= 0


async def test_a_member_that_dies_breaks_its_sub_ring_for_a_round_and_is_left_out(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    victim = ring_order(5)[1]  # in the first sub-ring (3 members), mid-relay
    result = await simulate(tmp_path, 5, faults=Faults(kills=(Kill(victim, lap=2),)))
    assert result.peers[victim].summary is None
    summaries = [p.summary for p in result.peers if p.index != victim]
    assert all(s is not None for s in summaries)
    same(summaries, "model_sha256", "federated_val_loss", "dead")
    first = summaries[0]
    assert first is not None
    assert first.dead == [result.peers[victim].peer_id] and first.stop_reason == "max-laps"
    # Its successor waited out the hop deadline, and said so, naming it.
    victim_id = result.peers[victim].peer_id
    assert any(victim_id in m for m in relayed(caplog, "relay broke"))


async def test_a_slow_sub_ring_is_waited_for_not_left_out(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A member 40 s slower per hop makes its sub-ring's relay (six hops of its, three
    laps) last four minutes longer than the other's: the other sub-ring's members wait
    for it in the all-reduce (its first message may wait the longest relay), probing,
    and nobody is left out or retried."""
    slow = ring_order(4)[0]
    run = attrs.evolve(RUN, sync_laps=3, max_laps=3, patience=3)
    with trio.fail_after(10_000):
        result = await run_simulation(
            lenders(4), tmp_path, SimSettings(run=run, faults=Faults(slow=(Slow(slow, 40.0),)))
        )
    summaries = [p.summary for p in result.peers]
    assert all(s is not None and s.ok and s.dead == [] for s in summaries)
    same(summaries, "model_sha256", "federated_val_loss")
    assert not relayed(caplog, "attempt 0 failed") and not relayed(caplog, "relay broke")


@pytest.mark.parametrize(
    ("lie", "said"),
    [
        ({"scale": 1e12}, "beyond 1e+08"),
        ({"hop": 7}, "not hop"),
        ({"rows": 10**7}, "the federation has"),
        ({"cut": 1}, "bytes, not"),
    ],
    ids=["weights", "hop", "rows", "size"],
)
async def test_a_member_lying_in_the_relay_breaks_only_its_sub_ring(
    autojump_clock: trio.testing.MockClock,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    lie: dict[str, float],
    said: str,
) -> None:
    """A member that sends its successor a model with huge weights, the wrong hop, a
    claim of 10 million rows or a short part, every round: the successor refuses it,
    sends "broken" on, and the round goes on with the other sub-ring's model; every
    member, the liar too, saves the same model, and it is a trained one."""
    liar = sim_identity(0, ring_order(4)[0]).peer_id  # trains hop 0 of sub-ring 0
    honest = HybridRun._messages

    def lying(self: HybridRun, layout: Any, round_: int, hop: int, state: Any, rows: int,
              samples: int, broken: Any) -> list[bytes]:  # fmt: skip
        if self.me != liar:
            return honest(self, layout, round_, hop, state, rows, samples, broken)
        state = {k: v * lie.get("scale", 1.0) for k, v in state.items()}
        out = honest(self, layout, round_, hop, state, int(lie.get("rows", rows)), samples, None)
        if "hop" in lie or "cut" in lie:
            parts = [
                decode_relay_message(x, max_part=self._limits.max_allreduce_chunk) for x in out
            ]
            parts = [
                attrs.evolve(p, hop=int(lie.get("hop", p.hop)),
                             data=p.data[: len(p.data) - 4 * int(lie.get("cut", 0))])
                for p in parts
            ]  # fmt: skip
            out = [p.encode() for p in parts]
        return out

    monkeypatch.setattr(HybridRun, "_messages", lying)
    result = await simulate(tmp_path, 4)
    summaries = [p.summary for p in result.peers]
    assert all(s is not None for s in summaries)
    same(summaries, "model_sha256", "federated_val_loss")
    first = summaries[0]
    assert first is not None and first.ok and first.best_lap >= 0
    broke = relayed(caplog, "relay broke")
    assert broke and all(said in m and liar.text in m for m in broke[:1])


async def test_a_strangers_relay_message_is_refused_and_the_run_goes_on(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    message = RelayMessage(bytes(16), 0, 0, 0, 0, 1, 1, 1, bytes(4))
    await stranger_sends(tmp_path, RUN, message.encode(), caplog, "sent a relay message")
