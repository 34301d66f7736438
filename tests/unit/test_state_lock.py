"""One running peer per state directory (fedup/state_lock.py)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from fedup.errors import ConfigError
from fedup.state_lock import LOCK_FILE_NAME, hold_state_dir


def test_a_second_holder_is_refused_naming_the_first(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with hold_state_dir(state) as lock:
        assert lock == state / LOCK_FILE_NAME
        assert stat.S_IMODE(lock.stat().st_mode) == 0o600
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        assert lock.read_text() == f"{os.getpid()}\n"
        message = (
            f"state directory {state} is in use by another running peer "
            f"(pid {os.getpid()}); stop it or pass another --state-dir"
        )
        with pytest.raises(ConfigError) as refused, hold_state_dir(state):
            pass
        assert str(refused.value) == message
        assert lock.read_text() == f"{os.getpid()}\n"  # the refused one changed nothing
    assert lock.read_text() == ""  # released: emptied, and free again
    with hold_state_dir(state):
        pass


def test_the_lock_goes_with_the_process_that_held_it(tmp_path: Path) -> None:
    """A holder that dies without cleaning up leaves no stale lock behind."""
    code = (
        "import os, sys; from pathlib import Path; from fedup.state_lock import hold_state_dir\n"
        "with hold_state_dir(Path(sys.argv[1])):\n"
        "    print(os.getpid(), flush=True); sys.stdin.readline(); os._exit(9)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        pid = int(child.stdout.readline())
        with pytest.raises(ConfigError, match=rf"in use by another running peer \(pid {pid}\)"):
            with hold_state_dir(tmp_path):
                pass
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.wait(timeout=60) == 9
    finally:
        child.kill()
        child.wait()
    with hold_state_dir(tmp_path):
        assert (tmp_path / LOCK_FILE_NAME).read_text() == f"{os.getpid()}\n"


def test_a_lock_file_that_is_a_link_or_not_a_file_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("keep me\n")
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / LOCK_FILE_NAME).symlink_to(elsewhere)
    with pytest.raises(ConfigError, match="cannot use state directory"), hold_state_dir(linked):
        pass
    assert elsewhere.read_text() == "keep me\n"
    odd = tmp_path / "odd"
    (odd / LOCK_FILE_NAME).mkdir(parents=True)
    with pytest.raises(ConfigError, match="pass a --state-dir of your own"), hold_state_dir(odd):
        pass
