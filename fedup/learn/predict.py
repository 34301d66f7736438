"""Use the model a finished run saved: score new rows with it.

A run's output folder (:mod:`fedup.peer.outputs`) holds everything needed:
``model.safetensors`` (the weights), ``federation.json`` (the run settings and the
merged feature schema: how rows become model inputs) and ``summary.json`` (the
model file's SHA-256).  :func:`load_model` checks them before any weight is used:

1. ``summary.json`` and ``federation.json`` are read as untrusted input, bounded
   (:data:`MAX_RUN_JSON_BYTES`), never through a symbolic link
   (:func:`fedup.files.read_bounded`); the schema is decoded with the checks a
   member applies to the one in a view, and its digest must be the one in the
   run's settings (``schema_digest``).
2. ``model.safetensors`` is read once, bounded by ``Limits.max_blob_size``, and its
   SHA-256 must be ``summary.json``'s ``model_sha256``: a model altered or replaced
   since the run saved it is refused.  (``fedup-peer verify`` checks more: that the
   federation trained it; see :mod:`fedup.commands.verify`.)
3. The model is built from the schema (the tabular MLP, ``schema.width`` inputs),
   its tensor layout must be the one the run agreed on (``model_digest``), and
   the weights are loaded from the bytes just hashed with the safetensors checks of
   :func:`fedup.learn.weights.load_safetensors_bytes` (names, dtypes, shapes,
   finite values).  Nothing is unpickled; ``torch.load`` is never called.

:func:`predict` then reads the rows (:mod:`fedup.learn.new_rows`: the schema's
columns, the training encoding, and a :class:`~fedup.learn.new_rows.RowReport` of
missing values, unknown categories and absent or ignored columns) and returns the
probability of the positive class for each row, in the rows' order (a multi-class
model: each class's probability and the most probable class; a regression model: the
predicted value, in the target's units).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import attrs
import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from fedup.config import DEFAULT_LIMITS, Limits
from fedup.errors import FedupError, FileError
from fedup.files import read_bounded
from fedup.learn.new_rows import NewRows, RowReport, read_new_rows, rows_from_records
from fedup.learn.schema import FeatureSchema, SummaryError, schema_from_dict
from fedup.learn.tabular import encode_features
from fedup.learn.targets import BINARY, MULTICLASS, REGRESSION
from fedup.learn.task import mlp
from fedup.learn.weights import layout_digest, load_safetensors_bytes

__all__ = [
    "DEFAULT_HIDDEN",
    "MAX_RUN_JSON_BYTES",
    "ModelError",
    "Predictions",
    "SavedModel",
    "load_model",
    "predict",
]

DEFAULT_HIDDEN: Final = (64, 32)
"""The hidden layers of the tabular MLP every ``fedup-peer start`` run trains."""
MAX_RUN_JSON_BYTES: Final = 16 * 1024 * 1024
"""``federation.json`` and ``summary.json`` are a few KiB (the schema of a wide table a
few hundred KiB); a larger file is not a run's (as ``fedup.ui.folder`` bounds them)."""
PROBABILITY: Final = "probability"
"""The header of the scores' column."""
_EVAL_BATCH: Final = 8192

F64 = npt.NDArray[np.float64]
Rows = str | os.PathLike[str] | Sequence[Mapping[str, object]]


class ModelError(FedupError):
    """A run's output folder does not hold a model that can be used: a file is
    missing or malformed, the model's SHA-256 is not the one the run recorded, or
    the model is not the one the run's settings describe.  One line naming the file."""


@attrs.frozen(eq=False)
class SavedModel:
    """A run's model, checked and loaded (see the module docstring)."""

    out_dir: Path
    run_id: str
    schema: FeatureSchema
    """How rows become the model's inputs (``federation.json``)."""
    model: nn.Module
    """The MLP with the run's weights, in eval mode."""
    model_sha256: str
    """SHA-256 (hex) of ``model.safetensors``, as ``summary.json`` records it."""
    run_ok: bool
    """``summary.json``'s ``ok``: the run ended by its stopping rule with a trained model."""
    stop_reason: str

    @torch.no_grad()
    def outputs(self, x: npt.NDArray[np.float32]) -> torch.Tensor:
        """The model's raw outputs (float64, ``[n, outputs]``) for encoded inputs ``x``."""
        self.model.eval()
        t = torch.from_numpy(x)
        parts = [self.model(t[i : i + _EVAL_BATCH]) for i in range(0, len(t), _EVAL_BATCH)]
        if not parts:
            return torch.zeros((0, self.schema.outputs), dtype=torch.float64)
        return torch.cat(parts).double()

    def probabilities(self, x: npt.NDArray[np.float32]) -> F64:
        """P(positive) for each row of encoded inputs ``x`` (``[n, schema.width]``); a
        multi-class model: each class's probability (``[n, K]``, the schema's class
        order); a regression model has none (``[n, 0]``)."""
        out = self.outputs(x)
        if self.schema.task == MULTICLASS:
            return torch.softmax(out, dim=1).numpy()
        if self.schema.task == REGRESSION:
            return np.zeros((len(out), 0))
        return torch.sigmoid(out.reshape(-1)).numpy()

    def values(self, x: npt.NDArray[np.float32]) -> F64:
        """A regression model's predictions in the target's units (the standardized
        output times the pooled standard deviation, plus the pooled mean); empty for a
        classifier."""
        if self.schema.task != REGRESSION:
            return np.zeros(0)
        z = self.outputs(x).reshape(-1).numpy()
        return z * self.schema.target_std + self.schema.target_mean


@attrs.frozen(eq=False)
class Predictions:
    """One score per input row, in the input's order."""

    target: str
    """The target column the model predicts."""
    id_column: str | None
    """The input column ``ids`` come from, or None: ``ids`` are row numbers from 1."""
    ids: tuple[str, ...]
    probabilities: F64
    """Binary: P(target is the positive label) per row (float64 in [0, 1]); multi-class:
    ``[n, K]``, each class's probability (:attr:`classes` order); regression: ``[n, 0]``."""
    report: RowReport
    """Missing values, unknown categories, absent and ignored columns."""
    model_sha256: str
    task: str = BINARY
    """The run's task (:mod:`fedup.learn.targets`)."""
    classes: tuple[str, ...] = ()
    """Multi-class: the classes, in the order of the probabilities' columns."""
    values: F64 = attrs.field(factory=lambda: np.zeros(0))
    """Regression: the predicted target per row, in its units (empty otherwise)."""

    @property
    def predicted(self) -> list[str]:
        """Multi-class: the most probable class per row (the first on a tie)."""
        if self.task != MULTICLASS or not len(self.probabilities):
            return []
        return [self.classes[int(i)] for i in self.probabilities.argmax(axis=1)]

    def to_csv(self) -> bytes:
        """The scores as CSV: a header (the id column's name or ``row``, then
        ``probability``) and one line per row, each probability printed exactly.  A
        multi-class model: ``predicted`` (the most probable class), then
        ``probability:CLASS`` per class; a regression model: ``predicted`` (the value)."""
        out = io.StringIO()
        w = csv.writer(out, lineterminator="\n")
        head = self.id_column or "row"
        if self.task == MULTICLASS:
            w.writerow([head, "predicted", *(f"{PROBABILITY}:{c}" for c in self.classes)])
            for row_id, cls, probs in zip(
                self.ids, self.predicted, self.probabilities, strict=True
            ):
                w.writerow([row_id, cls, *(repr(float(p)) for p in probs)])
        elif self.task == REGRESSION:
            w.writerow([head, "predicted"])
            w.writerows(zip(self.ids, (repr(float(v)) for v in self.values), strict=True))
        else:
            w.writerow([head, PROBABILITY])
            w.writerows(zip(self.ids, (repr(float(p)) for p in self.probabilities), strict=True))
        return out.getvalue().encode("utf-8")


def predict(
    out_dir: str | os.PathLike[str] | SavedModel,
    rows: Rows,
    *,
    id_column: str | None = None,
    hidden: Sequence[int] = DEFAULT_HIDDEN,
    limits: Limits = DEFAULT_LIMITS,
) -> Predictions:
    """Score ``rows`` with the model a finished run saved in ``out_dir``.

    ``out_dir`` is a run's output folder (or a :class:`SavedModel` already loaded
    from one, to score several batches).  ``rows`` is a CSV file's path (a header
    row; UTF-8) or a sequence of mappings from column name to value.  Columns are
    matched by name; the encoding is training's, and what did not fit the schema is
    in :attr:`Predictions.report` (see :mod:`fedup.learn.new_rows` for the rules).
    ``id_column`` names the column that identifies rows (default: one called
    ``id`` or ending in ``_id``, if any; else row numbers).  ``hidden`` are the
    MLP's hidden layers, for a run a library user made with other sizes.

    Raises :class:`ModelError` for an output folder whose model cannot be used
    (including a model whose SHA-256 is not ``summary.json``'s),
    :class:`~fedup.learn.weights.WeightsFileError` for a model file that is not
    the run's model, and :class:`~fedup.learn.tabular.DataError` for rows that
    cannot be scored (a numeric column with text, a column the model needs and
    never saw missing, a file that is not CSV).  Every message is one line.
    """
    saved = (
        out_dir
        if isinstance(out_dir, SavedModel)
        else load_model(out_dir, hidden=hidden, limits=limits)
    )
    new = _rows(rows, saved.schema, id_column)
    x = encode_features(new.table, saved.schema)
    return Predictions(
        target=saved.schema.target,
        id_column=new.id_column,
        ids=new.ids,
        probabilities=saved.probabilities(x),
        report=new.report,
        model_sha256=saved.model_sha256,
        task=saved.schema.task,
        classes=saved.schema.classes,
        values=saved.values(x),
    )


def _rows(rows: Rows, schema: FeatureSchema, id_column: str | None) -> NewRows:
    if isinstance(rows, str | os.PathLike):
        return read_new_rows(rows, schema, id_column=id_column)
    return rows_from_records(rows, schema, id_column=id_column)


def load_model(
    out_dir: str | os.PathLike[str],
    *,
    hidden: Sequence[int] = DEFAULT_HIDDEN,
    limits: Limits = DEFAULT_LIMITS,
) -> SavedModel:
    """Check and load the model of the run whose output folder is ``out_dir``.

    See the module docstring for the checks.  Raises :class:`ModelError` or
    :class:`~fedup.learn.weights.WeightsFileError`, one line naming the file.
    """
    folder = Path(out_dir)
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise ModelError(f"{folder} {what}; give a run's output folder (it holds {_MODEL})")
    summary = _json(folder / "summary.json")
    expected = summary.get("model_sha256")
    if not isinstance(expected, str) or len(expected) != 64 or not _is_hex(expected):
        raise ModelError(f"{folder / 'summary.json'}: model_sha256 is not a SHA-256 in hex")
    federation = _json(folder / "federation.json")
    schema = _schema(folder / "federation.json", federation)
    settings = federation.get("settings")
    if not isinstance(settings, dict):
        raise ModelError(f"{folder / 'federation.json'}: settings are not a JSON object")
    path = folder / _MODEL
    try:
        data = read_bounded(path, limits.max_blob_size)
    except FileError as exc:
        raise ModelError(str(exc)) from None
    if data is None:
        raise ModelError(f"no {_MODEL} in {folder}: the run saved no model")
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected.lower():
        raise ModelError(
            f"{path}: SHA-256 {actual[:16]}... is not the {expected[:16]}... summary.json "
            "records; the model was altered or replaced since the run saved it, refusing "
            "to use it"
        )
    model = mlp(schema.width, tuple(hidden), schema.outputs)
    if layout_digest(model).hex() != settings.get("model_digest"):
        raise ModelError(
            f"{path}: the run's model is not the tabular MLP with hidden layers "
            f"{tuple(hidden)} on {schema.width} inputs (its layout digest differs from "
            "federation.json's model_digest); pass the hidden sizes the run used"
        )
    model.load_state_dict(load_safetensors_bytes(data, like=model, source=str(path), limits=limits))
    model.eval()
    run_id = federation.get("run_id")
    stop = summary.get("stop_reason")
    return SavedModel(
        out_dir=folder,
        run_id=run_id if isinstance(run_id, str) else "",
        schema=schema,
        model=model,
        model_sha256=actual,
        run_ok=summary.get("ok") is True,
        stop_reason=stop if isinstance(stop, str) else "",
    )


_MODEL: Final = "model.safetensors"


def _json(path: Path) -> dict[str, Any]:
    try:
        data = read_bounded(path, MAX_RUN_JSON_BYTES)
    except FileError as exc:
        raise ModelError(str(exc)) from None
    if data is None:
        raise ModelError(
            f"no {path.name} in {path.parent}: not the output folder of a finished run"
        )
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        raise ModelError(f"{path} is not JSON") from None
    if not isinstance(value, dict):
        raise ModelError(f"{path} is not a JSON object")
    return value


def _schema(path: Path, federation: Mapping[str, Any]) -> FeatureSchema:
    value = federation.get("schema")
    if value is None:
        raise ModelError(
            f"{path}: the run has no feature schema (a library task of its own); "
            "predict scores the tabular model that fedup-peer start trains"
        )
    try:
        schema = schema_from_dict(value)
    except SummaryError as exc:
        raise ModelError(f"{path}: {exc.reason}") from None
    settings = federation.get("settings")
    agreed = settings.get("schema_digest") if isinstance(settings, dict) else None
    if schema.digest() != agreed:
        raise ModelError(
            f"{path}: the schema is not the one the run agreed on (its digest is not "
            "the settings' schema_digest)"
        )
    return schema


def _is_hex(text: str) -> bool:
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return True
