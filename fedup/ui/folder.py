"""A run's output folder onto a :class:`~fedup.ui.board.RunBoard`: finished, or growing.

``federation.json`` gives the run, its members in ring order and its settings;
``metrics.jsonl`` the hops this member trained, every lap's federated results
and the members declared dead; ``summary.json`` (written when the run ends)
who this member is and how the run ended.  :meth:`RunFolder.read` reads what
is new since the last call (a line still being written waits for the next), so
the demo can follow its peers' folders as they grow and ``fedup-peer show``
reads a finished one once.

The files are read as untrusted input: each is bounded in size
(:data:`MAX_JSON_BYTES`, :data:`MAX_METRICS_BYTES`), and a value of the wrong
shape is a :class:`~fedup.errors.ConfigError` naming the file and line.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedup.errors import ConfigError, FileError
from fedup.files import read_bounded
from fedup.protocol.view import settings_problem
from fedup.ui.board import LapPoint, RunBoard

__all__ = ["LINKED_FILES", "MAX_JSON_BYTES", "MAX_METRICS_BYTES", "RunFolder", "load_run"]

LINKED_FILES = (
    "summary.json",
    "federation.json",
    "metrics.jsonl",
    "model.safetensors",
    "provenance.cbor",
)
"""The run's files the page links to, when present (nothing else in the folder is served)."""

MAX_JSON_BYTES = 16 * 1024 * 1024
"""``federation.json`` and ``summary.json`` are a few KiB (the merged schema of a wide
table a few hundred KiB); a larger file is not a run's."""
MAX_METRICS_BYTES = 256 * 1024 * 1024
"""``metrics.jsonl`` holds about 250 bytes per hop and lap: 10,000 laps of 64 members
are 160 MB."""


def _read_bounded(path: Path, limit: int, offset: int = 0) -> bytes | None:
    """The bytes of regular file ``path`` from ``offset`` (None if it is not there yet)."""
    try:
        return read_bounded(path, limit, offset=offset)
    except FileError as exc:  # a symbolic link, a FIFO, too large: this run folder's fault
        raise ConfigError(str(exc)) from None


def _json(path: Path) -> dict[str, Any] | None:
    data = _read_bounded(path, MAX_JSON_BYTES)
    if data is None:
        return None
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):  # FedUp writes these whole (atomic replace)
        raise ConfigError(f"{path} is not JSON") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path} is not a JSON object")
    return value


def _int(record: Mapping[str, Any], key: str, where: str) -> int:
    value = record.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{where}: {key} is not a whole number")
    return value


def _float(record: Mapping[str, Any], key: str, where: str) -> float:
    value = record.get(key)
    if value is None:
        return math.nan
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ConfigError(f"{where}: {key} is not a number")
    return float(value)


def _text(record: Mapping[str, Any], key: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {key} is not text")
    return value


class RunFolder:
    """Reads one member's output folder onto ``board``.

    ``peer_id`` is the member whose folder it is; without it, ``summary.json``
    says (the hops read before that is known are not shown: whose they were is
    not written anywhere else).
    """

    def __init__(self, directory: Path, board: RunBoard, peer_id: str | None = None) -> None:
        self.directory = directory
        self.board = board
        self.peer_id = peer_id
        self.formed = False
        self.done = False
        self._offset = 0
        self._line = 0

    def read(self) -> None:
        """Read what is new; raises :class:`~fedup.errors.ConfigError` for a bad file."""
        board = self.board
        summary = None
        if self.peer_id is None or not self.done:  # read once for both uses below
            summary = _json(self.directory / "summary.json")
        if self.peer_id is None and summary is not None:
            self.peer_id = _text(summary, "peer_id", "summary.json")
        if not self.formed:
            federation = _json(self.directory / "federation.json")
            if federation is None:
                return
            self._formed(federation)
        self._metrics()
        if not self.done and summary is not None:
            self.done = True
            self._summary(summary)
        board.set_files(name for name in LINKED_FILES if (self.directory / name).is_file())

    def _formed(self, federation: Mapping[str, Any]) -> None:
        where = str(self.directory / "federation.json")
        members = federation.get("members")
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            raise ConfigError(f"{where}: members is not a list of peer IDs")
        settings = federation.get("settings")
        if not isinstance(settings, dict) or not all(
            isinstance(v, str | bool) or (isinstance(v, int | float) and math.isfinite(v))
            for v in settings.values()
        ):
            raise ConfigError(f"{where}: settings is not a map of finite values")
        problem = settings_problem(settings)
        if problem is not None:
            raise ConfigError(f"{where}: settings: {problem[0]} {problem[1]}")
        addresses = federation.get("addresses")
        if addresses is not None and not (
            isinstance(addresses, dict)
            and all(
                isinstance(v, list) and all(isinstance(a, str) for a in v)
                for v in addresses.values()
            )
        ):
            raise ConfigError(f"{where}: addresses is not a map of address lists")
        self.board.formed(
            run_id=_text(federation, "run_id", where),
            epoch=_int(federation, "epoch", where),
            leader=_text(federation, "leader", where),
            members=members,
            addresses=addresses,
            settings={k: v for k, v in settings.items() if isinstance(k, str)},
        )
        self.formed = True

    def _metrics(self) -> None:
        data = _read_bounded(self.directory / "metrics.jsonl", MAX_METRICS_BYTES, self._offset)
        if not data:
            return
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next read
        self._offset += end
        for raw in data[:end].splitlines():
            self._line += 1
            where = f"{self.directory / 'metrics.jsonl'} line {self._line}"
            try:
                record = json.loads(raw)
            except (ValueError, RecursionError):
                raise ConfigError(f"{where} is not JSON") from None
            if not isinstance(record, dict):
                raise ConfigError(f"{where} is not a JSON object")
            self._record(record, where)

    def _record(self, record: Mapping[str, Any], where: str) -> None:
        kind = record.get("type")
        board = self.board
        if kind == "hop" and self.peer_id is not None:
            board.hop_trained(
                self.peer_id,
                _int(record, "lap", where),
                _int(record, "hop", where),
                _float(record, "train_loss", where),
            )
        elif kind == "lap":
            board.lap_noted(
                LapPoint(
                    _int(record, "lap", where),
                    _float(record, "federated_val_loss", where),
                    _float(record, "accuracy", where),
                    _float(record, "auc", where),
                    _int(record, "samples", where),
                )
            )
        elif kind == "dead":
            peer = _text(record, "peer", where)
            if peer in board.members:  # a line naming anyone else adds no member to the page
                board.declared_dead(peer, _text(record, "why", where))

    def _summary(self, summary: Mapping[str, Any]) -> None:
        where = str(self.directory / "summary.json")
        peer = _text(summary, "peer_id", where)
        ended_by = summary.get("ended_by")
        excluded = summary.get("excluded")
        if isinstance(excluded, str):
            self.board.excluded(peer, excluded)
        self.board.finished(
            peer,
            _text(summary, "stop_reason", where),
            ended_by if isinstance(ended_by, str) else None,
            _text(summary, "model_sha256", where),
        )


def load_run(directory: Path) -> RunBoard:
    """The board of a run's output folder, read once (``fedup-peer show``).

    Raises :class:`~fedup.errors.ConfigError` when ``directory`` holds no run's
    ``federation.json`` (naming the folders of a simulation or demo, where the
    runs are one level or two below), or a file of the wrong shape.
    """
    if not directory.is_dir():
        raise ConfigError(f"{directory} is not a folder; pass a run's output folder")
    if not (directory / "federation.json").is_file():
        hint = ""
        if (directory / "peers").is_dir():
            hint = f" (for a simulation or demo: one of {directory / 'peers'}/*, or its run/)"
        raise ConfigError(
            f"{directory} holds no federation.json, so it is not a run's output folder; "
            f"pass the --out of a fedup-peer start run{hint}"
        )
    board = RunBoard(timed=False)
    folder = RunFolder(directory, board)
    folder.read()
    board.me = folder.peer_id
    if not folder.done:
        board.set_stage("stopped before it finished (no summary.json)")
    board.close()
    return board
