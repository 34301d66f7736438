"""What the federation is measured against, and the ring's learning without a network.

* :func:`simulate_ring` runs :func:`~fedup.learn.ring.train_hop` peer after
  peer, lap after lap, in one process (no sockets, no serialization): the
  learning exactly as the networked ring does it.  Used by tests and tuning.
* :func:`centralized` trains the same model on the pooled data of all peers
  (the upper bound a federation tries to reach).  It is the same code path: a
  ring of one peer holding everything, so the optimizer, batch size, data
  passes per evaluation and stopping rule are identical.
* :func:`local_only` trains one model per peer on its own data alone, stopped
  on its own validation split (what a lender can do without a federation).
* FedAvg-style parallel training (:func:`fedup.learn.fedavg.fedavg`): every peer
  trains from the round's model at once, then the models are averaged; the same
  tasks, settings and stopping rule (the parallel mode's peer in the report).

Every result is scored by :func:`score` on the union of all peers' validation
splits: mean binary cross-entropy, exact ROC AUC and accuracy (a multi-class
table: cross-entropy, accuracy, macro-F1; a regression table: the standardized
MSE that is its loss, and MSE, MAE, R² in the target's units; see
:mod:`fedup.learn.task_metrics`).

``python -m fedup.learn.baselines`` prints the comparison table of
``docs/learning.md`` (``--quick`` for a smaller run, ``--ablation`` for the
effect of each improvement over plain cyclical weight transfer).
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from collections.abc import Callable, Sequence

import attrs
import torch
from torch.nn import functional as F

from fedup.learn.fedavg import FedAvgResult, fedavg, federation_of
from fedup.learn.lap_sums import LapMasks
from fedup.learn.loans import generate_population, partition
from fedup.learn.ring import (
    FederationStats,
    LapResult,
    RingSettings,
    RingState,
    final_weights,
    initial_state,
    model_with,
    train_hop,
)
from fedup.learn.schema import merge_summaries
from fedup.learn.tabular import Table, summarize
from fedup.learn.task import TabularTask, TensorTask, roc_auc
from fedup.learn.task_metrics import prediction_figures

__all__ = [
    "RingResult",
    "Score",
    "centralized",
    "federation_of",
    "local_only",
    "make_tasks",
    "score",
    "simulate_ring",
]

PLAIN_CWT = RingSettings(
    hop_epochs=1.0,
    travel_optimizer=False,
    weight_labels=False,
    average_lap=False,
    keep_best=False,
    patience=2,
)
"""Plain cyclical weight transfer: one local epoch per hop, a fresh optimizer at every
hop, the last hop's model is the lap's output and the last lap's output is final.  It
stops by the same rule as the defaults: no improvement for 2 data passes."""


@attrs.frozen
class Score:
    """A model's quality on the union of the validation splits."""

    loss: float
    auc: float
    accuracy: float
    n: int
    task: str = "binary"
    """The table's task (:mod:`fedup.learn.targets`); a custom task counts as binary."""
    macro_f1: float = math.nan
    """Multi-class: the mean F1 over classes (:mod:`fedup.learn.task_metrics`)."""
    mse: float = math.nan
    """Regression: mean squared error in the target's units (``loss`` is standardized)."""
    mae: float = math.nan
    """Regression: mean absolute error in the target's units."""
    r2: float = math.nan
    """Regression: 1 - SSE / SST over the rows scored."""


@attrs.frozen(eq=False)
class RingResult:
    """What a simulated ring run did."""

    state: RingState
    """The final state; :func:`~fedup.learn.ring.final_weights` is the result."""
    history: tuple[LapResult, ...]
    """Federated validation loss of every evaluated lap output."""
    laps: int
    """Laps run (including the evaluation-only ones)."""
    passes: float
    """Data passes (training samples / training rows) until the final model's lap ended."""
    total_passes: float
    """Data passes of the whole run, including the laps after the best one."""
    seconds: float
    """Wall time of the run."""
    lap_seconds: tuple[float, ...] = ()
    """Wall seconds from the start until lap ``i``'s last hop ended, for each lap run."""

    @property
    def best(self) -> LapResult | None:
        lap = self.state.meta.best_lap
        return next((h for h in self.history if h.lap == lap), None)


def make_tasks(
    tables: Sequence[Table], *, split_seed: int = 0, min_category_count: int = 5, **task_kw: object
) -> list[TabularTask]:
    """Summaries -> merged schema -> one :class:`TabularTask` per table (as peers would)."""
    summaries = [summarize(t, min_category_count=min_category_count) for t in tables]
    schema = merge_summaries(summaries, tables[0].target_name)
    return [
        TabularTask(t, schema, split_seed=split_seed, **task_kw)  # type: ignore[arg-type]
        for t in tables
    ]


LapObserver = Callable[[LapResult, dict[str, torch.Tensor]], None]
"""Called with each evaluated lap's result and the weights that were evaluated."""


def _candidate(state: RingState) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in state.group("cand.").items()}


def simulate_ring(
    tasks: Sequence[TensorTask],
    settings: RingSettings,
    *,
    federation: FederationStats | None = None,
    on_lap: LapObserver | None = None,
) -> RingResult:
    """Run the ring's learning in-process: ``train_hop`` in ring order until done.

    ``on_lap`` sees every evaluated lap output (e.g. to score it on other data).
    """
    start = time.perf_counter()
    fed = federation or federation_of(tasks)
    state = initial_state(tasks[0], settings)
    history: list[LapResult] = []
    masks = LapMasks()  # the sums travel masked, as between peers (hop 0 opens each lap)
    lap = 0
    lap_seconds: list[float] = []
    while True:
        for hop, task in enumerate(tasks):
            # The candidate a hop judges is the one it received (train_hop replaces it).
            judged = _candidate(state) if on_lap is not None else None
            state, metrics = train_hop(task, state, settings, lap, hop, fed, masks=masks)
            if metrics.closed is not None:
                history.append(metrics.closed)
                if on_lap is not None and judged is not None:
                    on_lap(metrics.closed, judged)
            if metrics.done:
                break
        else:
            lap_seconds.append(time.perf_counter() - start)
            lap += 1
            continue
        break
    n_train = sum(t.n_train for t in tasks)
    meta = state.meta
    best = next((h for h in history if h.lap == meta.best_lap), None)
    last = history[-1] if history else None
    final = best if settings.keep_best else last
    return RingResult(
        state=state,
        history=tuple(history),
        laps=lap,
        passes=(final.samples if final else 0) / n_train,
        total_passes=meta.samples / n_train,
        seconds=time.perf_counter() - start,
        lap_seconds=tuple(lap_seconds),
    )


def score(weights: dict[str, torch.Tensor], tasks: Sequence[TensorTask]) -> Score:
    """Loss, exact AUC and accuracy of a model on the union of the tasks' validation splits."""
    metrics = tasks[0].metrics
    if metrics is not None:
        out = torch.cat([t.outputs(model_with(t, weights)).cpu() for t in tasks])
        y = torch.cat([t.y_val.cpu() for t in tasks])
        f = prediction_figures(metrics, out, y)
        return Score(
            f["loss"], math.nan, f.get("accuracy", math.nan), len(y), metrics.kind,
            macro_f1=f.get("macro_f1", math.nan), mse=f.get("mse", math.nan),
            mae=f.get("mae", math.nan), r2=f.get("r2", math.nan),
        )  # fmt: skip
    logits = []
    labels = []
    for t in tasks:
        logits.append(t.outputs(model_with(t, weights)).reshape(-1).cpu())  # scored on the CPU
        labels.append(t.y_val.reshape(-1).cpu())
    z = torch.cat(logits).double()
    y = torch.cat(labels).double()
    loss = float(F.binary_cross_entropy_with_logits(z, y))
    prob = torch.sigmoid(z).numpy()
    yn = y.numpy()
    acc = float(((prob >= 0.5) == (yn > 0.5)).mean())
    return Score(loss, roc_auc(yn, prob), acc, len(yn))


def centralized(tasks: Sequence[TensorTask], settings: RingSettings) -> RingResult:
    """The same training on the pooled data of every task (a ring of one peer)."""
    pooled = TensorTask.pooled(tasks)
    single = attrs.evolve(settings, weight_labels=False)
    return simulate_ring([pooled], single)


def local_only(
    tasks: Sequence[TensorTask],
    settings: RingSettings,
    *,
    on_lap: Callable[[int, LapResult, dict[str, torch.Tensor]], None] | None = None,
) -> list[RingResult]:
    """One model per task trained on its own data and stopped on its own validation split.

    ``on_lap`` gets the task's index with each evaluated lap (see :func:`simulate_ring`).
    """
    single = attrs.evolve(settings, weight_labels=False)

    def observer(i: int) -> LapObserver | None:
        if on_lap is None:
            return None
        return lambda result, weights: on_lap(i, result, weights)

    return [simulate_ring([t], single, on_lap=observer(i)) for i, t in enumerate(tasks)]


# --------------------------------------------------------------------------
# The report


Scenario = tuple[str, str, int, int | None]
SCENARIOS: tuple[Scenario, ...] = (
    ("3 lenders", "lender", 3, None),
    ("10 lenders", "lender", 10, None),
    ("dirichlet:0.3 over 10 lenders' rows", "dirichlet:0.3", 10, 10),
)


def _scenario(spec: str, n_lenders: int, n_peers: int | None, seed: int) -> list[Table]:
    lenders = [d.table for d in generate_population(n_lenders, seed=seed)]
    return partition(lenders, spec, n_peers, seed=seed)


def _row(label: str, sc: Score, passes: float, seconds: float) -> str:
    return (
        f"| {label} | {sc.loss:.4f} | {sc.auc:.4f} | {sc.accuracy:.4f} "
        f"| {passes:.1f} | {seconds:.1f} |"
    )


@attrs.frozen
class Comparison:
    """One scenario, one population seed, one run seed: every model scored the same way."""

    federated: tuple[Score, RingResult]
    centralized: tuple[Score, RingResult]
    plain: tuple[Score, RingResult]
    local: tuple[tuple[Score, RingResult], ...]
    parallel: tuple[Score, FedAvgResult]
    """FedAvg-style parallel training (:mod:`fedup.learn.fedavg`)."""

    @property
    def gap(self) -> float:
        """Federated loss / centralized loss - 1."""
        return self.federated[0].loss / self.centralized[0].loss - 1

    @property
    def beats_local(self) -> bool:
        return all(self.federated[0].loss < s.loss for s, _ in self.local)


def compare(tasks: Sequence[TensorTask], settings: RingSettings) -> Comparison:
    """Federated, centralized, plain CWT, local-only and FedAvg on the same tasks and
    settings."""

    def scored(r: RingResult) -> tuple[Score, RingResult]:
        return score(final_weights(r.state), tasks), r

    return Comparison(
        federated=scored(simulate_ring(tasks, settings)),
        centralized=scored(centralized(tasks, settings)),
        plain=scored(simulate_ring(tasks, attrs.evolve(PLAIN_CWT, seed=settings.seed))),
        local=tuple(scored(r) for r in local_only(tasks, settings)),
        parallel=_scored_fedavg(tasks, settings),
    )


def _scored_fedavg(
    tasks: Sequence[TensorTask], settings: RingSettings
) -> tuple[Score, FedAvgResult]:
    run = fedavg(tasks, settings)
    return score(run.weights, tasks), run


def report(scenarios: Sequence[Scenario], settings: RingSettings, repeats: int = 1) -> None:
    """Print, per scenario, the table for seed 0 and the gap over ``repeats``² seed pairs."""
    torch.set_num_threads(1)
    for name, spec, n_lenders, n_peers in scenarios:
        runs: list[Comparison] = []
        for pop_seed, run_seed in itertools.product(range(repeats), range(repeats)):
            tables = _scenario(spec, n_lenders, n_peers, pop_seed)
            tasks = make_tasks(tables)
            c = compare(tasks, attrs.evolve(settings, seed=run_seed))
            runs.append(c)
            if pop_seed or run_seed:
                continue
            rates = ", ".join(f"{t.target.mean():.2f}" for t in tables)
            sizes = ", ".join(str(t.n_rows) for t in tables)
            print(f"\n### {name}: {len(tables)} peers\n")
            print(f"rows {sizes}; default rates {rates}\n")
            print("| model | val loss | AUC | accuracy | data passes | seconds |")
            print("| --- | --- | --- | --- | --- | --- |")
            for label, (sc, r) in (
                ("ring federated", c.federated),
                ("centralized", c.centralized),
                ("plain CWT", c.plain),
            ):
                print(_row(label, sc, r.passes, r.seconds))
            sc_p, run_p = c.parallel
            print(_row("FedAvg parallel", sc_p, run_p.passes, run_p.seconds))
            order = sorted(range(len(c.local)), key=lambda i: c.local[i][0].loss)
            for label, i in (("best", order[0]), ("worst", order[-1])):
                sc, r = c.local[i]
                print(_row(f"{label} local-only (peer {i})", sc, r.passes, r.seconds))
            fed, cen = c.federated[0], c.centralized[0]
            print(
                f"\nfederated vs centralized: loss {c.gap * 100:+.2f}%, "
                f"AUC {fed.auc - cen.auc:+.4f}; better than every local-only model: "
                f"{c.beats_local}"
            )
        if repeats > 1:
            gaps = [c.gap * 100 for c in runs]
            plain = [(c.plain[0].loss / c.centralized[0].loss - 1) * 100 for c in runs]
            par = [(c.parallel[0].loss / c.centralized[0].loss - 1) * 100 for c in runs]
            print(
                f"\nover {len(runs)} (population seed, run seed) pairs: federated loss "
                f"{sum(gaps) / len(gaps):+.2f}% on average (worst {max(gaps):+.2f}%) vs "
                f"centralized; plain CWT {sum(plain) / len(plain):+.2f}% (worst "
                f"{max(plain):+.2f}%); FedAvg {sum(par) / len(par):+.2f}% (worst "
                f"{max(par):+.2f}%); federated better than every local-only model in "
                f"{sum(c.beats_local for c in runs)}/{len(runs)}"
            )


def ablation(scenarios: Sequence[Scenario], settings: RingSettings, repeats: int = 1) -> None:
    """Each improvement switched off (or on) in turn; mean gap over ``repeats``² seed pairs."""
    torch.set_num_threads(1)
    variants = {
        "defaults": settings,
        "plain CWT": PLAIN_CWT,
        "no travelling optimizer": attrs.evolve(settings, travel_optimizer=False),
        "label weighting on": attrs.evolve(settings, weight_labels=True),
        "no lap averaging": attrs.evolve(settings, average_lap=False),
        "no best-lap keeping": attrs.evolve(settings, keep_best=False),
        "hop 0.25 epoch": attrs.evolve(settings, hop_epochs=0.25, patience=8),
        "hop 1 epoch": attrs.evolve(settings, hop_epochs=1.0, patience=2),
        "proximal 0.01": attrs.evolve(settings, prox_mu=0.01),
    }
    for name, spec, n_lenders, n_peers in scenarios:
        gaps: dict[str, list[tuple[float, float, float]]] = {v: [] for v in variants}
        for pop_seed, run_seed in itertools.product(range(repeats), range(repeats)):
            tasks = make_tasks(_scenario(spec, n_lenders, n_peers, pop_seed))
            seeded = attrs.evolve(settings, seed=run_seed)
            cen = score(final_weights(centralized(tasks, seeded).state), tasks)
            for label, s in variants.items():
                r = simulate_ring(tasks, attrs.evolve(s, seed=run_seed))
                sc = score(final_weights(r.state), tasks)
                gaps[label].append((sc.loss / cen.loss - 1, sc.auc - cen.auc, r.passes))
        print(f"\n### {name} ({repeats**2} seed pairs)\n")
        print("| variant | val loss vs centralized (mean, worst) | AUC difference | data passes |")
        print("| --- | --- | --- | --- |")
        for label, g in gaps.items():
            k = len(g)
            mean_gap = sum(x[0] for x in g) / k * 100
            worst = max(x[0] for x in g) * 100
            print(
                f"| {label} | {mean_gap:+.2f}%, {worst:+.2f}% | "
                f"{sum(x[1] for x in g) / k:+.4f} | {sum(x[2] for x in g) / k:.1f} |"
            )


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Ring federated vs centralized vs local-only.")
    p.add_argument("--ablation", action="store_true", help="the effect of each improvement")
    p.add_argument("--quick", action="store_true", help="only the 3-lender scenario")
    p.add_argument("--repeats", type=int, default=1, help="population seeds x run seeds")
    args = p.parse_args(argv)
    scenarios = SCENARIOS[:1] if args.quick else SCENARIOS
    (ablation if args.ablation else report)(scenarios, RingSettings(), args.repeats)


if __name__ == "__main__":
    main()
