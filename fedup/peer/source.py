"""Where a peer's task comes from, before and after the federation agrees on a schema.

A :class:`TaskSource` has two steps.  Before the view: :meth:`summary` says what
may be shared about the local data (column names, types, vocabularies,
counts, means, variances; never rows), or None for a task without a schema.
After the view: :meth:`build` makes the :class:`~fedup.learn.task.Task` under
the federation's schema and settings.

* :class:`TabularSource`: a CSV (or the synthetic lender data) and the small MLP.
* :class:`FixedTaskSource`: a task the library user built (any ``nn.Module``).

Where a task trains (the CPU or a CUDA device, :mod:`fedup.learn.device`) is the
source's own choice (``TabularSource(device=...)``; a built task's
:attr:`~fedup.learn.task.Task.device`): it is no part of the summary, the view or
the model digest, so members with and without a GPU federate together.

Personalization (``personal_layers``) is a local choice too: see
:mod:`fedup.peer.personal`.

Differential privacy is the same kind of local choice (``TabularSource(privacy=
DpBudget(...))``, :mod:`fedup.learn.privacy`): the budget and the accountant stay in
the source, for the whole run, and nothing of them is in the summary, the view or the
model digest.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable
from pathlib import Path

import torch

from fedup.errors import ConfigError
from fedup.files import make_dirs
from fedup.learn.device import choose_device
from fedup.learn.loans import generate_lender, seed_from_peer_id
from fedup.learn.personal import layers_of
from fedup.learn.privacy import DpBudget, PrivateTraining
from fedup.learn.schema import FeatureSchema, fits, schema_from_dict, unused_columns
from fedup.learn.tabular import Table, read_csv, split, summarize
from fedup.learn.task import SPLIT_SEED, VAL_FRACTION, TabularTask, Task, check_rows
from fedup.learn.weights import layout_digest
from fedup.protocol.view import RunSettings


class TaskSource(abc.ABC):
    """A peer's task, in the two steps of the federation."""

    kind: str = "task"
    """Task family; peers of different families do not federate."""
    target: str | None = None
    """The target column, for schema agreement (None: no schema)."""
    personal_layers: int = 0
    """This member's personal layers K (0: none): after the run it fine-tunes the shared
    model's last K layers on its own data into ``personal.safetensors``
    (:mod:`fedup.peer.personal`).  A local choice, in no view and no digest."""

    @abc.abstractmethod
    def summary(self) -> dict[str, object] | None:
        """What this peer shares before the view (None: nothing)."""

    @abc.abstractmethod
    def build(self, schema: FeatureSchema | None, settings: RunSettings) -> Task:
        """The task under the federation's schema and settings."""

    def check_schema(self, schema: FeatureSchema) -> None:  # noqa: B027 (optional hook)
        """Raise :class:`~fedup.learn.schema.SchemaMismatchError` if the local data do not fit."""

    def unused_columns(self, schema: FeatureSchema) -> list[str]:
        """The local columns ``schema`` leaves out (not every member has them)."""
        return []

    def parse_schema(self, value: object) -> FeatureSchema | None:
        """Rebuild the schema carried by a view (raises SummaryError)."""
        return None if value is None else schema_from_dict(value)


class TabularSource(TaskSource):
    """A table with a binary, multi-class or numeric target (its :attr:`Table.task
    <fedup.learn.tabular.Table.task>`), trained with the built-in MLP on ``device``."""

    kind = "tabular-mlp"

    def __init__(
        self,
        table: Table,
        *,
        target: str,
        hidden: tuple[int, ...] = (64, 32),
        device: str | torch.device = "cpu",
        privacy: DpBudget | None = None,
        personal_layers: int = 0,
    ) -> None:
        """``device`` is where this peer trains: ``cpu`` (the default here; the
        command line's ``--device`` defaults to ``auto``), ``auto``, ``cuda`` or
        ``cuda:N`` (see :func:`~fedup.learn.device.choose_device`), chosen now.

        Raises :class:`~fedup.learn.tabular.DataError` for a table with fewer than
        :data:`~fedup.learn.task.MIN_ROWS` rows (too few to split for validation),
        :class:`~fedup.learn.device.DeviceError` for a CUDA device this machine does
        not have and ``ValueError`` for a ``device`` of no known form.

        ``privacy`` makes this member train every hop with DP-SGD within that budget
        (:mod:`fedup.learn.privacy`; :class:`~fedup.learn.privacy.DpError` when Opacus
        is not installed).

        ``personal_layers`` K > 0 makes this member fine-tune the shared model's last K
        layers on its own data after the run (:mod:`fedup.peer.personal`); a one-line
        :class:`~fedup.errors.ConfigError` when the MLP has fewer layers (it has
        ``len(hidden) + 1``)."""
        check_rows(table)
        self.personal_layers = check_personal_layers(
            personal_layers, len(hidden) + 1, private=privacy is not None
        )
        self.privacy = PrivateTraining(privacy) if privacy is not None else None
        self.device = choose_device(device)
        self.table = table
        self.target = target
        self.hidden = hidden
        # Only the training split's statistics are shared: the split TabularTask makes.
        # They are kept, not the split (a copy of most of the table, per peer).
        train, _ = split(table, val_fraction=VAL_FRACTION, seed=SPLIT_SEED)
        self._summary = summarize(train)

    @classmethod
    def from_csv(
        cls,
        path: Path,
        target: str,
        *,
        drop: Iterable[str] = (),
        positive_label: str | None = None,
        device: str | torch.device = "cpu",
        privacy: DpBudget | None = None,
        personal_layers: int = 0,
        task: str | None = None,
    ) -> TabularSource:
        """Read a CSV without the ``drop`` columns, ``positive_label`` being the target's
        positive class (default: inferred, see :func:`~fedup.learn.tabular.parse_target`),
        to train on ``device`` (see :class:`TabularSource`).  ``task`` is ``binary``,
        ``multiclass`` or ``regression``; None infers it from the target's values
        (:mod:`fedup.learn.targets`).

        Raises :class:`~fedup.learn.tabular.DataError` with a clear reason (a ``drop``
        column the file does not have, a ``positive_label`` the target does not have,
        too few rows, ...).
        """
        table = read_csv(path, target, drop=drop, positive_label=positive_label, task=task)
        return cls(
            table, target=target, device=device, privacy=privacy, personal_layers=personal_layers
        )

    @classmethod
    def synthetic(
        cls,
        peer_id: str,
        directory: Path,
        *,
        drop: Iterable[str] = (),
        positive_label: str | None = None,
        device: str | torch.device = "cpu",
        privacy: DpBudget | None = None,
        personal_layers: int = 0,
        task: str | None = None,
    ) -> TabularSource:
        """This peer's synthetic lender (deterministic from its peer ID), written to a CSV
        in ``directory`` so the user can see what was used (folder 0700, file 0600; see
        :mod:`fedup.files`), then read like :meth:`from_csv`."""
        data = generate_lender(seed_from_peer_id(peer_id))
        make_dirs(directory)
        path = directory / "synthetic-loans.csv"
        data.write_csv(path)
        return cls.from_csv(
            path, "default", drop=drop, positive_label=positive_label, device=device,
            privacy=privacy, personal_layers=personal_layers, task=task,
        )  # fmt: skip

    def summary(self) -> dict[str, object]:
        return self._summary.to_dict()

    def check_schema(self, schema: FeatureSchema) -> None:
        fits(self._summary, schema)

    def unused_columns(self, schema: FeatureSchema) -> list[str]:
        return unused_columns(self._summary, schema)

    def build(self, schema: FeatureSchema | None, settings: RunSettings) -> Task:
        if schema is None:
            raise ValueError("a tabular task needs the federation's schema")
        task = TabularTask(
            self.table,
            schema,
            hidden=self.hidden,
            batch_size=settings.batch_size,
            lr=settings.lr,
            device=self.device,
            privacy=self.privacy,
        )
        if self.privacy is not None:
            self.privacy.plan(
                n_train=task.n_train,
                batch_size=settings.batch_size,
                hop_epochs=settings.local_epochs,
                max_laps=settings.member_hops,
            )
        return task


class FixedTaskSource(TaskSource):
    """A task the library user built; every member must bring the same architecture."""

    kind = "custom"

    def __init__(self, task: Task, *, personal_layers: int = 0) -> None:
        """``personal_layers``: see :attr:`TaskSource.personal_layers` (checked against
        the model's ``Linear``/``Conv`` layers now)."""
        self.task = task
        model = task.build_model(0) if personal_layers else None
        self.personal_layers = check_personal_layers(
            personal_layers, len(layers_of(model)) if model is not None else 0
        )

    def summary(self) -> None:
        return None

    def build(self, schema: FeatureSchema | None, settings: RunSettings) -> Task:
        return self.task


def check_personal_layers(k: int, layers: int, *, private: bool = False) -> int:
    """``k`` if it is a layer count from 0 to ``layers``; else a one-line
    :class:`~fedup.errors.ConfigError` (also for K > 0 with DP training, ``private``:
    the fine-tuning would train outside the DP budget's plan)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ConfigError(f"--personal-layers {k!r}: give a whole number of layers, 0 for none")
    if k and private:
        raise ConfigError(
            "--personal-layers with --dp-epsilon is not supported: personal fine-tuning "
            "would spend beyond the DP budget's plan; drop one of them"
        )
    if k > layers:
        raise ConfigError(
            f"--personal-layers {k}: the model has {layers} Linear/Conv layers; "
            f"give a number from 0 to {layers}"
        )
    return k


def model_digest(task: Task, seed: int) -> bytes:
    """SHA-256 of the model's tensor layout (names, dtypes, shapes): members must agree."""
    return layout_digest(task.build_model(seed).state_dict())
