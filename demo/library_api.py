"""Embed FedUp peers in your own trio program, with your own model and training step.

Three peers in one process, each with private data of its own, train one
logistic-regression model together over real TCP on 127.0.0.1 (real handshakes,
real encryption).  Each peer brings a ``fedup.Task``: any ``torch.nn.Module``,
its own training loop and its own evaluation.  Run it with::

    python demo/library_api.py
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch
import trio
from torch import nn

import fedup


class LogisticTask(fedup.Task):
    """A peer's private data (never leaves it) and how to train and evaluate on it."""

    def __init__(self, seed: int, shift: float) -> None:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(800, 4, generator=g) + shift  # each peer sees a different region
        true_w = torch.tensor([1.5, -2.0, 0.5, 0.0])
        y = (torch.rand(800, generator=g) < torch.sigmoid(x @ true_w)).float()
        self.x_train, self.y_train = x[:640], y[:640]
        self.x_val, self.y_val = x[640:], y[640:]

    @property
    def n_train(self) -> int:
        return len(self.y_train)

    @property
    def n_val(self) -> int:
        return len(self.y_val)

    def build_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Linear(4, 1)

    def train(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, budget: fedup.TrainBudget
    ) -> fedup.TrainStats:
        g = torch.Generator().manual_seed(budget.seed)
        steps = max(1, math.ceil(budget.epochs * self.n_train / 32))
        loss_sum, samples = 0.0, 0
        for _ in range(steps):
            idx = torch.randint(0, self.n_train, (32,), generator=g)
            logits = model(self.x_train[idx]).squeeze(1)
            loss = nn.functional.binary_cross_entropy_with_logits(logits, self.y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * 32
            samples += 32
        return fedup.TrainStats(steps, samples, loss_sum)

    def evaluate(self, model: nn.Module) -> fedup.EvalStats:
        with torch.no_grad():
            logits = model(self.x_val).squeeze(1)
            losses = nn.functional.binary_cross_entropy_with_logits(
                logits, self.y_val, reduction="sum"
            )
            correct = int(((logits > 0).float() == self.y_val).sum())
        return fedup.EvalStats(float(losses), self.n_val, correct)


async def main() -> None:
    out = Path(tempfile.mkdtemp(prefix="fedup-library-"))
    settings = fedup.RunSettings(max_laps=40, patience=5, local_epochs=0.5, seed=7)
    summaries: list[fedup.RunSummary] = []

    def config(i: int, bootstrap: tuple[fedup.Address, ...]) -> fedup.PeerConfig:
        return fedup.PeerConfig(
            identity=fedup.Identity.generate(),
            out_dir=out / f"peer{i}",
            listen=fedup.Address("127.0.0.1", 0),
            mdns=False,
            bootstrap=bootstrap,
            min_peers=3,
            settle=1.0,
            run=settings,
        )

    async def member(i: int, bootstrap: tuple[fedup.Address, ...]) -> None:
        async with fedup.Peer.open(config(i, bootstrap), LogisticTask(i, shift=i - 1.0)) as peer:
            summaries.append(await peer.train())

    # The first peer's address is the others' bootstrap address.
    async with fedup.Peer.open(config(0, ()), LogisticTask(0, shift=-1.0)) as first:
        async with trio.open_nursery() as nursery:
            for i in (1, 2):
                nursery.start_soon(member, i, first.addresses)
            summaries.append(await first.train())

    for s in sorted(summaries, key=lambda s: s.peer_id):
        print(f"{s.peer_id[-8:]}: {s.stop_reason} after {s.laps} laps, "
              f"own val loss {s.final_val_loss:.4f}, model {s.model_sha256[:12]}")  # fmt: skip
    assert len({s.model_sha256 for s in summaries}) == 1
    print("all three peers hold the same model; outputs in", out)


if __name__ == "__main__":
    trio.run(main)
