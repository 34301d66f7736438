"""A hostile member among honest ones: the attacks of the federation-engine issue.

Each test runs real peers on an in-memory world under a virtual clock.  One of
them is hostile: a real peer that joins normally and trains, whose behaviour is
replaced in part through its :class:`~fedup.peer.tamper.Tamper` (or its data
summary).  In each, the honest members must finish with a summary that says the
stopping rule ended the run, save one identical trained model, take at most
twice the virtual time of the same run without the attack, and log the refusal
naming the offender's peer ID.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import torch
import trio
import trio.testing

from fedup.commands.verify import verify_model
from fedup.identity import Identity
from fedup.learn.ring import final_weights
from fedup.learn.ring_payload import RingBlob, content_of
from fedup.learn.tabular import Table
from fedup.learn.weights import safetensors_sha256
from fedup.peer import Peer, RunSummary, TabularSource
from fedup.peer.events import Finished, PeerEvent
from fedup.peer.tamper import OutgoingBlob, Tamper
from fedup.protocol.notices import DeadChain, FinalSeal
from fedup.protocol.peer_id import PeerId
from fedup.protocol.provenance import HopStatement, join_chain, split_chain
from fedup.protocol.view import RunSettings
from fedup.sim.hostile import rewrite_blob
from fedup.sim.world import MemoryWorld
from tests.integration.test_federation import (
    LIMITS,
    check_same_model,
    identities,
    lender,
    run_federation,
    weights_digest,
)

RUN = RunSettings(max_laps=4, patience=3)


class Attack(Tamper):
    """A tamper that knows its peer (set when the peer opens) and attacks once."""

    def __init__(self) -> None:
        self.peer: Peer | None = None
        self.done = False

    @property
    def template(self) -> Any:
        assert self.peer is not None and self.peer.custody is not None
        return self.peer.custody.template

    @property
    def identity(self) -> Identity:
        assert self.peer is not None
        return self.peer.identity

    @property
    def members(self) -> tuple[Any, ...]:
        assert self.peer is not None and self.peer.custody is not None
        return self.peer.custody.members

    def rewrite(
        self, blob: OutgoingBlob, change: Callable[[RingBlob], RingBlob], **kw: Any
    ) -> OutgoingBlob:
        return rewrite_blob(blob, self.template, change, limits=LIMITS, **kw)

    def blobs(self, blob: OutgoingBlob) -> list[OutgoingBlob]:
        if self.done or blob.kind != "model" or blob.lap < 1:
            return [blob]
        self.done = True
        return [*self.attack(blob), blob]  # then it complies

    def attack(self, blob: OutgoingBlob) -> list[OutgoingBlob]:
        raise NotImplementedError


async def federate(
    tmp_path: Path, ids: list[Identity], hostile: int, tamper: Tamper | None, **kw: Any
) -> tuple[dict[str, RunSummary | BaseException], float]:
    world = MemoryWorld()
    if tamper is not None:
        world.tampers[ids[hostile].peer_id] = tamper

    start = trio.current_time()
    finished: dict[PeerId, float] = {}

    def note_finish(peer: PeerId, at: float, event: PeerEvent) -> None:
        if isinstance(event, Finished):
            finished[peer] = at - start

    def opening(peer: Peer) -> None:
        peer.events.watch(note_finish)
        if isinstance(tamper, Attack) and peer.peer_id == ids[hostile].peer_id:
            tamper.peer = peer

    results = await run_federation(tmp_path, ids, world=world, on_open=opening, run=RUN, **kw)
    honest = [i.peer_id for n, i in enumerate(ids) if n != hostile]
    assert set(honest) <= set(finished), "an honest member did not finish"
    return results, max(finished[p] for p in honest)  # when the last honest member was done


def honest_finish(
    results: dict[str, RunSummary | BaseException], ids: list[Identity], hostile: int
) -> list[RunSummary]:
    honest = [results[i.peer_id.text] for n, i in enumerate(ids) if n != hostile]
    assert all(isinstance(s, RunSummary) for s in honest), honest
    summaries = [s for s in honest if isinstance(s, RunSummary)]
    assert all(s.ok and s.stop_reason in ("converged", "max-laps") for s in summaries)
    assert all(s.best_lap >= 0 for s in summaries)  # a trained model, not the initial one
    check_same_model(summaries)
    return summaries


async def attacked_run(
    tmp_path: Path,
    tamper: Attack,
    caplog: pytest.LogCaptureFixture,
    *,
    n: int = 4,
    hostile: int = 1,
) -> tuple[list[RunSummary], list[RunSummary], str]:
    """The same federation without and with the attack; (baseline, attacked, log text)."""
    ids = identities(n)
    base, base_time = await federate(tmp_path / "base", ids, hostile, None)
    baseline = honest_finish(base, ids, hostile)
    with caplog.at_level(logging.INFO, logger="fedup"):
        results, took = await federate(tmp_path / "attacked", ids, hostile, tamper)
    attacked = honest_finish(results, ids, hostile)
    assert tamper.done, "the attack never ran"
    assert took <= 2 * base_time, (took, base_time)
    return baseline, attacked, caplog.text


def refusals_naming(text: str, offender: Identity) -> list[str]:
    return [
        line for line in text.splitlines() if "refused" in line and offender.peer_id.text in line
    ]


# --- the attacks ---------------------------------------------------------------------------


class DoneToEveryone(Attack):
    """Blobs whose ring metadata says the run is done, sent to every member (the landed
    code made every honest member exit with code 1)."""

    def attack(self, blob: OutgoingBlob) -> list[OutgoingBlob]:
        out = []
        for target in self.members:
            if target == self.identity.peer_id:
                continue

            def done(b: RingBlob) -> RingBlob:
                meta = attrs.evolve(b.state.meta, done=True, lap=blob.lap, hop=blob.hop)
                return attrs.evolve(b, state=attrs.evolve(b.state, meta=meta))

            out.append(self.rewrite(blob, done, target=target))
        return out


async def test_a_done_flag_sent_to_everyone_changes_nothing(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tamper = DoneToEveryone()
    baseline, attacked, text = await attacked_run(tmp_path, tamper, caplog)
    assert weights_digest(attacked[0]) == weights_digest(baseline[0])  # the attack left no trace
    assert refusals_naming(text, tamper.identity)


class FarLapToANonSuccessor(Attack):
    """A lap-50 blob to a member that is not our successor (the landed code then refused
    the honest blob as a replay, and everyone saved the untrained model)."""

    def attack(self, blob: OutgoingBlob) -> list[OutgoingBlob]:
        me = self.members.index(self.identity.peer_id)
        target = self.members[(me + 2) % len(self.members)]

        def far(b: RingBlob) -> RingBlob:
            meta = attrs.evolve(b.state.meta, lap=50, hop=me)
            return attrs.evolve(b, state=attrs.evolve(b.state, meta=meta))

        return [self.rewrite(blob, far, target=target, lap=50, hop=(me + 2) % len(self.members))]


async def test_a_far_future_lap_to_a_non_successor_changes_nothing(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tamper = FarLapToANonSuccessor()
    baseline, attacked, text = await attacked_run(tmp_path, tamper, caplog)
    assert weights_digest(attacked[0]) == weights_digest(baseline[0])
    assert all(s.dead == [] for s in attacked)
    assert refusals_naming(text, tamper.identity)


class ReceiverIsDead(Attack):
    """A blob whose dead chain declares its receiver dead (the landed code left the
    receiver "excluded", waiting 3,600 s)."""

    def attack(self, blob: OutgoingBlob) -> list[OutgoingBlob]:
        assert self.peer is not None and self.peer.custody is not None
        chain = self.peer.custody.machine.chain
        claimed = chain.claim(self.identity, "unreachable", blob_position(blob))

        def dead(b: RingBlob) -> RingBlob:
            return attrs.evolve(b, chain=claimed.envelopes)

        return [self.rewrite(blob, dead, epoch=blob.epoch + 1)]


def blob_position(blob: OutgoingBlob) -> Any:
    from fedup.protocol.laps import Position

    return Position(blob.lap, blob.hop)


async def test_a_dead_notice_naming_its_receiver_changes_nothing(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tamper = ReceiverIsDead()
    baseline, attacked, text = await attacked_run(tmp_path, tamper, caplog)
    assert weights_digest(attacked[0]) == weights_digest(baseline[0])
    assert all(s.dead == [] and s.excluded is None for s in attacked)
    assert any("receiver itself" in line for line in refusals_naming(text, tamper.identity))


class ForgedFinal(Attack):
    """A ``final`` blob at lap 0 with all-zero weights to every member (the landed code
    made every member save it as their model)."""

    def attack(self, blob: OutgoingBlob) -> list[OutgoingBlob]:
        out = []
        for target in self.members:
            if target == self.identity.peer_id:
                continue

            def zero(b: RingBlob) -> RingBlob:
                tensors = {k: torch.zeros_like(v) for k, v in b.state.tensors.items()}
                meta = attrs.evolve(b.state.meta, done=True, lap=0, hop=0)
                state = attrs.evolve(b.state, tensors=tensors, meta=meta)
                run_id = self.peer.custody.run_id  # type: ignore[union-attr]
                model = safetensors_sha256(
                    final_weights(state), metadata={"fedup_run_id": run_id.hex(), "format": "pt"}
                )
                seal = FinalSeal.seal(
                    self.identity,
                    run_id=run_id,
                    content=content_of(state, limits=LIMITS),
                    model=bytes.fromhex(model),
                ).envelope
                return attrs.evolve(b, state=state, origin=self.identity.peer_id, seal=seal)

            out.append(self.rewrite(blob, zero, target=target, kind="final", lap=0, hop=0))
        return out


async def test_a_forged_final_model_is_saved_by_nobody(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tamper = ForgedFinal()
    baseline, attacked, text = await attacked_run(tmp_path, tamper, caplog)
    assert weights_digest(attacked[0]) == weights_digest(baseline[0])
    assert all(s.laps == RUN.max_laps and s.ended_by == s.members[0] for s in attacked)
    assert any("not-final" in line for line in refusals_naming(text, tamper.identity))


class HugeWeights(Attack):
    """Finite but huge weights (1e30) to our successor (the landed code trained them to
    NaN and declared everyone dead)."""

    def attack(self, blob: OutgoingBlob) -> list[OutgoingBlob]:
        def huge(b: RingBlob) -> RingBlob:
            tensors = {
                k: v * 1e30 if k.startswith("model.") and v.is_floating_point() else v
                for k, v in b.state.tensors.items()
            }
            return attrs.evolve(b, state=attrs.evolve(b.state, tensors=tensors))

        return [self.rewrite_unchecked(blob, huge)]

    def rewrite_unchecked(
        self, blob: OutgoingBlob, change: Callable[[RingBlob], RingBlob]
    ) -> OutgoingBlob:
        return rewrite_blob(blob, self.template, change, limits=LIMITS)


async def test_huge_weights_are_refused_before_custody(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tamper = HugeWeights()
    baseline, attacked, text = await attacked_run(tmp_path, tamper, caplog)
    assert weights_digest(attacked[0]) == weights_digest(baseline[0])
    assert all(s.dead == [] for s in attacked)
    assert any("max_weight_magnitude" in line for line in refusals_naming(text, tamper.identity))


class BrokenProvenance(Attack):
    """Hands its successor the model with the hop statements it has not seen broken four
    ways (the predecessor's statement removed; the same statement signed by a key outside
    the view; the statements starting one early, with the successor's own last statement,
    which it already knew; the first statement it lacks left out), then complies.  A
    member cannot slip a broken chain into the final model of the honest ones."""

    def attack(self, blob: OutgoingBlob) -> list[OutgoingBlob]:
        stranger = Identity(b"\x66" * 32)

        def with_hops(
            change: Callable[[list[bytes]], list[bytes]],
        ) -> Callable[[RingBlob], RingBlob]:
            def rewrite(b: RingBlob) -> RingBlob:
                return attrs.evolve(b, provenance=join_chain(change(split_chain(b.provenance))))

            return rewrite

        def foreign(hops: list[bytes]) -> list[bytes]:
            s = HopStatement.open(hops[-2])  # our predecessor's, new to our successor
            forged = HopStatement.seal(
                stranger,
                run_id=s.run_id,
                prev=s.prev,
                position=s.position,
                received=s.received,
                sent=s.sent,
                samples=s.samples,
            )
            return [*hops[:-2], forged.envelope, hops[-1]]

        def one_early(hops: list[bytes]) -> list[bytes]:
            assert self.peer is not None and self.peer.custody is not None
            held = self.peer.custody.machine.provenance  # ours, up to our new statement
            return [s.envelope for s in held.statements()][-len(hops) - 1 :]

        return [
            self.rewrite(blob, with_hops(lambda hops: [*hops[:-2], hops[-1]])),
            self.rewrite(blob, with_hops(foreign)),
            self.rewrite(blob, with_hops(one_early)),
            self.rewrite(blob, with_hops(lambda hops: hops[1:])),
        ]


async def test_a_broken_chain_of_hop_statements_is_refused_and_the_model_verifies(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tamper = BrokenProvenance()
    baseline, attacked, text = await attacked_run(tmp_path, tamper, caplog)
    assert weights_digest(attacked[0]) == weights_digest(baseline[0])
    assert all(s.dead == [] and s.excluded is None for s in attacked)
    lines = [x for x in refusals_naming(text, tamper.identity) if "bad-provenance" in x]
    for why in ("does not link", "not a member of the view", "must start right after them"):
        assert any(why in line for line in lines), (why, lines)
    missing = [x for x in refusals_naming(text, tamper.identity) if "missing-hops" in x]
    assert any("are missing" in line for line in missing), missing
    # honest_finish (in attacked_run) checked that every member's provenance verifies


class RewrittenHistory(Attack):
    """The ring's head ends the run and first hands on the final model with a chain of its
    own making: one statement at lap 0 hop 0, from the initial model straight to the final
    one, as if it had trained alone (each member would have cut its chain back to it and
    saved a provenance crediting the head alone), then complies."""

    def blobs(self, blob: OutgoingBlob) -> list[OutgoingBlob]:
        if blob.kind != "final":
            return [blob]
        self.done = True
        assert self.peer is not None and self.peer.custody is not None
        first = next(iter(self.peer.custody.machine.provenance.statements()))

        def alone(b: RingBlob) -> RingBlob:
            last = HopStatement.open(split_chain(b.provenance)[-1])
            forged = HopStatement.seal(
                self.identity,
                run_id=first.run_id,
                prev=first.prev,
                position=first.position,
                received=first.received,
                sent=last.sent,
                samples=first.samples,
            )
            return attrs.evolve(b, provenance=join_chain([forged.envelope]))

        return [self.rewrite(blob, alone), blob]


async def test_the_head_cannot_rewrite_the_history_of_the_final_model(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tamper = RewrittenHistory()
    baseline, attacked, text = await attacked_run(tmp_path, tamper, caplog, hostile=0)
    assert weights_digest(attacked[0]) == weights_digest(baseline[0])
    lines = [x for x in refusals_naming(text, tamper.identity) if "bad-provenance" in x]
    assert lines, refusals_naming(text, tamper.identity)
    for s in attacked:  # each saved the whole chain: every member trained hops in it
        _, verified = verify_model(Path(s.out_dir))
        assert {share.peer for share in verified.shares()} == {
            PeerId.from_text(m) for m in s.members
        }


class OverflowingSummary(TabularSource):
    """A candidate whose data summary has a column mean of 1.7e308 (the landed code's
    leader crashed with an OverflowError; this needs no membership)."""

    def summary(self) -> dict[str, object]:
        value = super().summary()
        for column in value["columns"]:  # type: ignore[attr-defined]
            if column.get("kind") == "numeric":
                column["mean"] = 1.7e308
                break
        return value


async def test_an_overflowing_summary_refuses_the_candidate_not_the_leader(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ids = identities(4)
    hostile = 2
    table: Table = lender(102).table
    honest = ids[:hostile] + ids[hostile + 1 :]
    same_data = {n: lender(100 + ids.index(i)) for n, i in enumerate(honest)}
    base, base_time = await federate(
        tmp_path / "base", honest, -1, None, min_peers=3, sources=same_data
    )
    baseline = honest_finish(base, honest, -1)
    with caplog.at_level(logging.INFO, logger="fedup"):
        results, took = await federate(
            tmp_path / "attacked",
            ids,
            hostile,
            None,
            min_peers=3,
            sources={hostile: OverflowingSummary(table, target="default")},
            leader=0,
        )
    attacked = honest_finish(results, ids, hostile)
    assert [s.members for s in attacked] == [baseline[0].members] * 3
    assert weights_digest(attacked[0]) == weights_digest(baseline[0])
    assert took <= 2 * base_time
    assert any(
        ids[hostile].peer_id.text in line and "unusable summary" in line and "1.7e+308" in line
        for line in caplog.text.splitlines()
    )


class BoundlessLeader(Tamper):
    """The drawn leader proposes max_laps 20,000 (the landed code let members acknowledge
    it and then crash)."""

    def view(self, value: dict[str, Any]) -> dict[str, Any]:
        return {**value, "settings": {**value["settings"], "max_laps": 20_000}}


async def test_a_leader_proposing_settings_out_of_bounds_is_elected_around(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ids = identities(4)
    hostile = 0
    same_data = {n: lender(101 + n) for n in range(3)}  # each identity keeps its data
    base, base_time = await federate(
        tmp_path / "base", ids[1:], -1, None, min_peers=3, sources=same_data
    )
    baseline = honest_finish(base, ids[1:], -1)
    with caplog.at_level(logging.INFO, logger="fedup"):
        # The hostile leader finds nobody who takes it; it gives up on its own, later.
        gives_up = {hostile: {"limits": attrs.evolve(LIMITS, peer_wait_timeout=60.0)}}
        results, took = await federate(
            tmp_path / "attacked",
            ids,
            hostile,
            BoundlessLeader(),
            min_peers=3,
            overrides=gives_up,
            leader=hostile,  # the first draw chooses it
        )
    attacked = honest_finish(results, ids, hostile)
    leader = attacked[0].leader
    assert [s.leader for s in attacked] == [leader] * 3 and leader != ids[hostile].peer_id.text
    assert weights_digest(attacked[0]) == weights_digest(baseline[0])
    assert took <= 2 * base_time
    assert any(
        ids[hostile].peer_id.text in line and "max_laps" in line
        for line in caplog.text.splitlines()
    )


def model_hash(summary: RunSummary) -> str:
    return hashlib.sha256((Path(summary.out_dir) / "model.safetensors").read_bytes()).hexdigest()


_ = DeadChain  # documented above: the chain a hostile member extends


class Blowup(TabularSource):
    """A member whose own training, once, turns the weights huge (a bug or bad data)."""

    def build(self, schema: Any, settings: RunSettings) -> Any:
        task = super().build(schema, settings)
        train = task.train
        state = {"hops": 0}

        def blowing(model: Any, optimizer: Any, budget: Any) -> Any:
            out = train(model, optimizer, budget)
            state["hops"] += 1
            if state["hops"] == 2:
                with torch.no_grad():
                    for p in model.parameters():
                        p.mul_(1e30)
            return out

        task.train = blowing
        return task


async def test_a_member_whose_training_blows_up_hands_on_its_last_good_state(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every state is checked before it is handed on: the member hands on the state it
    received (moved on to its position, evaluated, not trained), says so, and nobody
    is declared dead or trains NaN."""
    ids = identities(3)
    with caplog.at_level(logging.INFO, logger="fedup"):
        results = await run_federation(
            tmp_path, ids, run=RUN, sources={1: Blowup(lender(101).table, target="default")}
        )
    summaries = honest_finish(results, ids, -1)
    assert all(s.dead == [] for s in summaries)
    assert "gave a bad state" in caplog.text and "last good state" in caplog.text
    member = ids[1].peer_id.text[-8:]
    hops = [
        json.loads(line)
        for line in (tmp_path / member / "metrics.jsonl").read_text().splitlines()
        if '"hop"' in line
    ]
    assert [h["good"] for h in hops].count(False) == 1
