"""Whole federations in one process: formation, ring training, failures, replays.

Every test runs several :class:`~fedup.peer.Peer` s on a :class:`~fedup.sim.MemoryWorld`
(memory streams, in-memory discovery) under pytest-trio's ``autojump_clock``:
training runs inline (``train_in_thread=False``) and our blobs are far below the
size that is hashed in a worker thread, so nothing waits for a thread and every
deadline is virtual.  The data are small synthetic lenders.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import pytest
import trio
import trio.testing

from fedup.commands.verify import verify_model
from fedup.config import DEFAULT_LIMITS, Limits
from fedup.identity import Identity
from fedup.learn.loans import generate_lender
from fedup.learn.schema import CATEGORICAL
from fedup.learn.tabular import Column, Table
from fedup.net.discovery import DiscoveryEvent, EventKind, MemoryDiscoveryHub
from fedup.peer import FormationError, Peer, PeerConfig, RunSummary, TabularSource
from fedup.peer.events import FormationStage, PeerEvent
from fedup.protocol.peer_id import PeerId
from fedup.protocol.view import RunSettings
from fedup.sim.world import MemoryWorld
from tests.conftest import rig_draw

LIMITS: Limits = attrs.evolve(
    DEFAULT_LIMITS,
    hop_timeout=20.0,
    formation_timeout=15.0,
    call_timeout=5.0,
    view_timeout=10.0,
)
RUN = RunSettings(max_laps=4, patience=3)
DEADLINE = 300.0
"""Virtual seconds any federation here may take (a hung peer fails the test)."""


def identities(n: int, first: int = 1) -> list[Identity]:
    """``n`` deterministic identities, in ascending peer-ID order."""
    return sorted((Identity(bytes([first + i]) * 32) for i in range(n)), key=lambda i: i.peer_id)


def lender(seed: int, n_rows: int = 400) -> TabularSource:
    return TabularSource(generate_lender(seed, n_rows=n_rows).table, target="default")


RIGGED_RUN = bytes(range(16))


def config(ident: Identity, out: Path, **kw: Any) -> PeerConfig:
    base: dict[str, Any] = dict(
        identity=ident,
        out_dir=out,
        min_peers=3,
        settle=1.0,
        train_in_thread=False,
        run=RUN,
        limits=LIMITS,
    )
    base.update(kw)
    return PeerConfig(**base)


async def run_peer(
    world: MemoryWorld,
    cfg: PeerConfig,
    source: TabularSource,
    results: dict[str, RunSummary | BaseException],
    *,
    start_at: float = 0.0,
    on_open: Callable[[Peer], None] | None = None,
) -> None:
    """Open a peer at ``start_at`` (virtual seconds), train, and record what happened."""
    assert cfg.identity is not None
    name = cfg.identity.peer_id.text
    await trio.sleep(start_at)
    try:
        async with Peer.open(cfg, source, world=world) as peer:
            if on_open is not None:
                on_open(peer)
            results[name] = await peer.train()
    except Exception as exc:  # recorded for the test to judge
        results[name] = exc


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_same_model(summaries: Sequence[RunSummary]) -> str:
    """Every summary names the same model, each file on disk hashes to it, and each
    member's provenance of it verifies (``fedup-peer verify``) with the same hops."""
    hashes = {s.model_sha256 for s in summaries}
    assert len(hashes) == 1, hashes
    digest = hashes.pop()
    heads = set()
    for s in summaries:
        data = (Path(s.out_dir) / "model.safetensors").read_bytes()
        assert hashlib.sha256(data).hexdigest() == digest
        _, verified = verify_model(Path(s.out_dir))
        assert verified.seal.origin.text == s.ended_by
        assert verified.view.view.run_id.hex() == s.run_id
        heads.add(verified.chain.head)
    assert len(heads) == 1, "members saved different provenance for one model"
    return digest


# --- 1. formation and a whole run --------------------------------------------------------


async def test_three_peers_form_train_and_agree(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    ids = identities(3)
    results = await run_federation(tmp_path, ids)
    summaries = [results[i.peer_id.text] for i in ids]
    assert all(isinstance(s, RunSummary) for s in summaries), summaries
    done = [s for s in summaries if isinstance(s, RunSummary)]
    digest = check_same_model(done)
    members = [i.peer_id.text for i in ids]
    assert done[0].leader in members  # the member the draw chose (the same for everyone)
    for ident, s in zip(ids, done, strict=True):
        on_disk = json.loads((Path(s.out_dir) / "summary.json").read_text())
        assert on_disk == s.to_json()
        assert on_disk["peer_id"] == ident.peer_id.text
        assert on_disk["leader"] == done[0].leader
        assert on_disk["members"] == members == sorted(members)
        assert on_disk["run_id"] == done[0].run_id and len(on_disk["run_id"]) == 32
        assert on_disk["model_sha256"] == digest
        assert on_disk["stop_reason"] in ("converged", "max-laps")
        assert on_disk["converged"] == (on_disk["stop_reason"] == "converged")
        assert on_disk["dead"] == []
        assert 1 <= on_disk["laps"] <= RUN.max_laps
        losses = on_disk["federated_val_loss"]
        # One value per evaluated lap: the initial model (lap -1) and every lap trained.
        assert on_disk["federated_laps"] == list(range(-1, on_disk["laps"]))
        assert len(losses) == on_disk["laps"] + 1
        assert min(losses) < losses[0]
        assert on_disk["final_val_loss"] > 0
        lines = read_jsonl(Path(s.out_dir) / "metrics.jsonl")
        hops = [r for r in lines if r["type"] == "hop"]
        laps = [r for r in lines if r["type"] == "lap"]
        assert hops and laps
        position = ids.index(ident)
        assert {h["hop"] for h in hops} == {position}
        # Every peer logs every lap, the last ones learned from the final model.
        assert [r["lap"] for r in laps] == on_disk["federated_laps"]
        assert [r["federated_val_loss"] for r in laps] == losses
    # Every peer agrees on the federation's losses: they came from the ring.
    assert len({tuple(s.federated_val_loss) for s in done}) == 1


def weights_digest(summary: RunSummary) -> str:
    """SHA-256 of a saved model's tensors (the file's metadata also names the run)."""
    from safetensors.numpy import load_file

    tensors = load_file(str(Path(summary.out_dir) / "model.safetensors"))
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode() + b"\0" + tensors[name].tobytes())
    return h.hexdigest()


async def run_federation(
    tmp_path: Path,
    ids: Sequence[Identity],
    *,
    world: MemoryWorld | None = None,
    start_at: Sequence[float] | None = None,
    opened: dict[str, Peer] | None = None,
    observe: list[str] | None = None,
    sources: dict[int, TabularSource] | None = None,
    on_open: Callable[[Peer], None] | None = None,
    leader: int | None = None,
    **kw: Any,
) -> dict[str, RunSummary | BaseException]:
    """Run a peer per identity (lender data 100 + index unless ``sources`` says
    otherwise) until every one has ended.  ``opened`` collects the peers;
    ``observe`` the short IDs of the peers that elected themselves, in order;
    ``on_open`` is called with each peer once it listens; ``overrides`` (in ``kw``)
    maps a position to config fields of that peer alone; ``leader``: the position of
    the peer the first draw chooses (with every peer in it).
    """
    world = world if world is not None else MemoryWorld()
    if leader is not None:
        kw.setdefault("run_id", RIGGED_RUN)
        rig_draw(world, [i.peer_id for i in ids], ids[leader].peer_id, kw["run_id"])
    results: dict[str, RunSummary | BaseException] = {}
    peers = opened if opened is not None else {}

    elected = observe if observe is not None else []

    def note_leading(peer: PeerId, at: float, event: PeerEvent) -> None:
        if isinstance(event, FormationStage) and event.stage == "leading":
            elected.append(peer.short)

    def opening(peer: Peer) -> None:
        peers[peer.peer_id.text] = peer
        peer.events.watch(note_leading)
        if on_open is not None:
            on_open(peer)

    # Virtual seconds: a peer that never ends fails the test instead of hanging it.
    with trio.fail_after(DEADLINE):
        await _run_all(world, ids, tmp_path, start_at, sources, results, opening, kw)
    return results


async def _run_all(
    world: MemoryWorld,
    ids: Sequence[Identity],
    tmp_path: Path,
    start_at: Sequence[float] | None,
    sources: dict[int, TabularSource] | None,
    results: dict[str, RunSummary | BaseException],
    on_open: Callable[[Peer], None],
    kw: dict[str, Any],
) -> None:
    overrides: dict[int, dict[str, Any]] = kw.pop("overrides", {})
    async with trio.open_nursery() as nursery:
        for i, ident in enumerate(ids):
            cfg = config(
                ident, tmp_path / ident.peer_id.text[-8:], **{**kw, **overrides.get(i, {})}
            )
            at = start_at[i] if start_at is not None else 0.0
            source = (sources or {}).get(i) or lender(100 + i)
            nursery.start_soon(
                functools.partial(
                    run_peer, world, cfg, source, results, start_at=at, on_open=on_open
                )
            )


# --- 2. discovery order does not matter ------------------------------------------------


async def test_discovery_order_does_not_change_the_federation(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """Peers start at other times and hear of each other in other orders, each after
    its own delay; the leader, the members and the trained model stay the same."""
    ids = identities(3)
    names = [i.peer_id for i in ids]
    # (start times by ring position, delivery delay by (source, member) name)
    setups: list[tuple[list[float], Callable[[str, str], float]]] = [
        ([0.0, 0.5, 1.0], lambda s, m: 0.1),
        ([1.0, 0.0, 0.5], lambda s, m: 0.1 + 0.4 * int(m[-1])),
        ([0.5, 1.0, 0.0], lambda s, m: 0.1 + 0.7 * ((int(s[-1]) + 2 * int(m[-1])) % 3)),
    ]
    outcomes = []
    orders: set[tuple[int, ...]] = set()
    for k, (start, delay) in enumerate(setups):
        world = MemoryWorld(hub=MemoryDiscoveryHub(delay=delay))
        events: dict[int, trio.MemoryReceiveChannel[DiscoveryEvent]] = {}

        def watch(peer: Peer, events: dict[int, Any] = events) -> None:
            # Every delivery takes >= 0.1 s, so a peer knows nobody yet when it opens.
            assert peer.known_peers() == {}
            events[names.index(peer.peer_id)] = peer.discoveries[0].subscribe()

        results = await run_federation(
            tmp_path / f"setup{k}", ids, world=world, start_at=start, on_open=watch, leader=0
        )
        done = [results[i.peer_id.text] for i in ids]
        assert all(isinstance(s, RunSummary) for s in done), done
        summaries = [s for s in done if isinstance(s, RunSummary)]
        check_same_model(summaries)
        assert [index_of(ids, s) for s in summaries] == [(n, 0, (0, 1, 2)) for n in range(3)]
        outcomes.append((weights_digest(summaries[0]), tuple(summaries[0].federated_val_loss)))
        for member, channel in events.items():
            found = [e.peer_id for e in drain(channel) if e.kind == EventKind.FOUND]
            orders.add((member, *(names.index(p) for p in found)))
    # Each peer learned of the others in both orders over the three setups...
    assert orders == {
        (m, *o) for m in range(3) for o in itertools.permutations(set(range(3)) - {m})
    }
    # ...and the federation's result was the same each time.
    assert len(set(outcomes)) == 1, outcomes


def drain(channel: trio.MemoryReceiveChannel[DiscoveryEvent]) -> list[DiscoveryEvent]:
    out = []
    while True:
        try:
            out.append(channel.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            return out


def index_of(ids: Sequence[Identity], summary: RunSummary) -> tuple[int, int, tuple[int, ...]]:
    """(peer, leader, members) of a summary as positions in ``ids``."""
    pos = {i.peer_id.text: n for n, i in enumerate(ids)}
    return pos[summary.peer_id], pos[summary.leader], tuple(pos[m] for m in summary.members)


# --- 3. concurrent proposals -------------------------------------------------------------


async def test_a_hidden_lowest_peer_still_leads(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """B hears of A (the lowest) only when A calls it, so B settles first and leads.

    C and D know A and tell B to follow it; B stands down, A's call reaches B, and
    the one federation is A's.
    """
    ids = identities(4)
    a, b = ids[:2]
    # Join order B, C, D, A: the hub's sources are fedup-1 (B) ... fedup-4 (A).
    world = MemoryWorld(
        hub=MemoryDiscoveryHub(delay=lambda s, m: 60.0 if (s, m) == ("fedup-4", "fedup-1") else 0)
    )
    elected: list[str] = []
    results = await run_federation(
        tmp_path, ids, world=world, start_at=[0.3, 0.0, 0.01, 0.02], observe=elected
    )
    summaries = [results[i.peer_id.text] for i in ids]
    assert all(isinstance(s, RunSummary) for s in summaries), summaries
    done = [s for s in summaries if isinstance(s, RunSummary)]
    check_same_model(done)
    lead = index_of(ids, done[0])[1]  # whoever the draw chose, the same for all
    assert [index_of(ids, s) for s in done] == [(n, lead, (0, 1, 2, 3)) for n in range(4)]
    assert len({s.run_id for s in done}) == 1
    # Both A and B did try to lead.
    assert b.peer_id.short in elected and a.peer_id.short in elected
    assert trio.current_time() < 60  # nobody waited for the late announcement


async def test_the_drawn_leader_calls_members_it_never_discovered(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """The draw chooses C, whose discovery never finds D (bootstrap-only networks see
    partial views): the coordinator, which called D, hands C the roster's records with
    the draw's commit, and C calls D with them (the first form of the draw left D out)."""
    ids = identities(4)
    # Join order A, B, C, D: the hub's sources are fedup-1 (A) ... fedup-4 (D).
    world = MemoryWorld(
        hub=MemoryDiscoveryHub(
            delay=lambda s, m: 10_000.0 if (s, m) == ("fedup-4", "fedup-3") else 0
        )
    )
    opened: dict[str, Peer] = {}
    results = await run_federation(
        tmp_path, ids, world=world, start_at=[0.0, 0.01, 0.02, 0.03], opened=opened, leader=2
    )
    done = [results[i.peer_id.text] for i in ids]
    assert all(isinstance(s, RunSummary) for s in done), done
    summaries = [s for s in done if isinstance(s, RunSummary)]
    check_same_model(summaries)
    assert [index_of(ids, s) for s in summaries] == [(n, 2, (0, 1, 2, 3)) for n in range(4)]
    assert ids[3].peer_id not in opened[ids[2].peer_id.text].known_peers()  # never found


async def test_a_leader_called_by_a_lower_peer_stands_down(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """Two proposals at once: B is still waiting for a slow candidate when A calls it.

    E accepts connections but never answers a call, so B's round of calls lasts
    ``call_timeout``; A's call arrives in the middle, B follows A (its own round
    is cancelled) and every peer but E ends in A's federation with one model.
    """
    *ids, e = identities(5)
    a, b = ids[:2]
    world = MemoryWorld(
        hub=MemoryDiscoveryHub(delay=lambda s, m: 60.0 if (s, m) == ("fedup-5", "fedup-2") else 0)
    )
    elected: list[str] = []

    async def stuck(*args: object) -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:

        async def silent() -> None:
            async with Peer.open(config(e, tmp_path / "e"), lender(9), world=world) as peer:
                peer.formation.on_call = stuck  # type: ignore[method-assign]
                await trio.sleep_forever()

        nursery.start_soon(silent)  # joins first: fedup-1
        await trio.sleep(0.005)
        results = await run_federation(
            tmp_path, ids, world=world, start_at=[0.5, 0.0, 0.01, 0.02], observe=elected
        )
        nursery.cancel_scope.cancel()
    summaries = [results[i.peer_id.text] for i in ids]
    assert all(isinstance(s, RunSummary) for s in summaries), summaries
    done = [s for s in summaries if isinstance(s, RunSummary)]
    check_same_model(done)
    lead = index_of(ids, done[0])[1]
    assert [index_of(ids, s) for s in done] == [(n, lead, (0, 1, 2, 3)) for n in range(4)]
    assert b.peer_id.short in elected and a.peer_id.short in elected
    # A waited call_timeout for E too, then formed without it.
    assert trio.current_time() < 0.5 + 2 * LIMITS.call_timeout + 5


# --- 4. a member dies mid-run ------------------------------------------------------------


class Tripwire(TabularSource):
    """A lender whose ``after``-th training hop calls ``action`` (e.g. kill the peer)."""

    def __init__(self, seed: int, *, after: int, action: Callable[[], None]) -> None:
        super().__init__(generate_lender(seed, n_rows=400).table, target="default")
        self.after = after
        self.action = action
        self.hops = 0

    def build(self, schema: Any, settings: RunSettings) -> Any:
        task = super().build(schema, settings)
        train = task.train

        def counted(*args: Any) -> Any:
            out = train(*args)
            self.hops += 1
            if self.hops == self.after:
                self.action()
            return out

        task.train = counted
        return task


async def run_with_death(
    tmp_path: Path, victim: int, *, watcher: int, after: int
) -> tuple[list[Identity], dict[str, RunSummary | BaseException], float]:
    """Four peers; ``victim`` is cancelled when ``watcher`` trained its ``after``-th hop."""
    ids = identities(4)
    world = MemoryWorld()
    results: dict[str, RunSummary | BaseException] = {}
    died_at: list[float] = []
    doomed = trio.CancelScope()

    def kill() -> None:
        died_at.append(trio.current_time())
        doomed.cancel()

    tripwire = Tripwire(100 + watcher, after=after, action=kill)
    with trio.fail_after(DEADLINE):
        await _run_with_death(world, ids, tmp_path, victim, watcher, tripwire, doomed, results)
    assert died_at, "the watcher never trained enough hops"
    assert tripwire.hops >= after
    return ids, results, died_at[0]


async def _run_with_death(
    world: MemoryWorld,
    ids: list[Identity],
    tmp_path: Path,
    victim: int,
    watcher: int,
    tripwire: Tripwire,
    doomed: trio.CancelScope,
    results: dict[str, RunSummary | BaseException],
) -> None:
    async with trio.open_nursery() as nursery:
        for i, ident in enumerate(ids):
            cfg = config(
                ident, tmp_path / f"p{i}", min_peers=4, run=RunSettings(max_laps=6, patience=6)
            )
            source = tripwire if i == watcher else lender(100 + i)
            if i == victim:

                async def doomed_peer(
                    cfg: PeerConfig = cfg, source: TabularSource = source
                ) -> None:
                    with doomed:
                        await run_peer(world, cfg, source, results)

                nursery.start_soon(doomed_peer)
            else:
                nursery.start_soon(run_peer, world, cfg, source, results)


async def test_a_member_still_building_its_run_takes_the_first_model(
    autojump_clock: trio.testing.MockClock,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """B builds its run's initial state slowly (the first optimizer of a process can
    take seconds); A, formed with it, hands B the first model meanwhile.  B's link
    waits for its run instead of refusing A's as not ours (A would try again later)."""
    from fedup.peer.custody_driver import CustodyDriver

    ids = identities(3)
    slow = lender(101)
    real = CustodyDriver.template_for.__func__  # type: ignore[attr-defined]

    async def slow_template(cls: type[CustodyDriver], builder: Any, signed: Any) -> Any:
        if builder.source is slow:
            await trio.sleep(5.0)
        return await real(cls, builder, signed)

    monkeypatch.setattr(CustodyDriver, "template_for", classmethod(slow_template))
    with caplog.at_level(logging.INFO):
        results = await run_federation(tmp_path, ids, sources={1: slow})
    summaries = [results[i.peer_id.text] for i in ids]
    assert all(isinstance(s, RunSummary) and s.ok for s in summaries), summaries
    check_same_model([s for s in summaries if isinstance(s, RunSummary)])
    text = caplog.text
    assert "which is not ours" not in text
    assert "trying again" not in text


async def test_a_member_that_dies_holding_the_model_is_skipped(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """C dies right after training (before handing on): B keeps custody, waits
    ``hop_timeout`` for C to say ``passed``, declares C dead and sends its copy on."""
    ids, results, died_at = await run_with_death(tmp_path, victim=2, watcher=2, after=2)
    victim = ids[2].peer_id.text
    assert victim not in results  # cancelled: no summary, no error
    hops = [r for r in read_jsonl(tmp_path / "p2" / "metrics.jsonl") if r["type"] == "hop"]
    # It died inside its second hop (lap 1), before logging or handing it on.
    assert [(r["lap"], r["hop"]) for r in hops] == [(0, 2)]
    done = [results[i.peer_id.text] for i in ids if i.peer_id.text != victim]
    assert all(isinstance(s, RunSummary) for s in done), done
    summaries = [s for s in done if isinstance(s, RunSummary)]
    check_same_model(summaries)
    for s in summaries:
        assert s.dead == [victim]
        assert s.members == [i.peer_id.text for i in ids]  # the view does not change
        assert s.stop_reason == "max-laps" and s.laps == 6
    assert not (tmp_path / "p2" / "summary.json").exists()
    # The ring waited one hop_timeout for the silent member, and no longer.
    elapsed = trio.current_time() - died_at
    assert LIMITS.hop_timeout <= elapsed < LIMITS.hop_timeout + 5
    # B (the predecessor) logged why it skipped C.
    dead_lines = [r for r in read_jsonl(tmp_path / "p1" / "metrics.jsonl") if r["type"] == "dead"]
    b = ids[1].peer_id.text
    assert [(r["peer"], r["by"], r["why"]) for r in dead_lines] == [(victim, b, "timed-out")]


async def test_a_member_that_dies_between_hops_is_skipped_at_once(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """The leader dies while B trains (A handed the model on): nobody waits, D's
    hand-over to A fails to connect, and B (the lowest live member) starts the laps
    from then on."""
    ids, results, died_at = await run_with_death(tmp_path, victim=0, watcher=1, after=3)
    victim = ids[0].peer_id.text
    assert victim not in results
    done = [results[i.peer_id.text] for i in ids[1:]]
    assert all(isinstance(s, RunSummary) for s in done), done
    summaries = [s for s in done if isinstance(s, RunSummary)]
    check_same_model(summaries)
    assert all(s.dead == [victim] for s in summaries)
    assert trio.current_time() - died_at < 1  # unreachable is noticed at once
    # After the leader's death B starts the laps: its hops are at position 0.
    hops = [r for r in read_jsonl(tmp_path / "p1" / "metrics.jsonl") if r["type"] == "hop"]
    assert [(r["lap"], r["hop"]) for r in hops[:4]] == [(0, 1), (1, 1), (2, 1), (3, 0)]
    assert all(r["hop"] == 0 for r in hops[3:])
    leader = [r for r in read_jsonl(tmp_path / "p0" / "metrics.jsonl") if r["type"] == "hop"]
    assert [(r["lap"], r["hop"]) for r in leader] == [(0, 0), (1, 0), (2, 0)]
    dead_lines = [r for r in read_jsonl(tmp_path / "p3" / "metrics.jsonl") if r["type"] == "dead"]
    d = ids[3].peer_id.text
    assert [(r["peer"], r["by"], r["why"]) for r in dead_lines] == [(victim, d, "unreachable")]


# --- 6. data that do not fit -------------------------------------------------------------


def without_income(table: Table) -> Table:
    return attrs.evolve(table, columns=tuple(c for c in table.columns if c.name != "income"))


def age_as_text(table: Table) -> Table:
    return attrs.evolve(
        table,
        columns=tuple(
            Column(c.name, CATEGORICAL, np.array([f"{v:.0f}y" for v in c.values]))
            if c.name == "age"
            else c
            for c in table.columns
        ),
    )


def inverted_as_the_leader_spells_it(table: Table) -> Table:
    """The target read the other way round (``--positive-label`` naming the 0), spelled
    as the leader (lender 102) spells its target: one spelling, opposite classes."""
    leader = generate_lender(102, n_rows=400).table
    return attrs.evolve(
        table,
        target=(1 - table.target).astype(np.int8),
        negative_label=leader.positive_label,
        positive_label=leader.negative_label,
    )


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (age_as_text, "type conflicts 'age' (categorical here, numeric in the federation)"),
        (inverted_as_the_leader_spells_it, "which is the negative label in the federation"),
    ],
)
async def test_a_peer_whose_columns_do_not_fit_is_refused(
    autojump_clock: trio.testing.MockClock,
    tmp_path: Path,
    change: Callable[[Table], Table],
    named: str,
) -> None:
    ids = identities(4)
    odd = 1  # not the leader (a leader whose own data do not fit fails on its own)
    table = change(generate_lender(100 + odd, n_rows=400).table)
    results = await run_federation(
        tmp_path, ids, sources={odd: TabularSource(table, target="default")}, leader=2
    )
    error = results[ids[odd].peer_id.text]
    assert isinstance(error, FormationError), error
    assert named in str(error)
    assert ids[2].peer_id.text in str(error)  # who refused it: the drawn leader
    others = [results[i.peer_id.text] for n, i in enumerate(ids) if n != odd]
    assert all(isinstance(s, RunSummary) for s in others), others
    done = [s for s in others if isinstance(s, RunSummary)]
    check_same_model(done)
    members = [i.peer_id.text for n, i in enumerate(ids) if n != odd]
    assert all(s.members == members and s.dead == [] for s in done)
    assert not (tmp_path / ids[odd].peer_id.text[-8:] / "summary.json").exists()


async def test_a_column_some_members_lack_is_left_out_and_every_member_trains(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """It used to get the member refused ("missing columns 'income'")."""
    ids = identities(4)
    odd = 1
    table = without_income(generate_lender(100 + odd, n_rows=400).table)
    results = await run_federation(
        tmp_path, ids, sources={odd: TabularSource(table, target="default")}, leader=2
    )
    done = [results[i.peer_id.text] for i in ids]
    assert all(isinstance(s, RunSummary) for s in done), done
    check_same_model([s for s in done if isinstance(s, RunSummary)])
    federation = json.loads((Path(done[0].out_dir) / "federation.json").read_text())
    names = [c["name"] for c in federation["schema"]["columns"]]
    assert "income" not in names and "age" in names


async def test_a_member_that_cannot_accept_the_view_is_left_out_at_the_next_epoch(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """D's model has other layers, so D refuses the view (epoch 0) that B and C
    acknowledged.  The leader re-signs it without D (epoch 1); B and C acknowledge
    again and train under that view, not the first one."""
    ids = identities(4)
    odd = 3
    table = generate_lender(100 + odd, n_rows=400).table
    results = await run_federation(
        tmp_path,
        ids,
        sources={odd: TabularSource(table, target="default", hidden=(16,))},
        leader=1,
    )
    error = results[ids[odd].peer_id.text]
    assert isinstance(error, FormationError), error
    assert "my model's layout differs from the leader's" in str(error)
    others = [results[i.peer_id.text] for i in ids[:odd]]
    assert all(isinstance(s, RunSummary) for s in others), others
    done = [s for s in others if isinstance(s, RunSummary)]
    check_same_model(done)
    members = [i.peer_id.text for i in ids[:odd]]
    assert all(s.members == members and s.dead == [] for s in done)


async def test_a_peer_that_finds_too_few_others_gives_up_with_a_reason(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    (alone,) = identities(1)
    limits = attrs.evolve(LIMITS, peer_wait_timeout=45.0)
    cfg = config(alone, tmp_path / "alone", min_peers=2, limits=limits)
    start = trio.current_time()
    with pytest.raises(FormationError, match=r"found 1 of the 2 peers needed"):
        async with Peer.open(cfg, lender(1), world=MemoryWorld()) as peer:
            await peer.train()
    assert trio.current_time() - start == pytest.approx(45.0)


# --- 7. a member's own files ------------------------------------------------------------


async def test_a_member_whose_output_folder_holds_a_planted_link_stops_with_one_line(
    autojump_clock: trio.testing.MockClock,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Someone planted ``metrics.jsonl -> another file`` in B's output folder after B
    checked it (a link planted before is refused when the peer opens:
    test_a_link_planted_at_metrics_stops_start_before_it_joins_anyone). B refuses it
    (FileError naming the link) and writes nothing through it, both when the leader's
    first hand-over reaches B before B's own run is made (B learns of its membership
    late here) and when B makes its run; no traceback is logged by anyone, and the
    others carry on without B."""
    from fedup.errors import FileError
    from fedup.peer.formation_driver import FormationDriver

    ids = identities(3)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    folder = tmp_path / ids[1].peer_id.text[-8:]
    real_form = FormationDriver.form

    async def late_form(self: FormationDriver) -> Any:
        joined = await real_form(self)
        if self.me == ids[1].peer_id:
            (folder / "metrics.jsonl").symlink_to(victim)  # planted after the check
            await trio.sleep(5.0)  # the leader's first hand-over arrives meanwhile
        return joined

    monkeypatch.setattr(FormationDriver, "form", late_form)
    with caplog.at_level(logging.INFO):
        results = await run_federation(tmp_path, ids)
    refused = results[ids[1].peer_id.text]
    assert isinstance(refused, FileError), refused
    assert "metrics.jsonl is a symbolic link" in str(refused)
    assert victim.read_text() == "precious\n"
    assert not [r for r in caplog.records if r.exc_info is not None]
    early = [r for r in caplog.records if r.getMessage().startswith("cannot take run")]
    assert early, "the hand-over before B's run was made never reached B"
    for record in early:  # one line per refused hand-over, naming the sender and the link
        assert record.levelno == logging.ERROR
        assert ids[0].peer_id.text in record.getMessage()
        assert "metrics.jsonl is a symbolic link" in record.getMessage()
    others = [results[i.peer_id.text] for i in (ids[0], ids[2])]
    assert all(isinstance(s, RunSummary) for s in others), others
    for s in others:
        assert isinstance(s, RunSummary)
        assert s.dead == [ids[1].peer_id.text]
