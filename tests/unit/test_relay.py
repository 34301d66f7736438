"""The hybrid mode's relay core (fedup.protocol.relay): sub-rings, the plan, the
message's strict decoding and the intake's table, byte by byte."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedup.errors import LocalProtocolError
from fedup.protocol import cbor
from fedup.protocol.allreduce_messages import ChunkMessage, Phase
from fedup.protocol.relay import (
    MESSAGE_OVERHEAD,
    Broken,
    Ignored,
    Progress,
    Received,
    Refused,
    RelayIntake,
    RelayMessage,
    RelayMessageError,
    RelayPlan,
    decode_relay_message,
    is_relay_frame,
    parts_of,
    sub_ring_count,
    sub_rings,
)
from fedup.sim import sim_identity

RUN = bytes(range(16))
PEERS = tuple(sorted((sim_identity(0, i).peer_id for i in range(7)), key=lambda p: p.raw))


def f32(*values: float) -> bytes:
    return np.array(values, dtype="<f4").tobytes()


def fields() -> dict[str, object]:
    decoded = cbor.decode(message().encode(), max_size=1000, max_depth=1)
    assert isinstance(decoded, dict)
    return decoded


def message(**kw: object) -> RelayMessage:
    fields: dict[str, object] = dict(
        run_id=RUN, epoch=1, round=3, hop=1, part=0, parts=1, rows=10, samples=20,
        data=f32(1, 2, 3),
    )  # fmt: skip
    fields.update(kw)
    return RelayMessage(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("setting", "members", "sizes"),
    [
        (0, 1, [1]),
        (0, 3, [2, 1]),  # round(sqrt(3)) = 2
        (0, 10, [4, 3, 3]),  # round(sqrt(10)) = 3, the larger first
        (0, 50, [8, 7, 7, 7, 7, 7, 7]),
        (2, 7, [4, 3]),
        (9, 4, [1, 1, 1, 1]),  # never more sub-rings than members: the parallel mode
        (1, 5, [5]),  # one sub-ring: a ring
    ],
)
def test_sub_rings_are_contiguous_and_differ_by_at_most_one(
    setting: int, members: int, sizes: list[int]
) -> None:
    ids = list(range(members))
    rings = sub_rings(ids, setting)
    assert [len(r) for r in rings] == sizes
    assert [m for r in rings for m in r] == ids
    assert sub_ring_count(setting, members) == len(sizes)


def test_no_sub_rings_without_members() -> None:
    with pytest.raises(LocalProtocolError):
        sub_rings([], 0)


def test_the_plan_names_each_hops_trainer_and_the_holder() -> None:
    # 7 members, 3 sub-rings: (0 1 2) (3 4) (5 6); member 4 is in sub-ring 1.
    plan = RelayPlan.of(PEERS, 3, 2, PEERS[4])
    assert plan.ring == PEERS[3:5] and plan.index == 1 and plan.position == 1
    assert plan.hops == 4 and list(plan.my_hops) == [1, 3]
    assert [plan.trainer(h) for h in range(4)] == [PEERS[3], PEERS[4], PEERS[3], PEERS[4]]
    assert plan.holder == PEERS[4] and plan.next_of(3) is None and plan.next_of(2) == PEERS[4]
    with pytest.raises(LocalProtocolError):
        RelayPlan.of(PEERS[:3], 0, 1, PEERS[5])


def test_parts_cover_the_model() -> None:
    assert parts_of(1, 10) == 1 and parts_of(10, 10) == 1 and parts_of(11, 10) == 2
    with pytest.raises(LocalProtocolError):
        parts_of(0, 10)


def test_a_message_round_trips_and_is_recognised_by_its_first_bytes() -> None:
    m = message()
    data = m.encode()
    assert decode_relay_message(data, max_part=12) == m
    assert is_relay_frame(data)
    assert is_relay_frame(message(parts=0, part=0, data=b"").encode())
    chunk = ChunkMessage(RUN, 0, 0, 0, Phase.REDUCE_SCATTER, 0, 0, f32(1))
    assert not is_relay_frame(chunk.encode())
    assert len(message(hop=2**64 - 1, rows=2**53, samples=2**53, round=2**64 - 1,
                       epoch=2**64 - 1, data=b"").encode()) <= MESSAGE_OVERHEAD  # fmt: skip


@pytest.mark.parametrize(
    ("data", "said"),
    [
        (message(data=f32(*range(60))).encode(), "exceeds 204"),  # before decoding
        (message(data=f32(1, 2, 3, 4)).encode(), "at most 12 bytes"),
        (message().encode()[:-2], "bytes left"),  # truncated
        (cbor.encode({**fields(), "x": 1}), "unknown"),
        (cbor.encode({**fields(), "t": "relaz"}), "expected 'relay'"),
        (message(part=1, parts=1).encode(), "part 1 of 1"),
        (message(parts=0).encode(), "carries a part"),  # broken, with data
        (message(rows=2**53 + 1).encode(), "rows"),
    ],
    ids=["too-large", "data", "truncated", "unknown-field", "type", "part", "broken-data", "rows"],
)
def test_a_bad_message_is_refused_with_the_reason(data: bytes, said: str) -> None:
    with pytest.raises(RelayMessageError, match=said):
        decode_relay_message(data, max_part=12)


def intake(size: int = 12, max_part: int = 8) -> RelayIntake:
    return RelayIntake(
        run_id=RUN, epoch=1, round=3, hop=2, predecessor=PEERS[1], size=size,
        max_part=max_part, max_rows=100, bound=1e8,
    )  # fmt: skip


def test_the_model_arrives_in_parts_in_order() -> None:
    take = intake()
    assert take.parts == 2
    first = message(part=0, parts=2, data=f32(1, 2))
    assert isinstance(take.take(PEERS[1], first), Progress)
    done = take.take(PEERS[1], message(part=1, parts=2, data=f32(3)))
    assert done == Received(f32(1, 2, 3), 10, 20)
    assert isinstance(take.take(PEERS[1], first), Ignored)  # it has ended


def test_another_members_or_runs_message_changes_nothing() -> None:
    take = intake(size=4)
    assert isinstance(take.take(PEERS[2], message(data=f32(1))), Refused)
    assert isinstance(take.take(PEERS[1], message(run_id=bytes(16), data=f32(1))), Refused)
    assert isinstance(take.take(PEERS[1], message(epoch=2, data=f32(1))), Refused)
    # Late: an earlier round, or an earlier hop of this one.
    assert isinstance(take.take(PEERS[1], message(round=2, hop=5, data=f32(1))), Ignored)
    assert isinstance(take.take(PEERS[1], message(hop=0, data=f32(1))), Ignored)
    assert take.take(PEERS[1], message(data=f32(7))) == Received(f32(7), 10, 20)


@pytest.mark.parametrize(
    ("bad", "said"),
    [
        (message(parts=0, part=0, data=b""), "the relay broke before hop 2"),
        (message(hop=2, data=f32(1)), "not hop 1"),  # a later hop
        (message(round=4, hop=0, data=f32(1)), "sent round 4"),
        (message(parts=2, data=f32(1)), "part 0 of 1 was due"),
        (message(data=f32(1, 2)), "not 4"),
        (message(rows=101, data=f32(1)), "federation has 100"),
        (message(data=f32(math.nan)), "beyond"),
        (message(data=f32(math.inf)), "beyond"),
        (message(data=f32(-2e8)), "beyond 1e+08"),
    ],
    ids=["broken", "later-hop", "later-round", "parts", "size", "rows", "nan", "inf", "big"],
)
def test_a_wrong_message_from_the_predecessor_breaks_the_relay(
    bad: RelayMessage, said: str
) -> None:
    take = intake(size=4)
    outcome = take.take(PEERS[1], bad)
    assert isinstance(outcome, Broken) and said in outcome.reason
    assert isinstance(take.take(PEERS[1], message(data=f32(1))), Ignored)  # ended


def test_hop_zero_takes_nothing() -> None:
    with pytest.raises(LocalProtocolError):
        RelayIntake(
            run_id=RUN, epoch=1, round=0, hop=0, predecessor=PEERS[0], size=4,
            max_part=4, max_rows=1, bound=1.0,
        )  # fmt: skip
