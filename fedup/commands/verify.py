"""``fedup-peer verify PATH``: check a saved model's provenance; say who trained how much.

PATH is a run's output folder or the model file in it; ``provenance.cbor`` lies
beside the model.  Every signature, the hop chain from the initial model to the
final one, every signer's membership of the signed view and the seal over the
model file are checked (:func:`fedup.protocol.provenance.verify_provenance`).
On success it prints a report and exits 0; on any failure one line on stderr
and exit code 1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any, BinaryIO

from fedup.config import DEFAULT_LIMITS, Limits
from fedup.errors import FileError, RemoteProtocolError
from fedup.files import open_regular, read_bounded
from fedup.protocol.notices import DeadNotice
from fedup.protocol.provenance import VerifiedProvenance, max_provenance_size, verify_provenance
from fedup.protocol.refusal import printable
from fedup.protocol.returns import ReturnNotice

MODEL_FILE = "model.safetensors"
PROVENANCE_FILE = "provenance.cbor"


class VerifyFailure(Exception):
    """The model's provenance does not hold (or cannot be read); the message says why."""


def add_parser(
    subparsers: argparse._SubParsersAction,  # type: ignore[type-arg]
) -> argparse.ArgumentParser:
    """Register the ``verify`` command."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "verify",
        help="check a saved model's provenance and print who trained how much",
        description="Check that a model is the one a federation trained: every signed hop "
        "statement, the chain of hops from the initial model to the final one, that every "
        "signer is a member of the signed view, and the final seal over the model file. "
        "Prints each member's hops and samples and exits 0; any altered byte, removed or "
        "reordered hop, or foreign signature is one line on stderr and exit code 1.",
    )
    p.add_argument(
        "path",
        type=Path,
        metavar="PATH",
        help=f"a run's output folder, or its {MODEL_FILE} ({PROVENANCE_FILE} lies beside it)",
    )
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    try:
        model, verified = verify_model(args.path)
    except VerifyFailure as exc:
        print(f"fedup-peer verify: FAILED: {printable(str(exc))}", file=sys.stderr)
        return 1
    report = describe(model, verified)
    if args.json:
        print(json.dumps(report))
    else:
        print(render(report))
    return 0


def locate(path: Path) -> tuple[Path, Path]:
    """The model file and the provenance file that ``path`` names."""
    if path.is_dir():
        model = path / MODEL_FILE
    elif path.exists():
        model = path
    else:
        raise VerifyFailure(f"{path} does not exist")
    if not model.is_file():
        raise VerifyFailure(f"no {MODEL_FILE} in {path}")
    provenance = model.parent / PROVENANCE_FILE
    if not provenance.is_file():
        raise VerifyFailure(
            f"no {PROVENANCE_FILE} beside {model} (it is written with the model when a run ends)"
        )
    return model, provenance


def verify_model(path: Path, *, limits: Limits = DEFAULT_LIMITS) -> tuple[Path, VerifiedProvenance]:
    """Check the model ``path`` names against its provenance; raises :class:`VerifyFailure`."""
    model, provenance = locate(path)
    try:
        digest = _sha256(model, limits.max_blob_size)
        data = _read(provenance, max_provenance_size(limits))
    except OSError as exc:
        raise VerifyFailure(f"cannot read {exc.filename}: {exc.strerror}") from None
    try:
        return model, verify_provenance(data, model_sha256=digest, limits=limits)
    except RemoteProtocolError as exc:
        raise VerifyFailure(f"{provenance}: {exc.reason}") from None


def _sha256(path: Path, limit: int) -> bytes:
    opened = _opened(path)
    digest = hashlib.sha256()
    f, size = opened
    with f:
        if size > limit:
            raise VerifyFailure(f"{path} is larger than a model may be ({limit} bytes)")
        while chunk := f.read(min(1 << 20, size)):
            digest.update(chunk)
            size -= len(chunk)
    return digest.digest()


def _read(path: Path, limit: int) -> bytes:
    try:
        data = read_bounded(path, limit)
    except FileError as exc:
        raise VerifyFailure(str(exc)) from None
    if data is None:
        raise VerifyFailure(f"{path} does not exist")
    return data


def _opened(path: Path) -> tuple[BinaryIO, int]:
    """``path`` opened as a regular file (no symbolic link, no FIFO), and its size."""
    try:
        opened = open_regular(path)
    except FileError as exc:
        raise VerifyFailure(str(exc)) from None
    if opened is None:
        raise VerifyFailure(f"{path} does not exist")
    return opened


def describe(model: Path, verified: VerifiedProvenance) -> dict[str, Any]:
    """The report as plain values (what ``--json`` prints)."""
    view = verified.view.view
    last = verified.chain.last
    assert last is not None  # verify_provenance refuses an empty chain
    shares = verified.shares()
    return {
        "ok": True,
        "model": str(model),
        "model_sha256": verified.seal.model.hex(),
        "run_id": view.run_id.hex(),
        "epoch": view.epoch,
        "leader": view.leader.text,
        "hops": verified.chain.count,
        "initial_content": verified.initial.hex(),
        "final_content": last.sent.hex(),
        "ended_by": verified.seal.origin.text,
        "ended_at": [last.position.lap, last.position.hop],
        "dead": [
            {"peer": n.dead.text, "by": n.claimer.text, "why": n.cause}
            for n in verified.dead.notices
            if isinstance(n, DeadNotice)
        ],
        "returned": [
            {"peer": n.back.text, "by": n.claimer.text, "at": [n.at.lap, n.at.hop]}
            for n in verified.dead.notices
            if isinstance(n, ReturnNotice)
        ],
        "members": [
            {"peer": s.peer.text, "hops": s.hops, "trained": s.trained, "samples": s.samples}
            for s in shares
        ],
    }


def render(report: dict[str, Any]) -> str:
    """The report as text."""
    members = report["members"]
    lines = [
        f"verified: {report['model']} (SHA-256 {report['model_sha256'][:16]}...) is the model "
        f"run {report['run_id'][:8]} sealed",
        f"{len(members)} members (leader {report['leader']}); {report['hops']} signed hops "
        f"from the initial model {report['initial_content'][:16]}... to the final one "
        f"{report['final_content'][:16]}...; ended by {report['ended_by']} at lap "
        f"{report['ended_at'][0]} hop {report['ended_at'][1]}",
    ]
    for d in report["dead"]:
        lines.append(f"declared dead: {d['peer']} ({d['why']}, by {d['by']})")
    lines.append("")
    width = max(len(m["peer"]) for m in members)
    lines.append(f"{'member':<{width}}  {'hops':>6}  {'trained':>7}  {'samples':>12}")
    for m in members:
        lines.append(f"{m['peer']:<{width}}  {m['hops']:>6}  {m['trained']:>7}  {m['samples']:>12}")
    total = [sum(m[k] for m in members) for k in ("hops", "trained", "samples")]
    lines.append(f"{'all':<{width}}  {total[0]:>6}  {total[1]:>7}  {total[2]:>12}")
    return "\n".join(lines)
