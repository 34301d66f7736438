"""Benchmark: how fast 10 peers on one host find and verify each other over real mDNS.

Figure: the time from the moment the last peer starts (begins registering its
service; every peer's mDNS browser is already open, as when a group boots
together) until every peer has verified every other peer's signed record.
Floor: zeroconf's own registration time (probing plus announcing) in the same
run; the ratio says how much our verification and bridging add (below 1 means
peers verify each other before zeroconf's registration call even returns).
Goal: under 2.5 s.

SAFETY: real mDNS multicasts, so the peers run in a fresh network namespace
(``unshare --net``, loopback only) that disappears with the process.  Without
root or ``unshare`` the benchmark is skipped, never run on the real interfaces.

Usage: ``python bench/bench_discovery.py [--peers 10] [--runs 3]``; from code,
``main()`` returns the figures as a dict.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from contextlib import AsyncExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GOAL_SECONDS = 2.5


async def _one_run(n: int) -> dict[str, float]:
    import trio

    from fedup.identity import Identity
    from fedup.net.discovery import MdnsDiscovery, NetworkScope
    from fedup.protocol.records import Address, PeerRecord, next_seq

    idents = [Identity.generate() for _ in range(n)]
    everyone = {i.peer_id for i in idents}
    starts: list[float] = []
    registrations: list[float] = []
    done_at: list[float] = []
    discoveries: list[MdnsDiscovery] = []
    async with AsyncExitStack() as stack:
        for ident in idents:
            discoveries.append(
                await stack.enter_async_context(
                    MdnsDiscovery.open(
                        scope=NetworkScope("bench"), loopback=True, local_peer=ident.peer_id
                    )
                )
            )

        async def start(i: int, ident: Identity, disc: MdnsDiscovery) -> None:
            record = PeerRecord(
                ident.peer_id, next_seq(), (Address("127.0.0.1", 5000 + i),), "bench"
            ).seal(ident)
            starts.append(trio.current_time())
            await disc.announce(record)
            assert disc.registration_seconds is not None
            registrations.append(disc.registration_seconds)

        async def watch(disc: MdnsDiscovery) -> None:
            await disc.wait_for(lambda peers: len(peers) == n - 1)
            done_at.append(trio.current_time())

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for i, (ident, disc) in enumerate(zip(idents, discoveries, strict=True)):
                    nursery.start_soon(watch, disc)
                    nursery.start_soon(start, i, ident, disc)
        for disc in discoveries:
            assert disc.local_record is not None
            assert set(disc.peers()) | {disc.local_record.peer_id} == everyone
            assert not disc.rejections
    return {
        "discovery": max(done_at) - max(starts),
        "registration_median": statistics.median(registrations),
        "registration_max": max(registrations),
    }


def _inside(n: int, runs: int) -> None:
    import logging

    import trio

    logging.basicConfig(level=logging.WARNING)
    results = [trio.run(_one_run, n) for _ in range(runs)]
    print(json.dumps(results))


def _why_not() -> str | None:
    if sys.platform != "linux":
        return "needs Linux network namespaces"
    if os.geteuid() != 0:
        return "needs root to create a network namespace"
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "needs 'unshare' (util-linux) and 'ip' (iproute2)"
    return None


def main(peers: int = 10, runs: int = 3) -> dict[str, object]:
    """Run the benchmark in a private namespace; print and return the figures."""
    reason = _why_not()
    if reason:
        print(f"bench_discovery: skipped ({reason})")
        return {"skipped": reason}
    script = (
        "ip link set lo up && exec "
        f"{sys.executable} {Path(__file__).resolve()} --inside --peers {peers} --runs {runs}"
    )
    proc = subprocess.run(
        ["unshare", "--net", "--", "sh", "-c", script],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60 + 40 * runs,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"bench_discovery failed: {proc.stderr[-2000:]}")
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    discovery = statistics.median(r["discovery"] for r in results)
    registration = statistics.median(r["registration_median"] for r in results)
    figures: dict[str, object] = {
        "peers": peers,
        "runs": runs,
        "discovery_all_verified_s": round(discovery, 3),
        "discovery_worst_run_s": round(max(r["discovery"] for r in results), 3),
        "zeroconf_registration_s": round(registration, 3),
        "ratio_to_registration": round(discovery / registration, 2),
        "goal_s": GOAL_SECONDS,
        "meets_goal": discovery < GOAL_SECONDS,
    }
    for name, value in figures.items():  # one line per figure
        print(f"{name:<36}{value!s:>16}")
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    cli = parser.parse_args()
    if cli.inside:
        _inside(cli.peers, cli.runs)
    else:
        main(cli.peers, cli.runs)
