"""Control messages between members, as frozen attrs classes.

Every connection after the handshake starts with one request frame: a strict
CBOR map whose ``"t"`` field names the message.  Replies are messages too.
``from_cbor`` checks every field once, at the boundary; :func:`decode_message`
dispatches on ``"t"`` and rejects unknown types.

============  ==============  ==================================================
``t``         direction       meaning
============  ==============  ==================================================
``call``      leader->member  "I am forming run R; send me your data summary"
``offer``     member->leader  the member's data summary (never rows)
``follow``    member->leader  "I follow a lower leader" (reply to a call)
``view``      leader->member  a signed membership view (see fedup.protocol.view)
``ack``       member->leader  "I accept view (run, epoch, digest)"
``refuse``    either          "no", with a reason (e.g. columns that do not fit)
``blob``      member->member  a model blob follows (see fedup.protocol.blob)
``passed``    member->member  "the model you gave me has moved on"
``peers?``    any->any        "which peers do you know?" (bootstrap exchange)
``peers``     any->any        signed peer-record envelopes of verified peers
============  ==============  ==================================================
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs

from fedup.config import DEFAULT_LIMITS, Limits
from fedup.protocol import cbor
from fedup.protocol.peer_id import RAW_SIZE, PeerId
from fedup.protocol.schema import FieldReader, MessageError
from fedup.protocol.view import DIGEST_SIZE, RUN_ID_SIZE

MAX_REASON = 1024


@attrs.frozen
class Call:
    """Leader to candidate: join run ``run_id``; reply with an Offer, Follow or Refuse."""

    TYPE: ClassVar[str] = "call"
    run_id: bytes

    def fields(self) -> dict[str, Any]:
        return {"run": self.run_id}

    @classmethod
    def read(cls, f: FieldReader) -> Call:
        return cls(f.bytestr("run", size=RUN_ID_SIZE))


@attrs.frozen
class Offer:
    """Candidate to leader: its data summary (column names, types, vocabularies, statistics)."""

    TYPE: ClassVar[str] = "offer"
    run_id: bytes
    summary: object
    """Checked by :func:`fedup.learn.schema.DataSummary.from_value`."""
    task: str
    """The kind of task (model family) this peer trains, e.g. ``tabular-mlp``."""

    def fields(self) -> dict[str, Any]:
        return {"run": self.run_id, "summary": self.summary, "task": self.task}

    @classmethod
    def read(cls, f: FieldReader) -> Offer:
        return cls(
            f.bytestr("run", size=RUN_ID_SIZE), f.raw("summary"), f.text("task", max_bytes=64)
        )


@attrs.frozen
class Follow:
    """Candidate to a would-be leader: I follow ``leader``, whose ID is lower than yours."""

    TYPE: ClassVar[str] = "follow"
    run_id: bytes
    leader: PeerId

    def fields(self) -> dict[str, Any]:
        return {"run": self.run_id, "leader": self.leader.raw}

    @classmethod
    def read(cls, f: FieldReader) -> Follow:
        run = f.bytestr("run", size=RUN_ID_SIZE)
        return cls(run, PeerId.from_bytes(f.bytestr("leader", size=RAW_SIZE)))


@attrs.frozen
class ViewMessage:
    """Leader to member: the signed view envelope (verified by fedup.protocol.view.verify_view)."""

    TYPE: ClassVar[str] = "view"
    envelope: bytes

    def fields(self) -> dict[str, Any]:
        return {"view": self.envelope}

    @classmethod
    def read(cls, f: FieldReader) -> ViewMessage:
        return cls(f.bytestr("view"))


@attrs.frozen
class Ack:
    """Member to leader: I accept the view with this digest."""

    TYPE: ClassVar[str] = "ack"
    run_id: bytes
    epoch: int
    digest: bytes

    def fields(self) -> dict[str, Any]:
        return {"run": self.run_id, "epoch": self.epoch, "digest": self.digest}

    @classmethod
    def read(cls, f: FieldReader) -> Ack:
        return cls(
            f.bytestr("run", size=RUN_ID_SIZE),
            f.uint("epoch"),
            f.bytestr("digest", size=DIGEST_SIZE),
        )


@attrs.frozen
class Refuse:
    """Either side: a refusal with a human-readable reason."""

    TYPE: ClassVar[str] = "refuse"
    run_id: bytes
    reason: str

    def fields(self) -> dict[str, Any]:
        return {"run": self.run_id, "why": self.reason}

    @classmethod
    def read(cls, f: FieldReader) -> Refuse:
        return cls(f.bytestr("run", size=RUN_ID_SIZE), f.text("why", max_bytes=MAX_REASON))


@attrs.frozen
class BlobRequest:
    """Member to member: a model blob for ``run_id`` follows on this connection."""

    TYPE: ClassVar[str] = "blob"
    run_id: bytes

    def fields(self) -> dict[str, Any]:
        return {"run": self.run_id}

    @classmethod
    def read(cls, f: FieldReader) -> BlobRequest:
        return cls(f.bytestr("run", size=RUN_ID_SIZE))


@attrs.frozen
class Passed:
    """Member to its predecessor: the model of (lap, hop) has moved on; drop your copy."""

    TYPE: ClassVar[str] = "passed"
    run_id: bytes
    lap: int
    hop: int

    def fields(self) -> dict[str, Any]:
        return {"run": self.run_id, "lap": self.lap, "hop": self.hop}

    @classmethod
    def read(cls, f: FieldReader) -> Passed:
        return cls(f.bytestr("run", size=RUN_ID_SIZE), f.uint("lap"), f.uint("hop"))


@attrs.frozen
class GetPeers:
    """Ask a peer for the verified peer records it knows (the bootstrap exchange)."""

    TYPE: ClassVar[str] = "peers?"

    def fields(self) -> dict[str, Any]:
        return {}

    @classmethod
    def read(cls, f: FieldReader) -> GetPeers:
        return cls()


@attrs.frozen
class PeerList:
    """Signed peer-record envelopes, forwarded unchanged; the receiver verifies each."""

    TYPE: ClassVar[str] = "peers"
    records: tuple[bytes, ...]

    def fields(self) -> dict[str, Any]:
        return {"records": list(self.records)}

    @classmethod
    def read(cls, f: FieldReader) -> PeerList:
        return cls(tuple(f.array("records", _envelope_item, max_items=MAX_PEER_LIST)))


MAX_PEER_LIST = 256
"""Records in one PeerList (equal to the default member limit)."""


def _envelope_item(value: object, label: str) -> bytes:
    if not isinstance(value, bytes) or len(value) > 4096:
        raise MessageError(f"{label} must be a byte string of at most 4096 bytes")
    return value


Message = (
    Call | Offer | Follow | ViewMessage | Ack | Refuse | BlobRequest | Passed | GetPeers | PeerList
)
_TYPES: dict[str, Any] = {
    cls.TYPE: cls
    for cls in (
        Call,
        Offer,
        Follow,
        ViewMessage,
        Ack,
        Refuse,
        BlobRequest,
        Passed,
        GetPeers,
        PeerList,
    )
}


def encode_message(message: Message) -> bytes:
    """The CBOR bytes of ``message`` (its fields plus ``"t"``)."""
    return cbor.encode({"t": message.TYPE, **message.fields()})


def decode_message(data: bytes, *, limits: Limits = DEFAULT_LIMITS) -> Message:
    """Decode and check one control message; raises a RemoteProtocolError subclass."""
    value = cbor.decode(data, max_size=limits.max_message_size, max_depth=limits.max_cbor_depth)
    if not isinstance(value, dict) or not isinstance(value.get("t"), str):
        raise MessageError("control message: expected a map with a text field 't'")
    cls = _TYPES.get(value["t"])
    if cls is None:
        raise MessageError(f"control message: unknown type {value['t']!r}")
    f = FieldReader(value, f"{value['t']} message")
    f.raw("t")
    message: Message = cls.read(f)
    f.done()
    return message
