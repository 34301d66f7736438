"""One running peer per state directory: an exclusive lock held for the peer's lifetime.

``fedup-peer start`` takes an exclusive advisory lock (``flock``) on the file
``peer.lock`` in its state directory and keeps it until it exits, writing its
process ID into the file.  A second peer given the same state directory (it
would share the identity, the synthetic data and the run folders) finds the
lock taken and stops at once, naming the process that holds it.  The kernel
drops the lock when the holder exits, however it exits, so a crashed peer
never leaves a stale lock; the file itself stays (removing it would let two
peers lock two different files of the same name).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from fedup.errors import ConfigError
from fedup.files import check_private_dir, make_dirs

LOCK_FILE_NAME = "peer.lock"


@contextlib.contextmanager
def hold_state_dir(state_dir: Path) -> Iterator[Path]:
    """Hold ``state_dir``'s lock for the block; yields the lock file's path.

    Creates ``state_dir`` and its missing parents (mode 0700), checks that
    nobody else can write it (:func:`fedup.files.check_private_dir`, which
    raises :class:`~fedup.errors.FileError`), and creates the lock file (mode 0600, never
    through a symbolic link) if needed.  Raises :class:`ConfigError` when
    another process holds the lock (naming its process ID) or when the
    directory or the lock file cannot be used.
    """
    path = state_dir / LOCK_FILE_NAME
    try:
        make_dirs(state_dir)
        check_private_dir(state_dir)  # before we create anything in it
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ConfigError(
            f"cannot use state directory {state_dir} ({path}: {exc.strerror}); "
            "pass a --state-dir of your own"
        ) from None
    claimed = False
    try:
        _claim(fd, state_dir, path)
        claimed = True
        yield path
    finally:
        if claimed:  # emptied while still held, so the next holder's PID is never cut
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
        os.close(fd)  # releases the lock


def _claim(fd: int, state_dir: Path, path: Path) -> None:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{path} is not a regular file; move it away")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise ConfigError(f"cannot lock {path}: {exc.strerror}") from None
        raise ConfigError(
            f"state directory {state_dir} is in use by another running peer "
            f"({_holder(fd)}); stop it or pass another --state-dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)


def _holder(fd: int) -> str:
    """``pid N`` from the lock file, as far as it can be read."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        text = ""
    return f"pid {text}" if text.isdigit() else "pid unknown"
