"""A real run's provenance: it verifies, and every kind of tampering fails, in one line.

One federation of three real peers (memory world, virtual clock) runs once for the
module; each test copies one member's output folder and alters it: a byte of the
model, a byte of ``provenance.cbor``, a hop removed or reordered, a foreign
signature in a member's place, a statement from another run.  ``fedup-peer verify``
must say why in one line on stderr and exit 1, or report who trained how much and
exit 0.  The blobs of that run are recorded: each carries only the hop statements its
receiver has not seen.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from fedup.cli import main
from fedup.commands.verify import VerifyFailure, verify_model
from fedup.identity import Identity
from fedup.peer import RunSummary
from fedup.peer.tamper import OutgoingBlob, Tamper
from fedup.protocol import cbor
from fedup.protocol.payload import decode_payload
from fedup.protocol.provenance import (
    MAX_STATEMENT_SIZE,
    HopStatement,
    encode_provenance,
    join_chain,
    split_chain,
)
from fedup.sim.world import MemoryWorld
from tests.integration.test_federation import check_same_model, identities, run_federation

IDS = identities(3)
BY_PEER = {i.peer_id: i for i in IDS}
STRANGER = Identity(b"\x66" * 32)


@attrs.frozen
class BlobSeen:
    kind: str
    lap: int
    hop: int
    hops: list[bytes]
    """The statement envelopes it carried."""
    nbytes: int


class Recorder(Tamper):
    """Changes nothing; notes what each blob a member sends carries."""

    def __init__(self, seen: list[BlobSeen]) -> None:
        self.seen = seen

    def blobs(self, blob: OutgoingBlob) -> list[OutgoingBlob]:
        chain = decode_payload(bytearray(blob.data)).provenance
        self.seen.append(
            BlobSeen(blob.kind, blob.lap, blob.hop, split_chain(chain), memoryview(chain).nbytes)
        )
        return [blob]


SENT: list[BlobSeen] = []


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output folder of one member after a whole run (the others hold the same);
    what every blob carried is in ``SENT``."""
    tmp = tmp_path_factory.mktemp("federation")
    world = MemoryWorld()
    SENT.clear()
    for ident in IDS:
        world.tampers[ident.peer_id] = Recorder(SENT)

    async def federate() -> dict[str, RunSummary | BaseException]:
        return await run_federation(tmp, IDS, world=world)

    results = trio.run(federate, clock=trio.testing.MockClock(autojump_threshold=0))
    summaries = [results[i.peer_id.text] for i in IDS]
    assert all(isinstance(s, RunSummary) and s.ok for s in summaries), summaries
    check_same_model([s for s in summaries if isinstance(s, RunSummary)])
    out = summaries[1]
    assert isinstance(out, RunSummary)
    return Path(out.out_dir)


@pytest.fixture
def copy(run_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "out"
    shutil.copytree(run_dir, target)
    return target


def read_provenance(folder: Path) -> dict[str, Any]:
    value = cbor.decode((folder / "provenance.cbor").read_bytes(), max_size=1 << 24, max_depth=4)
    assert isinstance(value, dict)
    return value


def write_provenance(folder: Path, value: dict[str, Any], hops: list[bytes]) -> None:
    data = encode_provenance(
        view=value["view"], dead=value["dead"], hops=join_chain(hops), seal=value["seal"]
    )
    (folder / "provenance.cbor").write_bytes(data)


def statements(folder: Path) -> list[bytes]:
    return split_chain(read_provenance(folder)["hops"])


def fails(folder: Path, capsys: pytest.CaptureFixture[str], match: str) -> str:
    """``verify`` fails with exit code 1 and one line on stderr matching ``match``."""
    with pytest.raises(VerifyFailure, match=match):
        verify_model(folder)
    assert main(["verify", str(folder)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedup-peer verify: FAILED: "), err
    return lines[0]


# --- what a run leaves verifies -------------------------------------------------------------


def test_a_run_s_outputs_verify_and_say_who_trained_how_much(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert main(["verify", str(run_dir)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert f"is the model run {summary['run_id'][:8]} sealed" in out
    for member in summary["members"]:
        assert member in out
    assert main(["verify", str(run_dir / "model.safetensors"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["model_sha256"] == summary["model_sha256"]
    assert [m["peer"] for m in report["members"]] == summary["members"]
    assert report["ended_by"] == summary["ended_by"]
    hops = read_provenance(run_dir)["hops"]
    assert report["hops"] == len(split_chain(hops))
    # every member signed one hop a lap, laps 0 .. max_laps; the leader also the closing one
    laps = summary["laps"] + 1
    assert [m["hops"] for m in report["members"]] == [laps + 1] + [laps] * (len(IDS) - 1)
    # the samples the statements name are the ones the members logged
    logged = 0
    for folder in run_dir.parent.iterdir():
        lines = (folder / "metrics.jsonl").read_text().splitlines()
        logged += sum(r["samples"] for r in map(json.loads, lines) if r["type"] == "hop")
    assert sum(m["samples"] for m in report["members"]) == logged


def test_blobs_carry_less_than_a_lap_of_statements_and_every_member_the_whole_chain(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A blob carries the statements made since its receiver's own last one (fewer than
    a lap of the ring), not the chain since the run began; every member's
    ``provenance.cbor`` still holds the whole chain, and verifies."""
    whole = statements(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(whole) == (summary["laps"] + 1) * len(IDS) + 1  # laps 0 .. max_laps, closing
    assert len(whole) > 3 * len(IDS)  # so carrying it whole would exceed the bound below
    models = [b for b in SENT if b.kind == "model"]
    finals = [b for b in SENT if b.kind == "final"]
    assert len(models) == len(whole) - 1 and len(finals) == len(IDS) - 1
    lap = len(IDS) * MAX_STATEMENT_SIZE
    for blob in SENT:
        assert 1 <= len(blob.hops) < len(IDS), blob  # under a lap of statements
        assert blob.nbytes < 2 * lap
        # each is a run of the whole chain, ending with the statement of its state
        start = whole.index(blob.hops[0])
        assert whole[start : start + len(blob.hops)] == blob.hops
    last = max(models, key=lambda b: (b.lap, b.hop))
    assert last.hops == whole[-len(IDS) : -1]  # the last model blob: before the closing hop
    assert sum(b.nbytes for b in SENT) < len(SENT) * 2 * lap
    for folder in run_dir.parent.iterdir():  # every member: the whole chain, verified
        assert statements(folder) == whole
        assert main(["verify", str(folder)]) == 0
    capsys.readouterr()


def test_missing_files_fail_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fails(tmp_path / "nowhere", capsys, "does not exist")
    fails(tmp_path, capsys, "no model.safetensors")
    (tmp_path / "model.safetensors").write_bytes(b"x")
    fails(tmp_path, capsys, "no provenance.cbor beside")


# --- tampering ----------------------------------------------------------------------------------


def test_a_changed_byte_of_the_model_fails(copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = copy / "model.safetensors"
    data = bytearray(model.read_bytes())
    for at in (0, len(data) // 2, len(data) - 1):
        bad = bytearray(data)
        bad[at] ^= 0x01
        model.write_bytes(bad)
        fails(copy, capsys, "model file .* is not the one the run sealed")
    model.write_bytes(bytes(data) + b"\0")
    fails(copy, capsys, "is not the one the run sealed")


def test_a_changed_byte_of_the_provenance_fails(
    copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = copy / "provenance.cbor"
    data = path.read_bytes()
    for at in range(0, len(data), max(1, len(data) // 40)):  # every part of the file
        bad = bytearray(data)
        bad[at] ^= 0x04
        path.write_bytes(bad)
        fails(copy, capsys, "provenance.cbor")
    path.write_bytes(data[:-1])
    fails(copy, capsys, "provenance.cbor")


def test_a_removed_hop_fails(copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    value, hops = read_provenance(copy), statements(copy)
    write_provenance(copy, value, hops[:3] + hops[4:])
    fails(copy, capsys, "hop statement 3 .* does not link")
    write_provenance(copy, value, hops[:-1])
    fails(copy, capsys, "not over the model the last hop statement")


def test_reordered_hops_fail(copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    value, hops = read_provenance(copy), statements(copy)
    write_provenance(copy, value, [hops[0], hops[2], hops[1], *hops[3:]])
    fails(copy, capsys, "hop statement 1 .* does not link")


def resign(envelope: bytes, signer: Identity, **changes: Any) -> bytes:
    s = HopStatement.open(envelope)
    fields: dict[str, Any] = {
        "run_id": s.run_id,
        "prev": s.prev,
        "position": s.position,
        "received": s.received,
        "sent": s.sent,
        "samples": s.samples,
    }
    fields.update(changes)
    return HopStatement.seal(signer, **fields).envelope


def test_a_foreign_signature_fails(copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    value, hops = read_provenance(copy), statements(copy)
    hops[2] = resign(hops[2], STRANGER)
    write_provenance(copy, value, hops)
    fails(copy, capsys, "hop statement 2 is signed by .*, not a member of the view")


def test_a_member_s_statement_changed_and_signed_again_fails(
    copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Even its own signer cannot change a statement once the next one links to it."""
    value, hops = read_provenance(copy), statements(copy)
    own = HopStatement.open(hops[2])
    hops[2] = resign(hops[2], BY_PEER[own.signer], samples=own.samples * 10 + 1)
    write_provenance(copy, value, hops)
    fails(copy, capsys, "hop statement 3 .* does not link")


def test_a_statement_from_another_run_fails(copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    value, hops = read_provenance(copy), statements(copy)
    last = HopStatement.open(hops[-1])
    hops[-1] = resign(hops[-1], BY_PEER[last.signer], run_id=b"\x01" * 16)
    write_provenance(copy, value, hops)
    fails(copy, capsys, "from another run")
