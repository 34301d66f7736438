"""The run-state file on disk: found, checked, written, set aside.

The bytes are :mod:`fedup.protocol.run_state`'s; this module adds the file: where
it lives (``<state dir>/run-state.cbor``), writing it atomically and durably
(:func:`fedup.files.write_atomic`), reading it as run files are read back
(:func:`fedup.files.open_regular`: never through a symbolic link, never waiting on a
FIFO, its size checked before it is read), and the one-line refusals a person can act
on: a file that is corrupt, truncated, from another network or of another peer
is never used and never silently discarded; the message says how to start anew.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import attrs

from fedup.config import Limits
from fedup.errors import ConfigError, FileError, RemoteProtocolError
from fedup.files import make_dirs, open_regular, write_atomic
from fedup.protocol.peer_id import PeerId
from fedup.protocol.run_state import RunState, RunStateError, decode_run_state
from fedup.protocol.view import SignedView, verify_view

log = logging.getLogger("fedup.peer")

__all__ = ["FILE_NAME", "RunStateFile", "Saved"]

FILE_NAME = "run-state.cbor"
WAY_OUT = "pass --fresh to start a new run (the file is then set aside, not deleted)"


@attrs.frozen
class Saved:
    """A run-state file that was read and checked: the state, and its view verified."""

    state: RunState
    view: SignedView


def max_run_state_size(limits: Limits) -> int:
    """The largest run-state file: a ring blob, a view and a run's chain of statements."""
    return limits.max_blob_size + limits.max_message_size + 64 * limits.max_message_size


@attrs.define
class RunStateFile:
    """One peer's run-state file (``path``), for ``peer`` on ``network``."""

    path: Path
    peer: PeerId
    network: str
    limits: Limits
    durable: bool = True
    """fsync the file and its folder at every write (off in the simulator: one process)."""

    def load(self) -> Saved | None:
        """The saved run, or None if there is none; raises
        :class:`~fedup.errors.ConfigError` (one line, with the way out) for a file that
        cannot be used."""
        limit = max_run_state_size(self.limits)
        try:
            opened = open_regular(self.path)  # never through a link, never waiting on a FIFO
        except FileError as exc:
            raise self._refused(_unreadable(self.path, exc)) from None
        if opened is None:
            return None
        f, size = opened
        with f:
            if size > limit:
                raise self._refused(f"it is {size} bytes, more than a run state can be ({limit})")
            try:
                data = f.read(limit + 1)
            except OSError as exc:
                raise self._refused(exc.strerror or str(exc)) from None
        try:
            state = decode_run_state(data, max_size=limit)
        except RunStateError as exc:
            raise self._refused(exc.reason) from None
        if state.network != self.network:
            raise self._refused(
                f"it is a run of network {state.network!r}, and this peer is on {self.network!r}"
            )
        if state.peer != self.peer:
            raise self._refused(f"it is peer {state.peer}'s, and this peer is {self.peer}")
        try:
            view = verify_view(state.view, limits=self.limits)
        except RemoteProtocolError as exc:
            raise self._refused(f"its view does not verify: {exc.reason}") from None
        if self.peer not in view.view.member_ids:
            raise self._refused("its view does not name this peer as a member")
        return Saved(state, view)

    def _refused(self, why: str) -> ConfigError:
        return ConfigError(f"cannot resume the run saved in {self.path}: {why}; {WAY_OUT}")

    def save(self, data: bytes) -> None:
        """Replace the file with ``data`` (atomic; durable unless the simulator's)."""
        write_atomic(self.path, data, durable=self.durable)

    def discard(self) -> None:
        """The run has ended here: its outputs hold what is left; no state to resume."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def set_aside(self, folder: Path) -> Path | None:
        """Move the file into ``folder`` (``--fresh``: the interrupted run's outputs),
        under a name that says it was interrupted; returns where it went, or None if
        there was no file.  Never deletes it."""
        if not os.path.lexists(self.path):  # a link or a FIFO there is set aside too
            return None
        make_dirs(folder)  # 0700, missing parents too
        target = folder / "run-state.interrupted.cbor"
        n = 1
        while os.path.lexists(target):
            n += 1
            target = folder / f"run-state.interrupted.{n}.cbor"
        os.replace(self.path, target)
        return target


def _unreadable(path: Path, exc: FileError) -> str:
    """Why the file at ``path`` cannot be read (``exc``: what :func:`open_regular` said)."""
    if path.is_symlink():
        return "it is a symbolic link, which is not followed"
    if path.exists() and not path.is_file():
        return "it is not a regular file"
    return str(exc).removeprefix(f"cannot read {path}: ")
