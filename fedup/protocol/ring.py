"""The ring: who follows whom, who leads, and how the ring heals.

Rules (every member applies them to the same view and gets the same answer):

* The ring is the view's member IDs in ascending byte order of their raw peer
  IDs (equal to the order of their text forms, see :mod:`fedup.protocol.peer_id`).
  Discovery order never matters.
* The leader is the lowest live member: the member with the lowest peer ID
  that is not known to be dead.  It initialises the model and starts lap 0;
  the model's arrival at the leader marks the start of the next lap.
* The successor of a member is the next live member in ring order, wrapping
  around.  A dead member is skipped (Chord's successor list, with full
  membership known).  Each hop of a lap is addressed by the position of the
  receiving member in the live ring, so hop 0 is the leader.
"""

from __future__ import annotations

import operator
from collections.abc import Collection, Iterable

import attrs

from fedup.errors import LocalProtocolError
from fedup.protocol.peer_id import PeerId


def ring_order(members: Iterable[PeerId]) -> tuple[PeerId, ...]:
    """The ring: members sorted by raw peer ID, duplicates removed (sorted by the raw
    bytes as a key: comparing the IDs themselves costs a Python call per comparison)."""
    return tuple(sorted(set(members), key=_raw))


_raw = operator.attrgetter("raw")


@attrs.frozen
class Ring:
    """A view's ring with the members known to be dead.

    Every question is answered from tables built once per ring (a custody step
    asks several, and a ring of a thousand members would otherwise be walked for
    each)."""

    members: tuple[PeerId, ...]
    dead: frozenset[PeerId] = frozenset()
    _index: dict[PeerId, int] = attrs.field(init=False, eq=False, repr=False)
    _live: tuple[PeerId, ...] = attrs.field(init=False, eq=False, repr=False)
    _live_index: dict[PeerId, int] = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        live = tuple(p for p in self.members if p not in self.dead)
        object.__setattr__(self, "_index", {p: i for i, p in enumerate(self.members)})
        object.__setattr__(self, "_live", live)
        object.__setattr__(self, "_live_index", {p: i for i, p in enumerate(live)})

    @classmethod
    def of(cls, members: Iterable[PeerId], dead: Collection[PeerId] = ()) -> Ring:
        ring = ring_order(members)
        unknown = set(dead) - set(ring)
        if unknown:
            raise LocalProtocolError(f"dead peers not in the ring: {sorted(map(str, unknown))}")
        return cls(ring, frozenset(dead))

    def __contains__(self, peer: object) -> bool:
        """Whether ``peer`` is a member (live or dead)."""
        return peer in self._index

    @property
    def live(self) -> tuple[PeerId, ...]:
        """Live members in ring order."""
        return self._live

    @property
    def leader(self) -> PeerId:
        """The lowest live member."""
        if not self._live:
            raise LocalProtocolError("no live member left")
        return self._live[0]

    def successor(self, peer: PeerId) -> PeerId:
        """The next live member after ``peer`` (which may itself be dead), wrapping."""
        start = self._index.get(peer)
        if start is None:
            raise LocalProtocolError(f"{peer} is not in the ring")
        if not self._live:
            raise LocalProtocolError("no live member left")
        n = len(self.members)
        for step in range(1, n + 1):
            candidate = self.members[(start + step) % n]
            if candidate not in self.dead:
                return candidate
        raise AssertionError("a live member exists")  # pragma: no cover

    def successors(self, peer: PeerId) -> list[PeerId]:
        """Every other live member in the order ``peer`` should try them."""
        start = self._index.get(peer)
        if start is None:
            raise LocalProtocolError(f"{peer} is not in the ring")
        at = self._live_index.get(peer)
        if at is not None:  # slices of the live ring (every member asks, once per lap's end)
            return [*self._live[at + 1 :], *self._live[:at]]
        n = len(self.members)
        return [
            c for step in range(1, n) if (c := self.members[(start + step) % n]) not in self.dead
        ]

    def position(self, peer: PeerId) -> int:
        """``peer``'s hop index within a lap: its index among the live members."""
        at = self._live_index.get(peer)
        if at is None:
            raise LocalProtocolError(f"{peer} is not a live member")
        return at
