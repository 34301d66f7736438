"""The hybrid mode's relay: the sub-rings, and the model handed from hop to hop in one.

Pure: no I/O, no clocks; ``docs/parallel.md`` ("The hybrid mode") is the
specification, :mod:`fedup.peer.hybrid_driver` the driver.  In short:

* **Sub-rings.**  The round's members, in ring order, are cut into ``k`` contiguous
  sub-rings whose sizes differ by at most one, the larger first (:func:`sub_rings`);
  ``k`` is the run's ``sub_rings`` setting, 0 meaning the whole number nearest to the
  square root of the members, and never more than the members.
* **Plan.**  In each round a sub-ring of ``m`` members runs ``laps`` laps: hops
  ``0 .. laps x m - 1``; hop ``h`` is trained by the sub-ring's member ``h mod m``,
  which then hands the model to member ``(h + 1) mod m``.  Hop 0 starts from the
  round's model, which every member holds; the trainer of the last hop, the
  sub-ring's last member, is its *holder* and puts the sub-ring's model into the
  round's all-reduce (:class:`RelayPlan`).
* **Message.**  The model a hop trained travels in ``parts`` messages
  (:class:`RelayMessage`), each a strict CBOR map whose ``data`` is a piece of the
  model's raw little-endian float32 bytes of at most ``max_part`` bytes, in order.  A
  message with ``parts`` 0 and no data says the relay *broke* before this hop: its
  sender has no model to hand on (its predecessor was silent, or sent what it
  refused), so neither has the receiver.  ``rows`` counts the training rows of the
  sub-ring's members that trained so far (each once), ``samples`` the samples trained.
* **Intake.**  :class:`RelayIntake` takes one hop's parts from the one member allowed
  to send them and says what each message means (:data:`Outcome`): refused when it
  comes from another member, ignored when it is stale, the relay broken when the
  predecessor's message is wrong, and the hop's model once every part has arrived,
  finite and within the weight bound.

The channel authenticates the sender; the relay adds no signature (nothing is
forwarded: each model is the sender's own work, and a member may train badly anyway).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from typing import Any, ClassVar, TypeAlias, TypeVar

import attrs
import numpy as np

from fedup.errors import LocalProtocolError, RemoteProtocolError
from fedup.protocol import cbor
from fedup.protocol.peer_id import PeerId
from fedup.protocol.schema import FieldReader
from fedup.protocol.view import RUN_ID_SIZE

__all__ = [
    "MESSAGE_OVERHEAD",
    "MESSAGE_TYPE",
    "Broken",
    "Ignored",
    "Outcome",
    "Progress",
    "Received",
    "Refused",
    "RelayIntake",
    "RelayMessage",
    "RelayMessageError",
    "RelayPlan",
    "decode_relay_message",
    "is_relay_frame",
    "parts_of",
    "sub_ring_count",
    "sub_rings",
]

MESSAGE_TYPE = "relay"
"""The ``t`` field of every relay message."""
MESSAGE_OVERHEAD = 192
"""Bytes of a message besides its data: every field at its largest (64-bit integers)
takes 120 bytes; a longer message than this plus ``max_part`` is refused before it is
decoded."""
MAX_COUNT = 2**53
"""Largest ``rows`` or ``samples`` taken (exact in a float64)."""

_PREFIX = cbor.encode({"t": MESSAGE_TYPE})[1:]
_F32 = np.dtype("<f4")
T = TypeVar("T")


# --- sub-rings and the plan ---------------------------------------------------------------


def sub_ring_count(setting: int, members: int) -> int:
    """The sub-rings ``members`` are cut into under the ``sub_rings`` ``setting``."""
    if members < 1 or setting < 0:
        raise LocalProtocolError(f"no sub-rings for {members} members (setting {setting})")
    wanted = setting if setting > 0 else max(1, round(math.sqrt(members)))
    return min(wanted, members)


def sub_rings(members: Sequence[T], setting: int) -> tuple[tuple[T, ...], ...]:
    """``members`` (in ring order) cut into contiguous sub-rings (see the module
    docstring): sizes differ by at most one, the larger first."""
    k = sub_ring_count(setting, len(members))
    base, extra = divmod(len(members), k)
    out: list[tuple[T, ...]] = []
    start = 0
    for i in range(k):
        size = base + (1 if i < extra else 0)
        out.append(tuple(members[start : start + size]))
        start += size
    return tuple(out)


@attrs.frozen
class RelayPlan:
    """One member's part in its sub-ring's relay in a round."""

    ring: tuple[PeerId, ...]
    """The sub-ring, in ring order."""
    index: int
    """The sub-ring's place among the round's sub-rings."""
    me: PeerId
    laps: int

    def __attrs_post_init__(self) -> None:
        if self.me not in self.ring or self.laps < 1:
            raise LocalProtocolError(f"{self.me} has no part in a relay of {self.laps} laps")

    @classmethod
    def of(cls, members: Sequence[PeerId], setting: int, laps: int, me: PeerId) -> RelayPlan:
        """``me``'s plan among the round's ``members`` (ring order) under the settings."""
        for i, ring in enumerate(sub_rings(members, setting)):
            if me in ring:
                return cls(ring, i, me, laps)
        raise LocalProtocolError(f"{me} is not a member of this round")

    @property
    def hops(self) -> int:
        """Hops in the sub-ring's round: ``laps`` times its members."""
        return self.laps * len(self.ring)

    @property
    def position(self) -> int:
        return self.ring.index(self.me)

    @property
    def my_hops(self) -> range:
        """The hops this member trains, in order."""
        return range(self.position, self.hops, len(self.ring))

    @property
    def holder(self) -> PeerId:
        """The trainer of the last hop, which contributes the sub-ring's model."""
        return self.ring[-1]

    def trainer(self, hop: int) -> PeerId:
        return self.ring[hop % len(self.ring)]

    def next_of(self, hop: int) -> PeerId | None:
        """Who trains after ``hop``, None after the last."""
        return None if hop + 1 >= self.hops else self.trainer(hop + 1)


def parts_of(size: int, max_part: int) -> int:
    """Messages a model of ``size`` bytes travels in, ``max_part`` bytes at most each."""
    if size < 1 or max_part < 1:
        raise LocalProtocolError(f"cannot cut {size} bytes into parts of {max_part}")
    return -(-size // max_part)


# --- the message ------------------------------------------------------------------------


@attrs.frozen
class RelayMessage:
    """One part of the model hop ``hop`` trained, or (``parts`` 0) word that the relay
    broke before it."""

    TYPE: ClassVar[str] = MESSAGE_TYPE
    run_id: bytes
    epoch: int
    round: int
    hop: int
    """The hop that trained this model (the receiver trains ``hop + 1``)."""
    part: int
    parts: int
    rows: int
    samples: int
    data: bytes = attrs.field(repr=lambda d: f"<{len(d)} bytes>")

    @property
    def broken(self) -> bool:
        return self.parts == 0

    def encode(self) -> bytes:
        fields: dict[str, Any] = {
            "t": self.TYPE,
            "run": self.run_id,
            "epoch": self.epoch,
            "round": self.round,
            "hop": self.hop,
            "part": self.part,
            "parts": self.parts,
            "rows": self.rows,
            "samples": self.samples,
            "data": self.data,
        }
        return cbor.encode(fields)


class RelayMessageError(RemoteProtocolError):
    """Bytes that are not a relay message."""


def is_relay_frame(frame: bytes) -> bool:
    """Whether ``frame`` is meant as a relay message (a map of 10 pairs whose ``t`` is
    ``"relay"``); nothing else is decoded."""
    return len(frame) > 1 + len(_PREFIX) and frame[0] == 0xAA and frame[1:].startswith(_PREFIX)


def decode_relay_message(data: bytes, *, max_part: int) -> RelayMessage:
    """Decode one message, its size checked first (at most ``MESSAGE_OVERHEAD +
    max_part`` bytes), then strict CBOR with exactly the fields of
    :class:`RelayMessage`; ``part < parts`` unless broken, and a broken one has no
    data.  Raises :class:`RelayMessageError`."""
    limit = MESSAGE_OVERHEAD + max_part
    if len(data) > limit:
        raise RelayMessageError(f"relay message of {len(data)} bytes exceeds {limit}")
    try:
        f = FieldReader(cbor.decode(data, max_size=limit, max_depth=1), "relay message")
        kind = f.text("t", max_bytes=16)
        if kind != MESSAGE_TYPE:
            raise f.fail("t", f"is {kind!r}, expected {MESSAGE_TYPE!r}")
        message = RelayMessage(
            run_id=f.bytestr("run", size=RUN_ID_SIZE),
            epoch=f.uint("epoch"),
            round=f.uint("round"),
            hop=f.uint("hop"),
            part=f.uint("part"),
            parts=f.uint("parts"),
            rows=f.uint("rows", max_value=MAX_COUNT),
            samples=f.uint("samples", max_value=MAX_COUNT),
            data=f.bytestr("data", max_size=max_part),
        )
        f.done()
    except RemoteProtocolError as exc:
        raise RelayMessageError(exc.reason) from None
    if message.broken and (message.part or message.data):
        raise RelayMessageError("a broken relay's message carries a part")
    if not message.broken and message.part >= message.parts:
        raise RelayMessageError(f"part {message.part} of {message.parts}")
    return message


# --- taking one hop's model ---------------------------------------------------------------


@attrs.frozen
class Refused:
    """Not from the member that may send this hop, or not this run's: nothing changes."""

    reason: str


@attrs.frozen
class Ignored:
    """The predecessor's message for an earlier round or hop (it was late): dropped."""

    reason: str


@attrs.frozen
class Progress:
    """A part was taken; more are due."""


@attrs.frozen
class Broken:
    """The hop's model will not come: the predecessor said the relay broke, or sent what
    was refused (``reason``)."""

    reason: str


@attrs.frozen
class Received:
    """Every part arrived: the hop's model as float32 bytes, and the counts with it."""

    data: bytes = attrs.field(repr=lambda d: f"<{len(d)} bytes>")
    rows: int
    samples: int


Outcome: TypeAlias = Refused | Ignored | Progress | Broken | Received


class Stage(enum.Enum):
    WAITING = "waiting"
    """No part yet."""
    TAKING = "taking"
    """Some parts taken."""
    ENDED = "ended"
    """Received or broken: nothing more is taken."""


class RelayIntake:
    """Takes the model of hop ``hop - 1`` for this member, which trains ``hop``.

    ``size`` is the model's exact byte length (float32 elements x 4), ``max_part``
    the largest part, ``max_rows`` the most training rows the federation has and
    ``bound`` the largest weight magnitude (``Limits.max_weight_magnitude``).

    ========  =====================================  =========================
    stage     message from the predecessor           outcome, next stage
    ========  =====================================  =========================
    any       from another peer, or another run       Refused, unchanged
    any       an earlier round, or an earlier hop     Ignored, unchanged
    WAITING   broken                                  Broken, ENDED
    WAITING/  the next part, right size and parts     Progress, TAKING
    TAKING                                             (Received, ENDED: last)
    WAITING/  anything else (a later round or hop,    Broken, ENDED
    TAKING    a part out of order, a wrong size,
              rows beyond the federation's, a
              non-finite or too large weight)
    ENDED     anything                                Ignored, ENDED
    ========  =====================================  =========================
    """

    def __init__(
        self,
        *,
        run_id: bytes,
        epoch: int,
        round: int,
        hop: int,
        predecessor: PeerId,
        size: int,
        max_part: int,
        max_rows: int,
        bound: float,
    ) -> None:
        if hop < 1:
            raise LocalProtocolError("hop 0 starts from the round's model; nothing to take")
        self.run_id, self.epoch, self.round, self.hop = run_id, epoch, round, hop
        self.predecessor = predecessor
        self.size, self.max_part, self.max_rows, self.bound = size, max_part, max_rows, bound
        self.parts = parts_of(size, max_part)
        self.stage = Stage.WAITING
        self._data = bytearray()
        self._next = 0

    def _part_size(self, part: int) -> int:
        return min(self.max_part, self.size - part * self.max_part)

    def take(self, sender: PeerId, message: RelayMessage) -> Outcome:
        """What ``message`` from ``sender`` (authenticated by its channel) means."""
        if sender != self.predecessor:
            return Refused(f"sent hop {message.hop}'s model; it is {self.predecessor}'s to send")
        if message.run_id != self.run_id or message.epoch != self.epoch:
            return Refused("sent a relay message of another run or epoch")
        late = (message.round, message.hop) < (self.round, self.hop - 1)
        if late or self.stage is Stage.ENDED:
            return Ignored(f"round {message.round} hop {message.hop}: too late")
        problem = self._problem(message)
        if problem is not None:
            self.stage = Stage.ENDED
            return Broken(problem)
        self._data += message.data
        self._next += 1
        if self._next < self.parts:
            self.stage = Stage.TAKING
            return Progress()
        self.stage = Stage.ENDED
        data, self._data = bytes(self._data), bytearray()
        values = np.frombuffer(data, dtype=_F32)
        if not np.isfinite(values).all() or float(np.abs(values).max()) > self.bound:
            return Broken(f"hop {message.hop}'s model holds a weight beyond {self.bound:g}")
        return Received(data, message.rows, message.samples)

    def _problem(self, message: RelayMessage) -> str | None:
        if (message.round, message.hop) != (self.round, self.hop - 1):
            return f"sent round {message.round} hop {message.hop}, not hop {self.hop - 1}"
        if message.broken:
            return f"the relay broke before hop {self.hop} (its sender had no model)"
        if message.parts != self.parts or message.part != self._next:
            due = f"part {self._next} of {self.parts}"
            return f"sent part {message.part} of {message.parts}; {due} was due"
        if len(message.data) != self._part_size(message.part):
            return f"sent a part of {len(message.data)} bytes, not {self._part_size(message.part)}"
        if message.rows > self.max_rows:
            return f"claims {message.rows} training rows; the federation has {self.max_rows}"
        return None
