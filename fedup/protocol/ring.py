"""The ring: who follows whom, who leads, and how the ring heals.

Rules (every member applies them to the same view and gets the same answer):

* The ring is the view's member IDs in ascending byte order of their raw peer
  IDs (equal to the order of their text forms, see :mod:`fedup.protocol.peer_id`).
  Discovery order never matters.
* The leader is the lowest live member: the member with the lowest peer ID
  that is not known to be dead.  It initialises the model and starts lap 1;
  the model's arrival at the leader marks the start of the next lap.
* The successor of a member is the next live member in ring order, wrapping
  around.  A dead member is skipped (Chord's successor list, with full
  membership known).  Each hop of a lap is addressed by the position of the
  receiving member in the live ring, so hop 0 is the leader.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

import attrs

from fedup.errors import LocalProtocolError
from fedup.protocol.peer_id import PeerId


def ring_order(members: Iterable[PeerId]) -> tuple[PeerId, ...]:
    """The ring: members sorted by raw peer ID, duplicates removed."""
    return tuple(sorted(set(members)))


@attrs.frozen
class Ring:
    """A view's ring with the members known to be dead."""

    members: tuple[PeerId, ...]
    dead: frozenset[PeerId] = frozenset()

    @classmethod
    def of(cls, members: Iterable[PeerId], dead: Collection[PeerId] = ()) -> Ring:
        ring = ring_order(members)
        unknown = set(dead) - set(ring)
        if unknown:
            raise LocalProtocolError(f"dead peers not in the ring: {sorted(map(str, unknown))}")
        return cls(ring, frozenset(dead))

    @property
    def live(self) -> tuple[PeerId, ...]:
        """Live members in ring order."""
        return tuple(p for p in self.members if p not in self.dead)

    @property
    def leader(self) -> PeerId:
        """The lowest live member."""
        live = self.live
        if not live:
            raise LocalProtocolError("no live member left")
        return live[0]

    def successor(self, peer: PeerId) -> PeerId:
        """The next live member after ``peer`` (which may itself be dead), wrapping."""
        if peer not in self.members:
            raise LocalProtocolError(f"{peer} is not in the ring")
        n = len(self.members)
        start = self.members.index(peer)
        for step in range(1, n + 1):
            candidate = self.members[(start + step) % n]
            if candidate not in self.dead:
                return candidate
        raise LocalProtocolError("no live member left")

    def successors(self, peer: PeerId) -> list[PeerId]:
        """Every other live member in the order ``peer`` should try them."""
        out: list[PeerId] = []
        n = len(self.members)
        start = self.members.index(peer)
        for step in range(1, n):
            candidate = self.members[(start + step) % n]
            if candidate not in self.dead:
                out.append(candidate)
        return out

    def position(self, peer: PeerId) -> int:
        """``peer``'s hop index within a lap: its index among the live members."""
        live = self.live
        if peer not in live:
            raise LocalProtocolError(f"{peer} is not a live member")
        return live.index(peer)
