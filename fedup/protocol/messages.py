"""Control messages between members, as frozen attrs classes.

Every connection after the handshake starts with one request frame: a strict
CBOR map whose ``"t"`` field names the message.  Replies are messages too.
``from_cbor`` checks every field once, at the boundary; :func:`decode_message`
dispatches on ``"t"`` and rejects unknown types.

============  ==============  ==================================================
``t``         direction       meaning
============  ==============  ==================================================
``call``      leader->member  "I am forming run R": a coordinator's call for a draw, or a
                              drawn leader's (with the draw's proof) for data summaries
``offer``     member->leader  to a coordinator: a draw commitment; to a drawn leader: the
                              member's data summary (never rows)
``follow``    member->leader  "I follow a lower coordinator" (reply to a call)
``roster``    leader->member  a signed draw roster (see fedup.protocol.draw)
``view``      leader->member  a signed membership view (see fedup.protocol.view)
``ack``       member->leader  "I accept roster or view (run, epoch, digest)"; for a roster,
                              with the member's reveal
``commit``    leader->member  "every member acknowledged (run, epoch, digest)": a view
                              holds; a roster's draw is done (with every reveal)
``refuse``    either          "no", with a typed code and a reason
``link``      member->member  "I am your ring predecessor in run R": model blobs follow
                              on this connection, ``passed`` notices come back on it
``passed``    member->member  "the model you gave me moved on": the next member's receipt
``peers?``    any->any        "which peers do you know?" (bootstrap exchange)
``peers``     any->any        signed peer-record envelopes of verified peers
============  ==============  ==================================================
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs

from fedup.config import DEFAULT_LIMITS, Limits
from fedup.protocol import cbor
from fedup.protocol.draw import COMMIT_SIZE, NONCE_SIZE, decode_reveals, encode_reveals
from fedup.protocol.peer_id import RAW_SIZE, PeerId
from fedup.protocol.refusal import RefusalCode, cut_utf8, printable
from fedup.protocol.schema import FieldReader, MessageError
from fedup.protocol.view import DIGEST_SIZE, RUN_ID_SIZE

MAX_REASON = 1024
"""Largest refusal reason in bytes of UTF-8; :class:`Refuse` cuts longer ones (never splitting
a character), so the limit its decoder enforces is always met."""
MAX_RECEIPT = 1024


@attrs.frozen
class Call:
    """Leader to candidate: join run ``run_id``; reply with an Offer, Follow or Refuse.

    A drawn leader's call carries ``draw``, the draw's proof
    (:class:`fedup.protocol.draw.DrawProof`), and ``roster``, the digest of the roster
    drawn on (a receiver that computed that draw itself need not check the proof again).
    """

    TYPE: ClassVar[str] = "call"
    run_id: bytes
    draw: bytes | None = None
    roster: bytes | None = None

    def fields(self) -> dict[str, Any]:
        if self.draw is None or self.roster is None:
            return {"run": self.run_id}
        return {"run": self.run_id, "draw": self.draw, "roster": self.roster}

    @classmethod
    def read(cls, f: FieldReader, limits: Limits) -> Call:
        run = f.bytestr("run", size=RUN_ID_SIZE)
        if not f.optional("draw"):
            return cls(run)
        return cls(run, f.bytestr("draw"), f.bytestr("roster", size=DIGEST_SIZE))


@attrs.frozen
class Offer:
    """Candidate to leader: to a coordinator, its draw commitment (``summary`` None); to a
    drawn leader, its data summary (column names, types, vocabularies, statistics)."""

    TYPE: ClassVar[str] = "offer"
    run_id: bytes
    summary: object
    """Checked by :func:`fedup.learn.schema.DataSummary.from_value`."""
    task: str
    """The kind of task (model family) this peer trains, e.g. ``tabular-mlp``."""
    commit: bytes | None = None
    """The draw commitment (:func:`fedup.protocol.draw.commitment`)."""

    def fields(self) -> dict[str, Any]:
        fields = {"run": self.run_id, "summary": self.summary, "task": self.task}
        return fields | ({"commit": self.commit} if self.commit is not None else {})

    @classmethod
    def read(cls, f: FieldReader, limits: Limits) -> Offer:
        run = f.bytestr("run", size=RUN_ID_SIZE)
        summary, task = f.raw("summary"), f.text("task", max_bytes=64)
        commit = f.bytestr("commit", size=COMMIT_SIZE) if f.optional("commit") else None
        return cls(run, summary, task, commit)


@attrs.frozen
class Follow:
    """Candidate to a would-be leader: I follow ``leader``, whose ID is lower than yours."""

    TYPE: ClassVar[str] = "follow"
    run_id: bytes
    leader: PeerId

    def fields(self) -> dict[str, Any]:
        return {"run": self.run_id, "leader": self.leader.raw}

    @classmethod
    def read(cls, f: FieldReader, limits: Limits) -> Follow:
        run = f.bytestr("run", size=RUN_ID_SIZE)
        return cls(run, PeerId.from_bytes(f.bytestr("leader", size=RAW_SIZE)))


@attrs.frozen
class RosterMessage:
    """Coordinator to candidate: the signed draw roster (fedup.protocol.draw.verify_roster)."""

    TYPE: ClassVar[str] = "roster"
    envelope: bytes

    def fields(self) -> dict[str, Any]:
        return {"roster": self.envelope}

    @classmethod
    def read(cls, f: FieldReader, limits: Limits) -> RosterMessage:
        return cls(f.bytestr("roster"))


@attrs.frozen
class ViewMessage:
    """Leader to member: the signed view envelope (verified by fedup.protocol.view.verify_view)."""

    TYPE: ClassVar[str] = "view"
    envelope: bytes

    def fields(self) -> dict[str, Any]:
        return {"view": self.envelope}

    @classmethod
    def read(cls, f: FieldReader, limits: Limits) -> ViewMessage:
        return cls(f.bytestr("view"))


@attrs.frozen
class Ack:
    """Member to leader: I accept the view (or roster) with this digest; for a roster, with
    the nonce that opens my commitment for its epoch."""

    TYPE: ClassVar[str] = "ack"
    run_id: bytes
    epoch: int
    digest: bytes
    reveal: bytes | None = None

    def fields(self) -> dict[str, Any]:
        fields = {"run": self.run_id, "epoch": self.epoch, "digest": self.digest}
        return fields | ({"reveal": self.reveal} if self.reveal is not None else {})

    @classmethod
    def read(cls, f: FieldReader, limits: Limits) -> Ack:
        run, epoch = f.bytestr("run", size=RUN_ID_SIZE), f.uint("epoch")
        digest = f.bytestr("digest", size=DIGEST_SIZE)
        reveal = f.bytestr("reveal", size=NONCE_SIZE) if f.optional("reveal") else None
        return cls(run, epoch, digest, reveal)


def _wire_reason(reason: str) -> str:
    return cut_utf8(printable(reason), MAX_REASON)


@attrs.frozen
class Commit:
    """Leader to member: every member acknowledged view (run, epoch, digest); it holds.
    For a roster, ``reveals`` carries every candidate's reveal: the draw is done; and the
    commit to the member the draw chose carries ``records``, the signed peer records of
    the roster's members (it calls them next, and may not have found them all itself)."""

    TYPE: ClassVar[str] = "commit"
    run_id: bytes
    epoch: int
    digest: bytes
    reveals: dict[PeerId, bytes] | None = None
    records: tuple[bytes, ...] | None = None

    def fields(self) -> dict[str, Any]:
        fields = {"run": self.run_id, "epoch": self.epoch, "digest": self.digest}
        if self.reveals is not None:
            fields["reveals"] = encode_reveals(self.reveals)
        if self.records is not None:
            fields["records"] = list(self.records)
        return fields

    @classmethod
    def read(cls, f: FieldReader, limits: Limits) -> Commit:
        run, epoch = f.bytestr("run", size=RUN_ID_SIZE), f.uint("epoch")
        digest = f.bytestr("digest", size=DIGEST_SIZE)
        reveals = None
        if f.optional("reveals"):
            reveals = decode_reveals(f.bytestr("reveals"), "commit message: reveals", limits=limits)
        records = None
        if f.optional("records"):
            records = tuple(f.array("records", _envelope_item, max_items=limits.max_members))
        return cls(run, epoch, digest, reveals, records)


@attrs.frozen
class Refuse:
    """Either side: a refusal with a typed code and a human-readable reason.

    The reason is escaped and cut to :data:`MAX_REASON` bytes when the message is
    made (:func:`~fedup.protocol.refusal.cut_utf8`), so it always decodes.
    """

    TYPE: ClassVar[str] = "refuse"
    run_id: bytes
    code: RefusalCode
    reason: str = attrs.field(converter=_wire_reason)

    def fields(self) -> dict[str, Any]:
        return {"run": self.run_id, "code": self.code.value, "why": self.reason}

    @classmethod
    def read(cls, f: FieldReader, limits: Limits) -> Refuse:
        run = f.bytestr("run", size=RUN_ID_SIZE)
        text = f.text("code", max_bytes=32)
        code = RefusalCode.parse(text)
        if code is None:
            raise f.fail("code", f"names no known refusal: {printable(text)!r}")
        return cls(run, code, f.text("why", max_bytes=MAX_REASON, allow_empty=True))


@attrs.frozen
class Link:
    """Member to its ring successor: model blobs of run ``run_id`` follow on this connection,
    and ``passed`` notices come back on it."""

    TYPE: ClassVar[str] = "link"
    run_id: bytes

    def fields(self) -> dict[str, Any]:
        return {"run": self.run_id}

    @classmethod
    def read(cls, f: FieldReader, limits: Limits) -> Link:
        return cls(f.bytestr("run", size=RUN_ID_SIZE))


@attrs.frozen
class Passed:
    """Member to its predecessor: the model it gave us moved on; ``receipt`` is the next
    member's signed custody receipt (:class:`fedup.protocol.notices.CustodyReceipt`)."""

    TYPE: ClassVar[str] = "passed"
    run_id: bytes
    receipt: bytes

    def fields(self) -> dict[str, Any]:
        return {"run": self.run_id, "receipt": self.receipt}

    @classmethod
    def read(cls, f: FieldReader, limits: Limits) -> Passed:
        return cls(f.bytestr("run", size=RUN_ID_SIZE), f.bytestr("receipt", max_size=MAX_RECEIPT))


@attrs.frozen
class Return:
    """A member counted as dead asks to be taken back into run ``run_id``: ``request`` is
    its signed return request (:class:`fedup.protocol.returns.ReturnRequest`), sent on a
    link to every member."""

    TYPE: ClassVar[str] = "return"
    run_id: bytes
    request: bytes

    def fields(self) -> dict[str, Any]:
        return {"run": self.run_id, "ask": self.request}

    @classmethod
    def read(cls, f: FieldReader, limits: Limits) -> Return:
        return cls(f.bytestr("run", size=RUN_ID_SIZE), f.bytestr("ask", max_size=MAX_REQUEST))


@attrs.frozen
class GetPeers:
    """Ask a peer for the verified peer records it knows (the bootstrap exchange)."""

    TYPE: ClassVar[str] = "peers?"

    def fields(self) -> dict[str, Any]:
        return {}

    @classmethod
    def read(cls, f: FieldReader, limits: Limits) -> GetPeers:
        return cls()


@attrs.frozen
class PeerList:
    """Signed peer-record envelopes, forwarded unchanged; the receiver verifies each."""

    TYPE: ClassVar[str] = "peers"
    records: tuple[bytes, ...]

    def fields(self) -> dict[str, Any]:
        return {"records": list(self.records)}

    @classmethod
    def read(cls, f: FieldReader, limits: Limits) -> PeerList:
        return cls(tuple(f.array("records", _envelope_item, max_items=MAX_PEER_LIST)))


MAX_REQUEST = 256
"""Largest return request envelope (:data:`fedup.protocol.returns.MAX_REQUEST_SIZE`)."""
MAX_PEER_LIST = 256
"""Records in one PeerList (equal to the default member limit)."""


def _envelope_item(value: object, label: str) -> bytes:
    if not isinstance(value, bytes) or len(value) > 4096:
        raise MessageError(f"{label} must be a byte string of at most 4096 bytes")
    return value


Message = (
    Call
    | Offer
    | Follow
    | RosterMessage
    | ViewMessage
    | Ack
    | Commit
    | Refuse
    | Link
    | Passed
    | Return
    | GetPeers
    | PeerList
)
_TYPES: dict[str, Any] = {
    cls.TYPE: cls
    for cls in (
        Call,
        Offer,
        Follow,
        RosterMessage,
        ViewMessage,
        Ack,
        Commit,
        Refuse,
        Link,
        Passed,
        Return,
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
    message: Message = cls.read(f, limits)
    f.done()
    return message
