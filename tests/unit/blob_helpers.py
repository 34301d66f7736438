"""Shared fixtures of the blob tests: identities, headers, chunk frames and a plain sink."""

from __future__ import annotations

from typing import Any

import attrs

from fedup.config import DEFAULT_LIMITS
from fedup.identity import Identity
from fedup.protocol.blob import (
    BlobHeader,
    BlobReceiver,
    blob_digest,
    iter_chunks,
    seal_blob_end,
    seal_blob_header,
    verify_blob_header,
)

ALICE = Identity(b"\x01" * 32)  # the sender
BOB = Identity(b"\x02" * 32)  # the recipient
MALLORY = Identity(b"\x03" * 32)
RUN = bytes(range(16))
OTHER_RUN = bytes(range(1, 17))
DATA = bytes(range(256)) * 3 + b"tail"
LIMITS = attrs.evolve(DEFAULT_LIMITS, blob_chunk_size=100)


def header(**kw: Any) -> BlobHeader:
    fields: dict[str, Any] = {
        "run_id": RUN,
        "kind": "model",
        "lap": 3,
        "hop": 2,
        "epoch": 7,
        "sender": ALICE.peer_id,
        "recipient": BOB.peer_id,
        "size": len(DATA),
        "chunk_size": LIMITS.blob_chunk_size,
    }
    fields.update(kw)
    return BlobHeader(**fields)


def sealed(h: BlobHeader | None = None, ident: Identity = ALICE) -> bytes:
    return seal_blob_header(ident, h or header(), limits=LIMITS)


def verify(frame: bytes, **kw: Any) -> BlobHeader:
    args: dict[str, Any] = {
        "me": BOB.peer_id,
        "remote": ALICE.peer_id,
        "run_id": RUN,
        "limits": LIMITS,
    }
    args.update(kw)
    return verify_blob_header(frame, **args)


class Collect:
    """The simplest sink: a bytearray (the tests hash it themselves)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.views: list[memoryview] = []
        """Every piece as given (to check that they are views, not copies)."""

    def append(self, data: memoryview) -> None:
        self.data += data
        self.views.append(data)

    @property
    def digest(self) -> bytes:
        return blob_digest(self.data)


def frames_of(data: bytes, chunk_size: int) -> list[bytes]:
    return [kind + bytes(piece) for kind, piece in iter_chunks(memoryview(data), chunk_size)]


def receiver_for(data: bytes, chunk_size: int = 100, **kw: Any) -> tuple[BlobReceiver, Collect]:
    h = header(size=len(data), chunk_size=chunk_size, **kw)
    sink = Collect()
    return BlobReceiver(h, sealed(h), sink), sink


def end_for(rx: BlobReceiver, data: bytes, ident: Identity = ALICE) -> bytes:
    """The END the honest sender of ``rx``'s header would send after ``data``."""
    return seal_blob_end(ident, sealed(rx.header), blob_digest(data))
