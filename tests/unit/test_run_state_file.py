"""The run-state file on disk (:class:`fedup.peer.run_state_file.RunStateFile`): loaded
only when it is this peer's, of this network, with a view that verifies and names it;
refused otherwise with one line that names the file and the way out (``--fresh``);
written atomically (mode 0600, never through a link); set aside, never deleted."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import attrs
import pytest

from fedup.config import DEFAULT_LIMITS
from fedup.errors import ConfigError
from fedup.identity import Identity
from fedup.peer.run_state_file import FILE_NAME, RunStateFile, Saved, max_run_state_size
from fedup.protocol import cbor
from fedup.protocol.laps import LapRecord, Position
from fedup.protocol.records import Address, PeerRecord, SignedPeerRecord
from fedup.protocol.run_state import CustodyMemory, RunState, encode_run_state
from fedup.protocol.view import MembershipView, RunSettings
from tests.conftest import make_identities

IDS = sorted(make_identities(4), key=lambda i: i.peer_id)
ME, OTHER, THIRD, OUTSIDER = IDS
NETWORK = "loans-lan"


def rec(ident: Identity) -> SignedPeerRecord:
    return PeerRecord(ident.peer_id, 1, (Address("127.0.0.1", 4000),), NETWORK).seal(ident)


def signed_view(members: list[Identity]) -> bytes:
    """A real view of ``members``, signed by the first (its leader)."""
    view = MembershipView(
        run_id=bytes(range(16)),
        epoch=0,
        leader=members[0].peer_id,
        members=tuple(rec(i) for i in members),
        settings=RunSettings(seed=7),
        schema={"cols": ["a", "b"]},
    )
    return view.seal(members[0]).envelope


VIEW = signed_view([ME, OTHER, THIRD])


def state(**kw: object) -> RunState:
    fields: dict[str, object] = {
        "network": NETWORK,
        "peer": ME.peer_id,
        "out_dir": "/runs/0001",
        "view": VIEW,
        "custody": CustodyMemory(
            "waiting", 2, b"\x33" * 32, (), b"", holding=None, source=OTHER.peer_id
        ),
        "state": b"ring blob",
        "role": "seen",
        "history": (LapRecord(-1, 0.7, 0.5, 0.5, 10, 0),),
    }
    fields.update(kw)
    return RunState(**fields)  # type: ignore[arg-type]


def the_file(tmp_path: Path, peer: Identity = ME, network: str = NETWORK) -> RunStateFile:
    return RunStateFile(tmp_path / FILE_NAME, peer.peer_id, network, DEFAULT_LIMITS)


def refusal(f: RunStateFile) -> str:
    """The one line ``load`` refuses the file with; checks that it says what to do."""
    with pytest.raises(ConfigError) as caught:
        f.load()
    line = str(caught.value)
    assert "\n" not in line
    assert line.startswith(f"cannot resume the run saved in {f.path}: ")
    assert line.endswith(
        "; pass --fresh to start a new run (the file is then set aside, not deleted)"
    )
    return line.removeprefix(f"cannot resume the run saved in {f.path}: ").split("; pass")[0]


# --- load ------------------------------------------------------------------------------


def test_no_file_is_no_saved_run(tmp_path: Path) -> None:
    assert the_file(tmp_path).load() is None


def test_a_saved_run_loads_with_its_view_verified(tmp_path: Path) -> None:
    f = the_file(tmp_path)
    f.save(encode_run_state(state()))
    saved = f.load()
    assert isinstance(saved, Saved)
    assert saved.state == state()
    assert saved.view.envelope == VIEW
    assert saved.view.view.member_ids == tuple(i.peer_id for i in (ME, OTHER, THIRD))


def test_a_run_of_another_network_is_refused(tmp_path: Path) -> None:
    the_file(tmp_path).save(encode_run_state(state()))
    assert refusal(the_file(tmp_path, network="other-net")) == (
        "it is a run of network 'loans-lan', and this peer is on 'other-net'"
    )


def test_a_run_of_another_peer_is_refused(tmp_path: Path) -> None:
    the_file(tmp_path).save(encode_run_state(state()))
    assert refusal(the_file(tmp_path, peer=OTHER)) == (
        f"it is peer {ME.peer_id}'s, and this peer is {OTHER.peer_id}"
    )


def tampered(view: bytes, where: int) -> bytes:
    """``view`` with one byte of its signed payload changed (still well-formed CBOR)."""
    envelope = cbor.decode(view, max_size=1 << 20, max_depth=4)
    assert isinstance(envelope, dict)
    payload = bytearray(envelope["payload"])
    payload[where] ^= 0x01
    envelope["payload"] = bytes(payload)
    return cbor.encode(envelope)


def test_a_view_that_does_not_verify_is_refused(tmp_path: Path) -> None:
    """A byte changed inside the view, the file sealed again (its digest matches)."""
    envelope = cbor.decode(VIEW, max_size=1 << 20, max_depth=4)
    assert isinstance(envelope, dict)
    at = bytes(envelope["payload"]).index(bytes(range(16)))  # inside the run ID
    bad = tampered(VIEW, at)
    the_file(tmp_path).save(encode_run_state(state(view=bad)))
    why = refusal(the_file(tmp_path))
    assert why.startswith("its view does not verify: ")
    assert "signature" in why, why
    for junk in (b"", b"\xa0", VIEW[:-1]):
        the_file(tmp_path).save(encode_run_state(state(view=junk)))
        assert refusal(the_file(tmp_path)).startswith("its view does not verify: ")


def test_a_view_that_does_not_name_this_peer_is_refused(tmp_path: Path) -> None:
    """A real, signed view of three other peers: this peer was never a member."""
    theirs = signed_view([OTHER, THIRD, OUTSIDER])
    the_file(tmp_path).save(encode_run_state(state(view=theirs)))
    assert refusal(the_file(tmp_path)) == "its view does not name this peer as a member"


def test_a_corrupt_or_truncated_file_is_refused_with_its_reason(tmp_path: Path) -> None:
    f = the_file(tmp_path)
    data = encode_run_state(state())
    f.path.write_bytes(data[:-3])
    assert refusal(f) == "it is truncated or corrupt (its digest does not match)"
    f.path.write_bytes(data[:5])
    assert refusal(f) == "it is truncated"
    f.path.write_bytes(b"")
    assert refusal(f) == "it is empty"
    f.path.write_bytes(b"peer_id = 'me'\n")
    assert refusal(f) == "it is not a FedUp run-state file"


def test_a_file_too_large_is_refused_with_its_size_unread(tmp_path: Path) -> None:
    small = attrs.evolve(DEFAULT_LIMITS, max_blob_size=4096, max_message_size=1024)
    limit = max_run_state_size(small)
    f = RunStateFile(tmp_path / FILE_NAME, ME.peer_id, NETWORK, small)
    with open(f.path, "wb") as out:
        out.truncate(limit * 3)  # sparse: its true size is named, though never read
    assert refusal(f) == f"it is {limit * 3} bytes, more than a run state can be ({limit})"


def test_a_link_a_folder_or_a_fifo_at_the_name_is_refused_at_once(tmp_path: Path) -> None:
    """Never read through a symbolic link, never waiting on a FIFO planted at the name."""
    f = the_file(tmp_path)
    real = tmp_path / "elsewhere.cbor"
    real.write_bytes(encode_run_state(state()))
    f.path.symlink_to(real)
    assert refusal(f) == "it is a symbolic link, which is not followed"
    f.path.unlink()
    f.path.mkdir()
    assert refusal(f) == "it is not a regular file"
    f.path.rmdir()
    os.mkfifo(f.path)
    assert refusal(f) == "it is not a regular file"


def test_a_file_it_may_not_read_is_refused(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    f = the_file(tmp_path)
    f.save(encode_run_state(state()))
    f.path.chmod(0)
    assert refusal(f) == "Permission denied"


# --- save, discard ---------------------------------------------------------------------


def test_save_writes_mode_0600_atomically_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    f = the_file(tmp_path)
    old = os.umask(0o022)
    try:
        f.save(b"first")
        f.save(encode_run_state(state()))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(f.path).st_mode) == 0o600
    assert sorted(os.listdir(tmp_path)) == [FILE_NAME]
    loaded = f.load()
    assert loaded is not None and loaded.state == state()


def test_save_replaces_a_link_at_the_name_and_never_writes_through_it(tmp_path: Path) -> None:
    f = the_file(tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"not yours")
    f.path.symlink_to(victim)
    f.save(encode_run_state(state()))
    assert victim.read_bytes() == b"not yours"
    assert not f.path.is_symlink() and f.path.is_file()
    assert f.path.read_bytes() == encode_run_state(state())


def test_discard_removes_the_file_and_is_quiet_when_there_is_none(tmp_path: Path) -> None:
    f = the_file(tmp_path)
    f.save(encode_run_state(state()))
    f.discard()
    assert not f.path.exists()
    f.discard()
    assert f.load() is None


# --- set aside (--fresh) ---------------------------------------------------------------


def test_set_aside_moves_the_file_and_never_overwrites_one_set_aside_before(
    tmp_path: Path,
) -> None:
    f = the_file(tmp_path)
    folder = tmp_path / "runs" / "0001"
    assert f.set_aside(folder) is None  # nothing to set aside
    assert not folder.exists()
    moved = []
    for n in range(3):
        f.path.write_bytes(b"run %d" % n)
        moved.append(f.set_aside(folder))
        assert not os.path.lexists(f.path)
    assert moved == [
        folder / "run-state.interrupted.cbor",
        folder / "run-state.interrupted.2.cbor",
        folder / "run-state.interrupted.3.cbor",
    ]
    assert [p.read_bytes() for p in moved if p is not None] == [b"run 0", b"run 1", b"run 2"]
    assert stat.S_IMODE(os.stat(tmp_path / "runs").st_mode) == 0o700  # made private, parents too
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700


def test_set_aside_keeps_a_link_planted_at_a_name_it_would_use(tmp_path: Path) -> None:
    """A name taken by a link, even a dangling one, is taken: the next name is used."""
    f = the_file(tmp_path)
    folder = tmp_path / "aside"
    folder.mkdir()
    (folder / "run-state.interrupted.cbor").symlink_to(tmp_path / "nowhere")
    f.path.write_bytes(b"run")
    assert f.set_aside(folder) == folder / "run-state.interrupted.2.cbor"
    assert (folder / "run-state.interrupted.cbor").is_symlink()


def test_set_aside_moves_what_load_refuses(tmp_path: Path) -> None:
    """--fresh must get a peer past anything at the name: a dangling link, a FIFO."""
    f = the_file(tmp_path)
    f.path.symlink_to(tmp_path / "nowhere")
    with pytest.raises(ConfigError):
        f.load()
    assert f.set_aside(tmp_path / "aside") == tmp_path / "aside" / "run-state.interrupted.cbor"
    assert f.load() is None
    os.mkfifo(f.path)
    assert f.set_aside(tmp_path / "aside") == tmp_path / "aside" / "run-state.interrupted.2.cbor"
    assert f.load() is None


def test_a_position_round_trips_through_the_file(tmp_path: Path) -> None:
    """The file is the pure module's bytes: what is saved is what is loaded."""
    s = state(custody=CustodyMemory("training", 5, b"\x01" * 32, (), b"", Position(5, 0)))
    f = the_file(tmp_path)
    f.save(encode_run_state(s))
    loaded = f.load()
    assert loaded is not None and loaded.state.custody.holding == Position(5, 0)
