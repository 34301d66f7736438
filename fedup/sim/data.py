"""The data of simulated peers: synthetic lenders or a CSV, dealt out by a partition spec.

Partition specs (see :func:`fedup.learn.loans.partition`):

* ``lender`` (synthetic data only, the default there): one synthetic lender
  per peer, each with its own customers: the natural non-IID case;
* ``iid``: all rows shuffled and dealt evenly (the default for a CSV);
* ``dirichlet:ALPHA``: label skew, each label's rows split in Dirichlet(ALPHA)
  proportions (small ALPHA: strong skew);
* ``column:NAME``: the values of column NAME (e.g. ``column:region``) grouped
  into the number of peers asked for (:func:`fedup.learn.loans.group_by_rows`: largest value
  first, each to the group with the fewest rows so far), or one peer per
  value when no number is given.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from fedup.learn.loans import generate_lender, lender_seed, partition
from fedup.learn.privacy import DpBudget
from fedup.learn.tabular import DataError, Table, read_csv
from fedup.peer import TabularSource

__all__ = ["DEFAULT_PEERS", "csv_tables", "sources_of", "synthetic_tables"]

DEFAULT_PEERS = 5
"""Peers (synthetic lenders) when no number is given."""


def synthetic_tables(
    n_peers: int | None, spec: str = "lender", *, seed: int = 0, n_rows: int | None = None
) -> list[Table]:
    """``n_peers`` synthetic lenders (population ``seed``), dealt out by ``spec``.

    ``n_peers`` None: :data:`DEFAULT_PEERS` lenders, and for ``column:NAME`` one peer
    per value; a number: that many lenders and, for ``column:NAME``, their values
    grouped into that many peers (:func:`~fedup.learn.loans.group_by_rows`).  ``n_rows`` fixes every
    lender's size (default: drawn from its seed, 1,500 to 5,000).  Raises
    :class:`~fedup.learn.tabular.DataError` for an unknown spec or one that cannot
    be met (more peers than the column has values).
    """
    n_lenders = DEFAULT_PEERS if n_peers is None else n_peers
    if n_lenders < 1:
        raise DataError("a simulation needs at least one peer")
    lenders = [generate_lender(lender_seed(seed, i), n_rows).table for i in range(n_lenders)]
    return _dealt(lenders, spec, n_peers, seed)


def csv_tables(
    path: Path,
    target: str,
    n_peers: int | None,
    spec: str = "iid",
    *,
    seed: int = 0,
    drop: Iterable[str] = (),
    positive_label: str | None = None,
    task: str | None = None,
) -> list[Table]:
    """The rows of one CSV dealt out to ``n_peers`` peers by ``spec`` (not ``lender``).

    ``n_peers`` None: :data:`DEFAULT_PEERS`, and for ``column:NAME`` one peer per
    value (a number groups the values, :func:`~fedup.learn.loans.group_by_rows`).  ``drop``,
    ``positive_label`` and ``task`` are :func:`~fedup.learn.tabular.read_csv`'s
    (``task`` None: inferred from the whole file, so every peer has the same).  Raises
    :class:`~fedup.learn.tabular.DataError` for an unusable file or spec.
    """
    if spec == "lender":
        raise DataError(
            "partition 'lender' is for synthetic data; use iid, dirichlet:A or column:NAME"
        )
    table = read_csv(path, target, drop=drop, positive_label=positive_label, task=task)
    return _dealt([table], spec, n_peers, seed)


def _dealt(tables: Sequence[Table], spec: str, n_peers: int | None, seed: int) -> list[Table]:
    """``tables`` dealt out by ``spec``; ``column:NAME`` values grouped into ``n_peers``
    (None: one peer per value)."""
    if spec.startswith("column:"):
        return partition(tables, spec, n_peers, seed=seed)
    return partition(tables, spec, DEFAULT_PEERS if n_peers is None else n_peers, seed=seed)


def sources_of(
    tables: Sequence[Table],
    *,
    hidden: tuple[int, ...] = (64, 32),
    device: str | torch.device = "cpu",
    privacy: Sequence[DpBudget | None] = (),
    personal_layers: int = 0,
) -> list[TabularSource]:
    """One :class:`~fedup.peer.TabularSource` (the built-in MLP) per table, each
    training on ``device`` (see :func:`~fedup.learn.device.choose_device`), the i-th
    with the DP budget ``privacy[i]`` (none when absent or None), each with
    ``personal_layers`` (see :mod:`fedup.peer.personal`)."""
    return [
        TabularSource(
            t,
            target=t.target_name,
            hidden=hidden,
            device=device,
            privacy=privacy[i] if i < len(privacy) else None,
            personal_layers=personal_layers,
        )
        for i, t in enumerate(tables)
    ]
