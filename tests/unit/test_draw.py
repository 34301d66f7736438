"""The leader draw, byte by byte: commitments, rosters, reveals and proofs."""

from __future__ import annotations

import hashlib

import pytest

from fedup.errors import LocalProtocolError, RemoteProtocolError
from fedup.identity import Identity
from fedup.protocol import cbor
from fedup.protocol.draw import (
    COMMIT_SIZE,
    NONCE_SIZE,
    DrawError,
    DrawProof,
    Roster,
    commitment,
    draw_leader,
    proof_problem,
    reveal_matches,
    reveal_of,
    verify_roster,
)
from fedup.protocol.envelope import seal_envelope
from fedup.protocol.peer_id import PeerId
from fedup.protocol.schema import MessageError

IDS = sorted((Identity(bytes([i + 1]) * 32) for i in range(5)), key=lambda i: i.peer_id)
RUN = bytes(range(16))


def nonces(peer: PeerId, salt: bytes = b"") -> bytes:
    return hashlib.sha512(peer.raw + salt).digest()


def roster_of(ids: list[Identity], epoch: int = 0, salt: bytes = b"") -> Roster:
    coordinator, *rest = ids
    commits = tuple((i.peer_id, commitment(nonces(i.peer_id, salt))) for i in rest)
    return Roster(RUN, epoch, coordinator.peer_id, commits)


def reveals_of(roster: Roster, salt: bytes = b"") -> dict[PeerId, bytes]:
    return {p: reveal_of(nonces(p, salt), roster.epoch) for p, _ in roster.commits}


def test_a_reveal_opens_its_commitment_only_for_its_epoch() -> None:
    n = nonces(IDS[1].peer_id)
    commit = commitment(n)
    assert len(commit) == COMMIT_SIZE and len(reveal_of(n, 0)) == NONCE_SIZE
    assert reveal_matches(commit, 0, reveal_of(n, 0))
    assert reveal_matches(commit, 1, reveal_of(n, 1))
    assert not reveal_matches(commit, 1, reveal_of(n, 0))  # epoch 0's nonce is spent
    assert not reveal_matches(commit, 2, reveal_of(n, 1))
    assert not reveal_matches(commit, 0, b"\0" * NONCE_SIZE)
    assert not reveal_matches(commit[:-1], 0, reveal_of(n, 0))
    with pytest.raises(LocalProtocolError):
        commitment(n[:-1])


def test_a_roster_round_trips_and_only_its_coordinator_signs_it() -> None:
    roster = roster_of(IDS)
    signed = roster.seal(IDS[0])
    again = verify_roster(signed.envelope)
    assert again.roster == roster and again.digest == signed.digest
    assert roster.member_ids == frozenset(i.peer_id for i in IDS)
    with pytest.raises(LocalProtocolError):
        roster.seal(IDS[1])


def _forged(value: dict[str, object], signer: Identity) -> bytes:
    return seal_envelope(
        signer.sign,
        signer.public_key,
        domain="fedup-draw-roster",
        payload_type="fedup/draw-roster/1",
        payload=cbor.encode(value),
    ).to_cbor()


def _value(roster: Roster) -> dict[str, object]:
    value = cbor.decode(roster.to_cbor(), max_size=1 << 20, max_depth=8)
    assert isinstance(value, dict)
    return value


@pytest.mark.parametrize(
    ("change", "signer", "match"),
    [
        ({}, 1, "signed by"),
        ({"epoch": 2}, 0, "epoch"),
        ({"members": "reversed"}, 0, "ascending"),
        ({"members": "coordinator"}, 0, "coordinator is listed"),
        ({"members": "short commit"}, 0, "multiple of 102 bytes"),
        ({"members": "none"}, 0, "no candidates"),
        ({"extra": 1}, 0, "unknown field"),
    ],
)
def test_a_bad_roster_is_refused_naming_the_problem(
    change: dict[str, object], signer: int, match: str
) -> None:
    value = _value(roster_of(IDS))
    members = value["members"]
    assert isinstance(members, bytes)
    step = 38 + COMMIT_SIZE
    entries = [members[i : i + step] for i in range(0, len(members), step)]
    for key, what in change.items():
        if what == "reversed":
            value[key] = b"".join(reversed(entries))
        elif what == "coordinator":
            value[key] = IDS[0].peer_id.raw + b"c" * COMMIT_SIZE + members
        elif what == "short commit":
            value[key] = entries[0][:-1]
        elif what == "none":
            value[key] = b""
        else:
            value[key] = what
    with pytest.raises(MessageError, match=match):
        verify_roster(_forged(value, IDS[signer]))
    tampered = bytearray(roster_of(IDS).seal(IDS[0]).envelope)
    tampered[-1] ^= 1
    with pytest.raises(RemoteProtocolError):
        verify_roster(bytes(tampered))


def test_everyone_computes_the_same_leader_and_every_reveal_counts() -> None:
    roster = roster_of(IDS)
    reveals = reveals_of(roster)
    leader = draw_leader(roster, reveals)
    assert leader in roster.member_ids
    assert draw_leader(roster, dict(reversed(list(reveals.items())))) == leader
    # Another nonce of any one candidate draws anew (over several salts, the leader moves).
    leaders = {
        draw_leader(roster_of(IDS, salt=s), reveals_of(roster_of(IDS, salt=s), s))
        for s in (b"a", b"b", b"c", b"d", b"e", b"f", b"g", b"h")
    }
    assert len(leaders) > 1


def test_a_missing_or_wrong_reveal_draws_nobody() -> None:
    roster = roster_of(IDS)
    reveals = reveals_of(roster)
    peer = IDS[2].peer_id
    with pytest.raises(DrawError, match="lacks the reveal"):
        draw_leader(roster, {p: r for p, r in reveals.items() if p != peer})
    with pytest.raises(DrawError, match="does not open"):
        draw_leader(roster, {**reveals, peer: b"\0" * NONCE_SIZE})


def test_the_lowest_id_leads_about_as_often_as_anyone() -> None:
    """A low peer ID (ground by key generation) buys nothing: over 300 draws with fresh
    nonces, each of five members leads about a fifth of the time."""
    counts = dict.fromkeys((i.peer_id for i in IDS), 0)
    for k in range(300):
        salt = k.to_bytes(2, "big")
        roster = roster_of(IDS, salt=salt)
        counts[draw_leader(roster, reveals_of(roster, salt))] += 1
    assert all(30 <= c <= 90 for c in counts.values()), counts  # 60 expected each


def test_a_proof_shows_the_roster_and_the_leader() -> None:
    roster = roster_of(IDS)
    signed = roster.seal(IDS[0])
    reveals = reveals_of(roster)
    proof = DrawProof(signed.envelope, reveals)
    checked, leader = DrawProof.check(proof.to_cbor())
    assert checked.digest == signed.digest and leader == draw_leader(roster, reveals)
    peer = IDS[3].peer_id
    forged = DrawProof(signed.envelope, {**reveals, peer: b"\1" * NONCE_SIZE})
    with pytest.raises(DrawError, match="does not open"):
        DrawProof.check(forged.to_cbor())
    with pytest.raises(RemoteProtocolError):
        DrawProof.check(cbor.encode({"roster": signed.envelope, "reveals": b"xy"}))
    twice = cbor.encode({"roster": signed.envelope, "reveals": (peer.raw + reveals[peer]) * 2})
    with pytest.raises(MessageError, match="ascending"):
        DrawProof.check(twice)


def test_a_call_shows_its_caller_drawn_on_the_roster_it_names_or_is_refused() -> None:
    """A member replaying the real proof of a draw that chose someone else, a proof of
    another roster than the one named, or garbage: each is a problem, named."""
    roster = roster_of(IDS)
    signed = roster.seal(IDS[0])
    reveals = reveals_of(roster)
    proof = DrawProof(signed.envelope, reveals).to_cbor()
    leader = draw_leader(roster, reveals)
    other = next(i.peer_id for i in IDS if i.peer_id != leader)
    assert proof_problem(proof, signed.digest, leader) is None
    assert proof_problem(proof, signed.digest, other) == (
        f"the draw it shows chose {leader}, not the caller"
    )
    assert proof_problem(proof, b"\0" * 32, leader) == (
        "the proof is of another roster than it names"
    )
    problem = proof_problem(b"\xa0", signed.digest, leader)
    assert problem is not None and "roster" in problem
