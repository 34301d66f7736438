"""What a finished run leaves in its output folder.

* ``metrics.jsonl``: one JSON object per line, appended as training goes:
  ``{"type": "hop", ...}`` for each hop this peer trained and
  ``{"type": "lap", ...}`` for each lap whose federated validation loss this
  peer learned (from the ring metadata).
* ``model.safetensors``: the final model, byte-identical on every member.
* ``summary.json``: the run in one object (see :class:`RunSummary`).
* ``federation.json``: what the members agreed on, written when training
  starts: run ID, leader, members in ring order, the run settings and the
  merged feature schema (how rows become model inputs: needed to use the
  model, and to score it on the same encoding).
* ``provenance.cbor``: the final model's provenance (the signed view, the dead
  notices, every hop's signed statement and the final seal), written with the
  model; ``fedup-peer verify`` checks it (:mod:`fedup.protocol.provenance`).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

import attrs
import torch

from fedup.learn.weights import save_safetensors
from fedup.protocol.view import RunSettings


@attrs.frozen
class RunSummary:
    """``summary.json``; also what :meth:`fedup.peer.Peer.train` returns."""

    run_id: str
    peer_id: str
    leader: str
    members: list[str]
    """Peer IDs in ring order."""
    laps: int
    """Training laps done."""
    converged: bool
    stop_reason: str
    """``converged``, ``max-laps`` or ``members-lost`` (this member could reach no other)."""
    federated_val_loss: list[float]
    """One value per evaluated lap, in order (lap -1 is the initial model)."""
    federated_laps: list[int]
    best_lap: int
    final_val_loss: float
    """The final model on this peer's own validation split."""
    final_val_accuracy: float
    data_passes: float
    """Passes over the federation's data until the best lap ended."""
    model_sha256: str
    dead: list[str]
    """Members skipped because they could not be reached."""
    model_bytes_sent: int
    """Payload bytes of the model blobs this peer handed on (custody taken), the final
    model's included; each blob's header, signatures and encryption add a few hundred
    bytes more."""
    out_dir: str
    excluded: str | None = None
    """Why the other members counted this one as dead while it was alive (slow, or cut
    off for a while), or None.  An excluded member trains no more; it receives the final
    model from the member that ends the run and saves it like every other member."""
    ended_by: str | None = None
    """The member whose hop ended the run (the one that sealed the final model)."""
    ok: bool = True
    """The run ended by its stopping rule (``converged`` or ``max-laps``) with a trained
    model; False for ``members-lost`` or a final model from no trained lap.  The
    ``start`` command exits with code 0 only when this is true."""

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


def run_settings_json(run: RunSettings) -> dict[str, Any]:
    """The run settings as JSON (digests in hex)."""
    return {k: v.hex() if isinstance(v, bytes) else v for k, v in attrs.asdict(run).items()}


class RunOutputs:
    """Writes a run's files into ``directory`` (created if needed)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.metrics_path = directory / "metrics.jsonl"
        self.model_path = directory / "model.safetensors"
        self.summary_path = directory / "summary.json"
        self.federation_path = directory / "federation.json"
        self.provenance_path = directory / "provenance.cbor"
        self._laps_logged: set[int] = set()
        self._metrics: TextIO | None = None

    def log(self, record: Mapping[str, Any]) -> None:
        """Append one metrics line (flushed, so progress is visible while training).

        The file is opened once, for appending, never through a symbolic link.
        """
        if self._metrics is None:
            fd = os.open(
                self.metrics_path,
                os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0),
                0o644,
            )
            self._metrics = os.fdopen(fd, "a", encoding="utf-8")
        self._metrics.write(json.dumps(record, allow_nan=True) + "\n")
        self._metrics.flush()

    def close(self) -> None:
        """Close the metrics file (a later :meth:`log` opens it again)."""
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None

    def log_lap(self, record: Mapping[str, Any]) -> None:
        """Append a lap line once per lap."""
        lap = int(record["lap"])
        if lap in self._laps_logged:
            return
        self._laps_logged.add(lap)
        self.log({"type": "lap", **record})

    def save_model(self, weights: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> str:
        """Write ``model.safetensors``; returns its SHA-256 (hex)."""
        return save_safetensors(dict(weights), self.model_path, metadata=metadata)

    def save_provenance(self, data: bytes) -> None:
        """Write ``provenance.cbor`` (replaced atomically, like the JSON files)."""
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".provenance.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, self.provenance_path)

    def save_federation(self, record: Mapping[str, Any]) -> None:
        self._write_json(self.federation_path, record)

    def save_summary(self, summary: RunSummary) -> None:
        self._write_json(self.summary_path, summary.to_json())

    def _write_json(self, path: Path, value: Mapping[str, Any]) -> None:
        """Replace ``path`` atomically: a reader never sees half a file."""
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{path.stem}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(value, f, indent=2, allow_nan=True)
            f.write("\n")
        os.replace(tmp, path)
