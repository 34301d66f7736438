"""FedAvg-style parallel training (fedup.learn.fedavg) and its modelled wall-clock."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fedup.errors import LocalProtocolError
from fedup.learn.baselines import score
from fedup.learn.fedavg import OPTIMIZER_STATES, RoundTime, average, fedavg
from fedup.learn.lap_sums import PACKED_SIZE
from fedup.learn.ring import RingSettings
from fedup.learn.task import TensorTask
from fedup.sim.network import Link
from fedup.sim.wallclock import LinkModel, allreduce_bytes, allreduce_seconds, parallel_clock

LINKS = LinkModel(link=Link(latency=0.01, bandwidth=1e6))


def test_a_ring_all_reduce_takes_2_n_minus_1_steps_of_a_latency_and_a_chunk() -> None:
    # 4 members, 400 kB: chunks of 100 kB (0.1 s at 1 MB/s) plus 10 ms, 6 steps.
    assert allreduce_seconds(LINKS, 4, 400_000) == pytest.approx(6 * 0.11)
    assert allreduce_seconds(LINKS, 4, 400_000, dial=True) == pytest.approx(0.66 + 2 * 0.01)
    assert allreduce_seconds(LINKS, 2, 400_000) == pytest.approx(2 * (0.01 + 0.2))
    assert allreduce_seconds(LINKS, 1, 400_000) == 0.0
    assert allreduce_bytes(4, 400_000) == 600_000  # 2 (N - 1) / N of the model
    assert allreduce_bytes(1, 400_000) == 0
    # Every member sends at once: a step lasts as long as the slowest link on the ring.
    slow = LinkModel(link=LINKS.link, links={(2, 3): Link(latency=0.05, bandwidth=5e5)})
    assert allreduce_seconds(slow, 4, 400_000) == pytest.approx(6 * (0.05 + 0.2))
    off_ring = LinkModel(link=LINKS.link, links={(3, 2): Link(latency=1.0)})
    assert allreduce_seconds(off_ring, 4, 400_000) == pytest.approx(0.66)


def test_the_parallel_clock_adds_the_slowest_member_and_the_all_reduce_of_each_round() -> None:
    size = 400_000 - PACKED_SIZE  # the model; the validation sums ride along
    rounds = (
        RoundTime(0, (0.5, 0.25, 0.125, 0.25), reduced=True),
        RoundTime(1, (0.125, 0.75, 0.125, 0.25), reduced=True),
        RoundTime(2, (0.25, 0.25, 0.25, 0.25), reduced=False),  # evaluation only: sums alone
    )
    clock = parallel_clock(rounds, size, LINKS, hold={2: 1.0}, sums_bytes=PACKED_SIZE)
    sums_only = 6 * (0.01 + PACKED_SIZE / 4 / 1e6)
    assert clock.compute == pytest.approx(1.125 + 1.125 + 1.25)  # member 2 holds 1 s more
    assert clock.transfer == pytest.approx(0.68 + 0.66 + sums_only)
    assert clock.round_ends == pytest.approx(
        {-1: 0.0, 0: 1.125 + 0.68, 1: 2.25 + 1.34, 2: clock.total}
    )
    assert clock.bytes_per_member == pytest.approx(2 * 600_000 + 1.5 * PACKED_SIZE)
    again = parallel_clock(rounds, size, LINKS, sums_bytes=PACKED_SIZE)
    assert again == parallel_clock(rounds, size, LINKS, sums_bytes=PACKED_SIZE)


def test_averaging_weighs_models_by_training_rows() -> None:
    a = {"w": torch.tensor([0.0, 4.0]), "count": torch.tensor(7)}
    b = {"w": torch.tensor([4.0, 0.0]), "count": torch.tensor(9)}
    mean = average([a, b], [1, 3])
    assert torch.equal(mean["w"], torch.tensor([3.0, 1.0]))
    assert mean["count"].item() == 7  # not floating point: the first model with rows
    only_b = average([a, b], [0, 10])
    assert torch.equal(only_b["w"], b["w"]) and only_b["count"].item() == 9
    with pytest.raises(LocalProtocolError, match="cannot average"):
        average([a, b], [0, 0])


def _task(n: int, seed: int, *, n_val: int = 200) -> TensorTask:
    """An easy binary task: the label is the sign of the first feature."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n + n_val, 4, generator=g)
    y = (x[:, :1] > 0).float()

    def model(s: int) -> nn.Module:
        return nn.Linear(4, 1)

    def loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(out, target, reduction="none").reshape(-1)

    return TensorTask(
        x[:n], y[:n], x[n:], y[n:], model_fn=model, loss_fn=loss, batch_size=32, lr=0.05,
        binary=True,
    )  # fmt: skip


@pytest.mark.parametrize("state", OPTIMIZER_STATES)
def test_fedavg_lowers_the_validation_loss_and_keeps_the_best_round(state: str) -> None:
    tasks = [_task(300, 1), _task(200, 2), _task(100, 3)]
    settings = RingSettings(seed=0, hop_epochs=0.5, patience=3, max_laps=8)
    run = fedavg(tasks, settings, optimizer_state=state)
    initial = run.history[0]
    assert initial.lap == -1
    best = run.best
    assert best is not None and best.loss < 0.5 * initial.loss
    assert min(h.loss for h in run.history) == best.loss
    # The kept model is the best round's output, as the pooled sums judged it.
    assert score(run.weights, tasks).loss == pytest.approx(best.loss, rel=1e-4)
    # Every member computes every round; each round trains half a pass over every row.
    assert all(len(r.compute) == 3 and min(r.compute) > 0 for r in run.rounds)
    assert [h.lap for h in run.history] == list(range(-1, len(run.rounds) - 1))
    assert run.passes == pytest.approx(0.5 * (best.lap + 1), rel=0.2)
    assert run.model_bytes == 5 * 4


def test_a_member_without_training_rows_does_not_move_the_average() -> None:
    alone = _task(300, 1)
    empty = TensorTask(
        alone.x_train[:0], alone.y_train[:0], alone.x_val, alone.y_val,
        model_fn=alone.model_fn, loss_fn=alone.loss_fn, batch_size=32, lr=0.05, binary=True,
    )  # fmt: skip
    settings = RingSettings(seed=0, hop_epochs=0.5, patience=50, max_laps=4)
    one = fedavg([alone], settings, optimizer_state="none")
    two = fedavg([alone, empty], settings, optimizer_state="none")
    # The empty member evaluates the same validation rows: the losses are the same, and so
    # is the model (it is member 0 in both runs, with the same seeds).
    assert [h.loss for h in two.history] == pytest.approx([h.loss for h in one.history])
    assert all(torch.equal(one.weights[k], two.weights[k]) for k in one.weights)
    assert two.total_passes == pytest.approx(one.total_passes)


def test_fedavg_refuses_an_unknown_optimizer_state() -> None:
    with pytest.raises(LocalProtocolError, match="is not one of none, member, server"):
        fedavg([_task(50, 1)], RingSettings(), optimizer_state="adam")
