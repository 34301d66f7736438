from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from fedup.errors import FileError, IdentityError
from fedup.identity import (
    KEY_FILE_NAME,
    Identity,
    default_state_dir,
    load_or_create_identity,
)
from fedup.protocol.peer_id import PeerId


def test_created_on_first_use_with_mode_0600(tmp_path: Path) -> None:
    state = tmp_path / "state"
    ident = load_or_create_identity(state)
    key = state / KEY_FILE_NAME
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert key.read_text().startswith("fedup-ed25519-seed-v1\n")
    assert not [p for p in state.iterdir() if p.name != KEY_FILE_NAME]  # no temp file left
    assert load_or_create_identity(state).peer_id == ident.peer_id


def test_same_state_dir_same_id_different_dirs_differ(tmp_path: Path) -> None:
    a = load_or_create_identity(tmp_path / "a").peer_id
    assert load_or_create_identity(tmp_path / "a").peer_id == a
    assert load_or_create_identity(tmp_path / "b").peer_id != a


def test_concurrent_creation_agrees(tmp_path: Path) -> None:
    results: list[PeerId] = []
    threads = [
        threading.Thread(target=lambda: results.append(load_or_create_identity(tmp_path).peer_id))
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o606])
def test_key_readable_by_others_is_refused_not_replaced(tmp_path: Path, mode: int) -> None:
    load_or_create_identity(tmp_path)
    key = tmp_path / KEY_FILE_NAME
    before = key.read_bytes()
    key.chmod(mode)
    with pytest.raises(IdentityError, match="accessible by group or others"):
        load_or_create_identity(tmp_path)
    assert key.read_bytes() == before


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"garbage",
        b"fedup-ed25519-seed-v1\n" + b"zz" * 32 + b"\n",
        b"fedup-ed25519-seed-v1\n" + b"ab" * 31 + b"\n",
        b"fedup-ed25519-seed-v2\n" + b"ab" * 32 + b"\n",
        b"\xff\xfe" * 40,
    ],
)
def test_corrupt_key_is_refused_not_replaced(tmp_path: Path, content: bytes) -> None:
    key = tmp_path / KEY_FILE_NAME
    fd = os.open(key, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, content)
    os.close(fd)
    with pytest.raises(IdentityError, match="corrupt"):
        load_or_create_identity(tmp_path)
    assert key.read_bytes() == content


def test_key_path_that_is_a_directory_or_symlink_is_refused(tmp_path: Path) -> None:
    (tmp_path / "d" / KEY_FILE_NAME).mkdir(parents=True)
    with pytest.raises(IdentityError, match="not a regular file"):
        load_or_create_identity(tmp_path / "d")
    real = tmp_path / "real"
    load_or_create_identity(real)
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / KEY_FILE_NAME).symlink_to(real / KEY_FILE_NAME)
    with pytest.raises(IdentityError, match=r"cannot read key file .*: it is a symbolic link"):
        load_or_create_identity(tmp_path / "s")


def test_uncreatable_state_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(IdentityError, match="cannot create state directory"):
        load_or_create_identity(blocker / "state")


def test_default_state_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FEDUP_STATE_DIR", str(tmp_path / "x"))
    assert default_state_dir() == tmp_path / "x"
    monkeypatch.delenv("FEDUP_STATE_DIR")
    assert "fedup" in str(default_state_dir())


def test_sign_verifies_with_embedded_key() -> None:
    import nacl.signing

    ident = Identity.generate()
    sig = ident.sign(b"hello")
    nacl.signing.VerifyKey(ident.peer_id.public_key).verify(b"hello", sig)
    assert ident.seed != Identity.generate().seed


@pytest.mark.parametrize("loose", [0o777, 0o775, 0o770, 0o1777])
def test_state_dir_others_can_write_is_refused_with_the_fix(tmp_path: Path, loose: int) -> None:
    state = tmp_path / "state"
    load_or_create_identity(state)
    key = state / KEY_FILE_NAME
    before = key.read_bytes()
    state.chmod(loose)
    with pytest.raises(FileError, match=rf"writable by group or others.*chmod 700 {state}$"):
        load_or_create_identity(state)
    assert key.read_bytes() == before
    state.chmod(0o755)  # others may look in, not write: accepted
    load_or_create_identity(state)


def test_state_dir_and_missing_parents_are_created_0700(tmp_path: Path) -> None:
    state = tmp_path / "a" / "b" / "state"
    load_or_create_identity(state)
    for folder in (tmp_path / "a", tmp_path / "a" / "b", state):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
