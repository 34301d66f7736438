"""The leader draw: which member of a roster leads formation, by commit and reveal.

A peer ID is the hash of a key anyone can generate, so "the lowest ID leads" is
a prize for whoever generates keys longest.  The leader that receives the data
summaries is drawn instead (docs/federation.md, section 2):

1. The *coordinator* (the lowest candidate, as before) calls; each candidate
   answers with a *commitment* ``H(n0) || H(n1)`` to two fresh random nonces.
2. The coordinator signs a *roster*: the run, an epoch (0, or 1 when it signs
   again without candidates that did not answer), itself and every candidate
   with its commitment, in ascending peer-ID order.
3. Each candidate checks the roster (its own commitment is in it) and only then
   *reveals* the nonce of that epoch (``n0`` or ``n1``).
4. With every reveal in, the coordinator sends them all; everyone checks each
   against its commitment and computes the same leader: the member whose
   ``H(beacon || peer ID)`` is smallest, where the beacon hashes the run, the
   epoch, the coordinator and every reveal.

No one knows the beacon before the roster is fixed: the honest candidates' nonces
are fresh and hidden behind their commitments, so a key generated in advance is
worth nothing.  The coordinator sees the reveals first; all it can do with what it
sees is throw the roster away (sign epoch 1 without someone, or give up), which
costs it the coordinator's role (:data:`MAX_ROSTER_EPOCH`; the formation machine
keeps every coordinator whose roster we revealed for from coordinating again).

Pure: no I/O.  The signed forms travel in messages (fedup.protocol.messages).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import itertools
import operator
from collections.abc import Mapping

import attrs

from fedup.config import DEFAULT_LIMITS, Limits
from fedup.errors import LocalProtocolError, RemoteProtocolError
from fedup.protocol import cbor
from fedup.protocol.envelope import Signer, open_envelope, seal_envelope
from fedup.protocol.peer_id import RAW_SIZE, PeerId
from fedup.protocol.schema import FieldReader, MessageError
from fedup.protocol.view import RUN_ID_SIZE

__all__ = [
    "COMMIT_SIZE",
    "MAX_ROSTER_EPOCH",
    "NONCE_SIZE",
    "DrawError",
    "DrawProof",
    "Roster",
    "SignedRoster",
    "commitment",
    "draw_leader",
    "proof_problem",
    "reveal_matches",
    "reveal_of",
    "verify_roster",
]

ROSTER_DOMAIN = "fedup-draw-roster"
ROSTER_TYPE = "fedup/draw-roster/1"
NONCE_SIZE = 32
HASH_SIZE = 32
COMMIT_SIZE = 2 * HASH_SIZE
"""One hash per roster epoch: a roster signed again (epoch 1) draws on fresh nonces that the
coordinator has not seen."""
MAX_ROSTER_EPOCH = 1
"""A coordinator signs its roster at most twice (epoch 0, then once without the candidates
that did not reveal): each signature gives it one look at a draw before it is spent."""


class DrawError(RemoteProtocolError):
    """A roster, a reveal or a draw proof is not what the rules allow."""


def _hash(data: bytes, person: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=HASH_SIZE, person=person).digest()


def commitment(nonces: bytes) -> bytes:
    """The commitment to ``nonces`` (``NONCE_SIZE`` bytes per roster epoch)."""
    if len(nonces) != NONCE_SIZE * (MAX_ROSTER_EPOCH + 1):
        raise LocalProtocolError("a draw commitment covers one nonce per roster epoch")
    return b"".join(
        _hash(nonces[i : i + NONCE_SIZE], b"fedup-draw-nonce")
        for i in range(0, len(nonces), NONCE_SIZE)
    )


def reveal_of(nonces: bytes, epoch: int) -> bytes:
    """The nonce a member reveals for a roster of ``epoch``."""
    if not 0 <= epoch <= MAX_ROSTER_EPOCH:
        raise LocalProtocolError(f"no nonce for roster epoch {epoch}")
    return nonces[epoch * NONCE_SIZE : (epoch + 1) * NONCE_SIZE]


def reveal_matches(commit: bytes, epoch: int, reveal: bytes) -> bool:
    """Whether ``reveal`` opens ``commit`` for a roster of ``epoch``."""
    if len(commit) != COMMIT_SIZE or len(reveal) != NONCE_SIZE:
        return False
    if not 0 <= epoch <= MAX_ROSTER_EPOCH:
        return False
    expected = commit[epoch * HASH_SIZE : (epoch + 1) * HASH_SIZE]
    return hmac.compare_digest(_hash(reveal, b"fedup-draw-nonce"), expected)


@attrs.frozen
class Roster:
    """Who takes part in a draw: the coordinator and the candidates with their commitments."""

    run_id: bytes
    epoch: int
    coordinator: PeerId
    commits: tuple[tuple[PeerId, bytes], ...]
    """(candidate, commitment), ascending by peer ID; the coordinator is not among them."""

    @property
    def member_ids(self) -> frozenset[PeerId]:
        return frozenset([self.coordinator, *(p for p, _ in self.commits)])

    def commit_of(self, peer: PeerId) -> bytes | None:
        return dict(self.commits).get(peer)

    def to_cbor(self) -> bytes:
        return cbor.encode(
            {
                "run": self.run_id,
                "epoch": self.epoch,
                "coordinator": self.coordinator.raw,
                "members": b"".join(p.raw + c for p, c in self.commits),
            }
        )

    def seal(self, identity: Signer) -> SignedRoster:
        """Sign the roster as its coordinator."""
        if identity.peer_id != self.coordinator:
            raise LocalProtocolError("only the coordinator signs its roster")
        _check_order(self)
        envelope = seal_envelope(
            identity.sign,
            identity.public_key,
            domain=ROSTER_DOMAIN,
            payload_type=ROSTER_TYPE,
            payload=self.to_cbor(),
        )
        return SignedRoster(self, envelope.to_cbor())


@attrs.frozen
class SignedRoster:
    """A verified roster and the exact envelope bytes that carried it."""

    roster: Roster
    envelope: bytes

    @property
    def digest(self) -> bytes:
        """SHA-256 of the envelope: what members acknowledge (with their reveal)."""
        return hashlib.sha256(self.envelope).digest()


def _check_order(roster: Roster) -> None:
    ids = [p for p, _ in roster.commits]
    if any(a >= b for a, b in itertools.pairwise(ids)):
        raise MessageError("draw roster: members are not in strictly ascending peer-ID order")
    if roster.coordinator in ids:
        raise MessageError("draw roster: the coordinator is listed among the candidates")
    if not 0 <= roster.epoch <= MAX_ROSTER_EPOCH:
        raise MessageError(f"draw roster: epoch {roster.epoch} is above {MAX_ROSTER_EPOCH}")


def _unpack(
    data: bytes, size: int, what: str, *, max_items: int
) -> tuple[tuple[PeerId, bytes], ...]:
    """Packed ``peer ID || bstr(size)`` entries (how rosters and reveals travel: one byte
    string, strictly ascending by peer ID), checked for shape, order and count.

    The same bytes are unpacked once per process (every member gets the same reveals,
    and the simulator runs them all in one process); a failure is not remembered."""
    return _unpacked(bytes(data), size, what, max_items)


@functools.lru_cache(maxsize=16)
def _unpacked(
    data: bytes, size: int, what: str, max_items: int
) -> tuple[tuple[PeerId, bytes], ...]:
    step = RAW_SIZE + size
    if len(data) % step:
        raise MessageError(f"{what} must be a multiple of {step} bytes, got {len(data)}")
    if len(data) // step > max_items:
        raise MessageError(f"{what} holds {len(data) // step} entries, more than {max_items}")
    items = tuple(
        (PeerId.from_bytes(data[i : i + RAW_SIZE]), data[i + RAW_SIZE : i + step])
        for i in range(0, len(data), step)
    )
    if any(a[0] >= b[0] for a, b in itertools.pairwise(items)):
        raise MessageError(f"{what}: entries are not in strictly ascending peer-ID order")
    return items


def verify_roster(data: bytes, *, limits: Limits = DEFAULT_LIMITS) -> SignedRoster:
    """Verify a roster from outside; raises a RemoteProtocolError subclass naming the problem.

    The same bytes are verified once per process (a roster reaches every candidate, and
    the simulator runs them all in one process); a failure is not remembered.
    """
    return _verified_roster(bytes(data), limits)


@functools.lru_cache(maxsize=16)
def _verified_roster(data: bytes, limits: Limits) -> SignedRoster:
    envelope = open_envelope(
        data, domain=ROSTER_DOMAIN, payload_type=ROSTER_TYPE, max_size=limits.max_message_size
    )
    f = FieldReader(
        cbor.decode(
            envelope.payload, max_size=limits.max_message_size, max_depth=limits.max_cbor_depth
        ),
        "draw roster",
    )
    run_id = f.bytestr("run", size=RUN_ID_SIZE)
    epoch = f.uint("epoch", max_value=MAX_ROSTER_EPOCH)
    coordinator = PeerId.from_bytes(f.bytestr("coordinator", size=RAW_SIZE))
    commits = _unpack(
        f.bytestr("members"), COMMIT_SIZE, "draw roster: members", max_items=limits.max_members - 1
    )
    f.done()
    if not commits:
        raise MessageError("draw roster: no candidates")
    if envelope.signer != coordinator:
        raise MessageError(
            f"draw roster names coordinator {coordinator} but is signed by {envelope.signer}"
        )
    roster = Roster(run_id, epoch, coordinator, tuple(commits))
    _check_order(roster)
    return SignedRoster(roster, bytes(data))


def draw_leader(roster: Roster, reveals: Mapping[PeerId, bytes]) -> PeerId:
    """The member of ``roster`` that leads, given every candidate's reveal.

    Raises :class:`DrawError` naming the first candidate whose reveal is missing or does
    not open its commitment.  The same draw is computed once per process.
    """
    return _drawn(roster, tuple(sorted(reveals.items(), key=_by_peer)))


def _by_peer(pair: tuple[PeerId, bytes]) -> bytes:
    return pair[0].raw


@functools.lru_cache(maxsize=16)
def _drawn(roster: Roster, pairs: tuple[tuple[PeerId, bytes], ...]) -> PeerId:
    reveals = dict(pairs)
    beacon = hashlib.blake2b(digest_size=HASH_SIZE, person=b"fedup-draw-seed")
    beacon.update(roster.run_id + roster.epoch.to_bytes(8, "big") + roster.coordinator.raw)
    for peer, commit in roster.commits:
        reveal = reveals.get(peer)
        if reveal is None:
            raise DrawError(f"the draw lacks the reveal of {peer}")
        if not reveal_matches(commit, roster.epoch, reveal):
            raise DrawError(f"the reveal of {peer} does not open its commitment")
        beacon.update(peer.raw + reveal)
    seed = beacon.digest()
    return min(roster.member_ids, key=lambda p: _hash(seed + p.raw, b"fedup-draw-rank"))


def encode_reveals(reveals: Mapping[PeerId, bytes]) -> bytes:
    """Reveals as they travel: ``peer ID || nonce`` entries, ascending by peer ID."""
    return b"".join(p.raw + reveals[p] for p in sorted(reveals, key=_raw))


_raw = operator.attrgetter("raw")


def decode_reveals(data: bytes, what: str, *, limits: Limits) -> dict[PeerId, bytes]:
    """Reveals from outside (shape, order and sizes; :func:`draw_leader` checks them)."""
    return dict(_unpack(data, NONCE_SIZE, what, max_items=limits.max_members))


@attrs.frozen
class DrawProof:
    """What a drawn leader shows with its call: the signed roster and every reveal."""

    roster: bytes
    """The roster's envelope."""
    reveals: Mapping[PeerId, bytes]

    def to_cbor(self) -> bytes:
        return cbor.encode({"roster": self.roster, "reveals": encode_reveals(self.reveals)})

    @classmethod
    def check(cls, data: bytes, *, limits: Limits = DEFAULT_LIMITS) -> tuple[SignedRoster, PeerId]:
        """Verify a proof from outside: the roster it names and the leader it draws."""
        value = cbor.decode(data, max_size=limits.max_message_size, max_depth=4)
        f = FieldReader(value, "draw proof")
        signed = verify_roster(f.bytestr("roster"), limits=limits)
        reveals = decode_reveals(f.bytestr("reveals"), "draw proof: reveals", limits=limits)
        f.done()
        return signed, draw_leader(signed.roster, reveals)


def proof_problem(
    proof: bytes, roster: bytes, caller: PeerId, *, limits: Limits = DEFAULT_LIMITS
) -> str | None:
    """Why a call's draw proof does not show ``caller`` drawn on the roster whose digest
    is ``roster`` (a bad proof, another roster, another leader), or None."""
    try:
        signed, drawn = DrawProof.check(proof, limits=limits)
    except RemoteProtocolError as exc:
        return exc.reason
    if signed.digest != roster:
        return "the proof is of another roster than it names"
    if drawn != caller:
        return f"the draw it shows chose {drawn}, not the caller"
    return None
