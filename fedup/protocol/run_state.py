"""What a member keeps on disk to continue its run after a crash: the run-state file.

Pure: values and bytes only (the trio layer writes and reads the file,
:mod:`fedup.peer.run_state_file`).  A member writes the file again at every custody
change (a blob taken, a hop trained, a hand-over done, ``passed``, a notice
learnt), atomically (write, fsync, rename), mode 0600, in its state directory.
It holds what the custody machine needs to go on (:class:`CustodyMemory`), the
signed view (so a restarted member needs no new formation), one ring state (the
one it holds, keeps or last saw: its tensors and the progress its metadata
carries) and the few numbers its summary needs.  It keeps no history beyond what
the run's provenance needs: its size is about one ring blob plus the run's chain
of hop statements.

A file is refused with :class:`RunStateError` and a one-line reason: empty, not a run
state, from another format version, truncated or corrupt (its BLAKE2b digest does
not match), too large, or not strict CBOR of the right shape.  The caller adds
whether it is this peer's and this network's, and the way out (``--fresh``).

File layout::

    "FUPRUN" 0x00 0x01 | digest (32 bytes, BLAKE2b of the body) | body (CBOR)
    body: {"v": 1, "network": tstr, "peer": bstr(38), "out": tstr, "view": bstr,
           "custody": {...}, "state": bstr / null, "role": "held"/"kept"/"seen",
           "history": [[lap, loss, accuracy, auc, n, samples], ...],
           "masks": [[lap, [uint, ...]], ...], "sent": uint, "hops": uint}
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any, Literal, TypeAlias

import attrs

from fedup.errors import RemoteProtocolError
from fedup.protocol import cbor
from fedup.protocol.laps import LapRecord, Position
from fedup.protocol.peer_id import RAW_SIZE, PeerId
from fedup.protocol.schema import FieldReader, MessageError

__all__ = [
    "CustodyMemory",
    "Kept",
    "RunState",
    "RunStateError",
    "Taken",
    "decode_run_state",
    "encode_run_state",
]

MAGIC = b"FUPRUN\x00\x01"
DIGEST_SIZE = 32
VERSION = 1
Role: TypeAlias = Literal["held", "kept", "seen"]
ROLES: tuple[Role, ...] = ("held", "kept", "seen")
PHASES = ("ready", "waiting", "training", "handing", "excluded")
"""The phases a run is resumed in (a member that finished keeps no run state)."""
MAX_CHAIN_ITEMS = 1 << 16
MAX_HISTORY = 1 << 16
MAX_MASK_LAPS = 8
MAX_MASK_LEN = 256


class RunStateError(RemoteProtocolError):
    """A run-state file that cannot be used (the reason says why)."""


@attrs.frozen
class Kept:
    """The copy a member keeps after handing it on, until ``passed``."""

    copy: Position
    target: PeerId
    position: Position


@attrs.frozen
class Taken:
    """The last blob a member took (to answer an identical resend with its receipt)."""

    sender: PeerId
    kind: Literal["model", "final"]
    position: Position
    digest: bytes
    receipt: bytes


@attrs.frozen
class CustodyMemory:
    """What a custody machine needs to go on after a restart (see
    :meth:`fedup.protocol.custody.CustodyMachine.memory`)."""

    phase: str
    last_lap: int
    received: bytes
    """The content digest of the state trained here (what our next statement received)."""
    chain: tuple[bytes, ...]
    """The notices (envelopes) this member knows."""
    provenance: bytes
    """The hop statements this member verified or signed (their chain's bytes)."""
    holding: Position | None = None
    source: PeerId | None = None
    kept: Kept | None = None
    taken: Taken | None = None
    asked: int = 0
    asks: tuple[bytes, ...] = ()
    """The latest return request of each member that asked."""


@attrs.frozen
class RunState:
    """Everything in a run-state file."""

    network: str
    peer: PeerId
    out_dir: str
    view: bytes
    """The signed view's envelope."""
    custody: CustodyMemory
    state: bytes | None
    """A ring blob (the learning layer's encoding): the state held, kept or last seen."""
    role: Role
    history: tuple[LapRecord, ...] = ()
    masks: tuple[tuple[int, tuple[int, ...]], ...] = ()
    """The masks on the validation sums of the laps this member opened (lap, mask)."""
    sent: int = 0
    """Model bytes this member sent so far."""
    hops: int = 0
    """Hops this member trained so far."""


# --- encoding --------------------------------------------------------------------------


def _pos(p: Position) -> list[int]:
    return [p.lap, p.hop]


def _float(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _memory_map(m: CustodyMemory) -> dict[str, Any]:
    out: dict[str, Any] = {
        "phase": m.phase,
        "last_lap": m.last_lap + 1,  # -1 (none yet) is kept as 0
        "received": m.received,
        "chain": list(m.chain),
        "provenance": m.provenance,
        "holding": _pos(m.holding) if m.holding is not None else None,
        "source": m.source.raw if m.source is not None else None,
        "kept": None,
        "taken": None,
        "asked": m.asked,
        "asks": list(m.asks),
    }
    if m.kept is not None:
        k = m.kept
        out["kept"] = {"copy": _pos(k.copy), "target": k.target.raw, "at": _pos(k.position)}
    if m.taken is not None:
        t = m.taken
        out["taken"] = {
            "from": t.sender.raw,
            "kind": t.kind,
            "at": _pos(t.position),
            "digest": t.digest,
            "receipt": t.receipt,
        }
    return out


def encode_run_state(s: RunState) -> bytes:
    """The file's bytes."""
    body = cbor.encode(
        {
            "v": VERSION,
            "network": s.network,
            "peer": s.peer.raw,
            "out": s.out_dir,
            "view": s.view,
            "custody": _memory_map(s.custody),
            "state": s.state,
            "role": s.role,
            "history": [
                [r.lap, _float(r.loss), _float(r.accuracy), _float(r.auc), r.n, r.samples]
                for r in s.history
            ],
            "masks": [[lap, list(mask)] for lap, mask in s.masks],
            "sent": s.sent,
            "hops": s.hops,
        }
    )
    return MAGIC + hashlib.blake2b(body, digest_size=DIGEST_SIZE).digest() + body


# --- decoding --------------------------------------------------------------------------


def decode_run_state(data: bytes, *, max_size: int) -> RunState:
    """Check and decode a run-state file's bytes; raises :class:`RunStateError`."""
    if len(data) > max_size:
        raise RunStateError(f"it is {len(data)} bytes, more than a run state can be ({max_size})")
    if not data:
        raise RunStateError("it is empty")
    if len(data) < len(MAGIC) and MAGIC.startswith(data):
        raise RunStateError("it is truncated")  # cut inside the magic: not another version
    if not data.startswith(MAGIC[:6]):
        raise RunStateError("it is not a FedUp run-state file")
    if data[: len(MAGIC)] != MAGIC:
        raise RunStateError(f"it is of another format version ({data[6:8].hex()})")
    head = len(MAGIC) + DIGEST_SIZE
    if len(data) < head:
        raise RunStateError("it is truncated")
    body = data[head:]
    if hashlib.blake2b(body, digest_size=DIGEST_SIZE).digest() != data[len(MAGIC) : head]:
        raise RunStateError("it is truncated or corrupt (its digest does not match)")
    try:
        return _decode_body(body, max_size)
    except RemoteProtocolError as exc:
        raise RunStateError(f"it is malformed: {exc.reason}") from None


def _decode_body(body: bytes, max_size: int) -> RunState:
    f = FieldReader(cbor.decode(body, max_size=max_size, max_depth=6), "run state")
    version = f.uint("v", max_value=255)
    if version != VERSION:
        raise MessageError(f"version {version} (this peer reads {VERSION})")
    network = f.text("network", max_bytes=256)
    peer = PeerId.from_bytes(f.bytestr("peer", size=RAW_SIZE))
    out_dir = f.text("out", max_bytes=4096)
    view = f.bytestr("view", max_size=max_size)
    custody = _read_memory(FieldReader(_map(f.raw("custody"), "custody"), "custody"), max_size)
    state = f.bytestr("state", max_size=max_size) if f.optional("state") else None
    role_text = f.text("role", max_bytes=8)
    role = next((r for r in ROLES if r == role_text), None)
    if role is None:
        raise MessageError(f"role {role_text!r}")
    history = tuple(_record(r) for r in f.array("history", _list, max_items=MAX_HISTORY))
    masks = tuple(_mask(m) for m in f.array("masks", _list, max_items=MAX_MASK_LAPS))
    sent = f.uint("sent")
    hops = f.uint("hops")
    f.done()
    return RunState(network, peer, out_dir, view, custody, state, role, history, masks, sent, hops)


def _read_memory(f: FieldReader, max_size: int) -> CustodyMemory:
    phase = f.text("phase", max_bytes=16)
    if phase not in PHASES:
        raise MessageError(f"custody phase {phase!r} is not one a run resumes in")
    last_lap = f.uint("last_lap", max_value=2**32) - 1
    received = f.bytestr("received", size=DIGEST_SIZE)
    chain = tuple(f.array("chain", _bytes, max_items=MAX_CHAIN_ITEMS))
    provenance = f.bytestr("provenance", max_size=max_size)
    holding = _position(f.raw("holding")) if f.optional("holding") else None
    source = PeerId.from_bytes(f.bytestr("source", size=RAW_SIZE)) if f.optional("source") else None
    kept = None
    if f.optional("kept"):
        k = FieldReader(_map(f.raw("kept"), "kept"), "kept")
        kept = Kept(
            _position(k.raw("copy"), allow_slots=True),
            PeerId.from_bytes(k.bytestr("target", size=RAW_SIZE)),
            _position(k.raw("at")),
        )
        k.done()
    taken = None
    if f.optional("taken"):
        t = FieldReader(_map(f.raw("taken"), "taken"), "taken")
        kind = t.text("kind", max_bytes=8)
        if kind not in ("model", "final"):
            raise MessageError(f"taken kind {kind!r}")
        taken = Taken(
            PeerId.from_bytes(t.bytestr("from", size=RAW_SIZE)),
            kind,  # type: ignore[arg-type]
            _position(t.raw("at")),
            t.bytestr("digest", size=DIGEST_SIZE),
            t.bytestr("receipt", max_size=4096),
        )
        t.done()
    asked = f.uint("asked", max_value=2**32 - 1)
    asks = tuple(f.array("asks", _bytes, max_items=MAX_CHAIN_ITEMS))
    f.done()
    return CustodyMemory(
        phase, last_lap, received, chain, provenance, holding, source, kept, taken, asked, asks
    )


def _map(value: object, label: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise MessageError(f"{label} must be a map")
    return value


def _list(value: object, label: str) -> list[Any]:
    if not isinstance(value, list):
        raise MessageError(f"{label} must be an array")
    return value


def _bytes(value: object, label: str) -> bytes:
    if not isinstance(value, bytes) or len(value) > 4096:
        raise MessageError(f"{label} must be a byte string of at most 4096 bytes")
    return value


def _int(value: object, label: str, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value < 2**63:
        raise MessageError(f"{label} must be an integer of at least {low}")
    return value


def _position(value: object, *, allow_slots: bool = False) -> Position:
    """A ``[lap, hop]`` pair (the copy slots INITIAL and FINAL are negative)."""
    if not isinstance(value, list) or len(value) != 2:
        raise MessageError("a position must be [lap, hop]")
    low = -2 if allow_slots else 0
    return Position(_int(value[0], "lap", low), _int(value[1], "hop", low))


def _record(value: Sequence[Any]) -> LapRecord:
    if len(value) != 6:
        raise MessageError("a lap record has 6 items")
    loss, accuracy, auc = (_float_item(x) for x in value[1:4])
    return LapRecord(
        _int(value[0], "lap", -1),
        loss,
        accuracy,
        auc,
        _int(value[4], "n"),
        _int(value[5], "samples"),
    )


def _float_item(x: object) -> float:
    if x is None:
        return math.nan
    if isinstance(x, float):
        return x
    raise MessageError("a lap record's loss, accuracy and AUC are floats or null")


def _mask(value: Sequence[Any]) -> tuple[int, tuple[int, ...]]:
    if len(value) != 2 or not isinstance(value[1], list) or len(value[1]) > MAX_MASK_LEN:
        raise MessageError("a mask is [lap, [uint, ...]]")
    return _int(value[0], "lap"), tuple(_int(x, "mask") for x in value[1])
