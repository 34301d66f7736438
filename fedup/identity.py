"""A peer's Ed25519 identity and the key file that keeps it.

The key file ``identity.key`` in the peer's state directory holds the 32-byte
Ed25519 seed as text::

    fedup-ed25519-seed-v1
    <64 hex digits>

It is created on first use with mode 0600, atomically: the key is written to a
private temporary file, flushed to disk, and hard-linked into place, which
fails if another process created the file first (then that file is used).  A
key file that cannot be read, is malformed, is a symbolic link or not a regular
file, belongs to another user, or can be read or written by group or others is
refused with :class:`IdentityError`; it is never silently replaced, because
replacing it would change the peer's identity.

The state directory is created with mode 0700 (missing parents too).  One that
belongs to another user, or that group or others can write (they could swap the
key file), is refused with :class:`~fedup.errors.FileError`.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import nacl.signing
import platformdirs

from fedup.errors import IdentityError
from fedup.files import check_private_dir, create_new, fsync_dir, make_dirs, read_private_file
from fedup.protocol.peer_id import PeerId

KEY_FILE_NAME = "identity.key"
_MAGIC = "fedup-ed25519-seed-v1"
STATE_DIR_ENV = "FEDUP_STATE_DIR"


class Identity:
    """An Ed25519 signing key and the peer ID derived from it."""

    def __init__(self, seed: bytes) -> None:
        if len(seed) != 32:
            raise ValueError("an Ed25519 seed has 32 bytes")
        self._signing_key = nacl.signing.SigningKey(seed)
        self.public_key: bytes = bytes(self._signing_key.verify_key)
        self.peer_id: PeerId = PeerId.from_public_key(self.public_key)

    @classmethod
    def generate(cls) -> Identity:
        """Make a fresh identity from the OS's secure random source."""
        return cls(secrets.token_bytes(32))

    def sign(self, message: bytes) -> bytes:
        """Return the 64-byte Ed25519 signature of ``message``."""
        return bytes(self._signing_key.sign(message).signature)

    @property
    def seed(self) -> bytes:
        """The secret seed.  Handle with care: whoever has it *is* this peer."""
        return bytes(self._signing_key)

    def __repr__(self) -> str:
        return f"Identity({self.peer_id.text})"


def default_state_dir() -> Path:
    """The state directory: ``$FEDUP_STATE_DIR`` or the platform's user data dir."""
    env = os.environ.get(STATE_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_data_dir("fedup", appauthor=False))


def load_or_create_identity(state_dir: Path) -> Identity:
    """Load the identity kept in ``state_dir``, creating it on first use.

    Creates ``state_dir`` (mode 0700, missing parents too) if needed.  Raises
    :class:`IdentityError` when the key file exists but is unusable, or when the
    directory or file cannot be created, and :class:`~fedup.errors.FileError`
    when the directory belongs to another user or group or others can write it;
    the message names the file and what to do.
    """
    try:
        make_dirs(state_dir)
        check_private_dir(state_dir)
    except OSError as exc:
        raise IdentityError(f"cannot create state directory {state_dir}: {exc.strerror}") from exc
    path = state_dir / KEY_FILE_NAME
    if not os.path.lexists(path):
        _create_key_file(path)
    return _read_key_file(path)


def _create_key_file(path: Path) -> None:
    seed = secrets.token_bytes(32)
    body = f"{_MAGIC}\n{seed.hex()}\n".encode("ascii")
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        with create_new(tmp) as f:  # 0600, never through a symbolic link
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails if another process won the race: use theirs
        except FileExistsError:
            pass
    except OSError as exc:
        raise IdentityError(f"cannot create key file {path}: {exc.strerror}") from exc
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
    fsync_dir(path.parent)


def _read_key_file(path: Path) -> Identity:
    data = read_private_file(path, "key file", IdentityError, max_bytes=4096)
    return Identity(_parse_key_file(path, data))


def _parse_key_file(path: Path, data: bytes) -> bytes:
    corrupt = IdentityError(
        f"key file {path} is corrupt (expected '{_MAGIC}' and 64 hex digits); "
        "refusing to replace it, since that would change this peer's identity. "
        "Restore it from a backup, or move it away to create a new identity"
    )
    try:
        lines = data.decode("ascii").splitlines()
    except UnicodeDecodeError:
        raise corrupt from None
    if len(lines) != 2 or lines[0] != _MAGIC or len(lines[1]) != 64:
        raise corrupt
    try:
        return bytes.fromhex(lines[1])
    except ValueError:
        raise corrupt from None
