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
* The JSON files are strict JSON: a figure that does not exist (NaN or
  infinity in Python) is ``null``.
* ``provenance.cbor``: the final model's provenance (the signed view, the dead
  notices, every hop's signed statement and the final seal), written with the
  model; ``fedup-peer verify`` checks it (:mod:`fedup.protocol.provenance`).

Before a peer joins anything, :func:`check_out_dir` makes sure it can write
its output folder: one it can create, its own, writable, not a symbolic link,
and holding no earlier run's files (which this run would overwrite, or append
to in ``metrics.jsonl``) nor a symbolic link at one of their names.

The folder is created with mode 0700 and every file with mode 0600
(:mod:`fedup.files`).  The model and the JSON files are replaced atomically (a
symbolic link at their name is replaced, not followed); ``metrics.jsonl`` is
opened for appending when the outputs are made, never through a symbolic link
(one there is refused with :class:`~fedup.errors.FileError`).
"""

from __future__ import annotations

import json
import math
import os
import stat
import tempfile
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import attrs
import torch

from fedup.errors import ConfigError, FileError
from fedup.files import make_dirs, open_append, write_atomic
from fedup.learn.ring import LapResult
from fedup.learn.schema import FeatureSchema
from fedup.learn.task import Task
from fedup.learn.weights import save_safetensors, write_safetensors_parts
from fedup.protocol.view import SignedView, run_settings_json

RUN_FILES = (
    "metrics.jsonl",
    "model.safetensors",
    "summary.json",
    "federation.json",
    "provenance.cbor",
    "personal.safetensors",
)
"""What a run writes into its output folder."""


def check_out_dir(directory: Path, *, outputs: Collection[str] = RUN_FILES) -> None:
    """Make sure a run can write into ``directory``; done before the peer joins anything.

    Creates ``directory`` (and its parents) if needed.  Raises
    :class:`~fedup.errors.ConfigError`, naming the folder and the fix, when it is
    a symbolic link (the folder it points to must be given itself), not a
    directory, cannot be created, belongs to another user, already holds one of
    ``outputs`` (another run's files, which this run would overwrite or append
    to), or is not writable (checked by creating and removing a file in it).
    """
    if directory.is_symlink():
        raise ConfigError(
            f"output directory {directory} is a symbolic link; "
            f"pass the folder it points to ({directory.resolve()}) as --out"
        )
    if os.path.lexists(directory) and not directory.is_dir():
        raise ConfigError(f"output path {directory} is not a directory; pass a folder as --out")
    try:
        make_dirs(directory)
    except OSError as exc:
        raise ConfigError(
            f"cannot create output directory {directory}: {exc.strerror}; "
            "pass an --out where you can write"
        ) from None
    info = directory.lstat()
    if not stat.S_ISDIR(info.st_mode):  # replaced since the checks above
        raise ConfigError(f"output path {directory} is not a directory; pass a folder as --out")
    if info.st_uid != os.geteuid():
        raise ConfigError(
            f"output directory {directory} belongs to another user (uid {info.st_uid}); "
            "pass an --out of your own"
        )
    held = sorted(name for name in outputs if os.path.lexists(directory / name))
    links = [name for name in held if (directory / name).is_symlink()]
    if links:
        raise FileError(
            f"{directory / links[0]} is a symbolic link; refusing to write through it. "
            "Remove it, or pass a new --out"
        )
    if held:
        raise ConfigError(
            f"output directory {directory} already holds another run's files "
            f"({', '.join(held)}); pass a new --out, or move them away"
        )
    try:
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".fedup-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(
            f"output directory {directory} is not writable ({exc.strerror}); "
            "pass an --out where you can write"
        ) from None


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
    """The final model on this peer's own validation split (``null`` in ``summary.json``
    if it has no validation row: :data:`~fedup.learn.task.MIN_ROWS` rules that out for a
    table, not for a library task)."""
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
    dp: dict[str, Any] | None = None
    """This member's differential privacy (``epsilon_spent``, ``epsilon``, ``delta``,
    ``noise_multiplier``, ``clip``, ...: :meth:`fedup.learn.privacy.PrivateTraining.report`),
    or None when it trained without.  A local figure: the other members' differ."""
    task: str = "binary"
    """The table's task (``binary``, ``multiclass``, ``regression``: :mod:`fedup.learn.targets`);
    a library task of its own counts as binary."""
    final_val: dict[str, Any] | None = None
    """The final model on this member's own validation split, as the task's figures
    (:meth:`fedup.learn.task.Task.figures`): ``loss``, ``accuracy``, ``auc`` (binary);
    ``loss``, ``accuracy``, ``macro_f1`` (multi-class); ``loss`` (the standardized MSE),
    ``mse``, ``mae``, ``r2`` in the target's units (regression)."""
    personal: dict[str, Any] | None = None
    """This member's personal model (``personal.safetensors``, never sent): ``layers``
    (K), ``own_val`` (the personal model), ``shared_own_val`` (the federation's) and
    ``local_only_own_val`` (the same model trained on this member's data alone), each
    ``{loss, auc, accuracy}`` on this member's own validation split, plus ``epochs``,
    ``best_epoch``, ``intercept``, ``selected_on`` (``"training holdout"``: the
    validation split was not used to choose), ``holdout_rows`` and ``pull`` of the
    fine-tuning
    (:class:`fedup.learn.personal.PersonalResult`); None without."""

    def to_json(self) -> dict[str, Any]:
        """Its fields as a dict (what :func:`attrs.asdict` gives: the lists copied); built
        field by field, as every member writes it twice with a list of every member."""
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), list) else v
            for f in attrs.fields(RunSummary)
        }


class RunOutputs:
    """Writes a run's files into ``directory``.

    Making one creates the folder (mode 0700) and opens ``metrics.jsonl`` for
    appending, so that an unusable folder is refused before the run needs it:
    :class:`~fedup.errors.FileError` (a symbolic link at ``metrics.jsonl``, say)
    or :class:`OSError` (the folder cannot be created).
    """

    def __init__(self, directory: Path, *, durable: bool = True) -> None:
        self.directory = directory
        self.durable = durable
        """Whether the model file is fsynced (a real peer's; a simulated one's is not)."""
        make_dirs(directory)
        self.metrics_path = directory / "metrics.jsonl"
        self.model_path = directory / "model.safetensors"
        self.summary_path = directory / "summary.json"
        self.federation_path = directory / "federation.json"
        self.provenance_path = directory / "provenance.cbor"
        self._laps_logged: set[int] = set()
        self._metrics: BinaryIO | None = open_append(self.metrics_path)

    def log(self, record: Mapping[str, Any]) -> None:
        """Append one metrics line (flushed, so progress is visible while training).

        After :meth:`close`, the file is opened again, never through a symbolic link.
        """
        if self._metrics is None:
            self._metrics = open_append(self.metrics_path)
        self._metrics.write((json.dumps(json_safe(record), allow_nan=False) + "\n").encode())
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

    def save_model_file(self, parts: Sequence[bytes | memoryview]) -> str:
        """Write ``model.safetensors`` from the bytes
        :func:`~fedup.learn.weights.safetensors_parts` made; returns its SHA-256 (hex)."""
        return write_safetensors_parts(parts, self.model_path, durable=self.durable)

    def save_provenance(self, data: bytes) -> None:
        """Write ``provenance.cbor`` (replaced atomically, like the JSON files)."""
        write_atomic(self.provenance_path, data)

    def save_federation(self, text: bytes) -> None:
        """Write ``federation.json`` from its encoded text (:func:`federation_json`)."""
        write_atomic(self.federation_path, text)

    def save_summary(self, summary: RunSummary) -> None:
        self._write_json(self.summary_path, summary.to_json())

    def _write_json(self, path: Path, value: Mapping[str, Any]) -> None:
        """Replace ``path`` atomically: a reader never sees half a file."""
        write_atomic(path, encode_json(value))


def lap_line(task: Task, h: LapResult) -> dict[str, Any]:
    """A ``metrics.jsonl`` lap line's figures: ``lap``, ``federated_val_loss`` (the loss
    the stopping rule judges), the task's figures, ``n``, ``samples``.  Binary:
    ``accuracy``, ``auc``; multi-class: ``accuracy``, ``macro_f1``; regression: ``mse``
    (the loss in the target's units), ``mae``, ``r2``."""
    metrics = task.metrics
    kind = "binary" if metrics is None else metrics.kind
    figures: dict[str, Any]
    if kind == "regression":
        std = getattr(metrics, "std", 1.0)
        figures = {"mse": h.loss * std * std, "mae": h.accuracy, "r2": h.auc}
    else:
        second = "macro_f1" if kind == "multiclass" else "auc"
        figures = {"accuracy": h.accuracy, second: h.auc}
    line = {"lap": h.lap, "federated_val_loss": h.loss, **figures, "n": h.n, "samples": h.samples}
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in line.items()}


def shown_figures(task: Task, h: LapResult) -> tuple[float, float]:
    """The accuracy and AUC a live display shows for a lap: a lap record's two figures
    for a binary task, its accuracy alone for a multi-class one (the other is the
    macro-F1), none for a regression (MAE and R²): NaN is not shown."""
    metrics = task.metrics
    if metrics is None:
        return h.accuracy, h.auc
    return (h.accuracy if metrics.kind == "multiclass" else math.nan), math.nan


def encode_json(value: Mapping[str, Any]) -> bytes:
    """The text of one of the JSON files, indented for people to read.

    JSON has no NaN or infinity: a figure that does not exist (a loss over no
    validation rows, say) is written as ``null`` (:func:`json_safe`).
    """
    try:
        text = json.dumps(value, indent=2, allow_nan=False)
    except ValueError:  # a NaN or infinity somewhere (rare): walk the value once
        text = json.dumps(json_safe(value), indent=2, allow_nan=False)
    return (text + "\n").encode("utf-8")


def json_safe(value: Any) -> Any:
    """``value`` with every NaN or infinite float (in dicts, lists, tuples) made None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


_federation_texts: dict[tuple[bytes, str | None], bytes] = {}
_FEDERATION_TEXTS_KEPT = 4


def federation_json(signed: SignedView, schema: FeatureSchema | None) -> bytes:
    """The text of ``federation.json`` for a view (the run, the members and their
    addresses, the settings, the schema): the same for every member, so made once per
    process and view (the simulator's thousand members share one)."""
    key = (signed.envelope, schema.digest() if schema is not None else None)
    text = _federation_texts.get(key)
    if text is None:
        view = signed.view
        text = encode_json(
            {
                "run_id": view.run_id.hex(),
                "epoch": view.epoch,
                "leader": view.leader.text,
                "members": [m.peer_id.text for m in view.members],
                "addresses": {
                    m.peer_id.text: [str(a) for a in m.record.addresses] for m in view.members
                },
                "settings": run_settings_json(view.settings),
                "schema": schema.to_dict() if schema is not None else None,
            }
        )
        while len(_federation_texts) >= _FEDERATION_TEXTS_KEPT:
            del _federation_texts[next(iter(_federation_texts))]
        _federation_texts[key] = text
    return text
