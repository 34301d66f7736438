"""Multi-class and regression targets: the federation against centralized training.

The goal: on synthetic data made for each task, with 3 and 10 peers, the federated
model is within 2% of centralized training on the union's main metric (multi-class:
log loss, the cross-entropy; regression: MSE).

Data (:mod:`fedup.learn.loan_targets`): one synthetic lender per peer (lender ``i``
of population ``seed``: its own customers, non-IID by construction), with a 3-class
``grade`` or a numeric ``interest_rate`` target instead of ``default``.

Each run is what ``fedup-peer simulate --baselines`` runs, in process: one real peer
per lender (:func:`fedup.sim.simulate`, the in-memory network on the virtual clock,
default run settings, ``--seed`` = the population seed) and the report of
:func:`fedup.sim.report.build_report` with the baselines, so centralized training is
the same code path (a ring of one peer on the pooled training splits, the same model,
splits and stopping rule).  Every figure is read from that report:

* ``fed``, ``cen``: the main metric on the union of the peers' validation splits;
  ``gap`` = fed / cen - 1 (negative: the federation is better);
* the other figures (accuracy and macro-F1; MAE and R²) and the data passes.

Run ``python bench/bench_tasks.py`` (``--quick``: 3 peers, seed 0; ``--seeds 0 1``);
``main()`` returns the figures.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from fedup.learn.loan_targets import generate_graded_lender, generate_priced_lender
from fedup.learn.loans import lender_seed
from fedup.protocol.view import RunSettings
from fedup.sim import SimSettings, simulate
from fedup.sim.data import sources_of
from fedup.sim.report import build_report

GAP_LIMIT = 0.02
TASKS = {
    "multiclass": (generate_graded_lender, "val_loss", ("accuracy", "macro_f1")),
    "regression": (generate_priced_lender, "mse", ("mae", "r2")),
}
PEERS = (3, 10)
SEEDS = (0, 1, 2)


def run_one(task: str, peers: int, seed: int, out: Path) -> dict[str, Any]:
    """One simulation with baselines; the figures of its report."""
    gen, main_key, others = TASKS[task]
    tables = [gen(lender_seed(seed, i)).table for i in range(peers)]
    sources = sources_of(tables, device="cpu")
    start = time.perf_counter()
    result = simulate(sources, out, SimSettings(seed=seed, run=RunSettings()))
    report = build_report(result, sources, baselines=True)
    fed, cen = report["federated"], report["centralized"]
    f, c = fed["union"][main_key], cen["union"][main_key]
    return {
        "task": task,
        "peers": peers,
        "seed": seed,
        "rows": sum(t.n_rows for t in tables),
        "metric": main_key,
        "fed": f,
        "cen": c,
        "gap": f / c - 1,
        **{f"fed_{k}": fed["union"][k] for k in others},
        **{f"cen_{k}": cen["union"][k] for k in others},
        "fed_passes": fed["mean"]["epochs"],
        "cen_passes": cen["mean"]["epochs"],
        "finished": report["simulation"]["finished"],
        "seconds": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 peers, seed 0")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    peers = (3,) if args.quick else PEERS
    seeds = [0] if args.quick else args.seeds
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for task in TASKS:
            for n in peers:
                for seed in seeds:
                    r = run_one(task, n, seed, Path(tmp) / f"{task}-{n}-{seed}")
                    runs.append(r)
                    extra = "  ".join(
                        f"{k[4:]} {r[k]:.4f}/{r['cen_' + k[4:]]:.4f}"
                        for k in r
                        if k.startswith("fed_") and k != "fed_passes"
                    )
                    print(
                        f"{task:<10} {n:>2} peers seed {seed}: {r['metric']} fed "
                        f"{r['fed']:.4f} cen {r['cen']:.4f} gap {r['gap']:+.2%}  {extra}  "
                        f"passes {r['fed_passes']:.1f}/{r['cen_passes']:.1f}  "
                        f"{r['seconds']:.0f} s",
                        flush=True,
                    )
    summary = {}
    for task in TASKS:
        for n in peers:
            gaps = [r["gap"] for r in runs if r["task"] == task and r["peers"] == n]
            met = sum(g <= GAP_LIMIT for g in gaps)
            summary[f"{task}_{n}"] = {"mean_gap": sum(gaps) / len(gaps), "worst_gap": max(gaps),
                                      "met": met, "runs": len(gaps)}  # fmt: skip
            print(
                f"{task} {n} peers: gap mean {sum(gaps) / len(gaps):+.2%}, worst "
                f"{max(gaps):+.2%}; within {GAP_LIMIT:.0%} in {met}/{len(gaps)} runs"
            )
    figures = {"runs": runs, "summary": summary}
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
