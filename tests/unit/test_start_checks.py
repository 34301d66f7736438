"""What a peer checks before it joins anything: its output folder and its listen address."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedup.errors import ConfigError
from fedup.peer.outputs import RUN_FILES, check_out_dir


def test_a_missing_folder_is_created_and_left_clean(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b"
    check_out_dir(out)
    assert out.is_dir() and list(out.iterdir()) == []  # the write probe is gone
    (out / "notes.txt").write_text("the user's own file\n")
    check_out_dir(out)  # other files are no run's outputs


@pytest.mark.parametrize("name", RUN_FILES)
def test_a_folder_holding_another_runs_files_is_refused(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_text("{}")
    with pytest.raises(ConfigError) as refused:
        check_out_dir(tmp_path)
    assert str(refused.value) == (
        f"output directory {tmp_path} already holds another run's files ({name}); "
        "pass a new --out, or move them away"
    )
    check_out_dir(tmp_path, outputs=("report.json",))  # what counts is the caller's


def test_a_link_or_a_file_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(ConfigError, match=f"symbolic link; pass the folder it points to \\({real}"):
        check_out_dir(tmp_path / "link")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is not a directory; pass a folder as --out"):
        check_out_dir(tmp_path / "file")
    with pytest.raises(ConfigError, match=r"cannot create output directory .*; pass an --out"):
        check_out_dir(tmp_path / "file" / "below")


def test_a_folder_of_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        theirs = tmp_path / "theirs"
        theirs.mkdir()
        os.chown(theirs, 65534, 65534)
    else:
        theirs = Path("/")  # root's
    uid = theirs.stat().st_uid
    with pytest.raises(ConfigError) as refused:
        check_out_dir(theirs)
    assert str(refused.value) == (
        f"output directory {theirs} belongs to another user (uid {uid}); pass an --out of your own"
    )


def test_a_folder_it_cannot_write_is_refused(tmp_path: Path) -> None:
    if os.geteuid() == 0:  # root writes through permissions; sysfs refuses it new files
        if not os.path.isdir("/sys/kernel"):
            pytest.skip("needs Linux sysfs to find a folder root cannot write")
        locked = Path("/sys/kernel")
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
    with pytest.raises(ConfigError, match=f"output directory {locked} is not writable"):
        check_out_dir(locked)


def test_why_a_listen_address_cannot_be_bound_names_the_fix() -> None:
    import errno

    from fedup.peer.node import _listen_error
    from fedup.protocol.records import Address

    address = Address("10.0.0.9", 80)
    cases = {
        errno.EADDRINUSE: "port 80 is in use by another program; pass another --listen port, "
        "or 0 to pick a free one",
        errno.EADDRNOTAVAIL: "this host has no address 10.0.0.9; pass --listen with one of "
        "this host's addresses, or 0.0.0.0:80",
        errno.EACCES: "not allowed to listen on port 80; pass a --listen port of 1024 or "
        "more, or 0 to pick a free one",
        errno.EMFILE: "Too many open files; pass another --listen address",
    }
    for code, why in cases.items():
        error = _listen_error(address, OSError(code, os.strerror(code)))
        assert str(error) == f"cannot listen on 10.0.0.9:80: {why}"
