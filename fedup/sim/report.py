"""The simulation's report: the federated model against centralized and local-only training.

:func:`build_report` turns a :class:`~fedup.sim.runner.SimResult` into the
JSON-ready dict written as ``report.json``; the comparison itself (same
held-out rows, same model, splits and epoch budget for every model) is
:mod:`fedup.learn.comparison`, shared with ``fedup-peer demo``.  Bytes sent:
what a peer sent over the simulated network (federated), the encoded rows it
would hand to a central server (centralized), nothing (local-only).  With
``--personal-layers``, ``personalized`` scores each member's personal model on its
own split and on the union, beside its summary's shared and local-only figures.

``time_to_quality`` puts each model's cost side by side: data passes, modelled
and real wall seconds, bytes sent per peer, and the modelled seconds until it
came within 1% of the final centralized model's validation loss on the union
(the federation's modelled wall-clock is :mod:`fedup.sim.wallclock`'s critical
path; centralized and local-only are timed as they ran).

With the baselines, ``fedavg`` is FedAvg-style parallel training
(:mod:`fedup.learn.fedavg`) on the same tasks and settings.  Its modelled
wall-clock (:func:`fedup.sim.wallclock.parallel_clock`) adds up its rounds: each round lasts as long
as its slowest member's measured computing, plus a bandwidth-optimal ring
all-reduce of the model over the simulated links; ``hybrid`` is the hybrid mode
(:mod:`fedup.learn.hybrid`) with the run's ``sub_rings`` and ``sync_laps``, its clock
(:func:`fedup.sim.wallclock.hybrid_clock`) each round's slowest sub-ring's chain of hops
and hand-overs, then the all-reduce.  A run in the parallel or hybrid mode is modelled
by the same clocks from its members' measured rounds (``rounds_clock``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fedup.errors import FedupError
from fedup.learn.baselines import RingResult, federation_of, score
from fedup.learn.comparison import centralized_entry, local_only_entry, model_entry, scores
from fedup.learn.fedavg import FedAvgResult, RoundTime, fedavg
from fedup.learn.hybrid import hybrid, relay_template
from fedup.learn.lap_sums import PACKED_SIZE
from fedup.learn.parallel import TAIL
from fedup.learn.ring import RingSettings
from fedup.learn.task import TensorTask
from fedup.learn.weights import load_safetensors
from fedup.peer import TaskSource
from fedup.protocol.allreduce_messages import ELEMENT_SIZE
from fedup.protocol.peer_id import PeerId
from fedup.protocol.relay import sub_rings
from fedup.protocol.ring import ring_order
from fedup.protocol.view import RunSettings, run_settings_json
from fedup.sim.runner import SimResult
from fedup.sim.wallclock import (
    CriticalPath,
    LinkModel,
    ParallelClock,
    critical_path,
    hybrid_clock,
    parallel_clock,
    time_to_target,
)

__all__ = ["TARGET_MARGIN", "build_report"]

TARGET_MARGIN = 0.01
"""Time to quality: within 1% of the final centralized model's validation loss."""


def _tasks(result: SimResult, sources: Sequence[TaskSource]) -> list[TensorTask]:
    if result.run is None:
        raise FedupError("no federation was formed: nothing to report")
    tasks = []
    for source in sources:
        task = source.build(result.schema, result.run)
        if not isinstance(task, TensorTask):
            raise FedupError("the report needs tasks with in-memory tensors (TensorTask)")
        tasks.append(task)
    return tasks


def build_report(
    result: SimResult, sources: Sequence[TaskSource], *, baselines: bool = False
) -> dict[str, Any]:
    """The report of a simulation (JSON-ready); see the module docstring.

    ``sources`` are the ones the simulation ran.  Raises
    :class:`~fedup.errors.FedupError` if no peer finished (there is no
    federated model to score).
    """
    tasks = _tasks(result, sources)
    done = result.finished_peers
    if not done or done[0].summary is None:
        raise FedupError("no peer finished the run: there is no federated model to score")
    first = done[0].summary
    weights = load_safetensors(Path(first.out_dir) / "model.safetensors")
    report: dict[str, Any] = {
        "peers": len(sources),
        "seed": result.settings.seed,
        "settings": run_settings_json(result.run) if result.run is not None else None,
        "mode": result.run.algorithm if result.run is not None else None,
        "simulation": _simulation(result),
        "data": [
            {
                "index": p.index,
                "peer_id": p.peer_id,
                "name": p.name,
                "train_rows": t.n_train,
                "val_rows": t.n_val,
                "positive_rate": float(torch.cat([t.y_train, t.y_val]).mean())
                if t.binary
                else None,
                "finished": p.summary is not None,
                "error": p.error,
                "listed_dead": any(
                    o.summary is not None and p.peer_id in o.summary.dead for o in done
                ),
            }
            for p, t in zip(result.peers, tasks, strict=True)
        ],
    }
    fed_peers = [
        {
            "peer": p.index,
            "epochs": first.data_passes,
            "wall_seconds": result.wall_seconds,
            "bytes_sent": p.bytes_sent,
        }
        for p in result.peers
    ]
    report["federated"] = model_entry(weights, tasks, fed_peers)
    personal = _personal_entry(result, tasks)
    if personal is not None:
        report["personalized"] = personal
    central: RingResult | None = None
    local: list[RingResult] = []
    parallel: dict[str, tuple[FedAvgResult, ParallelClock]] = {}
    if baselines:
        settings = RingSettings.for_run(result.run) if result.run is not None else RingSettings()
        report["centralized"], central = centralized_entry(tasks, settings)
        report["fedavg"], parallel["fedavg"] = _fedavg_entry(result, tasks, settings)
        report["hybrid"], parallel["hybrid"] = _hybrid_entry(result, tasks, settings)
        report["local_only"], local, _ = local_only_entry(tasks, settings)
    model_bytes = sum(v.element_size() * v.nelement() for v in weights.values())
    report["time_to_quality"] = _time_to_quality(
        result, report, central, local, parallel, tasks[0], weights, model_bytes=model_bytes
    )
    return report


def _links(result: SimResult) -> LinkModel:
    faults = result.settings.faults
    return LinkModel(link=faults.link, links=faults.links)


def _hold(result: SimResult) -> dict[int, float]:
    return {s.peer: s.delay for s in result.settings.faults.slow}


def _fedavg_entry(
    result: SimResult, tasks: Sequence[TensorTask], settings: RingSettings
) -> tuple[dict[str, Any], tuple[FedAvgResult, ParallelClock]]:
    """FedAvg on the same tasks and settings: its entry (bytes sent: the all-reduces')."""
    run = fedavg(tasks, settings)
    clock = parallel_clock(
        run.rounds, run.model_bytes, _links(result), _hold(result), sums_bytes=PACKED_SIZE
    )
    return _rounds_entry(run, clock, tasks)


def _rounds_entry(
    run: FedAvgResult, clock: ParallelClock, tasks: Sequence[TensorTask]
) -> tuple[dict[str, Any], tuple[FedAvgResult, ParallelClock]]:
    """A one-process run in rounds as a report entry: every peer with the run's passes,
    wall seconds and its clock's bytes per member."""
    per_peer = [
        {"peer": i, "epochs": run.passes, "wall_seconds": run.seconds,
         "bytes_sent": clock.bytes_per_member}
        for i in range(len(tasks))
    ]  # fmt: skip
    return model_entry(run.weights, tasks, per_peer), (run, clock)


def _hybrid_entry(
    result: SimResult, tasks: Sequence[TensorTask], settings: RingSettings
) -> tuple[dict[str, Any], tuple[FedAvgResult, ParallelClock]]:
    """The hybrid mode in one process on the same tasks and settings, and the run's
    ``sub_rings`` and ``sync_laps``: its entry (bytes sent: the relay's and the
    all-reduces')."""
    run_settings = result.run or RunSettings()
    fed = federation_of(tasks)
    order = _ring_indices(result)
    ordered = [tasks[i] for i in order]
    run = hybrid(ordered, settings, sub_ring_setting=run_settings.sub_rings,
                 sync_laps=run_settings.sync_laps, federation=fed)  # fmt: skip
    clock = _hybrid_clock(run.rounds, result, run.model_bytes, _relay_bytes(tasks[0], run))
    return _rounds_entry(run, clock, tasks)


def _ring_indices(result: SimResult) -> list[int]:
    """The peers' indices in ring order."""
    by_id = {p.peer_id: p.index for p in result.peers}
    ids = ring_order(PeerId.from_text(p.peer_id) for p in result.peers)
    return [by_id[i.text] for i in ids]


def _relay_bytes(task: TensorTask, run: FedAvgResult) -> int:
    """Bytes of the hybrid relay's state: the model and the optimizer's, as float32."""
    return ELEMENT_SIZE * sum(t.numel() for t in relay_template(task, run.weights).values())


def _hybrid_clock(
    rounds: Sequence[RoundTime], result: SimResult, model_bytes: int, relay_bytes: int
) -> ParallelClock:
    run = result.run or RunSettings()
    sizes = [len(r) for r in sub_rings(range(len(result.peers)), run.sub_rings)]
    return hybrid_clock(
        rounds, sizes, run.sync_laps, model_bytes, relay_bytes, _links(result),
        sums_bytes=ELEMENT_SIZE * TAIL,
    )  # fmt: skip


def _time_to_quality(
    result: SimResult,
    report: dict[str, Any],
    central: RingResult | None,
    local: Sequence[RingResult],
    parallel: dict[str, tuple[FedAvgResult, ParallelClock]],
    task: TensorTask,
    weights: dict[str, torch.Tensor],
    *,
    model_bytes: int = 0,
) -> dict[str, Any]:
    """Each model's data passes, modelled and real wall seconds, bytes sent per peer and
    modelled seconds to the target (see the module docstring and docs/simulator.md)."""
    path = critical_path(result.timeline, _links(result), hold=_hold(result))
    reference = report["centralized"]["union"]["val_loss"] if central is not None else None
    target = None if reference is None else reference * (1 + TARGET_MARGIN)
    first = result.finished_peers[0].summary
    assert first is not None
    fed_losses = zip(first.federated_laps, first.federated_val_loss, strict=True)
    total, ends = path.total, path.lap_ends
    rounds = _rounds_clock(result, model_bytes, task, weights)
    if rounds is not None:  # the parallel mode: rounds, not hops
        start = result.timeline.formation or 0.0
        total = start + rounds.total
        ends = {r: start + t for r, t in rounds.round_ends.items()}
    models: dict[str, Any] = {
        "federated": _cost(
            first.data_passes,
            total,
            result.wall_seconds,
            sum(p.bytes_sent for p in result.peers) / len(result.peers),
            time_to_target(ends, fed_losses, target),
        )
    }
    if central is not None:
        ends = {-1: 0.0, **dict(enumerate(central.lap_seconds))}
        reached = time_to_target(ends, ((h.lap, h.loss) for h in central.history), target)
        pooled = report["centralized"]["mean"]["bytes_sent"]
        models["centralized"] = _cost(central.passes, central.seconds, central.seconds, pooled,
                                      reached)  # fmt: skip
    for name, (run, clock) in parallel.items():
        reached = time_to_target(clock.round_ends, ((h.lap, h.loss) for h in run.history), target)
        models[name] = _cost(run.passes, clock.total, run.seconds, clock.bytes_per_member,
                             reached)  # fmt: skip
    if local:
        seconds = [r.seconds for r in local]
        models["local_only"] = _cost(
            sum(r.passes for r in local) / len(local), max(seconds), sum(seconds), 0, None
        )
    out = {
        "target": f"within {TARGET_MARGIN:.0%} of the final centralized validation loss",
        "centralized_val_loss": reference,
        "target_val_loss": target,
        "critical_path": _path(path, result),
        "models": models,
    }
    if rounds is not None:
        out["rounds_clock"] = {
            "formation_seconds": result.timeline.formation,
            "compute_seconds": rounds.compute,
            "allreduce_seconds": rounds.transfer,
            "rounds": len(result.timeline.rounds),
            "model_bytes": model_bytes,
        }
    for name, (run, clock) in parallel.items():
        out[f"{name}_clock"] = {
            "compute_seconds": clock.compute,
            "allreduce_seconds": clock.transfer,
            "rounds": len(run.rounds),
            "model_bytes": run.model_bytes,
            "round_end_seconds": {str(r): t for r, t in sorted(clock.round_ends.items())},
        }
    return out


def _rounds_clock(
    result: SimResult, model_bytes: int, task: TensorTask, weights: dict[str, torch.Tensor]
) -> ParallelClock | None:
    """The parallel or hybrid mode's modelled clock from its members' measured rounds
    (None for the ring).  Parallel: each round its slowest member, then the all-reduce of
    the whole vector (:mod:`fedup.learn.parallel`: the model, the sums, the samples and
    the rows).  Hybrid: each round its slowest sub-ring of the view (the slowest
    member's evaluation and every member's training, in sequence), its hand-overs and
    the all-reduce."""
    mode = result.run.algorithm if result.run is not None else "ring"
    if mode == "parallel":
        rounds = [RoundTime(r, compute, True) for r, compute in result.timeline.rounds]
        extra = ELEMENT_SIZE * TAIL
        return parallel_clock(rounds, model_bytes, _links(result), _hold(result),
                              sums_bytes=extra)  # fmt: skip
    if mode != "hybrid":
        return None
    assert result.run is not None
    rings = sub_rings(_ring_indices(result), result.run.sub_rings)
    chains = []
    for r, by in result.timeline.round_members:
        chain = []
        for ring in rings:
            parts = [by[m] for m in ring if m in by]
            chain.append(max((e for _, e in parts), default=0.0) + sum(s - e for s, e in parts))
        chains.append(RoundTime(r, tuple(chain), True))
    relay = ELEMENT_SIZE * sum(t.numel() for t in relay_template(task, weights).values())
    return _hybrid_clock(chains, result, model_bytes, relay)


def _cost(
    passes: float,
    modelled: float,
    real: float,
    sent: float,
    reached: tuple[int, float] | None,
) -> dict[str, Any]:
    return {
        "data_passes": passes,
        "modelled_wall_seconds": modelled,
        "real_wall_seconds": real,
        "bytes_sent_per_peer": sent,
        "target_lap": None if reached is None else reached[0],
        "modelled_seconds_to_target": None if reached is None else reached[1],
    }


def _path(path: CriticalPath, result: SimResult) -> dict[str, Any]:
    link = result.settings.faults.link
    return {
        "formation_seconds": path.formation,
        "compute_seconds": path.compute,
        "transfer_seconds": path.transfer,
        "final_seconds": path.final,
        "hops": path.hops,
        "latency_seconds": link.latency,
        "bandwidth_bytes_per_second": None if math.isinf(link.bandwidth) else link.bandwidth,
        "lap_end_seconds": {str(lap): t for lap, t in sorted(path.lap_ends.items())},
    }


def _personal_entry(result: SimResult, tasks: Sequence[TensorTask]) -> dict[str, Any] | None:
    """Each finished member's personal model (``personal.safetensors``) on its own split
    and on the union, with its summary's figures; None when no member made one."""
    per_peer: list[dict[str, Any]] = []
    for p, task in zip(result.peers, tasks, strict=True):
        figures = p.summary.personal if p.summary is not None else None
        if figures is None or p.summary is None:
            continue
        weights = load_safetensors(Path(p.summary.out_dir) / figures["file"])
        entry: dict[str, Any] = {"peer": p.index, "layers": figures["layers"]}
        entry.update(scores(score(weights, [task])))
        entry["union"] = scores(score(weights, tasks))
        entry["shared_own_val"] = figures["shared_own_val"]
        entry["local_only_own_val"] = figures["local_only_own_val"]
        per_peer.append(entry)
    if not per_peer:
        return None
    local = [e for e in per_peer if e["local_only_own_val"] is not None]
    return {
        "per_peer": per_peer,
        "peers_beating_local_only": sum(
            e["val_loss"] < e["local_only_own_val"]["loss"] for e in local
        ),
        "peers_with_local_only": len(local),
        "mean_own_val_loss": sum(e["val_loss"] for e in per_peer) / len(per_peer),
        "mean_union_val_loss": sum(e["union"]["val_loss"] for e in per_peer) / len(per_peer),
    }


def _simulation(result: SimResult) -> dict[str, Any]:
    laps = result.laps
    ends = [m.wall for m in laps[1:]]
    return {
        "virtual_clock": result.settings.virtual_clock,
        "wall_seconds": result.wall_seconds,
        "clock_seconds": result.clock_seconds,
        "formation_clock_seconds": result.formed,
        "finished_clock_seconds": result.finished,
        "lap_wall_seconds": [b - a.wall for a, b in zip(laps, ends, strict=False)],
        "training_wall_seconds": result.wall_seconds - laps[0].wall if laps else None,
        "peak_rss_bytes": result.peak_rss,
        "model_sha256": result.model_sha256,
        "weights_sha256": result.weights_sha256,
        "finished": len(result.finished_peers),
        "dropped_connections": [list(d) for d in result.dropped],
    }
