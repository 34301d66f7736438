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
members, settings in range, the algorithm one this FedUp runs), signer is
``leader``, the run's hops fit a model's provenance
(``Limits.max_provenance_hops``), every member record verifies,
members strictly ascending (so no duplicates), the leader is a member.  That the
leader is the one a draw chose (fedup.protocol.draw) is each member's own check: it
answers a leader's call only with the proof of the draw it revealed for.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
from typing import Any

import attrs

from fedup.config import DEFAULT_LIMITS, Limits
from fedup.errors import ConfigError, LocalProtocolError
from fedup.protocol import cbor
from fedup.protocol.envelope import Signer, open_envelope, seal_envelope
from fedup.protocol.laps import max_hops
from fedup.protocol.peer_id import RAW_SIZE, PeerId
from fedup.protocol.records import SignedPeerRecord, verify_peer_record
from fedup.protocol.schema import FieldReader, MessageError

VIEW_DOMAIN = "fedup-membership-view"
VIEW_TYPE = "fedup/membership-view/1"
RUN_ID_SIZE = 16
DIGEST_SIZE = 32
MAX_ALGORITHM_NAME = 32
ALGORITHMS = ("ring", "parallel", "hybrid")
"""The training algorithms this FedUp runs (``ring``: :mod:`fedup.peer.custody_driver`;
``parallel``: :mod:`fedup.peer.parallel_driver`; ``hybrid``:
:mod:`fedup.peer.hybrid_driver`): a view naming another is refused before it is
acknowledged (every member would otherwise train under another name)."""


@attrs.frozen
class Bound:
    """The range a run setting must lie in (``lo`` excluded when ``open_lo``)."""

    lo: float
    hi: float
    open_lo: bool = False
    integer: bool = False
    why: str = ""

    def admits(self, value: object) -> bool:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.integer and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        return (self.lo < value if self.open_lo else self.lo <= value) and value <= self.hi

    def describe(self) -> str:
        return f"{'(' if self.open_lo else '['}{self.lo:g}, {self.hi:g}]"


SETTINGS_BOUNDS: dict[str, Bound] = {
    "max_laps": Bound(1, 10_000, integer=True, why="the ring metadata counts laps up to this"),
    "patience": Bound(1, 10_000, integer=True, why="no more than the laps a run may have"),
    "tolerance": Bound(0, 0.999, why="a relative improvement: 1 would never improve"),
    "local_epochs": Bound(0, 100, open_lo=True, why="passes over local data per hop"),
    "lr": Bound(0, 10, open_lo=True, why="larger steps only diverge"),
    "batch_size": Bound(1, 2**20, integer=True, why="a minibatch of a million rows at most"),
    "seed": Bound(0, 2**63 - 1, integer=True, why="a 63-bit seed"),
    "sub_rings": Bound(0, 1024, integer=True, why="0 (one per sqrt of the members) to one each"),
    "sync_laps": Bound(1, 100, integer=True, why="sub-ring laps between two averages"),
}
"""The one source of the run settings' bounds: checked when settings are made locally
(:class:`~fedup.errors.ConfigError`) and before a member acknowledges a view."""


def settings_problem(values: dict[str, object]) -> tuple[str, str] | None:
    """The first ``(field, problem)`` of run settings outside :data:`SETTINGS_BOUNDS`
    (or naming an algorithm not in :data:`ALGORITHMS`)."""
    if "algorithm" in values and values["algorithm"] not in ALGORITHMS:
        known = ", ".join(repr(a) for a in ALGORITHMS)
        return "algorithm", f"must be one of {known}, got {values['algorithm']!r}"
    for name, bound in SETTINGS_BOUNDS.items():
        if name in values and not bound.admits(values[name]):
            return name, f"must be in {bound.describe()}, got {values[name]!r}"
    return None


@attrs.frozen
class RunSettings:
    """What every member must agree on to train together (bounds: :data:`SETTINGS_BOUNDS`)."""

    algorithm: str = "ring"
    """How the federation trains: ``ring`` (the model goes round, ``fedup.learn.ring``),
    ``parallel`` (every member trains at once, then a ring all-reduce averages:
    ``docs/parallel.md``) or ``hybrid`` (sub-rings train in sequence side by side, then
    the all-reduce averages their models); one of :data:`ALGORITHMS`."""
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
    sub_rings: int = 0
    """``hybrid``: the sub-rings the members are split into (:func:`fedup.protocol.relay.
    sub_rings`); 0 picks the nearest whole number to the square root of the members."""
    sync_laps: int = 3
    """``hybrid``: laps each sub-ring runs between two averages of the sub-rings' models."""

    def __attrs_post_init__(self) -> None:
        problem = settings_problem(attrs.asdict(self))
        if problem is not None:
            raise ConfigError(f"{problem[0]} {problem[1]}")

    @property
    def member_hops(self) -> int:
        """The most hops one member trains in a run: one per lap (or round), and
        ``sync_laps`` per round in the hybrid mode (what a DP budget is planned for)."""
        return self.max_laps * (self.sync_laps if self.algorithm == "hybrid" else 1)

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
            "rings": self.sub_rings,
            "sync": self.sync_laps,
        }

    @classmethod
    def from_value(cls, value: object, what: str = "run settings") -> RunSettings:
        """Check and build settings from a decoded CBOR map; raises MessageError.

        Every field is checked against :data:`SETTINGS_BOUNDS` before anything is
        built, so a view whose settings no member could train with is refused
        before it is acknowledged.
        """
        f = FieldReader(value, what)
        values: dict[str, object] = {
            "algorithm": f.text("alg", max_bytes=MAX_ALGORITHM_NAME),
            "max_laps": f.uint("max_laps"),
            "patience": f.uint("patience"),
            "tolerance": f.number("tol"),
            "local_epochs": f.number("epochs"),
            "lr": f.number("lr"),
            "batch_size": f.uint("batch"),
            "seed": f.uint("seed"),
            "model_digest": f.bytestr("model", size=DIGEST_SIZE),
            "schema_digest": f.bytestr("schema", size=DIGEST_SIZE),
            "sub_rings": f.uint("rings"),
            "sync_laps": f.uint("sync"),
        }
        f.done()
        problem = settings_problem(values)
        if problem is not None:
            raise f.fail(_WIRE_NAMES[problem[0]], problem[1])
        return cls(**values)  # type: ignore[arg-type]


def run_settings_json(run: RunSettings) -> dict[str, Any]:
    """The run settings as JSON (digests in hex), as ``federation.json`` has them."""
    return {k: v.hex() if isinstance(v, bytes) else v for k, v in attrs.asdict(run).items()}


_WIRE_NAMES = {
    "algorithm": "alg",
    "max_laps": "max_laps",
    "patience": "patience",
    "tolerance": "tol",
    "local_epochs": "epochs",
    "lr": "lr",
    "batch_size": "batch",
    "seed": "seed",
    "sub_rings": "rings",
    "sync_laps": "sync",
}


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
    """Verify a view from outside; raises a RemoteProtocolError subclass naming the problem.

    The same bytes are verified once per process (a view reaches every member, and the
    simulator runs them all in one process); a failure is not remembered.  The view
    returned is shared by every caller with those bytes: its ``schema`` (the decoded
    CBOR value) is read, never changed, by everything that uses it.
    """
    return _verified_view(bytes(data), limits)


@functools.lru_cache(maxsize=16)
def _verified_view(data: bytes, limits: Limits) -> SignedView:
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
    problem = provenance_capacity_problem(len(raw_members), settings.max_laps, limits)
    if problem is not None:
        raise MessageError(f"membership view: {problem}")
    members = tuple(verify_peer_record(m, limits=limits) for m in raw_members)
    ids = [m.peer_id for m in members]
    if any(a >= b for a, b in itertools.pairwise(ids)):
        raise MessageError("membership view: members are not in strictly ascending peer-ID order")
    if leader not in ids:
        raise MessageError("membership view: the leader is not a member")
    view = MembershipView(run_id, epoch, leader, members, settings, schema)
    return SignedView(view, data)


def provenance_capacity_problem(members: int, max_laps: int, limits: Limits) -> str | None:
    """Why a run of ``members`` members and ``max_laps`` laps cannot keep its provenance
    within ``Limits.max_provenance_hops`` (one signed statement per hop), or None."""
    needed = max_hops(members, max_laps)
    if needed <= limits.max_provenance_hops:
        return None
    return (
        f"{members} members for max_laps {max_laps} could make {needed} hops, more than the "
        f"{limits.max_provenance_hops} hop statements a model's provenance may hold "
        "(Limits.max_provenance_hops); lower --max-laps"
    )


def _bytes_item(value: object, label: str) -> bytes:
    if not isinstance(value, bytes):
        raise MessageError(f"{label} must be a byte string")
    return value
