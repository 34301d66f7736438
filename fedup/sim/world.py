"""The in-process world simulated peers live in: a network and a discovery hub."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import attrs

from fedup.net.discovery import MemoryDiscoveryHub
from fedup.net.transport import MemoryNetwork
from fedup.peer.tamper import Tamper
from fedup.protocol.peer_id import PeerId

__all__ = ["MemoryWorld"]


@attrs.define
class MemoryWorld:
    """The in-process network and discovery hub shared by simulated peers
    (pass it to :meth:`fedup.Peer.open` as ``world``)."""

    network: MemoryNetwork = attrs.field(factory=MemoryNetwork)
    hub: MemoryDiscoveryHub = attrs.field(factory=MemoryDiscoveryHub)
    tampers: dict[PeerId, Tamper] = attrs.field(factory=dict)
    """Hostile members: the tamper each of these peers acts through (fedup.sim.hostile)."""
    slow: dict[PeerId, float] = attrs.field(factory=dict)
    """Slow members: seconds each of their hops takes on top of its training."""
    draw_seed: bytes | None = None
    """With a seed, the peers' draw nonces derive from it (a reproducible simulation, or a
    test that knows who the draw chooses); without, they are random as on a real network."""
    _hosts: int = 0

    def tamper_for(self, peer: PeerId) -> Tamper | None:
        return self.tampers.get(peer)

    def train_delay(self, peer: PeerId) -> float:
        return self.slow.get(peer, 0.0)

    def draw_nonces(self, peer: PeerId) -> Callable[[PeerId, bytes], bytes] | None:
        """``peer``'s draw nonces for a coordinator's run, derived from ``draw_seed``."""
        seed = self.draw_seed
        if seed is None:
            return None
        return lambda coordinator, run_id: seeded_nonces(seed, peer, coordinator, run_id)

    def new_host(self) -> str:
        """A fresh address (from 10.0.0.0/8) for one simulated host."""
        self._hosts += 1
        n = self._hosts
        return f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"


def seeded_nonces(seed: bytes, peer: PeerId, coordinator: PeerId, run_id: bytes) -> bytes:
    """The draw nonces a :class:`MemoryWorld` with ``seed`` gives ``peer``."""
    return hashlib.sha512(seed + peer.raw + coordinator.raw + run_id).digest()
