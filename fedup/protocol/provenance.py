"""Provenance: every hop signs what it did, and the signed chain travels with the model.

A member that trains a hop (or only evaluates it) signs a *hop statement*:
"in run R, at lap L hop H, I received the model whose content digest is G, sent
on the model whose content digest is S, and trained it on N samples; the
statement before mine has digest P".  The statements form one hash chain per run
that grows by one at every hop; every member keeps the chain it verified, and a
ring blob carries the part its receiver has not seen.  The run's end is
sealed (:class:`~fedup.protocol.notices.FinalSeal`) over the last statement's
model and the SHA-256 of the model file every member saves, so anyone holding
the signed view, the dead notices, the chain and the seal can check who trained
the model, in which order, on how many samples, and that the file is the one
the run produced (``fedup-peer verify``).

The chain's rules (:class:`HopChain`; docs/federation.md, "Provenance"):

* statement 0 names :func:`provenance_genesis` of the view's digest (so a chain
  belongs to one view of one run) and every later one the digest of the
  statement before it: nothing can be removed, inserted or reordered;
* every statement verifies (its own domain) and is signed by a member of the
  view, and names the run;
* what a statement *received* is what the statement before it *sent*; the first
  statement's *received* is the chain's origin, the initial model as the leader
  built it (its own hop may change the model as any member's may, so no one
  re-derives it: members agree on the model's layout, by the view's model
  digest, not on its initial values across torch builds);
* its place is the one the ring rules give after the statement before it
  (:func:`~fedup.protocol.laps.next_position` in the ring without the members
  the dead notices at or before that statement's position declared dead; the
  first is the leader's, at lap 0 hop 0), never beyond the last lap, and a
  statement of an evaluation-only lap trained no samples.

A blob carries only what its receiver has not seen (:meth:`HopChain.suffix_for`):
the statements after the receiver's own last one in the sender's chain (all of
them if it signed none yet).  The receiver holds the chain up to that statement
(it verified the chain up to its predecessor's statement and signed its own), so
the first statement carried must name its head as ``prev``
(:meth:`HopChain.extend_with`); one that names an earlier statement of ours is
refused (:class:`ChainForkError`), one that names a statement not held here
says statements are missing (:class:`ChainGapError`, code ``missing-hops``).
Only a final model may resume after an earlier statement of ours (``rewind``): a
member counted as dead after it signed a hop holds a statement the run did not
keep, and the chain it saves is the run's.  Each statement carried is checked
exactly as if the whole chain had come.  Between the blobs of a ring without
deaths, that is fewer than a lap of statements; a final blob to a member counted
as dead carries everything since its last statement in the run's chain.

A statement's signature is verified once per process (a bounded cache of
successful verifications, keyed by the exact bytes), and a chain already
verified in this process under the same view and dead notices is recognised by
the digest of its bytes (the receiver's chain plus what the blob carries; each
chain keeps the digest's state, not its bytes), so in the simulator, where every
peer shares one process, each statement costs one verification in all.

Wire forms::

    hop statement   (envelope: domain fedup-hop-statement, type fedup/hop-statement/1)
      {"run": bstr(16), "prev": bstr(32), "by": bstr(38), "lap": uint, "hop": uint,
       "received": bstr(32), "sent": bstr(32), "samples": uint}
    chain           the statements in order, each its envelope followed by the
                    envelope's length as a big-endian u16 (so the last one can be
                    read from the end); at most Limits.max_provenance_hops
    provenance.cbor {"v": 1, "view": bstr, "dead": [bstr, ...], "hops": bstr,
                     "seal": bstr}

The content digests are the learning layer's (:func:`fedup.protocol.payload.content_digest`
over the ring metadata and the tensors, never the chain itself).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import types
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import attrs

from fedup.config import DEFAULT_LIMITS, Limits
from fedup.errors import LocalProtocolError, RemoteProtocolError
from fedup.protocol import cbor
from fedup.protocol.envelope import Signer, open_envelope, seal_envelope
from fedup.protocol.laps import Position, last_lap, next_position
from fedup.protocol.notices import MAX_SIGNED_SIZE, DeadChain, FinalSeal, SealError, dead_after
from fedup.protocol.peer_id import RAW_SIZE, PeerId
from fedup.protocol.refusal import RefusalCode
from fedup.protocol.returns import max_chain_notices
from fedup.protocol.ring import Ring
from fedup.protocol.schema import FieldReader, MessageError
from fedup.protocol.view import SignedView, verify_view

__all__ = [
    "ChainForkError",
    "ChainGapError",
    "ChainRules",
    "HopChain",
    "HopStatement",
    "MemberShare",
    "ProvenanceError",
    "VerifiedProvenance",
    "encode_provenance",
    "join_chain",
    "max_chain_bytes",
    "max_provenance_size",
    "provenance_file",
    "provenance_genesis",
    "shared_process",
    "split_chain",
    "verify_provenance",
]

STATEMENT_DOMAIN = "fedup-hop-statement"
STATEMENT_TYPE = "fedup/hop-statement/1"
MAX_STATEMENT_SIZE = 512
"""Largest hop-statement envelope (each is about 350 bytes); its length travels as a u16."""
MIN_STATEMENT_SIZE = 320
"""Smallest hop-statement envelope accepted: the smallest real one is 351 bytes (every
field but three small integers has a fixed size).  A chain of tiny entries would cost a
receiver a split per entry (1.6 MB of 3-byte entries blocked the event loop 0.4 s)."""
LENGTH_SIZE = 2
DIGEST_SIZE = 32
RUN_ID_SIZE = 16
MAX_SAMPLES = 2**62
"""The ring metadata's bound on sample counts."""
FILE_VERSION = 1
STATEMENT_CACHE = 8192
"""Hop statements whose verification is remembered per process: in one process of
1,000 peers a statement is checked again by every member for a lap after it was made."""
CHAIN_CACHE = 4096
"""Verified chains remembered per process (by the digest of their bytes, without them)."""


class ProvenanceError(RemoteProtocolError):
    """A chain of hop statements (or a provenance file) that is forged, broken or misplaced."""

    code = RefusalCode.BAD_PROVENANCE


class ChainForkError(ProvenanceError):
    """Statements that do not continue the chain known here from its last statement but
    from an earlier one (a hop known here would be gone)."""


class ChainGapError(ProvenanceError):
    """Statements that continue a statement not known here: the ones between are missing."""

    code = RefusalCode.MISSING_HOPS


def _blake(data: bytes | memoryview, person: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE, person=person).digest()


def provenance_genesis(view_digest: bytes) -> bytes:
    """What hop statement 0 names as its predecessor: a digest of the run's view."""
    return _blake(view_digest, b"fedup-hop-gen")


def _bytes_hasher() -> Any:
    """The digest of a chain's bytes (what a receiver compares the known prefix by)."""
    return hashlib.blake2b(digest_size=DIGEST_SIZE, person=b"fedup-hop-bytes")


EMPTY_FINGERPRINT = _bytes_hasher().digest()


def max_chain_bytes(limits: Limits) -> int:
    """The largest chain a peer accepts, in bytes."""
    return limits.max_provenance_hops * (MAX_STATEMENT_SIZE + LENGTH_SIZE)


def max_provenance_size(limits: Limits) -> int:
    """The largest ``provenance.cbor``: a view, a dead chain, a hop chain and a seal."""
    return (
        limits.max_message_size
        + max_chain_notices(limits.max_members, limits) * (MAX_SIGNED_SIZE + 3)
        + max_chain_bytes(limits)
        + MAX_SIGNED_SIZE
        + 64
    )


# --- one statement ----------------------------------------------------------------------


@attrs.frozen
class HopStatement:
    """A verified hop statement and the exact envelope bytes that carried it."""

    run_id: bytes
    prev: bytes
    """The digest of the statement before it (or :func:`provenance_genesis`)."""
    signer: PeerId
    """The member that did the hop (and signed this)."""
    position: Position
    received: bytes
    """The content digest of the model it received (the first: the leader's initial model)."""
    sent: bytes
    """The content digest of the model it handed on."""
    samples: int
    """Training samples this hop processed (0: it only evaluated)."""
    envelope: bytes
    digest: bytes
    """What the next statement names as ``prev``."""

    @property
    def entry(self) -> bytes:
        """Its bytes in a chain: the envelope, then its length."""
        return self.envelope + len(self.envelope).to_bytes(LENGTH_SIZE, "big")

    def describe(self) -> str:
        return f"{self.signer} at {self.position} ({self.samples} samples)"

    @classmethod
    def seal(
        cls,
        signer: Signer,
        *,
        run_id: bytes,
        prev: bytes,
        position: Position,
        received: bytes,
        sent: bytes,
        samples: int,
    ) -> HopStatement:
        """Sign a statement; raises LocalProtocolError for fields of the wrong size."""
        if {len(prev), len(received), len(sent)} != {DIGEST_SIZE} or len(run_id) != RUN_ID_SIZE:
            raise LocalProtocolError("a hop statement names a 16-byte run and 32-byte digests")
        if not 0 <= samples < MAX_SAMPLES or position.lap < 0 or position.hop < 0:
            raise LocalProtocolError(f"a hop statement cannot say {position}, {samples} samples")
        payload = cbor.encode(
            {
                "run": run_id,
                "prev": prev,
                "by": signer.peer_id.raw,
                "lap": position.lap,
                "hop": position.hop,
                "received": received,
                "sent": sent,
                "samples": samples,
            }
        )
        envelope = seal_envelope(
            signer.sign,
            signer.public_key,
            domain=STATEMENT_DOMAIN,
            payload_type=STATEMENT_TYPE,
            payload=payload,
        ).to_cbor()
        if len(envelope) > MAX_STATEMENT_SIZE:  # pragma: no cover - fixed-size fields
            raise LocalProtocolError("a hop statement outgrew MAX_STATEMENT_SIZE")
        digest = _blake(envelope, b"fedup-hop-stmt")
        return cls(
            run_id, prev, signer.peer_id, position, received, sent, samples, envelope, digest
        )

    @classmethod
    def open(cls, data: bytes | memoryview) -> HopStatement:
        """Verify the signature and decode the fields; raises :class:`ProvenanceError`.

        Successful verifications are remembered per process (by the exact bytes);
        the statement's place in a chain is :class:`HopChain`'s to check.
        """
        if len(data) > MAX_STATEMENT_SIZE:
            raise ProvenanceError(
                f"hop statement of {len(data)} bytes exceeds {MAX_STATEMENT_SIZE}"
            )
        return _open_statement(bytes(data))


@functools.lru_cache(maxsize=STATEMENT_CACHE)
def _open_statement(data: bytes) -> HopStatement:
    try:
        envelope = open_envelope(
            data, domain=STATEMENT_DOMAIN, payload_type=STATEMENT_TYPE, max_size=MAX_STATEMENT_SIZE
        )
        f = FieldReader(
            cbor.decode(envelope.payload, max_size=MAX_STATEMENT_SIZE, max_depth=1),
            "hop statement",
        )
        run_id = f.bytestr("run", size=RUN_ID_SIZE)
        prev = f.bytestr("prev", size=DIGEST_SIZE)
        signer = PeerId.from_bytes(f.bytestr("by", size=RAW_SIZE))
        lap = f.uint("lap", max_value=2**32 - 1)
        hop = f.uint("hop", max_value=2**32 - 1)
        received = f.bytestr("received", size=DIGEST_SIZE)
        sent = f.bytestr("sent", size=DIGEST_SIZE)
        samples = f.uint("samples", max_value=MAX_SAMPLES - 1)
        f.done()
    except RemoteProtocolError as exc:
        raise ProvenanceError(exc.reason) from None
    if envelope.signer != signer:
        raise ProvenanceError(f"it names {signer} but is signed by {envelope.signer}")
    digest = _blake(data, b"fedup-hop-stmt")
    return HopStatement(
        run_id, prev, signer, Position(lap, hop), received, sent, samples, data, digest
    )


# --- the chain --------------------------------------------------------------------------


@attrs.frozen(cache_hash=True)
class ChainRules:
    """What a run's chain is checked against: its view's run, digest, members and laps."""

    run_id: bytes
    view_digest: bytes
    members: tuple[PeerId, ...]
    """The view's members in ring order."""
    max_laps: int
    _memberset: frozenset[PeerId] = attrs.field(init=False, eq=False, hash=False, repr=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "_memberset", frozenset(self.members))

    def is_member(self, peer: PeerId) -> bool:
        return peer in self._memberset


@attrs.frozen(eq=False, slots=True)
class _Link:
    """One statement of a chain and the link to the one before it (chains that share a
    beginning share its links)."""

    statement: HopStatement
    entry: bytes
    """Its bytes in a chain (:attr:`HopStatement.entry`, made once)."""
    parent: _Link | None
    index: int


class _Bytes:
    """The bytes of chains that share a beginning: one buffer that only grows, and where
    each statement begins in it.

    A chain holds one and its first ``nbytes`` bytes and ``count`` starts are the chain's,
    so the statements a blob carries are one slice (:meth:`HopChain.suffix_for`), not a
    walk of every link.  A chain extended by statements appends them when it ends where the
    buffer does (the usual case: a member extends what it last held); otherwise (another
    extension came first) the extension gets a copy of its beginning.
    """

    __slots__ = ("buf", "starts")

    def __init__(self, buf: bytearray | None = None, starts: list[int] | None = None) -> None:
        self.buf = bytearray() if buf is None else buf
        self.starts: list[int] = [] if starts is None else starts

    def extended(self, count: int, nbytes: int, entries: Sequence[bytes]) -> _Bytes:
        """The bytes of a chain of ``count`` statements and ``nbytes`` bytes held here,
        extended by ``entries``."""
        target = self
        if len(self.buf) != nbytes or len(self.starts) != count:
            target = _Bytes(self.slice(0, nbytes), self.starts[:count])
        for entry in entries:
            target.starts.append(len(target.buf))
            target.buf += entry
        return target

    def slice(self, begin: int, end: int) -> bytearray:
        """A copy of the bytes from ``begin`` to ``end``."""
        return self.buf[begin:end]

    def bytes(self, begin: int, end: int) -> bytes:
        """The bytes from ``begin`` to ``end`` as ``bytes``, copied once (a bytearray
        slice made into bytes is two copies: a blob's statements, some 350 kB among a
        thousand members, are taken at every hop)."""
        with memoryview(self.buf) as view:
            return bytes(view[begin:end])


@attrs.frozen(eq=False)
class HopChain:
    """A verified chain of hop statements: what the next one must link to, and every statement.

    The statements are held as links (a chain extended by one statement shares the
    links of the chain it extends), so a member keeps the whole chain it verified
    and a blob need carry only what its receiver has not seen (:meth:`suffix_for`,
    :meth:`extend_with`).
    """

    rules: ChainRules
    count: int
    """Statements in the chain."""
    nbytes: int
    """The chain's bytes (every statement's :attr:`HopStatement.entry`)."""
    fingerprint: bytes
    """The digest of the chain's bytes (what the process's cache of verified chains is
    keyed by)."""
    head: bytes
    """The digest the next statement must name as ``prev``."""
    tail: _Link | None
    """The last statement's link (None: no statement yet)."""
    last_by: Mapping[PeerId, int]
    """Each signer's last statement's index (never changed once made)."""
    _hasher: Any = attrs.field(default=None, repr=False)
    """The bytes digest's state after the chain (so a statement appends in O(1))."""
    _bytes: _Bytes = attrs.field(factory=_Bytes, repr=False)
    """The chain's bytes and where each statement begins (shared with its extensions)."""

    @classmethod
    def start(cls, rules: ChainRules) -> HopChain:
        """The empty chain of a run (no hop yet)."""
        return cls(
            rules,
            0,
            0,
            EMPTY_FINGERPRINT,
            provenance_genesis(rules.view_digest),
            None,
            _NO_SIGNERS,
            _bytes_hasher(),
        )

    @property
    def last(self) -> HopStatement | None:
        """The last statement (None: no statement yet)."""
        return self.tail.statement if self.tail is not None else None

    @property
    def data(self) -> bytes:
        """The chain's bytes, first statement to last (made on demand)."""
        return self._bytes.bytes(0, self.nbytes)

    def statements(self) -> Iterator[HopStatement]:
        """Every statement, first to last (verified when this chain was)."""
        return (link.statement for link in self._links(self.count))

    def _links(self, n: int) -> list[_Link]:
        """The last ``n`` links, in chain order."""
        out: list[_Link] = []
        link = self.tail
        for _ in range(n):
            assert link is not None
            out.append(link)
            link = link.parent
        out.reverse()
        return out

    def suffix_for(self, peer: PeerId) -> bytes:
        """The bytes of the statements after ``peer``'s last one (all of them if it signed
        none): what a blob to ``peer`` carries.  ``peer`` holds the chain up to its own
        last statement (it verified it, then signed its own), so with its copy these are
        the whole chain (:meth:`extend_with`)."""
        start = self.last_by.get(peer, -1) + 1
        if start >= self.count:
            return b""
        return self._bytes.bytes(self._bytes.starts[start], self.nbytes)

    def next_place(self, dead: DeadChain) -> tuple[PeerId, Position]:
        """Who must sign the next statement, and at which position (the ring rules)."""
        return _Walk(self, dead).next_place()

    def extend_with(
        self,
        data: bytes | memoryview,
        *,
        dead: DeadChain,
        limits: Limits = DEFAULT_LIMITS,
        rewind: bool = False,
    ) -> HopChain:
        """This chain extended by the statements in ``data``, each checked.

        ``data`` holds the statements that follow this chain's last one: its first
        must name this chain's head as ``prev``.  With ``rewind`` (a final model, whose
        chain may leave out statements of ours the run did not keep), it may instead
        follow any statement of this chain (or none: it starts the chain), and the
        statements after that one are dropped.  Every statement in ``data`` must fit
        its place (the module docstring's rules), with the dead notices of ``dead``
        deciding the ring at each position.  Raises :class:`ChainGapError` when the
        first statement follows none held here (statements between are missing),
        :class:`ChainForkError` when it follows an earlier one without ``rewind``,
        :class:`ProvenanceError` for every other problem, naming the first statement
        at fault.
        """
        view = memoryview(data)
        n = view.nbytes
        cap = max_chain_bytes(limits)
        if n > cap:
            raise ProvenanceError(
                f"provenance chain of {n} bytes exceeds {cap} (Limits.max_provenance_hops)"
            )
        if n == 0:
            return self
        if _SHARED_PROCESS:
            known = self._made_here(view, dead, limits)
            if known is not None:
                return known
        hasher = (self._hasher or _hasher_over(self.data)).copy()
        hasher.update(view)
        key = (self.rules, dead.head, self.nbytes + n, hasher.digest())
        known = _VERIFIED.get(key)
        if known is not None and known.count <= limits.max_provenance_hops:
            return attrs.evolve(known, hasher=hasher)
        room = limits.max_provenance_hops - (0 if rewind else self.count)
        spans = _entries(view, 0, room)
        try:
            first = HopStatement.open(view[spans[0][0] : spans[0][1]])
        except ProvenanceError as exc:
            raise ProvenanceError(f"hop statement {self.count}: {exc.reason}") from None
        base = self._resume_after(first.prev, rewind)
        if base.count + len(spans) > limits.max_provenance_hops:
            raise ProvenanceError(
                "provenance chain holds more statements than Limits.max_provenance_hops"
            )
        if base is not self:
            hasher = (base._hasher or _hasher_over(base.data)).copy()
            hasher.update(view)
            key = (self.rules, dead.head, base.nbytes + n, hasher.digest())
        walk = _Walk(base, dead)
        walk.take(first, bytes(view[spans[0][0] : spans[0][1] + LENGTH_SIZE]))
        for begin, end in spans[1:]:
            try:
                statement = HopStatement.open(view[begin:end])
            except ProvenanceError as exc:
                raise ProvenanceError(f"hop statement {walk.count}: {exc.reason}") from None
            walk.take(statement, bytes(view[begin : end + LENGTH_SIZE]))
        chain = walk.chain(base.nbytes + n, hasher)
        _remember(key, chain)
        return chain

    def _made_here(self, view: memoryview, dead: DeadChain, limits: Limits) -> HopChain | None:
        """The chain a member of this process made that is this one extended by exactly
        the statements in ``view``, or None.

        Found by its last statement's bytes (what the sender appended) and checked byte
        for byte: its statement where this chain ends is this chain's last one, and the
        statements after it are ``view``.  Equal last statements mean equal chains up to
        them (each statement's digest covers the one before: the chain's own rule), so
        this is what :meth:`extend_with` would verify, without hashing every carried
        statement to look the result up (about 350 kB a hop among a thousand members).
        """
        n = view.nbytes
        if n < LENGTH_SIZE:
            return None
        begin = n - LENGTH_SIZE - int.from_bytes(view[n - LENGTH_SIZE :], "big")
        if begin < 0:
            return None
        known = _ENDS.get((self.rules, dead.head, self.nbytes + n, bytes(view[begin:])))
        if known is None or known.count > limits.max_provenance_hops:
            return None
        held = known._bytes
        if self.count:
            assert self.tail is not None
            at = held.starts[self.count - 1] if len(held.starts) >= self.count else -1
            if at + len(self.tail.entry) != self.nbytes:
                return None
            if not held.buf.startswith(self.tail.entry, at, self.nbytes):
                return None
        if not held.buf.startswith(view, self.nbytes, self.nbytes + n):  # (no copy)
            return None
        return known

    def _resume_after(self, prev: bytes, rewind: bool) -> HopChain:
        """The chain a statement naming ``prev`` continues: this one, or (``rewind``) this
        one cut after the statement whose digest is ``prev``."""
        if prev == self.head or self.count == 0:
            return self  # (an empty chain: the walk says the first does not link)
        link, genesis = self.tail, provenance_genesis(self.rules.view_digest)
        while link is not None and link.statement.digest != prev:
            link = link.parent
        if link is None and prev != genesis:
            raise ChainGapError(
                f"provenance chain continues from a hop statement not known here: the "
                f"statements after statement {self.count - 1}, the last known here, are "
                "missing"
            )
        kept = link.index + 1 if link is not None else 0
        if not rewind:
            after = f"after statement {kept - 1}" if kept else "from the chain's start"
            raise ChainForkError(
                f"provenance chain resumes {after}, but the statements known here run to "
                f"statement {self.count - 1}: it must start right after them"
            )
        return self._cut(kept)

    def _cut(self, n: int) -> HopChain:
        """This chain's first ``n`` statements."""
        links = self._links(self.count)[:n]
        last_by: dict[PeerId, int] = {}
        hasher = _bytes_hasher()
        for link in links:
            last_by[link.statement.signer] = link.index
            hasher.update(link.entry)
        tail = links[-1] if links else None
        return HopChain(
            self.rules,
            n,
            sum(len(link.entry) for link in links),
            hasher.digest(),
            tail.statement.digest
            if tail is not None
            else provenance_genesis(self.rules.view_digest),
            tail,
            last_by,
            hasher,
            _Bytes().extended(0, 0, [link.entry for link in links]),
        )

    def append(
        self,
        signer: Signer,
        *,
        position: Position,
        received: bytes,
        sent: bytes,
        samples: int,
        dead: DeadChain,
        limits: Limits = DEFAULT_LIMITS,
    ) -> HopChain:
        """This chain with ``signer``'s statement about the hop at ``position``.

        Raises :class:`~fedup.errors.LocalProtocolError` if the chain is full or the
        statement would break the chain's rules (the caller must train only where
        :meth:`next_place` says, on what it received).
        """
        if self.count >= limits.max_provenance_hops:
            raise LocalProtocolError(
                f"the provenance chain holds {self.count} statements already "
                "(Limits.max_provenance_hops)"
            )
        statement = HopStatement.seal(
            signer,
            run_id=self.rules.run_id,
            prev=self.head,
            position=position,
            received=received,
            sent=sent,
            samples=samples,
        )
        entry = statement.entry
        walk = _Walk(self, dead)
        try:
            walk.take(statement, entry)
        except ProvenanceError as exc:
            raise LocalProtocolError(
                f"our own hop statement breaks the chain: {exc.reason}"
            ) from None
        hasher = (self._hasher or _hasher_over(self.data)).copy()
        hasher.update(entry)
        chain = walk.chain(self.nbytes + len(entry), hasher)
        if _SHARED_PROCESS:  # the simulator: the receivers are in this process too
            _remember((self.rules, dead.head, chain.nbytes, chain.fingerprint), chain)
        return chain


def split_chain(data: bytes | memoryview, *, limits: Limits = DEFAULT_LIMITS) -> list[bytes]:
    """The statement envelopes a chain's bytes hold, in order (not verified); raises
    :class:`ProvenanceError` for bytes that are not a chain within ``limits``."""
    view = memoryview(data)
    if view.nbytes > max_chain_bytes(limits):
        raise ProvenanceError("provenance chain exceeds Limits.max_provenance_hops")
    return [bytes(view[a:b]) for a, b in _entries(view, 0, limits.max_provenance_hops)]


def join_chain(envelopes: Sequence[bytes]) -> bytes:
    """A chain's bytes from its statement envelopes, in order (:func:`split_chain`'s inverse)."""
    return b"".join(e + len(e).to_bytes(LENGTH_SIZE, "big") for e in envelopes)


def _hasher_over(data: bytes | memoryview) -> Any:
    hasher = _bytes_hasher()
    hasher.update(data)
    return hasher


def _entries(view: memoryview, start: int, max_count: int) -> list[tuple[int, int]]:
    """Where each statement envelope after ``start`` lies, in chain order (read from the end)."""
    out: list[tuple[int, int]] = []
    end = view.nbytes
    while end > start:
        if end - start < LENGTH_SIZE:
            raise ProvenanceError("provenance chain is cut short (a length is missing)")
        size = int.from_bytes(view[end - LENGTH_SIZE : end], "big")
        begin = end - LENGTH_SIZE - size
        if size < MIN_STATEMENT_SIZE or size > MAX_STATEMENT_SIZE or begin < start:
            raise ProvenanceError(
                "provenance chain: a statement's length does not fit (the chain was cut or altered)"
            )
        if len(out) == max_count:
            raise ProvenanceError(
                "provenance chain holds more statements than Limits.max_provenance_hops"
            )
        out.append((begin, end - LENGTH_SIZE))
        end = begin
    out.reverse()
    return out


_VERIFIED: dict[tuple[ChainRules, bytes, int, bytes], HopChain] = {}
_ENDS: dict[tuple[ChainRules, bytes, int, bytes], HopChain] = {}
"""In a shared process (:func:`shared_process`): the chains of :data:`_VERIFIED` by their
last statement's bytes instead of their fingerprint (:meth:`HopChain._made_here`)."""
_NO_SIGNERS: Mapping[PeerId, int] = types.MappingProxyType({})
_SHARED_PROCESS = False


@contextlib.contextmanager
def shared_process() -> Iterator[None]:
    """For the block, a chain a member extends with its own statement counts as verified
    for the other members of this process (the simulator's peers), so that each statement
    is checked once per process, not once per later holder, and the members that save the
    same provenance share its bytes (:func:`provenance_file`).  Outside it (real peers, the
    tests of peers in one process) every receiver checks the statements it has not seen."""
    global _SHARED_PROCESS
    before, _SHARED_PROCESS = _SHARED_PROCESS, True
    try:
        yield
    finally:
        _SHARED_PROCESS = before
        _FILES.clear()
        _ENDS.clear()


def _remember(key: tuple[ChainRules, bytes, int, bytes], chain: HopChain) -> None:
    """Note a chain verified in this process, oldest forgotten first (its links are
    shared with the chains it extends, so a note costs little)."""
    if len(_VERIFIED) >= CHAIN_CACHE:
        del _VERIFIED[next(iter(_VERIFIED))]
    _VERIFIED[key] = attrs.evolve(chain, hasher=None)
    if _SHARED_PROCESS and chain.tail is not None:
        if len(_ENDS) >= CHAIN_CACHE:
            del _ENDS[next(iter(_ENDS))]
        _ENDS[(chain.rules, key[1], chain.nbytes, chain.tail.entry)] = chain


class _Walk:
    """Checks statements one after another against a chain's rules (see the module)."""

    def __init__(self, chain: HopChain, dead: DeadChain) -> None:
        self._base = chain
        self._entries: list[bytes] = []
        """The bytes of the statements taken, in order."""
        self.rules = chain.rules
        self.count = chain.count
        self.head = chain.head
        self.last = chain.last
        self.tail = chain.tail
        self.last_by = chain.last_by
        self._own_last_by = False
        # In chain order, by position (a stable sort: notices at one position keep their
        # order, so a death and the return after it fold in that order).
        self._notices = sorted(dead.notices, key=lambda n: n.at)
        self._rings: dict[frozenset[PeerId], Ring] = {}
        if dead.members == self.rules.members:  # the dead chain's own ring, built once
            self._rings[dead.dead] = dead.ring

    def _ring_after(self, position: Position | None) -> Ring:
        """The ring for the hop after ``position``: without those counted as dead by
        then (declared dead, and not taken back since)."""
        notices = [] if position is None else [n for n in self._notices if n.at <= position]
        dead = dead_after(self.rules.members, notices)
        ring = self._rings.get(dead)
        if ring is None:
            ring = self._rings[dead] = Ring(self.rules.members, dead)
        return ring

    def next_place(self) -> tuple[PeerId, Position]:
        last = self.last
        if last is None:
            return self._ring_after(None).leader, Position(0, 0)
        try:
            return next_position(self._ring_after(last.position), last.signer, last.position)
        except LocalProtocolError as exc:
            raise ProvenanceError(f"no member can follow {last.describe()}: {exc}") from None

    def take(self, s: HopStatement, entry: bytes) -> None:
        """Check ``s`` (whose bytes in the chain are ``entry``) and add it."""
        rules = self.rules
        where = f"hop statement {self.count}"
        if s.run_id != rules.run_id:
            raise ProvenanceError(
                f"{where} is from another run ({s.run_id.hex()[:8]}, not {rules.run_id.hex()[:8]})"
            )
        if s.prev != self.head:
            raise ProvenanceError(
                f"{where} ({s.describe()}) does not link to the statement before it "
                "(a hop was removed, reordered or inserted)"
            )
        if not rules.is_member(s.signer):
            raise ProvenanceError(f"{where} is signed by {s.signer}, not a member of the view")
        if self.last is not None and s.received != self.last.sent:
            raise ProvenanceError(
                f"{where} ({s.describe()}) received a model other than the one the statement "
                "before it sent"
            )
        target, position = self.next_place()
        if (s.signer, s.position) != (target, position):
            raise ProvenanceError(
                f"{where} is by {s.signer} at {s.position}, but the ring puts {target} at "
                f"{position} next"
            )
        if position.lap > last_lap(rules.max_laps):
            raise ProvenanceError(f"{where} is at {position}, beyond the run's last lap")
        if position.lap >= rules.max_laps and s.samples:
            raise ProvenanceError(
                f"{where} claims {s.samples} samples trained in lap {position.lap}, which only "
                "evaluates"
            )
        if not self._own_last_by:
            self.last_by, self._own_last_by = dict(self.last_by), True
        self.last_by[s.signer] = self.count  # type: ignore[index]
        self.tail = _Link(s, entry, self.tail, self.count)
        self._entries.append(entry)
        self.count += 1
        self.head = s.digest
        self.last = s

    def chain(self, nbytes: int, hasher: Any) -> HopChain:
        """The chain the statements taken make (``nbytes`` long, ``hasher`` over them)."""
        base = self._base
        return HopChain(
            self.rules,
            self.count,
            nbytes,
            hasher.digest(),
            self.head,
            self.tail,
            self.last_by,
            hasher,
            base._bytes.extended(base.count, base.nbytes, self._entries),
        )


# --- the provenance of a saved model --------------------------------------------------------


def encode_provenance(
    *, view: bytes, dead: Sequence[bytes], hops: bytes | memoryview, seal: bytes
) -> bytes:
    """The bytes of ``provenance.cbor``: the signed view, dead notices, hop chain and seal."""
    return cbor.encode(
        {"v": FILE_VERSION, "view": view, "dead": list(dead), "hops": bytes(hops), "seal": seal}
    )


_FileKey = tuple[bytes, tuple[bytes, ...], ChainRules, int, bytes, bytes]
_FILES: dict[_FileKey, bytes] = {}
"""The last ``provenance.cbor`` made in a shared process (every member of a run saves the
same one, about 1 MB at 1,000 members)."""


def provenance_file(*, view: bytes, dead: Sequence[bytes], chain: HopChain, seal: bytes) -> bytes:
    """:func:`encode_provenance` of ``chain``'s bytes.

    Under :func:`shared_process` the bytes are made once per content (the key: the view's
    bytes, the dead notices, the chain's rules, length and fingerprint, the seal) and the
    same object is returned to every member of the process that asks for that content;
    elsewhere they are made on each call.
    """
    if not _SHARED_PROCESS:
        return encode_provenance(view=view, dead=dead, hops=chain.data, seal=seal)
    key = (view, tuple(dead), chain.rules, chain.nbytes, chain.fingerprint, seal)
    data = _FILES.get(key)
    if data is None:
        data = encode_provenance(view=view, dead=dead, hops=chain.data, seal=seal)
        _FILES.clear()
        _FILES[key] = data
    return data


@attrs.frozen
class MemberShare:
    """What one member did for the model: hops signed, hops trained, samples trained."""

    peer: PeerId
    hops: int
    trained: int
    samples: int


@attrs.frozen(eq=False)
class VerifiedProvenance:
    """A model's provenance, every check passed."""

    view: SignedView
    dead: DeadChain
    chain: HopChain
    seal: FinalSeal

    @property
    def initial(self) -> bytes:
        """The content digest of the model the first hop started from."""
        first = next(self.chain.statements())
        return first.received

    def shares(self) -> list[MemberShare]:
        """Each member's part, in ring order (members that did nothing included)."""
        counts = {p: [0, 0, 0] for p in self.view.view.member_ids}
        for s in self.chain.statements():
            c = counts[s.signer]
            c[0] += 1
            c[1] += s.samples > 0
            c[2] += s.samples
        return [MemberShare(p, *c) for p, c in counts.items()]


def verify_provenance(
    data: bytes, *, model_sha256: bytes, limits: Limits = DEFAULT_LIMITS
) -> VerifiedProvenance:
    """Check a ``provenance.cbor`` and the SHA-256 of the model file it is for.

    In order: the file's size and shape; the view (:func:`~fedup.protocol.view.verify_view`);
    the dead notices (:meth:`DeadChain.extend_with`); every hop statement (the
    :class:`HopChain` rules, statement 0 starting from whatever model it names as
    received); the seal verifies, is for the run, is by the signer of the last
    statement, over the model that statement sent, and names ``model_sha256``.
    Raises :class:`ProvenanceError` naming the first problem.
    """
    size = max_provenance_size(limits)
    if len(data) > size:
        raise ProvenanceError(f"provenance file of {len(data)} bytes exceeds {size}")
    try:
        f = FieldReader(cbor.decode(data, max_size=size, max_depth=2), "provenance file")
        version = f.uint("v")
        if version != FILE_VERSION:
            raise f.fail("v", f"is {version}; this FedUp reads version {FILE_VERSION}")
        view_bytes = f.bytestr("view", max_size=limits.max_message_size)
        dead_bytes = f.array(
            "dead", _signed_item, max_items=max_chain_notices(limits.max_members, limits)
        )
        hops = f.bytestr("hops", max_size=max_chain_bytes(limits))
        seal_bytes = f.bytestr("seal", max_size=MAX_SIGNED_SIZE)
        f.done()
        signed = verify_view(view_bytes, limits=limits)
    except ProvenanceError:
        raise
    except RemoteProtocolError as exc:
        raise ProvenanceError(exc.reason) from None
    view = signed.view
    try:
        dead = DeadChain(view.run_id, signed.digest, view.member_ids).extend_with(
            dead_bytes, receiver=None, limits=limits
        )
    except RemoteProtocolError as exc:
        raise ProvenanceError(f"dead notices: {exc.reason}") from None
    rules = ChainRules(view.run_id, signed.digest, view.member_ids, view.settings.max_laps)
    chain = HopChain.start(rules).extend_with(hops, dead=dead, limits=limits)
    last = chain.last
    if last is None:
        raise ProvenanceError("the provenance chain holds no hop statement")
    try:
        seal = FinalSeal.open(seal_bytes)
    except SealError as exc:
        raise ProvenanceError(exc.reason) from None
    if seal.run_id != view.run_id:
        raise ProvenanceError(f"the final seal is for another run ({seal.run_id.hex()[:8]})")
    if seal.origin != last.signer or seal.content != last.sent:
        raise ProvenanceError(
            f"the final seal (by {seal.origin}) is not over the model the last hop statement "
            f"({last.describe()}) sent"
        )
    if seal.model != model_sha256:
        raise ProvenanceError(
            f"the model file (SHA-256 {model_sha256.hex()[:16]}...) is not the one the run "
            f"sealed ({seal.model.hex()[:16]}...)"
        )
    return VerifiedProvenance(signed, dead, chain, seal)


def _signed_item(value: object, label: str) -> bytes:
    if not isinstance(value, bytes) or len(value) > MAX_SIGNED_SIZE:
        raise MessageError(f"{label} must be a signed notice of at most {MAX_SIGNED_SIZE} bytes")
    return value
