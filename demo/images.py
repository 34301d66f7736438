"""A second field: handwritten digits, classified by a small CNN trained by a federation.

scikit-learn's bundled digits (1,797 8x8 grey images of the digits 0 to 9, shipped
inside the scikit-learn wheel: nothing is downloaded) are split into a held-out test
set (20%, stratified) and a share for each of four peers.  The shares are skewed by
label: for each digit, the fraction of its images each peer gets is drawn from a
Dirichlet distribution (``--alpha``; smaller is more skewed), so a peer sees some
digits often and others rarely or never, as hospitals or postal sorting offices
would.  Each peer keeps a fifth of its share for validation (what the federation's
stopping rule is judged on).

Four real peers (real identities, handshakes, encryption, signed hops) train one
two-layer CNN together through the library API (``fedup.Peer.open`` with a
``fedup.Task`` of our own), on an in-memory network (``fedup.MemoryWorld``) in this
process, on trio's virtual clock.  The script then trains the same CNN centralized
(every peer's images pooled) and local-only (each peer alone), and prints the
accuracy of each on the same held-out test images.  Needs scikit-learn (the
``examples`` extra).  Run it with::

    python demo/images.py [--seed 0] [--alpha 0.5] [--peers 4] [--out DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import attrs
import numpy as np
import torch
import trio
import trio.testing
from torch import nn
from torch.nn import functional as F

import fedup
from fedup.learn.weights import load_safetensors

CLASSES = 10
TEST_FRACTION = 0.2
"""Share of the digits held out from every peer: the test set every model is scored on."""
VAL_FRACTION = 0.2
"""Share of each peer's images it keeps for validation (the federation's stopping rule)."""
MIN_SHARE = 100
"""Fewest images a peer may get: a Dirichlet draw that leaves a peer less is drawn again."""
RUN = fedup.RunSettings(max_laps=60, patience=6, local_epochs=0.5, lr=3e-3, batch_size=32)
"""The run's settings.  A ``fedup.Task`` brings its own optimizer and minibatches:
:class:`DigitsTask` takes ``lr`` and ``batch_size`` from here, so that the settings
the members agree on are the ones they train with."""


def cnn() -> nn.Module:
    """Two 3x3 convolutions (16 and 32 channels), a 2x2 max-pool and a linear layer."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, CLASSES),
    )


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels, reduction="none")


class DigitsTask(fedup.TensorTask):
    """One peer's images: a :class:`fedup.TensorTask` whose evaluation counts a
    prediction correct when the largest of the ten logits is the label's."""

    def __init__(
        self,
        x_train: torch.Tensor,
        y_train: torch.Tensor,
        x_val: torch.Tensor,
        y_val: torch.Tensor,
        settings: fedup.RunSettings = RUN,
    ) -> None:
        super().__init__(
            x_train, y_train, x_val, y_val,
            model_fn=lambda seed: cnn(), loss_fn=_cross_entropy,
            batch_size=settings.batch_size, lr=settings.lr,
        )  # fmt: skip

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> fedup.EvalStats:
        return score(self, model, self.x_val, self.y_val)


def score(
    task: fedup.TensorTask, model: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> fedup.EvalStats:
    """Cross-entropy sum, count and correct predictions (argmax) of ``model`` on ``x``, ``y``."""
    if len(y) == 0:
        return fedup.EvalStats(0.0, 0)
    logits = task.outputs(model, x)
    loss_sum = float(_cross_entropy(logits, y).double().sum())
    return fedup.EvalStats(loss_sum, len(y), int((logits.argmax(1) == y).sum()))


class SplitError(ValueError):
    """The digits cannot be split as asked."""


@attrs.frozen
class Split:
    """The peers' tasks and the held-out test images."""

    tasks: list[DigitsTask]
    x_test: torch.Tensor
    y_test: torch.Tensor

    def label_counts(self) -> list[list[int]]:
        """Each peer's images (training and validation) per digit."""
        return [
            np.bincount(torch.cat([t.y_train, t.y_val]).numpy(), minlength=CLASSES).tolist()
            for t in self.tasks
        ]


def split_digits(seed: int, peers: int, alpha: float, settings: fedup.RunSettings = RUN) -> Split:
    """The digits split as the module docstring says (the same for the same arguments).

    Raises ImportError (one line) without scikit-learn, and :class:`SplitError` if no Dirichlet
    draw in 1,000 gives every peer ``MIN_SHARE`` images (too many peers for 1,437)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError(
            "scikit-learn is not installed: pip install -e '.[examples]' (it ships the digits)"
        ) from None

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    labels = torch.from_numpy(digits.target.astype(np.int64))
    rng = np.random.default_rng(seed)
    test_idx, pool_idx = [], []
    for c in range(CLASSES):
        idx = rng.permutation(np.flatnonzero(digits.target == c))
        cut = round(TEST_FRACTION * len(idx))
        test_idx.append(idx[:cut])
        pool_idx.append(idx[cut:])
    for _ in range(1000):
        shares: list[list[np.ndarray]] = [[] for _ in range(peers)]
        for idx in pool_idx:
            fractions = rng.dirichlet([alpha] * peers)
            cuts = np.round(np.cumsum(fractions)[:-1] * len(idx)).astype(int)
            for p, part in enumerate(np.split(idx, cuts)):
                shares[p].append(part)
        if min(sum(len(part) for part in share) for share in shares) >= MIN_SHARE:
            break
    else:
        raise SplitError(
            f"no label split in 1,000 gives each of {peers} peers {MIN_SHARE} images: "
            "use fewer peers or a larger --alpha"
        )
    tasks = []
    for share in shares:
        idx = torch.from_numpy(rng.permutation(np.concatenate(share)))
        n_val = round(VAL_FRACTION * len(idx))
        val, train = idx[:n_val], idx[n_val:]
        tasks.append(DigitsTask(images[train], labels[train], images[val], labels[val], settings))
    test = torch.from_numpy(np.concatenate(test_idx))
    return Split(tasks, images[test], labels[test])


# --------------------------------------------------------------------------
# The federation: real peers on an in-memory network


@attrs.frozen
class Federation:
    summaries: list[fedup.RunSummary]
    model: nn.Module
    """The final model, loaded from a member's ``model.safetensors``."""
    file_sha256: set[str]
    """SHA-256 of every member's ``model.safetensors`` (one value: the same file)."""
    epochs: float
    """Passes over every member's training images until the best lap ended."""


def identity(seed: int, index: int) -> fedup.Identity:
    """Peer ``index``'s identity: derived from the seed so that a run can be repeated."""
    return fedup.Identity(hashlib.sha256(f"images:{seed}:{index}".encode()).digest())


async def federate(
    tasks: Sequence[fedup.Task], out: Path, settings: fedup.RunSettings
) -> list[fedup.RunSummary]:
    """Run one peer per task on one in-memory world until each has its summary."""
    world = fedup.MemoryWorld(draw_seed=f"images:{settings.seed}".encode())
    run_id = hashlib.sha256(f"images-run:{settings.seed}".encode()).digest()[:16]
    summaries: list[fedup.RunSummary | None] = [None] * len(tasks)

    async def member(i: int) -> None:
        config = fedup.PeerConfig(
            identity=identity(settings.seed, i),
            out_dir=out / f"peer{i}",
            min_peers=len(tasks),
            settle=1.0,  # virtual seconds
            run=settings,
            run_id=run_id,
            train_in_thread=False,  # train inline: the virtual clock waits for no thread
        )
        async with fedup.Peer.open(config, tasks[i], world=world) as peer:
            summaries[i] = await peer.train()

    async with trio.open_nursery() as nursery:
        for i in range(len(tasks)):
            nursery.start_soon(member, i)
    return [s for s in summaries if s is not None]


def run_federation(
    tasks: Sequence[DigitsTask], out: Path, settings: fedup.RunSettings
) -> Federation:
    """:func:`federate` under trio's virtual clock (settle periods cost no real time)."""
    clock = trio.testing.MockClock(autojump_threshold=0)
    summaries = trio.run(federate, tasks, out, settings, clock=clock)
    files = {hashlib.sha256(Path(s.out_dir, "model.safetensors").read_bytes()).hexdigest()
             for s in summaries}  # fmt: skip
    first = Path(summaries[0].out_dir)
    model = tasks[0].build_model(0)
    model.load_state_dict(load_safetensors(first / "model.safetensors"))
    # A library task shares no row counts, so the summary's data_passes is null; the lap
    # records count the samples trained exactly, and this script knows every member's size.
    records = [json.loads(line) for line in (first / "metrics.jsonl").read_text().splitlines()]
    best = next(r for r in records if r["type"] == "lap" and r["lap"] == summaries[0].best_lap)
    epochs = best["samples"] / sum(t.n_train for t in tasks)
    return Federation(summaries, model, files, epochs)


# --------------------------------------------------------------------------
# The baselines: the same CNN, trained alone


@attrs.frozen
class Alone:
    model: nn.Module
    epochs: float
    """Passes over its training data until its best validation loss."""


def train_alone(task: DigitsTask, settings: fedup.RunSettings) -> Alone:
    """Train ``task``'s CNN on its own data under the federation's stopping rule: a
    validation check every ``local_epochs`` passes (a lap's worth), stop after
    ``patience`` checks in a row without a gain above ``tolerance`` (or ``max_laps``
    checks), keep the model of the lowest validation loss."""
    model = task.build_model(settings.seed)
    optimizer = task.make_optimizer(model)
    best_loss = ref_loss = task.evaluate(model).loss
    best_state, best_epochs = _copy(model), 0.0
    stale = 0
    for check in range(1, settings.max_laps + 1):
        budget = fedup.TrainBudget(settings.local_epochs, seed=settings.seed * 100_003 + check)
        task.train(model, optimizer, budget)
        loss = task.evaluate(model).loss
        if loss < best_loss:
            best_loss, best_state, best_epochs = loss, _copy(model), check * settings.local_epochs
        if loss < ref_loss * (1 - settings.tolerance):
            ref_loss, stale = loss, 0
        else:
            stale += 1
            if stale >= settings.patience:
                break
    model.load_state_dict(best_state)
    return Alone(model, best_epochs)


def _copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def pooled(tasks: Sequence[DigitsTask], settings: fedup.RunSettings) -> DigitsTask:
    """One task over every peer's training and validation images (centralized)."""
    return DigitsTask(
        torch.cat([t.x_train for t in tasks]), torch.cat([t.y_train for t in tasks]),
        torch.cat([t.x_val for t in tasks]), torch.cat([t.y_val for t in tasks]), settings,
    )  # fmt: skip


# --------------------------------------------------------------------------
# The comparison


@attrs.frozen
class Comparison:
    split: Split
    federation: Federation
    federated: fedup.EvalStats
    """The federated model on the test images."""
    centralized: fedup.EvalStats
    local_only: list[fedup.EvalStats]
    centralized_epochs: float
    local_epochs: list[float]
    seconds: float


def compare(
    seed: int, peers: int, alpha: float, out: Path, settings: fedup.RunSettings = RUN
) -> Comparison:
    """Split the digits, federate, train the baselines, score all on the test images."""
    started = time.monotonic()
    settings = attrs.evolve(settings, seed=seed)
    split = split_digits(seed, peers, alpha, settings)
    federation = run_federation(split.tasks, out, settings)
    judge = split.tasks[0]

    def on_test(model: nn.Module) -> fedup.EvalStats:
        return score(judge, model, split.x_test, split.y_test)

    central = train_alone(pooled(split.tasks, settings), settings)
    local = [train_alone(t, settings) for t in split.tasks]
    return Comparison(
        split, federation, on_test(federation.model), on_test(central.model),
        [on_test(a.model) for a in local], central.epochs, [a.epochs for a in local],
        time.monotonic() - started,
    )  # fmt: skip


def report(c: Comparison) -> str:
    s = c.federation.summaries[0]
    lines = ["digit images per peer (0..9):"]
    for i, counts in enumerate(c.split.label_counts()):
        lines.append(f"  peer {i}: {sum(counts):4d}  {counts}")
    lines += [
        f"test images: {len(c.split.y_test)} (held out from every peer)",
        "",
        f"federation: {len(c.federation.summaries)} peers, {s.stop_reason} after {s.laps} laps, "
        f"best lap {s.best_lap}",
        f"every peer holds model {s.model_sha256[:16]}: "
        f"{all(x.model_sha256 == s.model_sha256 for x in c.federation.summaries)}",
        "",
        "accuracy on the test images:",
        f"  federated    {c.federated.accuracy:.3f}  ({c.federation.epochs:.1f} passes)",
        f"  centralized  {c.centralized.accuracy:.3f}  ({c.centralized_epochs:.1f} passes)",
    ]
    for i, (e, ep) in enumerate(zip(c.local_only, c.local_epochs, strict=True)):
        lines.append(f"  peer {i} alone {e.accuracy:.3f}  ({ep:.1f} passes)")
    lines.append(f"(seconds: {c.seconds:.1f})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label skew")
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None, help="the peers' output folders")
    args = parser.parse_args(argv)
    if args.peers < 1 or not args.alpha > 0:
        parser.error("--peers must be at least 1 and --alpha above 0")
    # One thread: on tensors this small, a second one costs more than it gives
    # (3 ms a training step alone, up to 100 ms sharing two busy cores).
    torch.set_num_threads(1)
    out = args.out or Path(tempfile.mkdtemp(prefix="fedup-images-"))
    try:
        comparison = compare(args.seed, args.peers, args.alpha, out)
    except (ImportError, SplitError) as e:
        parser.exit(1, f"images.py: {e}\n")
    print(report(comparison))
    print("outputs in", out)


if __name__ == "__main__":
    main()
