"""The files and folders FedUp makes, and the secrets it reads, on a shared machine.

Another user of the host may plant a symbolic link where FedUp is about to write,
or loosen a key file's mode.  Every file FedUp writes goes through this module (the
state lock, ``peer.lock``, is opened by :mod:`fedup.state_lock`, in the state folder
checked by :func:`check_private_dir`):

* **Folders** FedUp creates get mode 0700, missing parents included
  (:func:`make_dirs`).  An existing folder is used as it is, but a symbolic link
  owned by another user where a folder should be is refused.
* **Files** FedUp writes get mode 0600 and are never written through a symbolic
  link at their name:

  - :func:`atomic_writer` / :func:`write_atomic` (model, summary, federation
    record, CSVs, reports, the plot): the bytes go to a fresh temporary file in
    the same folder, created with ``O_CREAT | O_EXCL | O_NOFOLLOW``, which is then
    renamed over the name.  A symbolic link planted at the name is *replaced*,
    never followed; a reader sees the old file or the new one, never half.
  - :func:`open_append` (``metrics.jsonl``): opened with ``O_APPEND | O_NOFOLLOW``;
    a symbolic link, or anything but a regular file of the current user's, is
    *refused* with :class:`~fedup.errors.FileError`.
  - :func:`create_new` (the demo's network key and peer logs): created with
    ``O_CREAT | O_EXCL | O_NOFOLLOW``; anything already at the name, a symbolic
    link included, is refused.

* **Run files read back** (``fedup-peer show``, the page's downloads, ``verify``, the
  demo following its peers) are opened by :func:`open_regular` / :func:`read_bounded`:
  never through a symbolic link, never blocking on a FIFO planted at the name, only a
  regular file, and never more than a stated size.
* **Secrets** (the identity key, the network key) are read by
  :func:`read_private_file`: the name must be a regular file, not a symbolic link,
  owned by the current user, that group and others can neither read nor write.
* **The state folder** (:func:`check_private_dir`) must be owned by the current
  user and not writable by group or others, who could otherwise replace its files.

Refusals are one line naming the path and the fix (``chmod 600 PATH``,
``chmod 700 DIR``).  This module uses the standard library only.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from fedup.errors import FedupError, FileError

__all__ = [
    "FILE_MODE",
    "FOLDER_MODE",
    "atomic_writer",
    "check_private_dir",
    "copy_atomic",
    "create_new",
    "fsync_dir",
    "make_dirs",
    "open_append",
    "open_regular",
    "read_bounded",
    "read_private_file",
    "write_atomic",
]

FILE_MODE = 0o600
"""Mode of every file FedUp creates (the process umask can only narrow it)."""
FOLDER_MODE = 0o700
"""Mode of every folder FedUp creates."""

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # a FIFO planted at the name must not block us

StrPath = str | os.PathLike[str]


def _uid() -> int | None:
    return os.getuid() if hasattr(os, "getuid") else None


def _is_link(path: StrPath) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError:
        return False


# -- folders ------------------------------------------------------------------------


def make_dirs(path: StrPath) -> Path:
    """Create the folder ``path`` and its missing parents, each with mode 0700.

    An existing folder is kept as it is (a link the user made to a folder is
    followed), but a symbolic link owned by another user is refused with
    :class:`~fedup.errors.FileError`.  Returns ``path``; raises :class:`OSError`
    when a folder cannot be created (say a file is in the way).
    """
    path = Path(path)
    try:
        os.mkdir(path, FOLDER_MODE)
    except FileNotFoundError:
        if path.parent == path:
            raise
        make_dirs(path.parent)
        return make_dirs(path)
    except FileExistsError:
        info = os.lstat(path)
        uid = _uid()
        if stat.S_ISLNK(info.st_mode) and uid is not None and info.st_uid not in (uid, 0):
            raise FileError(
                f"{path} is a symbolic link owned by another user; refusing to write through "
                "it. Remove it, or choose another folder"
            ) from None
        if not path.is_dir():
            raise
    return path


def check_private_dir(path: StrPath, what: str = "state directory") -> None:
    """Refuse a folder that another user owns or that group or others can write.

    A symbolic link to the folder is followed and its target checked.  Raises
    :class:`~fedup.errors.FileError` (one line with the fix) or :class:`OSError`
    when the folder cannot be examined.
    """
    info = os.stat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise FileError(f"{what} {path} is not a directory")
    uid = _uid()
    if uid is not None and info.st_uid != uid:
        raise FileError(
            f"{what} {path} belongs to another user; refusing to use it. "
            "Choose a directory of your own"
        )
    if info.st_mode & 0o022:
        raise FileError(
            f"{what} {path} is writable by group or others "
            f"(mode {stat.S_IMODE(info.st_mode):04o}), who could replace its files; "
            f"refusing to use it. Restrict it with: chmod 700 {path}"
        )


# -- files FedUp writes ---------------------------------------------------------------


@contextlib.contextmanager
def atomic_writer(path: StrPath, *, durable: bool = False) -> Iterator[BinaryIO]:
    """Write ``path`` whole or not at all; yields a binary file to write into.

    The file object belongs to a new temporary file (mode 0600, created with
    ``O_EXCL | O_NOFOLLOW`` next to ``path``); when the block ends without an
    error it is flushed and renamed over ``path``, which replaces a symbolic link
    there rather than following it.  On an error the temporary file is removed
    and ``path`` is unchanged.  ``durable`` also fsyncs the file and its folder.
    """
    target = os.path.abspath(os.fspath(path))
    folder, name = os.path.split(target)
    tmp = os.path.join(folder, f".{name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(folder)


def write_atomic(path: StrPath, data: bytes, *, durable: bool = False) -> None:
    """Replace ``path`` with ``data`` as :func:`atomic_writer` does."""
    with atomic_writer(path, durable=durable) as f:
        f.write(data)


def copy_atomic(source: StrPath, path: StrPath) -> None:
    """Copy the file ``source`` to ``path`` as :func:`atomic_writer` writes."""
    with open(source, "rb") as src, atomic_writer(path) as f:
        shutil.copyfileobj(src, f)


def open_append(path: StrPath) -> BinaryIO:
    """Open ``path`` for appending, creating it with mode 0600.

    Refuses, with :class:`~fedup.errors.FileError`, a symbolic link at ``path``,
    anything but a regular file, and a file owned by another user; an existing
    file of ours that group or others may access is narrowed to 0600.
    """
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW | _CLOEXEC | _NONBLOCK
    try:
        fd = os.open(path, flags, FILE_MODE)
    except OSError as exc:
        if _is_link(path):
            raise FileError(
                f"{path} is a symbolic link; refusing to append through it. "
                f"Remove it (rm {path}) or choose another output folder"
            ) from None
        if not _is_regular(path):
            raise _not_regular(path) from None
        raise exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _not_regular(path)
        uid = _uid()
        if uid is not None and info.st_uid != uid:
            raise FileError(
                f"{path} belongs to another user; refusing to append to it. "
                f"Remove it or choose another output folder"
            )
        if info.st_mode & 0o077:
            os.fchmod(fd, FILE_MODE)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "ab")
    except BaseException:
        os.close(fd)
        raise


def create_new(path: StrPath) -> BinaryIO:
    """Create ``path`` (mode 0600) for writing; refuse if anything is already there.

    Raises :class:`~fedup.errors.FileError` when ``path`` exists, a symbolic link
    (even a dangling one) included: nothing is written through it.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, FILE_MODE)
    except FileExistsError:
        kind = "a symbolic link" if _is_link(path) else "already there"
        raise FileError(
            f"{path} is {kind}; FedUp creates this file afresh and does not write through "
            "what is there. Remove it or choose another folder"
        ) from None
    return os.fdopen(fd, "wb")


def _is_regular(path: StrPath) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return True  # nothing there (or unreadable): the open's own error is the story


def _not_regular(path: StrPath) -> FileError:
    return FileError(f"{path} is not a regular file; refusing to write to it")


def open_regular(path: StrPath) -> tuple[BinaryIO, int] | None:
    """Open regular file ``path`` to read: ``(file, size)``, or None if nothing is there.

    Never through a symbolic link (refused), never blocking on a FIFO or device planted
    at the name (opened without waiting, then refused): anything but a regular file is
    a :class:`~fedup.errors.FileError` naming the path.
    """
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC | _NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        why = "it is a symbolic link" if _is_link(path) else exc.strerror
        raise FileError(f"cannot read {path}: {why}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise FileError(f"{path} is not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb"), info.st_size


def read_bounded(path: StrPath, limit: int, *, offset: int = 0) -> bytes | None:
    """The bytes of regular file ``path`` from ``offset`` (None if it is not there), read
    as :func:`open_regular` opens it; a file larger than ``limit`` is a FileError."""
    opened = open_regular(path)
    if opened is None:
        return None
    f, size = opened
    with f:
        if size > limit:
            raise FileError(f"{path} is larger than it may be ({limit:,} bytes)")
        f.seek(offset)
        return f.read(limit - offset)


def fsync_dir(folder: StrPath) -> None:
    """Make a rename or link in ``folder`` durable (where the platform allows)."""
    with contextlib.suppress(OSError):  # not every platform can fsync a directory
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# -- secrets FedUp reads --------------------------------------------------------------


def read_private_file(
    path: StrPath, what: str, error: type[FedupError], *, max_bytes: int
) -> bytes:
    """Read at most ``max_bytes`` of a secret file, after checking who may touch it.

    ``what`` names the file in messages ("key file", "network key file"); every
    refusal raises ``error`` with one line naming the path and the fix: not
    readable, a symbolic link (not followed), not a regular file, readable or
    writable by group or others (fix: ``chmod 600 PATH``), or another user's.
    """
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC | _NONBLOCK)
    except OSError as exc:
        if _is_link(path):
            raise error(
                f"cannot read {what} {path}: it is a symbolic link, which FedUp does not "
                "follow to a secret; give the path of the file itself"
            ) from None
        raise error(f"cannot read {what} {path}: {exc.strerror}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{what} {path} is not a regular file; refusing to use it")
        if info.st_mode & 0o077:
            raise error(
                f"{what} {path} is accessible by group or others "
                f"(mode {stat.S_IMODE(info.st_mode):04o}); refusing to use it. "
                f"If it has not leaked, restrict it with: chmod 600 {path}"
            )
        uid = _uid()
        if uid is not None and info.st_uid != uid:
            raise error(f"{what} {path} belongs to another user; refusing to use it")
        os.set_blocking(fd, True)
        return os.read(fd, max_bytes)
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror}") from exc
    finally:
        os.close(fd)
