"""Hostile members: real peers of a simulation whose behaviour is replaced in part.

(The hook itself, :class:`~fedup.peer.tamper.Tamper`, lives in the peer; this
module holds what writing a hostile behaviour needs.)

A member of a federation can sign anything.  To test that the others hold
(``docs/federation.md``, the member threat model), the simulator can give a
peer a :class:`Tamper`: the peer runs the real code, joins normally and trains,
but every blob it is about to send passes through :meth:`Tamper.blobs` (which
returns what to send instead: other blobs, more blobs, to anyone) and, if it
leads, every view it signs passes through :meth:`Tamper.view`.

Only an in-process world (:class:`~fedup.sim.world.MemoryWorld`) hosts hostile
members; a peer on a real network never looks for a tamper.

:func:`rewrite_blob` decodes a ring blob, lets a function change its state,
metadata, dead chain, hop statements or final-model fields, and encodes it again, so a
behaviour can be written in a few lines (see ``tests/integration/test_hostile.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from fedup.config import Limits
from fedup.learn.ring import RingState
from fedup.learn.ring_payload import RingBlob, decode_ring_blob, encode_ring_blob
from fedup.peer.tamper import OutgoingBlob, Tamper

__all__ = ["OutgoingBlob", "Tamper", "rewrite_blob"]


def rewrite_blob(
    blob: OutgoingBlob,
    template: RingState,
    change: Callable[[RingBlob], RingBlob],
    *,
    limits: Limits,
    **header: Any,
) -> OutgoingBlob:
    """``blob`` with its decoded content changed by ``change`` (and header fields by
    ``header``, e.g. ``target=``, ``lap=``), encoded again."""
    decoded = decode_ring_blob(bytearray(blob.data), template, limits=limits)
    new = change(decoded)
    data = encode_ring_blob(
        new.state,
        view=new.view,
        chain=new.chain,
        origin=new.origin,
        seal=new.seal,
        provenance=new.provenance,
        limits=limits,
    )
    return attrs.evolve(blob, data=bytes(data), **header)
