"""The parallel mode's learning: one member's round as a vector to sum, and the sum's use.

A round of the parallel mode (``docs/parallel.md``) is a round of
:mod:`fedup.learn.fedavg` whose averaging is a ring all-reduce among the members:
every member evaluates the round's model on its validation split and trains a copy
of it (:func:`~fedup.learn.fedavg.member_round`), then contributes one float32
vector (:func:`contribution`)::

    rows x every floating tensor of the trained model, flattened, in state-dict order
    the validation sums (fedup.learn.lap_sums: loss in fixed point, count, correct, ...)
    the samples it trained
    rows                           (its training rows: the average's weight)

The members' vectors are summed (the same bytes at every member), and
:func:`round_end` reads the sum: the rows-weighted average of the trained models,
the federation's validation sums of the round's model and the samples trained.
Every member then takes the same server-momentum step and judges the same lap
result, so all of them hold the same model and stop at the same round.

A member whose training gave a non-finite model contributes the round's model with
no weight (it does not train this round) rather than poisoning the sum; the
all-reduce refuses non-finite numbers from others.  The sums travel as float32:
exact below 2**24, within a few parts in 10**8 above (the loss's fixed point), the
same rounding at every member.  Unlike the ring's masked sums, a member's own sums
are readable by the member after it in the ring (the first partial sum of the
chunk that holds them is its contribution alone).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import attrs
import numpy as np
import torch

from fedup.errors import LocalProtocolError
from fedup.learn.lap_sums import SUMS_LEN

__all__ = ["TAIL", "RoundSum", "VectorLayout", "contribution", "round_end"]

Weights = dict[str, torch.Tensor]

TAIL = SUMS_LEN + 2
"""Elements after the parameters: the validation sums, the samples, the rows."""


@attrs.frozen
class VectorLayout:
    """Where each tensor of a model lies in a round's vector."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]
    offsets: tuple[int, ...]
    """Start of each tensor; the last entry is where the validation sums begin."""

    @classmethod
    def for_weights(cls, weights: Mapping[str, torch.Tensor]) -> VectorLayout:
        """The layout of ``weights`` (every tensor floating point, or
        :class:`~fedup.errors.LocalProtocolError`: a counter cannot be averaged)."""
        offsets = [0]
        for name, t in weights.items():
            if not t.is_floating_point():
                raise LocalProtocolError(
                    f"the parallel mode averages floating tensors only; {name!r} is {t.dtype}"
                )
            offsets.append(offsets[-1] + t.numel())
        return cls(
            tuple(weights),
            tuple(tuple(t.shape) for t in weights.values()),
            tuple(t.dtype for t in weights.values()),
            tuple(offsets),
        )

    @property
    def params(self) -> int:
        return self.offsets[-1]

    @property
    def length(self) -> int:
        """Elements of the vector: the parameters, the sums, the samples, the rows."""
        return self.params + TAIL


def contribution(
    layout: VectorLayout,
    weights: Mapping[str, torch.Tensor],
    *,
    rows: int,
    samples: int,
    sums: tuple[int, ...],
) -> bytes:
    """This member's vector (little-endian float32 bytes)."""
    if len(sums) != SUMS_LEN or rows < 0 or samples < 0:
        raise LocalProtocolError(f"a contribution of {rows} rows and {len(sums)} sums")
    out = np.empty(layout.length, dtype="<f4")
    for name, start, stop in zip(
        layout.names, layout.offsets[:-1], layout.offsets[1:], strict=True
    ):
        flat = weights[name].detach().to("cpu", torch.float64).reshape(-1) * rows
        out[start:stop] = flat.numpy()
    out[layout.params : layout.params + SUMS_LEN] = sums
    out[-2] = samples
    out[-1] = rows
    return out.tobytes()


def finite(weights: Mapping[str, torch.Tensor]) -> bool:
    """Whether every value of ``weights`` is finite."""
    return all(bool(torch.isfinite(t).all()) for t in weights.values())


@attrs.frozen(eq=False)
class RoundSum:
    """What the members' summed vectors say."""

    average: Weights | None
    """The rows-weighted mean of the trained models; None when no member had rows."""
    sums: tuple[int, ...]
    """The federation's validation sums of the round's model."""
    samples: int
    rows: int


def round_end(layout: VectorLayout, total: bytes | bytearray | memoryview) -> RoundSum:
    """Read the sum of every member's :func:`contribution`."""
    v = np.frombuffer(total, dtype="<f4")
    if v.size != layout.length:
        raise LocalProtocolError(f"a sum of {v.size} elements, not {layout.length}")
    rows = round(float(v[-1]))
    samples = max(0, round(float(v[-2])))
    sums = tuple(max(0, round(float(x))) for x in v[layout.params : layout.params + SUMS_LEN])
    average: Weights | None = None
    if rows > 0 and math.isfinite(float(v[-1])):
        average = {}
        for name, shape, dtype, start, stop in zip(
            layout.names, layout.shapes, layout.dtypes, layout.offsets[:-1], layout.offsets[1:],
            strict=True,
        ):  # fmt: skip
            part = torch.from_numpy(v[start:stop].astype(np.float64) / float(v[-1]))
            average[name] = part.reshape(shape).to(dtype)
    return RoundSum(average, sums, samples, max(0, rows))
