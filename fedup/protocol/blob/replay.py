"""The replay guard: what a receiver has accepted per run, so old blobs are refused."""

from __future__ import annotations

import collections

from fedup.protocol.blob.errors import BlobReplayError
from fedup.protocol.blob.header import BlobHeader

__all__ = ["BlobReplayGuard"]


class BlobReplayGuard:
    """What this peer has accepted per run; refuses old and repeated blobs.

    Rules: a ``model`` blob's ``(lap, hop)`` must be strictly greater
    (lexicographically) than the last accepted for its run; a ``final`` blob
    is accepted once per run, and after it no ``model`` blob of that run.
    :meth:`check` looks; :meth:`commit` (once the digest verified) re-checks
    and records, so a transfer that fails half-way can be retried.  At most
    ``max_runs`` runs are remembered, the oldest forgotten first (a forgotten
    run's blobs are still refused by the run check unless it is the current run).
    """

    def __init__(self, *, max_runs: int = 1024) -> None:
        self._high: collections.OrderedDict[bytes, tuple[int, int]] = collections.OrderedDict()
        self._finals: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._max_runs = max_runs

    def high_water(self, run_id: bytes) -> tuple[int, int] | None:
        """The last accepted ``(lap, hop)`` of ``run_id``, or None."""
        return self._high.get(run_id)

    def has_final(self, run_id: bytes) -> bool:
        """Whether the final model of ``run_id`` was accepted."""
        return run_id in self._finals

    def check(self, header: BlobHeader) -> None:
        """Raise :class:`BlobReplayError` if ``header`` is not new for its run."""
        run = header.run_id
        if run in self._finals:
            if header.kind == "final":
                raise BlobReplayError(
                    f"final model of run {run.hex()} was already accepted (replay?)"
                )
            raise BlobReplayError(
                f"lap {header.lap} hop {header.hop} arrived after the final model of run "
                f"{run.hex()} (stale)"
            )
        high = self._high.get(run)
        if header.kind == "model" and high is not None and (header.lap, header.hop) <= high:
            raise BlobReplayError(
                f"lap {header.lap} hop {header.hop} is not newer than "
                f"lap {high[0]} hop {high[1]} (replay?)"
            )

    def commit(self, header: BlobHeader) -> None:
        """Record ``header`` as accepted; raises :class:`BlobReplayError` like :meth:`check`."""
        self.check(header)
        run = header.run_id
        if header.kind == "final":
            self._finals[run] = None
            self._finals.move_to_end(run)
            if len(self._finals) > self._max_runs:
                self._finals.popitem(last=False)
        else:
            self._high[run] = (header.lap, header.hop)
            self._high.move_to_end(run)
            if len(self._high) > self._max_runs:
                self._high.popitem(last=False)
