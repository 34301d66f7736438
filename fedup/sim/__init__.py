"""The simulator: many real peers in one process, with faults, and the comparison report.

See ``docs/simulator.md``.  :func:`simulate` runs one
:class:`~fedup.peer.Peer` per data source on an in-memory network and
discovery hub (:class:`SimNetwork`), on a virtual or real clock, with the
:class:`Faults` asked for; :func:`build_report` scores the federated model
against centralized and local-only training.
"""

from fedup.sim.faults import Cut, Drop, Faults, Kill, Slow
from fedup.sim.network import Link, LinkStream, SimNetwork, SimTransport
from fedup.sim.runner import (
    LapMark,
    PeerOutcome,
    SimResult,
    SimSettings,
    run_simulation,
    sim_identity,
    simulate,
    weights_digest,
)
from fedup.sim.world import MemoryWorld

__all__ = [
    "Cut",
    "Drop",
    "Faults",
    "Kill",
    "LapMark",
    "Link",
    "LinkStream",
    "MemoryWorld",
    "PeerOutcome",
    "SimNetwork",
    "SimResult",
    "SimSettings",
    "SimTransport",
    "Slow",
    "run_simulation",
    "sim_identity",
    "simulate",
    "weights_digest",
]
