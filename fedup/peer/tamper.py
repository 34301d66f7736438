"""The one hook through which a simulation makes a member hostile (see fedup.sim.hostile).

A :class:`Tamper` sees every blob a peer is about to send and every view it is
about to sign, and says what to send or sign instead.  Peers on a real network
never have one: only an in-process world (the simulator's ``MemoryWorld``) hands
a tamper to the peers it hosts.  The default changes nothing.
"""

from __future__ import annotations

from typing import Any

import attrs

from fedup.protocol.peer_id import PeerId

__all__ = ["OutgoingBlob", "Tamper"]


@attrs.frozen
class OutgoingBlob:
    """A blob a member is about to hand to ``target``."""

    target: PeerId
    kind: str
    lap: int
    hop: int
    epoch: int
    data: bytes | memoryview


class Tamper:
    """What a hostile member does instead of behaving.

    ``blobs`` returns the blobs to send, in order, in place of ``blob``; the
    member's custody learns the outcome of the last one addressed to
    ``blob.target`` (so "send a forged blob, then comply" reads as one
    hand-over).  ``view`` returns the map the member signs as its view.
    """

    def blobs(self, blob: OutgoingBlob) -> list[OutgoingBlob]:
        return [blob]

    def view(self, value: dict[str, Any]) -> dict[str, Any]:
        return value
