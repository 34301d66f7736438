"""The hybrid mode's learning (fedup.learn.hybrid): the relay's bytes, a relay hop with
the optimizer's state, and the mode in one process."""

from __future__ import annotations

import pytest
import torch

from fedup.errors import LocalProtocolError
from fedup.learn.baselines import federation_of, score
from fedup.learn.fedavg import RoundTime
from fedup.learn.hybrid import OPTIM, hybrid, relay_hop, relay_template, weights_bytes, weights_from
from fedup.learn.lap_sums import PACKED_SIZE
from fedup.learn.parallel import VectorLayout
from fedup.learn.ring import RingSettings, hop_budget
from fedup.learn.task import seeded
from fedup.sim.network import Link
from fedup.sim.wallclock import (
    DIAL_TRIPS,
    HAND_OVER_TRIPS,
    LinkModel,
    allreduce_bytes,
    allreduce_seconds,
    hybrid_clock,
)
from tests.unit.test_fedavg import _task

SETTINGS = RingSettings(seed=0, hop_epochs=0.5, patience=3, max_laps=6)


def test_the_relay_bytes_give_back_every_tensor_in_its_shape_and_dtype() -> None:
    state = {
        "a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "b": torch.tensor([0.5, -2.0], dtype=torch.float64),
    }
    layout = VectorLayout.for_weights(state)
    data = weights_bytes(layout, state)
    assert len(data) == 4 * 8
    back = weights_from(layout, data)
    assert list(back) == ["a", "b"] and back["b"].dtype == torch.float64
    assert all(torch.equal(back[k], state[k]) for k in state)
    with pytest.raises(LocalProtocolError, match="not 8"):
        weights_from(layout, data[:-4])


def test_a_hop_from_the_template_is_a_hop_with_a_fresh_optimizer() -> None:
    task = _task(300, 1)
    fed = federation_of([task])
    initial = {k: v.clone() for k, v in task.build_model(0).state_dict().items()}
    template = relay_template(task, initial)
    optim = {k: v for k, v in template.items() if k.startswith(OPTIM)}
    assert optim and all(not v.any() for v in optim.values())  # zeros: no step yet
    trained, samples, _ = relay_hop(task, template, SETTINGS, fed, seed=7)
    assert set(trained) == set(template) and samples == 160  # 150 rows, whole batches of 32
    assert any(trained[k].any() for k in optim)  # the moments and the step moved on
    with task.scratch_model() as model, seeded(7, task.device):
        model.load_state_dict(initial)
        optimizer = task.make_optimizer(model)
        task.train(model, optimizer, hop_budget(task, SETTINGS, fed, model, 7))
        fresh = model.state_dict()
    assert all(torch.equal(trained[k], fresh[k]) for k in initial)
    # The next hop resumes the optimizer: not what a fresh one would do.
    again, _, _ = relay_hop(task, trained, SETTINGS, fed, seed=8)
    reset = {**trained, **optim}
    other, _, _ = relay_hop(task, reset, SETTINGS, fed, seed=8)
    assert not all(torch.equal(again[k], other[k]) for k in initial)


def test_hybrid_lowers_the_validation_loss_and_keeps_the_best_round() -> None:
    tasks = [_task(300, 1), _task(200, 2), _task(100, 3), _task(100, 4)]
    run = hybrid(tasks, SETTINGS, sub_ring_setting=2, sync_laps=2, federation=federation_of(tasks))
    initial, best = run.history[0], run.best
    assert initial.lap == -1 and best is not None and best.loss < 0.5 * initial.loss
    assert score(run.weights, tasks).loss == pytest.approx(best.loss, rel=1e-4)
    # Two sub-rings; each trains its two members twice a round: 2 x 0.5 passes of all rows.
    assert all(len(r.compute) == 2 for r in run.rounds)
    assert run.passes == pytest.approx(1.0 * (best.lap + 1), rel=0.2)


def test_the_hybrid_clock_adds_the_slowest_chain_and_the_all_reduce_of_each_round() -> None:
    links = LinkModel(link=Link(latency=0.01, bandwidth=1e6))
    hand_over = HAND_OVER_TRIPS * 0.01 + 0.1  # 100 kB of relay state
    opening = DIAL_TRIPS * 0.01
    rounds = (
        RoundTime(0, (1.0, 1.2), reduced=True),  # sub-rings of 2 and 1 members, 2 laps
        RoundTime(1, (0.2, 0.3), reduced=False),  # evaluation only: no relay
    )
    clock = hybrid_clock(rounds, (2, 1), 2, 30_000, 100_000, links, sums_bytes=PACKED_SIZE)
    # Round 0: the sub-ring of two hands on 3 times (both members send) and is the slower.
    chain = 1.0 + 3 * hand_over + 2 * opening
    assert chain > 1.2
    first = allreduce_seconds(links, 3, 30_000 + PACKED_SIZE, dial=True)
    second = allreduce_seconds(links, 3, PACKED_SIZE)
    assert clock.compute == pytest.approx(1.0 + 0.3)
    assert clock.transfer == pytest.approx(chain - 1.0 + first + second)
    assert clock.round_ends == pytest.approx({-1: 0.0, 0: chain + first, 1: clock.total})
    relayed = 3 * 100_000 / 3  # three hand-overs, counted per member
    reduced = allreduce_bytes(3, 30_000 + PACKED_SIZE) + allreduce_bytes(3, PACKED_SIZE)
    assert clock.bytes_per_member == pytest.approx(relayed + reduced)
