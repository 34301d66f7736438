"""Many real peers in one trio process: the simulator's core.

Each simulated peer is a real :class:`~fedup.peer.Peer` (the code deployments
run) with its own identity, data, listener and in-memory discovery, on one
:class:`~fedup.sim.network.SimNetwork` and one
:class:`~fedup.net.discovery.MemoryDiscoveryHub`.  Faults (:class:`Faults`)
are injected around the peers, never inside them:

* link latency and bandwidth, dropped connections and partitions (cuts): in
  the network;
* a killed peer: its task (everything it runs) is cancelled, as a crash;
* a slow peer: after each hop it trains, its next connection waits.

The faults themselves are values (:mod:`fedup.sim.faults`), triggered at
ring positions.  Each peer's event stream (:mod:`fedup.peer.events`) is
watched: when a peer reports that it trained hop (lap, position), faults
waiting for that hop fire at once, so "kill peer 3 when lap 1, hop 2 has
been trained" happens at that point whatever the timing.

Reproducible: identities derive from the seed (``seed`` also becomes the run
seed), the ring order is the peer IDs' order, and every hop's training is
seeded, so the same seed and sources give the same final weights
(:attr:`SimResult.weights_sha256`).  The run ID, which the model *file* names,
derives from the seed as well, so the file's hash is reproducible too.

With ``virtual_clock`` the run uses :class:`trio.testing.MockClock` with
autojump: time advances only when every peer waits, so settle periods,
timeouts and link delays cost no real time, and training (done inline,
``train_in_thread=False``) takes no virtual time.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Final

import attrs
import trio
import trio.testing

from fedup.config import DEFAULT_LIMITS, Limits
from fedup.errors import ConfigError, FedupError
from fedup.identity import Identity
from fedup.learn.schema import FeatureSchema
from fedup.learn.weights import load_safetensors
from fedup.net.discovery import MemoryDiscoveryHub
from fedup.peer import Peer, PeerConfig, RunSummary, TabularSource, TaskSource
from fedup.peer import events as ev
from fedup.protocol.formation_events import Stage
from fedup.protocol.peer_id import PeerId
from fedup.protocol.provenance import shared_process
from fedup.protocol.view import RunSettings
from fedup.sim.faults import Cut, Drop, Faults, Kill
from fedup.sim.network import SimNetwork
from fedup.sim.wallclock import Timeline, TimelineRecorder
from fedup.sim.world import MemoryWorld

__all__ = [
    "LapMark",
    "PeerOutcome",
    "SimResult",
    "SimSettings",
    "run_simulation",
    "sim_identity",
    "simulate",
]

log = logging.getLogger("fedup.sim")


@attrs.frozen
class SimSettings:
    """How to run a simulation."""

    seed: int = 0
    """Identities and the run seed (it replaces ``run.seed``)."""
    run: RunSettings = attrs.field(factory=RunSettings)
    """The federation's settings (every peer proposes the same)."""
    settle: float = 1.0
    """Seconds without a new peer before forming (every peer waits for all the others)."""
    virtual_clock: bool = True
    """Run on :class:`trio.testing.MockClock` (autojump): waits cost no real time."""
    faults: Faults = attrs.field(factory=Faults)
    limits: Limits = DEFAULT_LIMITS
    discovery_delay: float = 0.0
    """Seconds each announcement takes to reach each peer."""
    deadline: float | None = None
    """Clock seconds after which peers still running are stopped (None: their own deadlines)."""
    min_peers: int | None = None
    """Peers each one waits for before forming, itself included (None: every simulated
    peer); fewer let a federation form without some of them."""


@attrs.frozen
class LapMark:
    """When the ring started training a lap (its first hop)."""

    lap: int
    clock: float
    """trio time (virtual seconds with the virtual clock)."""
    wall: float
    """Real seconds since the simulation started."""
    rss: int
    """Resident memory of the process then, bytes (-1 where unknown)."""


@attrs.frozen(eq=False)
class PeerOutcome:
    """What became of one simulated peer."""

    index: int
    peer_id: str
    name: str
    """Where its data came from (the table's source)."""
    out_dir: Path
    summary: RunSummary | None
    """Its run summary, if it finished."""
    error: str | None
    """Why it did not finish (an error, ``killed`` or ``deadline``)."""
    bytes_sent: int
    """Bytes it sent over the simulated network (handshakes, control, blobs)."""
    bytes_received: int
    hops: int
    """Training hops it did."""
    restarts: int = 0
    """Times it was killed and started again (it resumed its run each time)."""


@attrs.frozen(eq=False)
class SimResult:
    """What a simulation did."""

    peers: tuple[PeerOutcome, ...]
    settings: SimSettings
    run: RunSettings | None
    """The run's settings as agreed in the view (None if no federation formed)."""
    schema: FeatureSchema | None
    """The federation's merged schema (tabular tasks)."""
    laps: tuple[LapMark, ...]
    """The start of every training lap."""
    formed: float | None
    """Clock time of the first hop (formation took this long)."""
    finished: float | None
    """Clock time when the first peer finished (the final model existed)."""
    clock_seconds: float
    wall_seconds: float
    peak_rss: int
    """Peak resident memory of the process so far, bytes (-1 where unknown)."""
    weights_sha256: str | None
    """SHA-256 of the final model's tensors (names and bytes), if every finished peer
    saved the same model; the same seed and data give the same value."""
    dropped: tuple[tuple[int, int, float], ...]
    """Connections dropped: (dialer, listener, clock time)."""
    unreachable: tuple[tuple[int, int, float], ...] = ()
    """Dials that a cut (:class:`~fedup.sim.faults.Cut`) made fail: (dialer, listener,
    clock time)."""
    connections: dict[tuple[int, int], int] = attrs.field(factory=dict)
    """Connections opened, by (dialer, listener): calls, links, and re-dials of broken links."""
    timeline: Timeline = attrs.field(factory=Timeline)
    """Formation, every hop's computing and every hand-over's size
    (:mod:`fedup.sim.wallclock` makes the modelled wall-clock of them)."""

    @property
    def finished_peers(self) -> list[PeerOutcome]:
        return [p for p in self.peers if p.summary is not None]

    @property
    def model_sha256(self) -> str | None:
        """The model file's hash, if every finished peer saved the same file."""
        hashes = {p.summary.model_sha256 for p in self.peers if p.summary is not None}
        return hashes.pop() if len(hashes) == 1 else None


def sim_identity(seed: int, index: int) -> Identity:
    """The identity of simulated peer ``index`` (the same for the same seed)."""
    return Identity(hashlib.sha256(f"fedup-sim:{seed}:{index}".encode()).digest())


Watcher = Callable[[int, PeerId, float, ev.PeerEvent], None]
"""``watcher(index, peer, time, event)``: simulated peer ``index`` reported ``event``."""


def simulate(
    sources: Sequence[TaskSource],
    out_dir: Path,
    settings: SimSettings = SimSettings(),
    *,
    watch: Watcher | None = None,
) -> SimResult:
    """Run a whole simulation (its own ``trio.run``); see :func:`run_simulation`."""
    clock = trio.testing.MockClock(autojump_threshold=0) if settings.virtual_clock else None
    job = functools.partial(run_simulation, sources, out_dir, settings, watch=watch)
    with _collector_for_many_objects(), shared_process():  # one check per statement
        return trio.run(job, clock=clock)


GC_FIRST_THRESHOLD: Final = 50_000
"""Allocations between young-generation collections while a simulation runs (Python's
default is 700).  Hundreds of peers create millions of small objects (sightings,
notices, events); with the default, collections took 14% of a 500-peer run, with this
3%, at the same peak memory."""


@contextlib.contextmanager
def _collector_for_many_objects() -> Iterator[None]:
    """Collect young objects less often for the duration (restored afterwards)."""
    before = gc.get_threshold()
    gc.set_threshold(max(before[0], GC_FIRST_THRESHOLD), *before[1:])
    try:
        yield
    finally:
        gc.set_threshold(*before)


async def run_simulation(
    sources: Sequence[TaskSource],
    out_dir: Path,
    settings: SimSettings = SimSettings(),
    *,
    watch: Watcher | None = None,
) -> SimResult:
    """Run one real peer per source until every peer finished, failed or was killed.

    Peer ``i`` has data ``sources[i]`` and writes into ``out_dir/peers/NNN-<id>``.
    ``watch`` is called at once for every event of every peer (a live display).
    Call it from a trio program (its clock is used as it is: run it under a
    ``MockClock`` for virtual time), or use :func:`simulate`.  Raises
    :class:`~fedup.errors.ConfigError` for unusable settings; a peer's failure
    is recorded in its :class:`PeerOutcome`, not raised.
    """
    sim = _Simulation(sources, out_dir, settings, watch)
    return await sim.run()


# --------------------------------------------------------------------------
# The machinery


def _rss(field: str = "VmRSS") -> int:
    """A memory figure of this process from /proc (bytes), or -1."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return -1


def weights_digest(path: Path) -> str:
    """SHA-256 of a saved model's tensors (sorted names and raw bytes), not its metadata."""
    tensors = load_safetensors(path)
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode() + b"\0" + tensors[name].contiguous().numpy().tobytes())
    return h.hexdigest()


class _Simulation:
    def __init__(
        self,
        sources: Sequence[TaskSource],
        out_dir: Path,
        settings: SimSettings,
        watch: Watcher | None = None,
    ) -> None:
        n = len(sources)
        faults = settings.faults
        for k in faults.kills:
            _check_index(k.peer, n, "kill")
            _check_stage(k)
        if settings.min_peers is not None and not 1 <= settings.min_peers <= n:
            raise ConfigError(
                f"min_peers {settings.min_peers} must be from 1 to the {n} simulated peers"
            )
        for d in faults.drops:
            _check_index(d.src, n, "drop")
            _check_index(d.dst, n, "drop")
        for s in faults.slow:
            _check_index(s.peer, n, "slow")
        for c in faults.cuts:
            _check_cut(c, n)
        self.settings = settings
        self.watch = watch
        self.sources = sources
        self.out_dir = out_dir
        self.run_settings = attrs.evolve(settings.run, seed=settings.seed)
        self.identities = [sim_identity(settings.seed, i) for i in range(n)]
        self.network = SimNetwork(
            link=faults.link,
            links=faults.links,
            index_of={ident.peer_id: i for i, ident in enumerate(self.identities)},
        )
        self.world = MemoryWorld(
            network=self.network,
            hub=MemoryDiscoveryHub(delay=settings.discovery_delay),
            slow={self.identities[s.peer].peer_id: s.delay for s in faults.slow},
            draw_seed=f"fedup-sim-draw:{settings.seed}".encode(),
        )
        self.scopes = [trio.CancelScope() for _ in range(n)]
        self.peers: list[Peer | None] = [None] * n
        self.summaries: list[RunSummary | None] = [None] * n
        self.errors: list[str | None] = [None] * n
        self.hops = [0] * n
        self.marks: list[LapMark] = []
        self.timeline = TimelineRecorder(
            {ident.peer_id: i for i, ident in enumerate(self.identities)}
        )
        self.triggers: dict[tuple[int, int], list[Kill | Drop | Cut]] = {}
        faulty: list[Kill | Drop | Cut] = [*faults.kills, *faults.drops, *faults.cuts]
        self.training_kills: dict[tuple[int, int, int], Kill] = {}
        self.stage_kills: dict[tuple[int, str], Kill] = {}
        for fault in faulty:
            if isinstance(fault, Kill) and fault.stage is not None:
                self.stage_kills[(fault.peer, fault.stage)] = fault
                continue
            if isinstance(fault, Kill) and fault.training:
                self.training_kills[(fault.peer, fault.lap, fault.hop)] = fault
                continue
            if isinstance(fault, Drop) and fault.lap is None:
                self.network.arm_drop(fault.src, fault.dst, fault.after_bytes)
                continue
            assert fault.lap is not None
            self.triggers.setdefault((fault.lap, fault.hop), []).append(fault)
        self._start_wall = 0.0
        self._start_clock = 0.0
        self.formed: float | None = None
        self.finished: float | None = None
        self._settled = [False] * n
        self._all_settled = trio.Event()
        self._end_clock = 0.0
        self._end_wall = 0.0
        self.restarting: set[int] = set()
        """Peers killed that will be started again (not settled meanwhile)."""
        self.restarts = [0] * n
        self._persist = any(k.restart_after is not None for k in faults.kills)
        """Peers save their run (run-state files) only when some will be restarted."""
        self._nursery: trio.Nursery | None = None

    def _round_trained(self, index: int, event: ev.RoundTrained) -> None:
        """Peer ``index`` trained its part of a parallel round: the round's mark, and a
        :class:`Kill` of that peer at that round (``Kill(peer, lap=round)``) before its
        all-reduce."""
        now = trio.current_time() - self._start_clock
        if self.formed is None:
            self.formed = now
        if event.round < self.run_settings.max_laps:
            self.hops[index] += 1
            if not self.marks or self.marks[-1].lap < event.round:
                wall = time.perf_counter() - self._start_wall
                self.marks.append(LapMark(event.round, now, wall, _rss()))
        kill = self.training_kills.pop((index, event.round, 0), None)
        if kill is not None:
            self._kill(kill)
        self._fire(event.round, 0)  # the faults of "lap L, hop 0": round L

    def on_event(self, index: int, peer: PeerId, at: float, event: ev.PeerEvent) -> None:
        """Peer ``index`` reported ``event`` (called at once, in that peer's task)."""
        self.timeline.note(index, at - self._start_clock, event)
        if isinstance(event, ev.FormationStage):
            kill = self.stage_kills.pop((index, event.stage), None)
            if kill is not None:
                self._kill(kill)
            return
        if isinstance(event, ev.Training):
            kill = self.training_kills.pop((index, event.lap, event.hop), None)
            if kill is not None:
                self._kill(kill)
            return
        if isinstance(event, ev.RoundTrained):  # the parallel mode: a Kill's lap is a round
            self._round_trained(index, event)
            return
        if not isinstance(event, ev.HopTrained):
            return
        lap = event.lap
        if lap < self.run_settings.max_laps:  # a training hop (lap max_laps only evaluates)
            self.hops[index] += 1
        if self.formed is None:
            self.formed = trio.current_time() - self._start_clock
        if lap < self.run_settings.max_laps and (not self.marks or self.marks[-1].lap < lap):
            self.marks.append(
                LapMark(
                    lap,
                    trio.current_time() - self._start_clock,
                    time.perf_counter() - self._start_wall,
                    _rss(),
                )
            )
        self._fire(event.lap, event.hop)

    def _fire(self, lap: int, hop: int) -> None:
        """Carry out the faults set for when position (``lap``, ``hop``) was trained."""
        for fault in self.triggers.pop((lap, hop), []):
            if isinstance(fault, Kill):
                self._kill(fault)
            elif isinstance(fault, Cut):
                self._cut(fault)
            else:
                self.network.arm_drop(fault.src, fault.dst, fault.after_bytes)

    async def run(self) -> SimResult:
        self._start_wall = time.perf_counter()
        self._start_clock = trio.current_time()
        deadline = self.settings.deadline
        with trio.move_on_after(math.inf if deadline is None else deadline) as scope:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for i in range(len(self.sources)):
                    nursery.start_soon(self._peer, i)
                await self._all_settled.wait()
                # Everyone is done: stop all peers at once.  Leaving one by one would
                # make every remaining peer process every other's goodbye (N^2 notices).
                self._end_clock = trio.current_time()
                self._end_wall = time.perf_counter()
                nursery.cancel_scope.cancel()
        if scope.cancelled_caught:
            self._end_clock = trio.current_time()
            self._end_wall = time.perf_counter()
            for i, s in enumerate(self.summaries):
                if s is None and self.errors[i] is None:
                    self.errors[i] = "deadline"
        return self._result()

    def _kill(self, fault: Kill) -> None:
        if fault.delay > 0:
            assert self._nursery is not None
            self._nursery.start_soon(self._kill_later, fault)
            return
        if fault.stage is not None:
            log.info("killing peer %d when its formation is %s", fault.peer, fault.stage)
        else:
            when = "while training" if fault.training else "after"
            log.info("killing peer %d %s lap %d hop %d", fault.peer, when, fault.lap, fault.hop)
        self.errors[fault.peer] = "killed"
        if fault.restart_after is not None:
            self.restarting.add(fault.peer)
            assert self._nursery is not None
            self._nursery.start_soon(self._restart, fault.peer, fault.restart_after)
        self.scopes[fault.peer].cancel()

    async def _kill_later(self, fault: Kill) -> None:
        """Kill as ``fault`` says, ``fault.delay`` seconds after its trigger."""
        await trio.sleep(fault.delay)
        self._kill(attrs.evolve(fault, delay=0.0))

    def _cut(self, fault: Cut) -> None:
        if fault.delay > 0:
            assert self._nursery is not None
            self._nursery.start_soon(self._cut_later, fault)
            return
        log.info(
            "cutting peers %s off for %g s after lap %d hop %d",
            list(fault.peers),
            fault.duration,
            fault.lap,
            fault.hop,
        )
        cut = self.network.cut_off(fault.peers)
        assert self._nursery is not None
        self._nursery.start_soon(self._heal_later, cut, fault.duration)

    async def _cut_later(self, fault: Cut) -> None:
        """Cut as ``fault`` says, ``fault.delay`` seconds after its trigger."""
        await trio.sleep(fault.delay)
        self._cut(attrs.evolve(fault, delay=0.0))

    async def _heal_later(self, cut: frozenset[int], duration: float) -> None:
        await trio.sleep(duration)
        log.info("healing the cut of peers %s", sorted(cut))
        self.network.heal(cut)

    async def _restart(self, i: int, delay: float) -> None:
        """Start killed peer ``i`` again after ``delay`` s (its task has ended by then)."""
        await trio.sleep(delay)
        log.info("restarting peer %d", i)
        self.restarts[i] += 1
        self.errors[i] = None
        self.scopes[i] = trio.CancelScope()
        self.restarting.discard(i)
        await self._peer(i)

    def _settle(self, i: int) -> None:
        """Peer ``i`` has finished, failed or died (and is not to be restarted)."""
        if i in self.restarting:
            return
        if not self._settled[i]:
            self._settled[i] = True
            if all(self._settled):
                self._all_settled.set()

    async def _peer(self, i: int) -> None:
        ident = self.identities[i]
        config = PeerConfig(
            identity=ident,
            out_dir=self._out_dir(i),
            min_peers=self.settings.min_peers or len(self.sources),
            settle=self.settings.settle,
            train_in_thread=False,
            run=self.run_settings,
            limits=self.settings.limits,
            run_id=hashlib.sha256(f"fedup-sim-run:{self.settings.seed}".encode()).digest()[:16],
            state_dir=self._out_dir(i) / "state" if self._persist else None,
        )
        try:
            with self.scopes[i]:
                try:
                    async with Peer.open(config, self.sources[i], world=self.world) as peer:
                        self.peers[i] = peer
                        peer.events.watch(functools.partial(self.on_event, i))
                        if self.watch is not None:
                            peer.events.watch(functools.partial(self.watch, i))
                        self.summaries[i] = await peer.train()
                        if self.finished is None:
                            self.finished = trio.current_time() - self._start_clock
                        self._settle(i)
                        await trio.sleep_forever()  # keep serving until all are done
                except* FedupError as group:  # Peer.train may raise it inside a group
                    exc = group.exceptions[0]
                    while isinstance(exc, BaseExceptionGroup):
                        exc = exc.exceptions[0]
                    log.warning("peer %d (%s) failed: %s", i, ident.peer_id.short, exc)
                    self.errors[i] = f"{type(exc).__name__}: {exc}"
        finally:
            self._settle(i)

    def _out_dir(self, i: int) -> Path:
        """Where peer ``i`` writes its run (its ``PeerConfig.out_dir``)."""
        return self.out_dir / "peers" / f"{i:03d}-{self.identities[i].peer_id.text[-8:]}"

    def _result(self) -> SimResult:
        runs = (p.custody or p.parallel for p in self.peers if p is not None)
        run = next((r for r in runs if r is not None), None)  # a ring's or a parallel run's
        schema = run.schema if run is not None else None
        outcomes = []
        for i, ident in enumerate(self.identities):
            source = self.sources[i]
            name = source.table.source if isinstance(source, TabularSource) else f"peer {i}"
            outcomes.append(
                PeerOutcome(
                    index=i,
                    peer_id=ident.peer_id.text,
                    name=name,
                    out_dir=self._out_dir(i),
                    summary=self.summaries[i],
                    error=None if self.summaries[i] is not None else self.errors[i] or "unknown",
                    bytes_sent=self.network.bytes[str(i)],
                    bytes_received=self.network.bytes[f"{i}:received"],
                    hops=self.hops[i],
                    restarts=self.restarts[i],
                )
            )
        done = [o for o in outcomes if o.summary is not None]
        files = {o.summary.model_sha256 for o in done if o.summary is not None}
        digest = None
        if len(files) == 1:
            first = done[0].summary
            assert first is not None
            digest = weights_digest(Path(first.out_dir) / "model.safetensors")
        return SimResult(
            peers=tuple(outcomes),
            settings=self.settings,
            run=run.view.settings if run is not None else None,
            schema=schema,
            laps=tuple(self.marks),
            formed=self.formed,
            finished=self.finished,
            clock_seconds=self._end_clock - self._start_clock,
            wall_seconds=self._end_wall - self._start_wall,
            peak_rss=_rss("VmHWM"),
            weights_sha256=digest,
            dropped=tuple(self.network.dropped),
            unreachable=tuple(self.network.unreachable),
            connections=dict(self.network.connections),
            timeline=self.timeline.timeline(),
        )


def _check_cut(cut: Cut, n: int) -> None:
    for i in cut.peers:
        _check_index(i, n, "cut")
    if not 0 < len(set(cut.peers)) < n:
        raise ConfigError(f"cut: name at least one peer and not all {n}, got {list(cut.peers)}")
    if not cut.duration > 0:
        raise ConfigError(f"cut: the duration must be positive, got {cut.duration:g} s")
    if not cut.delay >= 0:
        raise ConfigError(f"cut: the delay must not be negative, got {cut.delay:g} s")


def _check_index(i: int, n: int, what: str) -> None:
    if not 0 <= i < n:
        raise ConfigError(f"{what}: peer {i} is not one of the {n} simulated peers (0..{n - 1})")


def _check_stage(kill: Kill) -> None:
    """A kill at a formation stage names a stage, and is not also a kill while training."""
    if kill.stage is None:
        return
    stages = [s.value for s in Stage]
    if kill.stage not in stages:
        raise ConfigError(
            f"kill: {kill.stage!r} is not a formation stage (one of {', '.join(stages)})"
        )
    if kill.training:
        raise ConfigError("kill: a kill at a formation stage cannot also be while training")
