"""Run settings and the signed membership view the leader proposes.

The view is the agreement every member trains under: the run ID, the view
epoch, the leader, the members (each with its own signed peer record), the
run's settings and the merged feature schema.  The leader signs it as an
envelope (domain ``fedup-membership-view``, payload type
``fedup/membership-view/1``); members verify it before acknowledging::

    {
      "run": bstr .size 16,
      "epoch": uint,
      "leader": bstr .size 38,
      "members": [bstr, ...],     ; signed peer-record envelopes, ascending peer ID
      "settings": {...},          ; RunSettings
      "schema": any               ; the merged feature schema (checked by fedup.learn)
    }

Checks, in order: size, signature, decode (every field, at most ``max_members``
members, settings in range), signer is ``leader``, every member record
verifies, members strictly ascending (so no duplicates), the leader is a
member and is the lowest member ID (the election rule).
"""

from __future__ import annotations

import hashlib
import itertools
from typing import Any

import attrs

from fedup.config import DEFAULT_LIMITS, Limits
from fedup.errors import LocalProtocolError
from fedup.protocol import cbor
from fedup.protocol.envelope import Signer, open_envelope, seal_envelope
from fedup.protocol.peer_id import RAW_SIZE, PeerId
from fedup.protocol.records import SignedPeerRecord, verify_peer_record
from fedup.protocol.schema import FieldReader, MessageError

VIEW_DOMAIN = "fedup-membership-view"
VIEW_TYPE = "fedup/membership-view/1"
RUN_ID_SIZE = 16
DIGEST_SIZE = 32
MAX_ALGORITHM_NAME = 32


@attrs.frozen
class RunSettings:
    """What every member must agree on to train together."""

    algorithm: str = "ring"
    """Name of the ring-training algorithm (``fedup.learn.ring``)."""
    max_laps: int = 500
    """Stop after this many laps even if not converged."""
    patience: int = 20
    """Stop after this many laps in a row without an improvement above ``tolerance``."""
    tolerance: float = 1e-3
    """Relative improvement below which a lap does not count as progress."""
    local_epochs: float = 0.1
    """Passes over a peer's training data per hop.  Small hops make the ring behave like
    minibatch training on the pooled data (docs/learning.md has the measurements)."""
    lr: float = 1e-3
    """Learning rate."""
    batch_size: int = 64
    """Minibatch size."""
    seed: int = 0
    """Seed of the model's initialisation and of every hop's shuffling."""
    model_digest: bytes = b"\0" * DIGEST_SIZE
    """SHA-256 of the model's tensor spec (names, dtypes, shapes)."""
    schema_digest: bytes = b"\0" * DIGEST_SIZE
    """SHA-256 of the merged feature schema's canonical encoding."""

    def to_value(self) -> dict[str, Any]:
        return {
            "alg": self.algorithm,
            "max_laps": self.max_laps,
            "patience": self.patience,
            "tol": self.tolerance,
            "epochs": self.local_epochs,
            "lr": self.lr,
            "batch": self.batch_size,
            "seed": self.seed,
            "model": self.model_digest,
            "schema": self.schema_digest,
        }

    @classmethod
    def from_value(cls, value: object, what: str = "run settings") -> RunSettings:
        """Check and build settings from a decoded CBOR map; raises MessageError."""
        f = FieldReader(value, what)
        settings = cls(
            algorithm=f.text("alg", max_bytes=MAX_ALGORITHM_NAME),
            max_laps=f.uint("max_laps", min_value=1, max_value=100_000),
            patience=f.uint("patience", min_value=1, max_value=100_000),
            tolerance=f.number("tol"),
            local_epochs=f.number("epochs"),
            lr=f.number("lr"),
            batch_size=f.uint("batch", min_value=1, max_value=1 << 20),
            seed=f.uint("seed", max_value=2**63 - 1),
            model_digest=f.bytestr("model", size=DIGEST_SIZE),
            schema_digest=f.bytestr("schema", size=DIGEST_SIZE),
        )
        f.done()
        if not 0 <= settings.tolerance < 1:
            raise f.fail("tol", "must be in [0, 1)")
        if not 0 < settings.local_epochs <= 1000:
            raise f.fail("epochs", "must be in (0, 1000]")
        if not 0 < settings.lr <= 10:
            raise f.fail("lr", "must be in (0, 10]")
        return settings


@attrs.frozen
class MembershipView:
    """A proposed membership; see the module docstring for the wire form."""

    run_id: bytes
    epoch: int
    leader: PeerId
    members: tuple[SignedPeerRecord, ...]
    settings: RunSettings
    schema: object = None

    @property
    def member_ids(self) -> tuple[PeerId, ...]:
        return tuple(m.peer_id for m in self.members)

    def to_cbor(self) -> bytes:
        return cbor.encode(
            {
                "run": self.run_id,
                "epoch": self.epoch,
                "leader": self.leader.raw,
                "members": [m.envelope for m in self.members],
                "settings": self.settings.to_value(),
                "schema": self.schema,
            }
        )

    def seal(self, identity: Signer) -> SignedView:
        """Sign the view as its leader."""
        if identity.peer_id != self.leader:
            raise LocalProtocolError("only the leader signs its view")
        members = sorted(self.members, key=lambda m: m.peer_id)
        if tuple(members) != self.members:
            raise LocalProtocolError("members must be in ascending peer-ID order")
        envelope = seal_envelope(
            identity.sign,
            identity.public_key,
            domain=VIEW_DOMAIN,
            payload_type=VIEW_TYPE,
            payload=self.to_cbor(),
        )
        data = envelope.to_cbor()
        return SignedView(self, data)


@attrs.frozen
class SignedView:
    """A verified view and the exact envelope bytes that carried it."""

    view: MembershipView
    envelope: bytes

    @property
    def digest(self) -> bytes:
        """SHA-256 of the envelope: what members acknowledge."""
        return hashlib.sha256(self.envelope).digest()


def verify_view(data: bytes, *, limits: Limits = DEFAULT_LIMITS) -> SignedView:
    """Verify a view from outside; raises a RemoteProtocolError subclass naming the problem."""
    envelope = open_envelope(
        data, domain=VIEW_DOMAIN, payload_type=VIEW_TYPE, max_size=limits.max_message_size
    )
    f = FieldReader(
        cbor.decode(
            envelope.payload, max_size=limits.max_message_size, max_depth=limits.max_cbor_depth
        ),
        "membership view",
    )
    run_id = f.bytestr("run", size=RUN_ID_SIZE)
    epoch = f.uint("epoch")
    leader = PeerId.from_bytes(f.bytestr("leader", size=RAW_SIZE))
    raw_members = f.array("members", _bytes_item, max_items=limits.max_members, min_items=1)
    settings = RunSettings.from_value(f.raw("settings"), "membership view: settings")
    schema = f.raw("schema")
    f.done()
    if envelope.signer != leader:
        raise MessageError(
            f"membership view names leader {leader} but is signed by {envelope.signer}"
        )
    members = tuple(verify_peer_record(m, limits=limits) for m in raw_members)
    ids = [m.peer_id for m in members]
    if any(a >= b for a, b in itertools.pairwise(ids)):
        raise MessageError("membership view: members are not in strictly ascending peer-ID order")
    if leader not in ids:
        raise MessageError("membership view: the leader is not a member")
    if ids[0] != leader:
        raise MessageError(
            f"membership view: leader {leader} is not the lowest member ID ({ids[0]} is lower)"
        )
    view = MembershipView(run_id, epoch, leader, members, settings, schema)
    return SignedView(view, bytes(data))


def _bytes_item(value: object, label: str) -> bytes:
    if not isinstance(value, bytes):
        raise MessageError(f"{label} must be a byte string")
    return value
