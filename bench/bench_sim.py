"""How the simulator's cost grows with the number of simulated peers.

For 100, 200, 500 and 1,000 peers (one synthetic lender each, the small MLP,
3 laps of 0.1 epoch per hop, virtual clock, one torch thread), each size in
its own process so that peak memory is that run's:

* ``data_s``: generating the lenders' data (not part of the simulation);
* ``formation_s``: from the start to the first hop (discovery, election,
  view; every peer verifies every other's record twice, O(N^2) in all);
* ``lap_s``: wall time of a full training lap (mean of the laps whose end was
  seen), and ``hop_ms`` = ``lap_s`` / N, the per-hop cost, which should not
  grow with N;
* ``tail_s``: from the start of the last lap to the end (that lap, the
  evaluation-only lap and handing the final model around the ring), and its
  parts: ``eval_s`` from the first hop of the evaluation-only lap to the first
  member that saved the final model, ``final_s`` from then to the end (the
  final model handed round the ring, every member saving it);
* ``total_s``: the whole simulation; ``peak_mib``: the process's peak RSS;
  ``lap_rss_mib``: RSS growth from the first lap to the last.

Between consecutive sizes it prints the *growth exponent* of formation, a lap
and the whole run: log(time ratio) / log(size ratio), so 1 is linear and 2
quadratic (a lap has N hops, so a lap's floor is 1; formation, where every peer
hears of every other, is at least 1).

``--formed N`` simulates N peers only until the first hop and prints formation's
wall and CPU seconds and the peak memory (to compare two versions side by side).

Goals: 200 peers, 3 laps in under 60 s (data included) and under 2 GiB, ``hop_ms``
flat in N; 1,000 peers, 3 laps in under 120 s and under 4 GiB, formation's
exponent between 200 and 1,000 at most 1.3 and a lap's at most 1.1.  Run
``python bench/bench_sim.py`` (``--sizes 10,50`` for a quick look); ``main()``
returns the figures.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SIZES = (100, 200, 500, 1000)
LAPS = 3


class _Formed(Exception):
    """Raised from the watcher to stop a run at its first hop (``--formed``)."""


def formed(n: int) -> dict[str, Any]:
    """Simulate ``n`` peers until the first hop (formation only); return the seconds it
    took (wall and CPU) and the peak memory."""
    import resource

    import torch

    from fedup.peer import events as ev
    from fedup.protocol.view import RunSettings
    from fedup.sim import SimSettings, simulate
    from fedup.sim.data import sources_of, synthetic_tables

    torch.set_num_threads(1)
    sources = sources_of(synthetic_tables(n, "lender", seed=0))
    settings = SimSettings(run=RunSettings(max_laps=LAPS, patience=LAPS))

    def watch(index: int, peer: object, at: float, event: object) -> None:
        if isinstance(event, ev.HopTrained):
            raise _Formed

    with tempfile.TemporaryDirectory(prefix="fedup-bench-sim-") as out:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            simulate(sources, Path(out), settings, watch=watch)
        except BaseException as exc:  # the watcher's exception, in trio's groups
            if not _only_formed(exc):
                raise
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"peers": n, "formation_s": wall, "formation_cpu_s": cpu, "peak_mib": peak}


def _only_formed(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return all(_only_formed(e) for e in exc.exceptions)
    return isinstance(exc, _Formed)


def one(n: int) -> dict[str, Any]:
    """Simulate ``n`` peers in this process; return its figures."""
    import torch

    from fedup.peer import events as ev
    from fedup.protocol.view import RunSettings
    from fedup.sim import SimSettings, simulate
    from fedup.sim.data import sources_of, synthetic_tables

    torch.set_num_threads(1)
    start = time.perf_counter()
    sources = sources_of(synthetic_tables(n, "lender", seed=0))
    data_s = time.perf_counter() - start
    settings = SimSettings(run=RunSettings(max_laps=LAPS, patience=LAPS))
    seen: dict[str, float] = {}

    def watch(index: int, peer: object, at: float, event: object) -> None:
        if isinstance(event, ev.HopTrained) and event.lap == LAPS and "eval" not in seen:
            seen["eval"] = time.perf_counter()
        elif isinstance(event, ev.Finished) and "final" not in seen:
            seen["final"] = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="fedup-bench-sim-") as out:
        begun = time.perf_counter()
        result = simulate(sources, Path(out), settings, watch=watch)
    marks = result.laps
    laps = [b.wall - a.wall for a, b in itertools.pairwise(marks)]
    finished = len(result.finished_peers)
    return {
        "peers": n,
        "finished": finished,
        "data_s": data_s,
        "formation_s": marks[0].wall if marks else float("nan"),
        "lap_s": sum(laps) / len(laps) if laps else float("nan"),
        "hop_ms": 1000 * sum(laps) / len(laps) / n if laps else float("nan"),
        "tail_s": result.wall_seconds - marks[-1].wall if marks else float("nan"),
        "eval_s": seen["final"] - seen["eval"] if len(seen) == 2 else float("nan"),
        "final_s": begun + result.wall_seconds - seen["final"] if "final" in seen else float("nan"),
        "total_s": result.wall_seconds,
        "peak_mib": result.peak_rss / 2**20,
        "lap_rss_mib": (marks[-1].rss - marks[0].rss) / 2**20 if marks else float("nan"),
        "bytes_per_peer": sum(p.bytes_sent for p in result.peers) / n,
        "same_model": result.model_sha256 is not None and finished == n,
    }


def main(sizes: tuple[int, ...] = SIZES) -> dict[str, Any]:
    """Run each size in a child process; print one line per figure; return them all."""
    figures: dict[str, Any] = {}
    for n in sizes:
        proc = subprocess.run(
            [sys.executable, __file__, "--one", str(n)],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            print(f"sim_{n}_peers: failed: {proc.stderr.strip().splitlines()[-1:]}")
            figures[f"sim_{n}"] = None
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        figures[f"sim_{n}"] = row
        for key, value in row.items():
            if key == "peers":
                continue
            text = f"{value:.3f}" if isinstance(value, float) else str(value)
            print(f"sim_{n}_peers_{key}: {text}", flush=True)
    done = [n for n in sizes if figures.get(f"sim_{n}")]
    for a, b in itertools.pairwise(done):
        for phase in ("formation_s", "lap_s", "total_s"):
            x, y = figures[f"sim_{a}"][phase], figures[f"sim_{b}"][phase]
            exponent = math.log(y / x) / math.log(b / a) if x > 0 and y > 0 else math.nan
            figures[f"exponent_{phase[:-2]}_{a}_{b}"] = exponent
            print(f"sim_exponent_{phase[:-2]}_{a}_to_{b}: {exponent:.2f}", flush=True)
    big = figures.get("sim_200")
    if big:
        goal = big["data_s"] + big["total_s"] < 60 and big["peak_mib"] < 2048 and big["same_model"]
        print(f"sim_goal_200_peers_3_laps_under_60s_2GiB: {'met' if goal else 'NOT met'}")
        figures["goal_met"] = goal
    huge = figures.get("sim_1000")
    if huge:
        goal = huge["total_s"] < 120 and huge["peak_mib"] < 4096 and huge["same_model"]
        with_data = huge["data_s"] + huge["total_s"]
        print(
            f"sim_goal_1000_peers_3_laps_under_120s_4GiB: {'met' if goal else 'NOT met'} "
            f"(the simulation; {with_data:.1f} s with the data generation)"
        )
        figures["goal_1000_met"] = goal
    if big and huge:
        grow = {
            phase: math.log(huge[phase] / big[phase]) / math.log(5)
            for phase in ("formation_s", "lap_s")
        }
        goal = grow["formation_s"] <= 1.3 and grow["lap_s"] <= 1.1
        print(
            f"sim_goal_growth_200_to_1000_formation_1.3_lap_1.1: {'met' if goal else 'NOT met'} "
            f"({grow['formation_s']:.2f}, {grow['lap_s']:.2f})"
        )
        figures["goal_growth_met"] = goal
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", type=int, default=None, help="(internal) one size, as JSON")
    parser.add_argument("--sizes", default=None, help="comma-separated sizes")
    parser.add_argument(
        "--formed", type=int, default=None, help="one size until its first hop (formation only)"
    )
    args = parser.parse_args()
    if args.formed is not None:
        print(json.dumps(formed(args.formed)))
    elif args.one is not None:
        print(json.dumps(one(args.one)))
    else:
        main(tuple(int(s) for s in args.sizes.split(",")) if args.sizes else SIZES)
