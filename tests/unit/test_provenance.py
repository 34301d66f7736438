"""Hop statements, the chain they form and a saved model's provenance, byte by byte.

Pure: a signed view of four members, chains built with :meth:`HopChain.append` as the
custody machine builds them, then altered one way at a time (each field of a statement
re-signed by its own signer, a hop removed, reordered, duplicated, a foreign signer, a
statement of another run, a chain too long, any single byte).
"""

from __future__ import annotations

import hashlib
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedup.config import DEFAULT_LIMITS
from fedup.errors import LocalProtocolError
from fedup.identity import Identity
from fedup.protocol import cbor
from fedup.protocol import provenance as provenance_module
from fedup.protocol.envelope import seal_envelope
from fedup.protocol.laps import Position, max_hops
from fedup.protocol.notices import NOTICE_DOMAIN, DeadChain, FinalSeal
from fedup.protocol.provenance import (
    MAX_STATEMENT_SIZE,
    MIN_STATEMENT_SIZE,
    STATEMENT_DOMAIN,
    STATEMENT_TYPE,
    ChainForkError,
    ChainGapError,
    ChainRules,
    HopChain,
    HopStatement,
    ProvenanceError,
    encode_provenance,
    provenance_file,
    provenance_genesis,
    split_chain,
    verify_provenance,
)
from fedup.protocol.records import Address, PeerRecord
from fedup.protocol.refusal import RefusalCode
from fedup.protocol.view import MembershipView, RunSettings, SignedView

IDS = sorted((Identity(bytes([0x30 + i]) * 32) for i in range(4)), key=lambda i: i.peer_id)
BY_PEER = {i.peer_id: i for i in IDS}
STRANGER = Identity(b"\x77" * 32)
RUN = bytes(range(16))
OTHER_RUN = bytes(range(1, 17))
MAX_LAPS = 2
INITIAL = hashlib.sha256(b"initial model").digest()
MODEL_FILE = hashlib.sha256(b"model.safetensors").digest()


def signed_view(run_id: bytes = RUN) -> SignedView:
    records = tuple(
        PeerRecord(i.peer_id, 1, (Address("127.0.0.1", 4000 + n),), "net").seal(i)
        for n, i in enumerate(IDS)
    )
    view = MembershipView(
        run_id, 0, IDS[0].peer_id, records, RunSettings(max_laps=MAX_LAPS, patience=5), None
    )
    return view.seal(IDS[0])


VIEW = signed_view()
MEMBERS = VIEW.view.member_ids
RULES = ChainRules(RUN, VIEW.digest, MEMBERS, MAX_LAPS)
NO_DEAD = DeadChain(RUN, VIEW.digest, MEMBERS)


def sent_at(position: Position) -> bytes:
    """The content digest each hop of the honest chain sends."""
    return hashlib.sha256(f"model after {position}".encode()).digest()


def samples_at(position: Position) -> int:
    return 0 if position.lap >= MAX_LAPS else 100 + position.hop


def honest(hops: int, *, dead: DeadChain = NO_DEAD, rules: ChainRules = RULES) -> HopChain:
    """A chain of ``hops`` statements, each where the ring rules put it."""
    chain = HopChain.start(rules)
    for _ in range(hops):
        peer, position = chain.next_place(dead)
        chain = chain.append(
            BY_PEER[peer],
            position=position,
            received=chain.last.sent if chain.last is not None else INITIAL,
            sent=sent_at(position),
            samples=samples_at(position),
            dead=dead,
        )
    return chain


FULL = honest(max_hops(len(IDS), MAX_LAPS))
STATEMENTS = list(FULL.statements())


def join(statements: list[HopStatement]) -> bytes:
    return b"".join(s.entry for s in statements)


def resigned(s: HopStatement, signer: Identity | None = None, **changes: Any) -> HopStatement:
    """``s`` with fields changed, validly signed (by its own signer unless told)."""
    fields: dict[str, Any] = {
        "run_id": s.run_id,
        "prev": s.prev,
        "position": s.position,
        "received": s.received,
        "sent": s.sent,
        "samples": s.samples,
    }
    fields.update(changes)
    return HopStatement.seal(signer or BY_PEER[s.signer], **fields)


def check(data: bytes, *, dead: DeadChain = NO_DEAD, **kw: Any) -> HopChain:
    return HopChain.start(RULES).extend_with(data, dead=dead, **kw)


def refused(data: bytes, match: str, **kw: Any) -> ProvenanceError:
    with pytest.raises(ProvenanceError, match=match) as info:
        check(data, **kw)
    assert info.value.code is RefusalCode.BAD_PROVENANCE
    return info.value


# --- one statement --------------------------------------------------------------------------


def test_a_statement_round_trips_and_links_to_the_one_before() -> None:
    first, second = STATEMENTS[:2]
    assert first.prev == provenance_genesis(VIEW.digest)
    assert second.prev == first.digest
    assert (first.signer, first.position, first.received) == (MEMBERS[0], Position(0, 0), INITIAL)
    assert (second.signer, second.position, second.received) == (
        MEMBERS[1],
        Position(0, 1),
        first.sent,
    )
    again = HopStatement.open(first.envelope)
    assert again == first
    assert len(first.envelope) <= MAX_STATEMENT_SIZE
    assert first.entry == first.envelope + len(first.envelope).to_bytes(2, "big")


def statement_fields(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "run": RUN,
        "prev": b"p" * 32,
        "by": IDS[1].peer_id.raw,
        "lap": 0,
        "hop": 1,
        "received": b"r" * 32,
        "sent": b"s" * 32,
        "samples": 5,
    }
    fields.update(changes)
    return {k: v for k, v in fields.items() if v is not None}


def envelope(
    fields: dict[str, Any],
    *,
    ident: Identity = IDS[1],
    domain: str = STATEMENT_DOMAIN,
    payload_type: str = STATEMENT_TYPE,
) -> bytes:
    return seal_envelope(
        ident.sign,
        ident.public_key,
        domain=domain,
        payload_type=payload_type,
        payload=cbor.encode(fields),
    ).to_cbor()


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (envelope(statement_fields(), domain=NOTICE_DOMAIN), "bad signature"),
        (envelope(statement_fields(), payload_type="fedup/dead-notice/1"), "type"),
        (envelope(statement_fields(by=IDS[2].peer_id.raw)), "signed by"),
        (envelope(statement_fields(run=b"r" * 15)), "'run' must be 16 bytes"),
        (envelope(statement_fields(prev=b"p" * 31)), "'prev' must be 32 bytes"),
        (envelope(statement_fields(received=None)), "missing field 'received'"),
        (envelope(statement_fields(sent="text")), "'sent' must be a byte string"),
        (envelope(statement_fields(lap=-1)), "'lap'"),
        (envelope(statement_fields(hop=2**32)), "'hop'"),
        (envelope(statement_fields(samples=2**62)), "'samples'"),
        (envelope(statement_fields(extra=1)), "unknown field"),
        (b"\xa0" * (MAX_STATEMENT_SIZE + 1), "exceeds"),
    ],
)
def test_a_statement_that_does_not_verify_or_decode_is_refused(data: bytes, match: str) -> None:
    with pytest.raises(ProvenanceError, match=match):
        HopStatement.open(data)
    for cut in range(0, len(data), 17):
        with pytest.raises(ProvenanceError):
            HopStatement.open(data[:cut])


def test_sealing_checks_its_own_fields() -> None:
    good = {
        "run_id": RUN,
        "prev": b"p" * 32,
        "position": Position(0, 0),
        "received": INITIAL,
        "sent": INITIAL,
        "samples": 1,
    }
    HopStatement.seal(IDS[0], **good)
    for change in (
        {"run_id": b"r"},
        {"sent": b"s" * 31},
        {"samples": -1},
        {"position": Position(-1, 0)},
    ):
        with pytest.raises(LocalProtocolError):
            HopStatement.seal(IDS[0], **{**good, **change})


# --- honest chains ----------------------------------------------------------------------------


def test_an_honest_chain_follows_the_ring_and_verifies_from_scratch() -> None:
    assert FULL.count == len(STATEMENTS) == 13  # 4 members, laps 0..2, and the closing hop
    places = [(s.signer, s.position) for s in STATEMENTS]
    assert places[:5] == [
        (MEMBERS[0], Position(0, 0)),
        (MEMBERS[1], Position(0, 1)),
        (MEMBERS[2], Position(0, 2)),
        (MEMBERS[3], Position(0, 3)),
        (MEMBERS[0], Position(1, 0)),
    ]
    assert places[-1] == (MEMBERS[0], Position(3, 0))
    assert FULL.data is not None
    again = HopChain.start(RULES).extend_with(FULL.data, dead=NO_DEAD)
    assert (again.count, again.head, again.fingerprint, again.last) == (
        FULL.count,
        FULL.head,
        FULL.fingerprint,
        FULL.last,
    )
    assert [s.samples for s in STATEMENTS if s.position.lap >= MAX_LAPS] == [0] * 5


def test_a_receiver_checks_only_what_follows_the_chain_it_knew(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    walked = counting_walks(monkeypatch)
    mine = honest(6)  # what a member keeps after handing the model on
    walked.clear()
    later = mine.extend_with(join(STATEMENTS[6:]), dead=NO_DEAD)
    assert later.count == FULL.count and later.head == FULL.head
    assert walked == STATEMENTS[6:]
    # the whole chain again, as a final model may carry it: the same answer
    assert later.extend_with(join(STATEMENTS), dead=NO_DEAD, rewind=True).head == FULL.head
    assert later.extend_with(b"", dead=NO_DEAD) is later  # nothing new


def test_a_chain_that_does_not_start_with_the_one_known_here_is_a_fork() -> None:
    mine = honest(6)
    with pytest.raises(ChainForkError, match="resumes from the chain's start") as info:
        mine.extend_with(join(STATEMENTS[:5]), dead=NO_DEAD)
    assert info.value.code is RefusalCode.BAD_PROVENANCE
    changed = resigned(STATEMENTS[2], samples=999)
    forged = join([*STATEMENTS[:2], changed, *STATEMENTS[3:]])
    with pytest.raises(ChainForkError, match="resumes from the chain's start"):
        mine.extend_with(forged, dead=NO_DEAD)
    # a final model may rewind the chain known here, but not past a changed statement
    with pytest.raises(ProvenanceError, match=r"statement 3 .* does not link"):
        mine.extend_with(forged, dead=NO_DEAD, rewind=True)


# --- only what the receiver has not seen -----------------------------------------------------


def counting_walks(monkeypatch: pytest.MonkeyPatch) -> list[HopStatement]:
    """The statements walked (checked one by one) from now on, none taken from the cache
    of chains verified in this process."""
    walked: list[HopStatement] = []
    real = provenance_module._Walk.take

    def counting(self: Any, statement: HopStatement, entry: bytes) -> None:
        walked.append(statement)
        real(self, statement, entry)

    monkeypatch.setattr(provenance_module._Walk, "take", counting)
    monkeypatch.setattr(provenance_module, "_VERIFIED", {})  # what earlier tests checked
    return walked


def test_the_suffix_for_a_member_starts_after_its_own_last_statement() -> None:
    # lap 0: member 2 has signed nothing yet, so it gets everything
    assert honest(2).suffix_for(MEMBERS[2]) == join(STATEMENTS[:2])
    # later: the statements after its own last one, at most a lap
    assert honest(6).suffix_for(MEMBERS[2]) == join(STATEMENTS[3:6])  # after statement 2
    assert honest(9).suffix_for(MEMBERS[3]) == join(STATEMENTS[8:9])  # after statement 7
    assert honest(9).suffix_for(MEMBERS[1]) == join(STATEMENTS[6:9])  # after statement 5
    assert FULL.suffix_for(MEMBERS[0]) == b""


def test_two_extensions_of_one_chain_each_keep_their_own_bytes() -> None:
    """Chains that share a beginning share its bytes; an extension of a chain that
    another extension has already grown gets its own copy, and neither changes the
    other's bytes, statements or suffixes."""
    base = honest(4)
    peer, position = base.next_place(NO_DEAD)

    def extend(chain: HopChain, sent: bytes) -> HopChain:
        assert chain.last is not None
        return chain.append(
            BY_PEER[peer],
            position=position,
            received=chain.last.sent,
            sent=sent,
            samples=1,
            dead=NO_DEAD,
        )

    first = extend(base, b"\x01" * 32)
    second = extend(base, b"\x02" * 32)  # the shared bytes already hold ``first``'s
    later = extend(honest(4), b"\x01" * 32)  # the same as ``first``, built apart
    assert first.data == later.data == base.data + first.last.entry  # type: ignore[union-attr]
    assert second.data == base.data + second.last.entry  # type: ignore[union-attr]
    assert first.data != second.data
    for member in MEMBERS:
        assert first.suffix_for(member) == later.suffix_for(member)
        assert join(list(second.statements())[second.last_by.get(member, -1) + 1 :]) == (
            second.suffix_for(member)
        )
    assert base.data == honest(4).data  # the shorter chain reads only its own bytes


def test_an_honest_suffix_makes_the_whole_chain_the_old_way_made() -> None:
    """Each member keeps the chain up to its own last statement; handing on, it sends
    only the statements after its successor's last one; every member ends with the
    chain, byte for byte, that carrying the whole chain in every blob made."""
    held = {p: HopChain.start(RULES) for p in MEMBERS}
    biggest = 0
    peer = MEMBERS[0]
    for position in [s.position for s in STATEMENTS]:
        chain = held[peer]
        held[peer] = chain.append(
            BY_PEER[peer],
            position=position,
            received=chain.last.sent if chain.last is not None else INITIAL,
            sent=sent_at(position),
            samples=samples_at(position),
            dead=NO_DEAD,
        )
        if held[peer].count == FULL.count:
            break
        successor = MEMBERS[(MEMBERS.index(peer) + 1) % len(MEMBERS)]
        suffix = held[peer].suffix_for(successor)
        biggest = max(biggest, len(split_chain(suffix)))
        held[successor] = held[successor].extend_with(suffix, dead=NO_DEAD)
        peer = successor
    assert biggest == len(MEMBERS) - 1  # the others' statements since its own: under a lap
    final = held[MEMBERS[0]]
    assert (final.data, final.fingerprint, final.head) == (FULL.data, FULL.fingerprint, FULL.head)
    for member in MEMBERS[1:]:  # the final model goes round with the suffix each lacks
        held[member] = held[member].extend_with(final.suffix_for(member), dead=NO_DEAD, rewind=True)
        assert held[member].data == FULL.data
        assert held[member].fingerprint == FULL.fingerprint


def test_a_receiver_missing_statements_refuses_with_its_own_code() -> None:
    mine = honest(6)
    for suffix in (STATEMENTS[7:], STATEMENTS[8:10]):
        for rewind in (False, True):
            with pytest.raises(ChainGapError, match=r"after statement 5.* are missing") as info:
                mine.extend_with(join(suffix), dead=NO_DEAD, rewind=rewind)
            assert info.value.code is RefusalCode.MISSING_HOPS
    assert mine.count == 6  # unchanged
    # an empty chain has nothing to continue: the first statement must start the chain
    refused(join(STATEMENTS[3:]), "statement 0 .* does not link")


def test_a_suffix_starting_at_the_wrong_place_is_refused() -> None:
    mine = honest(6)
    # one statement early: statement 5, known here, again
    with pytest.raises(ChainForkError, match="resumes after statement 4"):
        mine.extend_with(join(STATEMENTS[5:]), dead=NO_DEAD)
    # the next statement left out (a gap), and one that links but is out of its place
    with pytest.raises(ChainGapError):
        mine.extend_with(join(STATEMENTS[7:]), dead=NO_DEAD)
    out_of_place = resigned(STATEMENTS[6], position=Position(1, 3))
    with pytest.raises(ProvenanceError, match=r"statement 6 is by .* ring puts"):
        mine.extend_with(join([out_of_place]), dead=NO_DEAD)
    # the right place: taken
    assert mine.extend_with(join(STATEMENTS[6:8]), dead=NO_DEAD).head == STATEMENTS[7].digest


def test_a_final_model_rewinds_a_dead_member_s_own_statement() -> None:
    """Member 1 trained lap 1 hop 1, but member 0 had declared it dead (it timed out):
    the run went on without its statement, so the final model's chain forks from the one
    it holds after statement 4.  The suffix sent to it starts after its last statement
    in the run's chain (statement 1); it keeps statements up to 4 and checks the rest."""
    late = NO_DEAD.claim(BY_PEER[MEMBERS[0]], "timed-out", Position(1, 0))
    mine = honest(5)
    orphan = mine.append(
        BY_PEER[MEMBERS[1]],
        position=Position(1, 1),
        received=STATEMENTS[4].sent,
        sent=b"o" * 32,
        samples=1,
        dead=NO_DEAD,
    )
    run = honest(9, dead=late)
    assert list(run.statements())[:5] == STATEMENTS[:5]
    assert MEMBERS[1] not in {s.signer for s in list(run.statements())[5:]}
    suffix = run.suffix_for(MEMBERS[1])
    assert suffix == join(list(run.statements())[2:])
    with pytest.raises(ChainForkError, match="resumes after statement 1"):
        orphan.extend_with(suffix, dead=late)
    got = orphan.extend_with(suffix, dead=late, rewind=True)
    assert (got.data, got.fingerprint, got.count) == (run.data, run.fingerprint, run.count)
    assert got.suffix_for(MEMBERS[1]) == suffix  # its own statement is not in it


def test_in_the_simulator_a_receiver_takes_a_chain_its_sender_built_as_checked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Only under :func:`shared_process`: the receiver's chain plus the suffix, compared
    by the digest of their bytes, is the chain its sender built and checked."""
    walked = counting_walks(monkeypatch)
    mine = honest(6)
    with provenance_module.shared_process():
        sender = honest(9)
        walked.clear()
        got = mine.extend_with(sender.suffix_for(MEMBERS[1]), dead=NO_DEAD)
        assert walked == []
        assert (got.data, got.fingerprint, got.count) == (sender.data, sender.fingerprint, 9)
        # a suffix that is not the sender's chain is walked (and refused)
        with pytest.raises(ChainGapError):
            mine.extend_with(join(STATEMENTS[7:9]), dead=NO_DEAD)


def test_append_keeps_the_rules_for_our_own_statements() -> None:
    chain = honest(3)
    peer, position = chain.next_place(NO_DEAD)
    assert (peer, position) == (MEMBERS[3], Position(0, 3))
    kw: dict[str, Any] = {"received": chain.last.sent, "sent": INITIAL, "samples": 1}  # type: ignore[union-attr]
    with pytest.raises(LocalProtocolError, match="ring puts"):
        chain.append(IDS[0], position=position, dead=NO_DEAD, **kw)
    full = attrs.evolve(DEFAULT_LIMITS, max_provenance_hops=3)
    with pytest.raises(LocalProtocolError, match="max_provenance_hops"):
        chain.append(BY_PEER[peer], position=position, dead=NO_DEAD, limits=full, **kw)
    assert chain.append(BY_PEER[peer], position=position, dead=NO_DEAD, **kw).count == 4


# --- broken chains ------------------------------------------------------------------------------


def test_a_removed_hop_is_refused() -> None:
    refused(join(STATEMENTS[1:]), "statement 0 .* does not link")
    refused(join(STATEMENTS[:4] + STATEMENTS[5:]), "statement 4 .* does not link")


def test_reordered_or_duplicated_hops_are_refused() -> None:
    swapped = [*STATEMENTS[:3], STATEMENTS[4], STATEMENTS[3], *STATEMENTS[5:]]
    refused(join(swapped), "statement 3 .* does not link")
    refused(join([*STATEMENTS[:4], STATEMENTS[3], *STATEMENTS[4:]]), "statement 4 .* does not link")


def test_a_foreign_signer_is_refused_even_in_the_right_place() -> None:
    foreign = resigned(STATEMENTS[2], signer=STRANGER)
    refused(join([*STATEMENTS[:2], foreign]), "statement 2 is signed by .*, not a member")


def test_a_statement_of_another_run_is_refused() -> None:
    other = resigned(STATEMENTS[2], run_id=OTHER_RUN)
    refused(join([*STATEMENTS[:2], other]), "statement 2 is from another run")


def test_a_chain_of_another_view_does_not_start_here() -> None:
    other_view = signed_view(OTHER_RUN)
    rules = ChainRules(OTHER_RUN, other_view.digest, MEMBERS, MAX_LAPS)
    chain = honest(3, rules=rules, dead=DeadChain(OTHER_RUN, other_view.digest, MEMBERS))
    assert chain.data is not None
    refused(bytes(chain.data), "statement 0")


@pytest.mark.parametrize(
    ("index", "changes", "match"),
    [
        (3, {"received": b"x" * 32}, "received a model other than the one the statement before"),
        (3, {"position": Position(0, 2)}, "ring puts"),
        (3, {"position": Position(1, 0)}, "ring puts"),
        (9, {"samples": 7}, "samples trained in lap 2, which only evaluates"),
    ],
)
def test_each_field_out_of_place_is_refused(
    index: int, changes: dict[str, Any], match: str
) -> None:
    bad = resigned(STATEMENTS[index], **changes)
    refused(join([*STATEMENTS[:index], bad]), match)


def test_the_first_statement_is_the_chain_s_origin() -> None:
    """Statement 0's received model is the leader's word (its own hop may change the
    model as any member's may): any digest is its origin, but only the leader's, at lap 0
    hop 0, linked to the view."""
    other = resigned(STATEMENTS[0], received=b"x" * 32)
    assert check(join([other])).last == other
    refused(join([resigned(STATEMENTS[0], signer=BY_PEER[MEMBERS[1]])]), "ring puts")
    refused(join([resigned(STATEMENTS[0], position=Position(0, 1))]), "ring puts")
    refused(join([resigned(STATEMENTS[0], prev=b"p" * 32)]), "statement 0 .* does not link")


def test_a_member_out_of_turn_is_refused() -> None:
    # the member after next signs the next hop: the next one was skipped without a notice
    skip = HopStatement.seal(
        BY_PEER[MEMBERS[2]],
        run_id=RUN,
        prev=STATEMENTS[0].digest,
        position=Position(0, 1),
        received=STATEMENTS[0].sent,
        sent=b"s" * 32,
        samples=3,
    )
    refused(join([STATEMENTS[0], skip]), "ring puts")


def test_a_member_declared_dead_is_skipped_from_the_hop_after_the_notice() -> None:
    # member 0 could not hand lap 0 hop 0 to member 1: member 2 follows it as hop 1
    dead = NO_DEAD.claim(BY_PEER[MEMBERS[0]], "unreachable", Position(0, 0))
    chain = honest(len(IDS) * 2, dead=dead)
    places = [(s.signer, s.position) for s in chain.statements()]
    assert places[1] == (MEMBERS[2], Position(0, 1))
    assert MEMBERS[1] not in {p for p, _ in places}
    assert chain.data is not None
    assert check(bytes(chain.data), dead=dead).count == chain.count
    # the same bytes, without the notice: member 1 was never declared dead.  (This chain
    # was verified with the notice in this process: that must not count for this check.)
    refused(bytes(chain.data), "statement 1 is by .* but the ring puts")
    # and statements before the notice's position are placed in the ring with member 1
    late = NO_DEAD.claim(BY_PEER[MEMBERS[0]], "unreachable", Position(1, 0))
    refused(bytes(chain.data), "statement 1 is by .* but the ring puts", dead=late)


def test_beyond_the_last_lap_is_refused() -> None:
    # a run whose rules allow fewer laps than the chain has
    short = ChainRules(RUN, VIEW.digest, MEMBERS, 0)
    assert FULL.data is not None
    with pytest.raises(ProvenanceError, match=r"beyond the run's last lap|only evaluates"):
        HopChain.start(short).extend_with(FULL.data, dead=NO_DEAD)


def test_a_chain_beyond_the_limits_is_refused_before_it_is_walked() -> None:
    data = join(STATEMENTS)
    three = attrs.evolve(DEFAULT_LIMITS, max_provenance_hops=3)
    refused(data, "exceeds", limits=three)  # more bytes than 3 statements may take
    refused(join(STATEMENTS[:4]), "more statements than Limits.max_provenance_hops", limits=three)
    assert check(join(STATEMENTS[:3]), limits=three).count == 3


def test_every_truncation_is_refused_or_a_whole_prefix() -> None:
    data = join(STATEMENTS[:4])
    ends = {sum(len(s.entry) for s in STATEMENTS[:k]): k for k in range(5)}
    for cut in range(len(data)):
        if cut in ends:
            assert check(data[:cut]).count == ends[cut]
        else:
            with pytest.raises(ProvenanceError):
                check(data[:cut])


def test_every_single_byte_change_is_refused() -> None:
    data = join(STATEMENTS[:5])
    for at in range(len(data)):
        for flip in (0x01, 0x80):
            bad = bytearray(data)
            bad[at] ^= flip
            with pytest.raises(ProvenanceError):
                check(bytes(bad))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=800))
def test_random_bytes_are_refused_cleanly(data: bytes) -> None:
    with pytest.raises(ProvenanceError):
        HopStatement.open(data)
    if data:
        with pytest.raises(ProvenanceError):
            check(data)


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=1, max_size=400))
def test_random_bytes_after_an_honest_chain_are_refused_cleanly(tail: bytes) -> None:
    with pytest.raises(ProvenanceError):
        check(join(STATEMENTS[:3]) + tail)


# --- a saved model's provenance --------------------------------------------------------------


def seal_of(statements: list[HopStatement], model: bytes = MODEL_FILE) -> FinalSeal:
    """The seal the member whose statement is last makes over the model it sent."""
    last = statements[-1]
    return FinalSeal.seal(BY_PEER[last.signer], run_id=RUN, content=last.sent, model=model)


SEAL = seal_of(STATEMENTS)


def provenance(
    statements: list[HopStatement] | None = None, *, seal: FinalSeal = SEAL, **kw: Any
) -> bytes:
    statements = STATEMENTS if statements is None else statements
    fields: dict[str, Any] = {
        "view": VIEW.envelope,
        "dead": (),
        "hops": join(statements),
        "seal": seal.envelope,
    }
    fields.update(kw)
    return encode_provenance(**fields)


def test_a_whole_provenance_verifies_and_says_who_trained_how_much() -> None:
    verified = verify_provenance(provenance(), model_sha256=MODEL_FILE)
    assert verified.initial == INITIAL
    assert verified.chain.count == 13 and verified.seal.origin == MEMBERS[0]
    shares = {s.peer: s for s in verified.shares()}
    assert list(shares) == list(MEMBERS)
    lead = shares[MEMBERS[0]]
    assert (lead.hops, lead.trained, lead.samples) == (4, 2, 200)
    other = shares[MEMBERS[3]]
    assert (other.hops, other.trained, other.samples) == (3, 2, 206)


@pytest.mark.parametrize(
    ("data", "model", "match"),
    [
        (provenance(), b"\0" * 32, "model file .* is not the one the run sealed"),
        (provenance(STATEMENTS[:-1]), MODEL_FILE, "not over the model the last hop statement"),
        (
            provenance(
                seal=FinalSeal.seal(
                    IDS[1], run_id=RUN, content=STATEMENTS[-1].sent, model=MODEL_FILE
                )
            ),
            MODEL_FILE,
            "not over the model the last hop statement",
        ),
        (
            provenance(
                seal=FinalSeal.seal(IDS[0], run_id=RUN, content=b"c" * 32, model=MODEL_FILE)
            ),
            MODEL_FILE,
            "not over the model the last hop statement",
        ),
        (
            provenance(
                seal=FinalSeal.seal(
                    IDS[0], run_id=OTHER_RUN, content=STATEMENTS[-1].sent, model=MODEL_FILE
                )
            ),
            MODEL_FILE,
            "seal is for another run",
        ),
        (provenance([]), MODEL_FILE, "holds no hop statement"),
        (provenance(view=signed_view(OTHER_RUN).envelope), MODEL_FILE, "statement 0"),
        (provenance(dead=(b"not a notice",)), MODEL_FILE, "dead notices"),
        (cbor.encode({"v": 2}), MODEL_FILE, "this FedUp reads version 1"),
        (provenance() + b"\0", MODEL_FILE, None),
    ],
)
def test_a_provenance_that_does_not_hold_is_refused(
    data: bytes, model: bytes, match: str | None
) -> None:
    with pytest.raises(ProvenanceError, match=match):
        verify_provenance(data, model_sha256=model)


def test_a_provenance_file_beyond_its_bound_is_refused_before_decoding() -> None:
    tiny = attrs.evolve(DEFAULT_LIMITS, max_provenance_hops=1, max_members=4)
    with pytest.raises(ProvenanceError, match=r"provenance file of .* exceeds"):
        verify_provenance(provenance() + bytes(600_000), model_sha256=MODEL_FILE, limits=tiny)


def test_every_single_byte_change_of_a_provenance_file_is_refused() -> None:
    data = provenance(STATEMENTS[:3], seal=seal_of(STATEMENTS[:3]))
    verify_provenance(data, model_sha256=MODEL_FILE)
    for at in range(0, len(data), 3):
        bad = bytearray(data)
        bad[at] ^= 0x01
        with pytest.raises(ProvenanceError):
            verify_provenance(bytes(bad), model_sha256=MODEL_FILE)


def test_outside_a_simulation_a_receiver_checks_a_chain_its_sender_built(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The chain its own statements made is not taken as verified by the process's other
    peers (only the simulator shares that, :func:`shared_process`): the receiver walks and
    checks every statement, so honest chains are really checked in the tests too."""
    walked = counting_walks(monkeypatch)
    chain = honest(FULL.count)  # built by its members' own appends, here
    assert chain.data is not None
    assert (chain.count, chain.head) == (FULL.count, FULL.head)
    walked.clear()  # appending walks too
    HopChain.start(RULES).extend_with(chain.data, dead=NO_DEAD)
    assert len(walked) == FULL.count


def test_the_provenance_file_is_made_once_per_content_only_in_the_simulator(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every member of a run saves the same provenance (about 1 MB at 1,000 members): in
    one process of simulated peers it is encoded once and its bytes shared; elsewhere it
    is encoded for each call.  Either way it is the file :func:`verify_provenance` reads."""
    encoded: list[int] = []
    real = provenance_module.encode_provenance

    def counting(**kw: Any) -> bytes:
        encoded.append(1)
        return real(**kw)

    monkeypatch.setattr(provenance_module, "encode_provenance", counting)
    fields: dict[str, Any] = {"view": VIEW.envelope, "dead": (), "seal": SEAL.envelope}
    whole = provenance()
    first = provenance_file(chain=FULL, **fields)
    again = provenance_file(chain=honest(FULL.count), **fields)
    assert first == again == whole and first is not again and len(encoded) == 2
    with provenance_module.shared_process():
        first = provenance_file(chain=FULL, **fields)
        assert provenance_file(chain=honest(FULL.count), **fields) is first == whole
        assert len(encoded) == 3
        other_seal = seal_of(STATEMENTS, model=hashlib.sha256(b"another").digest())
        other = provenance_file(chain=FULL, **{**fields, "seal": other_seal.envelope})
        shorter = provenance_file(chain=honest(FULL.count - 1), **fields)
        assert len(encoded) == 5 and len({first, other, shorter}) == 3
        assert other == provenance(seal=other_seal)
        assert shorter == provenance(STATEMENTS[:-1])
    assert provenance_file(chain=FULL, **fields) is not first  # forgotten on leaving
    assert len(encoded) == 6
    verified = verify_provenance(first, model_sha256=MODEL_FILE)
    assert (verified.chain.count, verified.chain.head) == (FULL.count, FULL.head)


def test_a_chain_of_tiny_entries_is_refused_before_it_costs_anything() -> None:
    """3-byte entries would make a 1.6 MB chain 524,288 entries to split (0.4 s of the
    event loop); no real statement is shorter than MIN_STATEMENT_SIZE."""
    tiny = b"\x00" + (1).to_bytes(2, "big")
    with pytest.raises(ProvenanceError, match="length does not fit"):
        HopChain.start(RULES).extend_with(tiny * 100_000, dead=NO_DEAD)
    assert min(len(s.entry) for s in STATEMENTS) - 2 >= MIN_STATEMENT_SIZE


def test_in_the_simulator_a_suffix_that_only_ends_like_the_sender_s_is_walked_and_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The shared process finds its sender's chain by the last statement carried, then
    compares every byte: a suffix whose last statement is the sender's but whose earlier
    ones were changed is walked and refused, and so is one sent to a receiver whose
    chain is not the one the sender's extends."""
    walked = counting_walks(monkeypatch)
    with provenance_module.shared_process():
        sender = honest(9)
        suffix = sender.suffix_for(MEMBERS[1])
        assert suffix == join(STATEMENTS[6:9])
        forged = bytearray(suffix)
        forged[len(STATEMENTS[6].entry) // 2] ^= 1  # inside statement 6: its signature fails
        walked.clear()
        with pytest.raises(ProvenanceError, match="hop statement 6"):
            honest(6).extend_with(bytes(forged), dead=NO_DEAD)
        # the same length and last statement, after another chain of 6 statements: its
        # first statement names a head not held here
        other = HopChain.start(RULES).extend_with(join(STATEMENTS[:5]), dead=NO_DEAD)
        other = other.extend_with(join([resigned(STATEMENTS[5], sent=bytes(32))]), dead=NO_DEAD)
        assert other.nbytes == honest(6).nbytes and other.head != honest(6).head
        with pytest.raises(ProvenanceError):
            other.extend_with(suffix, dead=NO_DEAD)
        # the honest receiver gets the sender's chain itself, nothing walked
        mine = honest(6)
        walked.clear()
        assert mine.extend_with(suffix, dead=NO_DEAD) is sender
        assert walked == []
