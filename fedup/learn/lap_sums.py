"""The federation's validation sums, as they travel: masked, so no neighbour reads one member.

Each hop adds its evaluation of the lap's candidate to sums that travel with the
model (:mod:`fedup.learn.ring`).  In the clear, the member after the lap's first
hop would read that member's exact figures (validation count, correct
predictions, loss, score histograms), and each later member the sum of the
members before it.  So the sums travel as integers modulo :data:`MODULUS`, and
the member that opens a lap (its first hop) starts them from a random *mask*
instead of zero; it alone subtracts the mask when the lap comes back to it to
be closed.  Every value a member sees on the way is uniformly random; the lap's
totals, which every member then reads in the lap history, are exact.

If the member that opened a lap is gone when the lap is closed (the ring skipped
it as dead), nobody can remove its mask: that lap is not judged (as a lap that
nobody evaluated) and the next lap is judged as usual.

The loss travels in fixed point (:data:`LOSS_SCALE` units per unit of loss sum),
so that the sums are integers that add up exactly in any order; the rounding is
at most half a unit per member.  Each member's figures are bounded so that the
totals of :data:`~fedup.config.Limits.max_members` members stay below half the
modulus (a loss sum above :data:`MAX_MEMBER_LOSS` counts as that much: a
diverged model still reads as a very bad lap, never as a wrapped-around good
one); totals at or above half the modulus cannot be a real federation's and
leave the lap unjudged.
"""

from __future__ import annotations

import secrets
import struct
from typing import Final

from fedup.learn.task import AUC_BINS, EvalStats

__all__ = [
    "MODULUS",
    "SUMS_LEN",
    "ZERO_SUMS",
    "LapMasks",
    "add_sums",
    "open_sums",
    "pack_sums",
    "to_sums",
    "unpack_sums",
]

MODULUS: Final = 2**62
"""Sums are kept modulo this (what the metadata decoder accepts as a count)."""
LOSS_SCALE: Final = 2**20
"""Fixed-point units per unit of loss sum: rounding costs under 1e-6 per member."""
SUMS_LEN: Final = 3 + 2 * AUC_BINS
"""loss sum, count, correct, then the positive and negative score histograms."""
ZERO_SUMS: Final = (0,) * SUMS_LEN
MAX_MEMBER_LOSS: Final = 2**30
"""A member's loss sum counts as at most this (about 1e9: 1e8 rows at a loss of 10)."""
MAX_SLOT: Final = 2**50
"""A slot of a member's (a count of at most 2 * :data:`MAX_MEMBER_COUNT`, or a regression
sum in fixed point, capped as the loss is: :data:`fedup.learn.task_metrics.MAX_SLOT`)."""
MAX_MEMBER_COUNT: Final = 2**40
"""Validation rows of one member, at most (a trillion)."""
MAX_TOTAL: Final = MODULUS // 2
"""Totals at or above this are not a real federation's (a forged sum): 1,024 members'
bounded figures stay below it (2^10 members * 2^30 * 2^20 = 2^60 for the loss)."""
KEPT_LAPS: Final = 2
"""Masks a member keeps: the lap it opened last and the one before."""


_PACKED = struct.Struct(f">{SUMS_LEN}Q")
PACKED_SIZE: Final = _PACKED.size
"""Bytes of the sums as they travel: one CBOR byte string, not 103 integers to encode."""


def pack_sums(sums: tuple[int, ...]) -> bytes:
    """The sums as 8-byte big-endian integers, one after the other."""
    return _PACKED.pack(*sums)


def unpack_sums(data: bytes) -> tuple[int, ...] | None:
    """The sums packed in ``data``; None if it is not :data:`PACKED_SIZE` bytes of values
    below :data:`MODULUS`."""
    if len(data) != PACKED_SIZE:
        return None
    sums: tuple[int, ...] = _PACKED.unpack(data)
    return sums if all(v < MODULUS for v in sums) else None


def to_sums(stats: EvalStats) -> tuple[int, ...]:
    """One member's evaluation as a sums vector (raises ValueError if it cannot be one)."""
    if not 0 <= stats.n < MAX_MEMBER_COUNT:
        raise ValueError(f"a validation count of {stats.n} is out of range")
    if stats.loss_sum < 0:
        raise ValueError(f"validation loss sum {stats.loss_sum} is negative")
    capped = stats.loss_sum if stats.loss_sum < MAX_MEMBER_LOSS else MAX_MEMBER_LOSS  # NaN too
    loss = round(capped * LOSS_SCALE)
    if stats.slots:
        if stats.pos_hist or stats.neg_hist or len(stats.slots) > 2 * AUC_BINS:
            raise ValueError(f"{len(stats.slots)} slots with histograms, or more than fit")
        if any(not 0 <= v <= MAX_SLOT for v in stats.slots):
            raise ValueError("a slot is out of range")
        rest = (*stats.slots, *(0,) * (2 * AUC_BINS - len(stats.slots)))
        return (loss, stats.n, stats.correct, *rest)
    return (loss, stats.n, stats.correct, *_bins(stats.pos_hist), *_bins(stats.neg_hist))


def _bins(hist: tuple[int, ...]) -> tuple[int, ...]:
    if not hist:
        return (0,) * AUC_BINS
    if len(hist) != AUC_BINS:
        raise ValueError(f"a score histogram has {len(hist)} bins, not {AUC_BINS}")
    return hist


def add_sums(a: tuple[int, ...], b: tuple[int, ...], *, sign: int = 1) -> tuple[int, ...]:
    """``a + sign * b`` element-wise, modulo :data:`MODULUS`."""
    return tuple((x + sign * y) % MODULUS for x, y in zip(a, b, strict=True))


def open_sums(sums: tuple[int, ...], *, slots: bool = False) -> EvalStats | None:
    """The evaluation the unmasked ``sums`` add up to; None if they cannot be real.

    ``slots``: the task sums its own counts (a multi-class or regression table) where
    a binary task's histograms go; they come back as :attr:`EvalStats.slots`."""
    loss, n, correct, *hists = sums
    pos, neg = tuple(hists[:AUC_BINS]), tuple(hists[AUC_BINS:])
    if any(v >= MAX_TOTAL for v in sums) or correct > n or n == 0:
        return None
    if slots:
        return EvalStats(loss / LOSS_SCALE, n, correct, slots=tuple(hists))
    if not any(pos) and not any(neg):
        pos = neg = ()
    return EvalStats(loss / LOSS_SCALE, n, correct, pos, neg)


class LapMasks:
    """The masks of the laps a member opened, kept until it closes them."""

    def __init__(self) -> None:
        self._masks: dict[int, tuple[int, ...]] = {}

    def open(self, lap: int) -> tuple[int, ...]:
        """A fresh mask for ``lap`` (replacing one made for it before), remembered.

        Each value is 8 random bytes modulo :data:`MODULUS`, uniform below it (2^62 divides
        2^64) as ``secrets.randbelow`` would draw it, from one read of the system's
        generator instead of 103 (0.23 ms, on each lap's first hop)."""
        mask = tuple(v % MODULUS for v in _PACKED.unpack(secrets.token_bytes(PACKED_SIZE)))
        self._masks[lap] = mask
        for old in sorted(self._masks)[:-KEPT_LAPS]:
            del self._masks[old]
        return mask

    def export(self) -> tuple[tuple[int, tuple[int, ...]], ...]:
        """The masks kept, by lap (for the run-state file)."""
        return tuple(sorted(self._masks.items()))

    def restore(self, masks: tuple[tuple[int, tuple[int, ...]], ...]) -> None:
        """Take up masks saved before a restart (only well-formed ones: a wrong mask
        would only spoil the lap's federated loss, which the head checks)."""
        for lap, mask in masks[-KEPT_LAPS:]:
            if len(mask) == SUMS_LEN and all(0 <= x < MODULUS for x in mask):
                self._masks[lap] = mask

    def get(self, lap: int) -> tuple[int, ...] | None:
        """The mask this member put on ``lap``, or None if it did not open that lap."""
        return self._masks.get(lap)
