"""The hybrid mode's learning: a relay hop, the model as relay bytes, and the mode in
one process (no network) for measuring it.

A round of the hybrid mode (``docs/parallel.md``) is a round of the parallel mode
(:mod:`fedup.learn.fedavg`, :mod:`fedup.learn.parallel`) in which the members do not
each train a copy of the round's model: they are cut into sub-rings
(:func:`fedup.protocol.relay.sub_rings`), and each sub-ring trains the round's model in
sequence for ``sync_laps`` laps, every hop ``hop_epochs`` of the trainer's data
(:func:`relay_hop`), the optimizer's state travelling with the model from hop to hop
as the ring's does, and starting fresh each round.  The round's average weighs each
sub-ring's model by its members' training rows; every member evaluates the round's
model as in the parallel mode, and the same stopping rule follows.

The relay carries the model and the optimizer's state as one set of named tensors,
:func:`relay_template`'s (the state under ``optim.``, as in the ring's blob), and the
next round's model is the average itself, without server momentum.  Measured on seed 0
against centralized training (10 synthetic lenders; ``dirichlet:0.3`` over 10 members;
3 sub-rings): one lap per round with a fresh optimizer every hop and server momentum
+6.1% and +10.2%; the optimizer's state carried through the round +2.7% and +3.1%, and
without server momentum +1.5% and +3.4%; two laps per round with the state carried and
no server momentum +0.7% and +0.4%; three laps +0.7% and +0.1%, the defaults (over seeds
0 to 2, three laps were within 1% in 8 runs of 9, two laps in 7: docs/parallel.md).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from fedup.errors import LocalProtocolError
from fedup.learn.fedavg import (
    FedAvgResult,
    RoundLedger,
    RoundTime,
    average,
)
from fedup.learn.lap_sums import ZERO_SUMS, add_sums, to_sums
from fedup.learn.parallel import VectorLayout
from fedup.learn.ring import (
    FederationStats,
    RingSettings,
    fresh_optimizer_state,
    hop_budget,
    load_optimizer,
    model_with,
    optimizer_tensors,
)
from fedup.learn.task import Task, seeded
from fedup.protocol.relay import sub_rings

__all__ = [
    "OPTIM",
    "hybrid",
    "relay_hop",
    "relay_seed",
    "relay_template",
    "weights_bytes",
    "weights_from",
]

OPTIM = "optim."
"""The prefix of the optimizer's tensors in a relay state."""

Weights = dict[str, torch.Tensor]


def weights_bytes(layout: VectorLayout, weights: Mapping[str, torch.Tensor]) -> bytes:
    """``weights`` as the relay carries them: every tensor of ``layout`` flattened, in
    order, as little-endian float32."""
    out = np.empty(layout.params, dtype="<f4")
    for name, start, stop in zip(
        layout.names, layout.offsets[:-1], layout.offsets[1:], strict=True
    ):
        out[start:stop] = weights[name].detach().to("cpu", torch.float32).reshape(-1).numpy()
    return out.tobytes()


def weights_from(layout: VectorLayout, data: bytes) -> Weights:
    """The weights ``data`` holds (:func:`weights_bytes`'s form), each tensor in the
    layout's shape and dtype; :class:`~fedup.errors.LocalProtocolError` for another size."""
    values = np.frombuffer(data, dtype="<f4")
    if values.size != layout.params:
        raise LocalProtocolError(f"relay bytes of {values.size} elements, not {layout.params}")
    return {
        name: torch.from_numpy(values[start:stop].copy()).reshape(shape).to(dtype)
        for name, shape, dtype, start, stop in zip(
            layout.names, layout.shapes, layout.dtypes, layout.offsets[:-1], layout.offsets[1:],
            strict=True,
        )
    }  # fmt: skip


def relay_seed(settings: RingSettings, round_: int, ring: int, hop: int) -> int:
    """The seed of hop ``hop`` of sub-ring ``ring`` in round ``round_``."""
    data = f"fedup-relay:{settings.seed}:{round_}:{ring}:{hop}".encode()
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big") >> 1


def relay_template(task: Task, weights: Mapping[str, torch.Tensor]) -> Weights:
    """A relay state: ``weights`` and, under :data:`OPTIM`, the task's optimizer's state
    before any step (zeros: what a fresh optimizer starts from)."""
    with task.scratch_model() as model:
        model.load_state_dict(dict(weights), strict=True)
        state = fresh_optimizer_state(task, model)
    return {**{k: v.detach().cpu().clone() for k, v in weights.items()}, **dict(state)}


def relay_hop(
    task: Task,
    state: Mapping[str, torch.Tensor],
    settings: RingSettings,
    fed: FederationStats,
    seed: int,
) -> tuple[Weights, int, float]:
    """Train the relay ``state`` (:func:`relay_template`'s names) for one hop on
    ``task``'s data (``hop_epochs`` passes, the seed ``seed``, the optimizer resumed from
    the state's); returns the new state (CPU), the samples trained and the seconds it
    took."""
    began = time.perf_counter()
    if task.n_train == 0:
        return dict(state), 0, time.perf_counter() - began
    weights = {k: v for k, v in state.items() if not k.startswith(OPTIM)}
    with task.scratch_model() as model:
        with seeded(seed, task.device):
            model.load_state_dict(weights, strict=True)
            optimizer = task.make_optimizer(model)
            load_optimizer(model, optimizer, {
                k[len(OPTIM):]: v for k, v in state.items() if k.startswith(OPTIM)
            })  # fmt: skip
            stats = task.train(model, optimizer, hop_budget(task, settings, fed, model, seed))
        out = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        for k, v in optimizer_tensors(model, optimizer):
            if k not in state:
                raise LocalProtocolError(f"the optimizer made a new tensor {k!r}")
            out[k] = v.to(state[k].dtype)
    return out, stats.samples, time.perf_counter() - began


def hybrid(
    tasks: Sequence[Task],
    settings: RingSettings,
    *,
    sub_ring_setting: int = 0,
    sync_laps: int = 3,
    federation: FederationStats,
) -> FedAvgResult:
    """Run the hybrid mode over ``tasks`` (one per member, in ring order) in one process.

    Each :class:`~fedup.learn.fedavg.RoundTime` lists every sub-ring's compute seconds
    (its members' evaluations' longest plus its hops' sum: a sub-ring trains in
    sequence), not every member's."""
    start = time.perf_counter()
    rings = sub_rings(range(len(tasks)), sub_ring_setting)
    n_train = sum(t.n_train for t in tasks)
    current = {
        k: v.detach().cpu().clone()
        for k, v in tasks[0].build_model(settings.seed).state_dict().items()
    }
    model_bytes = sum(v.element_size() * v.nelement() for v in current.values())
    ledger, rounds, round_ = RoundLedger(current), list[RoundTime](), 0
    while True:
        trains = round_ < settings.max_laps
        sums, evals = ZERO_SUMS, [0.0] * len(tasks)
        for i, task in enumerate(tasks):
            t0 = time.perf_counter()
            sums = add_sums(sums, to_sums(task.evaluate(model_with(task, current))))
            evals[i] = time.perf_counter() - t0
        models: list[Weights] = []
        rows: list[int] = []
        compute: list[float] = []
        round_samples = 0
        start_state = relay_template(tasks[0], current)
        for k, ring in enumerate(rings):
            state, seconds = start_state, max(evals[i] for i in ring)
            if trains:
                for hop in range(sync_laps * len(ring)):
                    member = ring[hop % len(ring)]
                    seed = relay_seed(settings, round_, k, hop)
                    state, n, took = relay_hop(tasks[member], state, settings, federation, seed)
                    round_samples += n
                    seconds += took
            models.append({n: t for n, t in state.items() if not n.startswith(OPTIM)})
            rows.append(sum(tasks[i].n_train for i in ring))
            compute.append(seconds)
        rounds.append(RoundTime(round_, tuple(compute), trains))
        ledger.judge(tasks[0], sums, round_, current, round_samples, settings.tolerance)
        if ledger.ends(round_, settings):
            break
        if n_train > 0:
            current = average(models, rows)
        round_ += 1
    return FedAvgResult.ended(ledger, rounds, n_train, start, model_bytes)
