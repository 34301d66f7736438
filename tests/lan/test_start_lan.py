"""``fedup-peer start`` on three hosts of a LAN, with zero configuration.

Three network namespaces ("hosts") joined by a bridge, each running the real
command with its own CSV and nothing else: no ``--listen``, ``--interface`` or
``--bootstrap``, so the peers find each other by mDNS on the interface the
command chooses, form a federation and must all save the same model.

SAFETY: every process here runs in a namespace from the ``netns`` fixture
(tests/lan/conftest.py); nothing multicasts on the machine's interfaces.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import pytest

from fedup.identity import load_or_create_identity
from fedup.learn.loans import generate_lender
from tests.lan.conftest import REPO, Netns

pytestmark = pytest.mark.netns

ROWS = 800
SEEDS = (1, 2, 10)
"""Lenders that spell the target false/true, no/yes and 0/1, and missing values
``null``, ``NA`` and empty: the hosts' CSV files differ in more than their rows."""
TIMEOUT = 180.0
"""Seconds for the whole federation; a run takes about 20 s on two CPUs."""
QUICK = ["--target", "default", "--max-laps", "8", "--patience", "3"]
"""Only what keeps the run short (and names the target of the CSV)."""


@attrs.frozen
class Host:
    ns: str
    address: str
    state: Path
    data: Path
    peer_id: str


@attrs.frozen
class Result:
    host: Host
    returncode: int
    stdout: str
    stderr: str

    def last_json(self) -> dict[str, Any]:
        lines = self.stdout.strip().splitlines()
        assert lines, f"{self.host.ns} printed nothing; stderr:\n{self.tail()}"
        out: dict[str, Any] = json.loads(lines[-1])
        return out

    def tail(self, n: int = 25) -> str:
        return "\n".join(self.stderr.splitlines()[-n:])


def make_hosts(netns: Netns, root: Path, seeds: tuple[int, ...]) -> list[Host]:
    """Hosts on a bridge, each with a state dir, an identity and a lender's CSV, by peer ID."""
    hosts = []
    for (ns, address), seed in zip(netns.hosts_on_a_bridge(len(seeds)), seeds, strict=True):
        state = root / ns.rsplit("-", 1)[-1]
        data = state / "loans.csv"
        peer_id = load_or_create_identity(state).peer_id.text
        generate_lender(seed, n_rows=ROWS).write_csv(data)
        hosts.append(Host(ns, address, state, data, peer_id))
    return hosts


def peer_env() -> dict[str, str]:
    """The test's environment without FEDUP_* settings (zero configuration means none)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDUP_")}
    # Three torch processes share the machine: one thread each trains faster.
    return {**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def start(
    netns: Netns, host: Host, *options: str, log: Path | None = None
) -> subprocess.Popen[bytes]:
    """``fedup-peer start`` on ``host``; its output goes to ``log`` (default ``<state>/start``)
    ``.out`` and ``.err``."""
    argv = [sys.executable, "-m", "fedup.cli", "start", "--state-dir", str(host.state)]
    argv += ["--data", str(host.data), *QUICK, *options]
    return netns.spawn(host.ns, argv, log=log or host.state / "start", env=peer_env())


def finish(
    procs: list[tuple[Host, subprocess.Popen[bytes]]],
    timeout: float = TIMEOUT,
    *,
    logs: Mapping[Host, Path] | None = None,
) -> list[Result]:
    """Wait for every process (all within ``timeout`` s) and collect what each printed
    (into ``<state>/start``, or the ``log`` a host has in ``logs``)."""
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for _, p in procs) and time.monotonic() < deadline:
        time.sleep(0.2)
    results = []
    late = []
    for host, proc in procs:
        log = (logs or {}).get(host, host.state / "start")
        out = Path(f"{log}.out").read_text(errors="replace")
        err = Path(f"{log}.err").read_text(errors="replace")
        code = proc.poll()
        if code is None:
            late.append(f"\n--- {host.ns} ({host.address}):\n" + "\n".join(err.splitlines()[-25:]))
        else:
            results.append(Result(host, code, out, err))
    assert not late, f"still running after {timeout} s:" + "".join(late)
    return results


def check_identical_models(results: list[Result]) -> list[dict[str, Any]]:
    """Every result finished with the same model; returns the summaries."""
    for r in results:
        assert r.returncode == 0, f"{r.host.ns} exited {r.returncode}:\n{r.tail()}"
        assert "Traceback" not in r.stderr, r.tail(60)
        # the default interface choice found the host's LAN address, not loopback
        assert f"listening on {r.host.address}:" in r.stderr, r.tail()
    printed = [r.last_json() for r in results]
    shas = {p["model_sha256"] for p in printed}
    assert len(shas) == 1, printed
    models = [(Path(p["out"]) / "model.safetensors").read_bytes() for p in printed]
    assert {hashlib.sha256(m).hexdigest() for m in models} == shas
    assert len(set(models)) == 1
    summaries = [json.loads((Path(p["out"]) / "summary.json").read_text()) for p in printed]
    expected = sorted(r.host.peer_id for r in results)
    for r, s in zip(results, summaries, strict=True):
        assert s["peer_id"] == r.host.peer_id
        assert s["members"] == expected
        assert s["leader"] == summaries[0]["leader"] in expected  # the one the draw chose
        assert s["model_sha256"] in shas
    assert len({s["run_id"] for s in summaries}) == 1
    return summaries


def test_three_hosts_with_zero_configuration_finish_with_one_model(
    netns: Netns, tmp_path: Path
) -> None:
    hosts = make_hosts(netns, tmp_path, SEEDS)
    spellings = [
        {r["default"] for r in csv.DictReader(h.data.read_text().splitlines())} for h in hosts
    ]
    assert len({frozenset(s) for s in spellings}) == 3, spellings  # each lender its own way
    procs = [(h, start(netns, h, "--min-peers", "3", "--settle", "2")) for h in hosts]
    summaries = check_identical_models(finish(procs))
    assert summaries[0]["stop_reason"] in ("converged", "max-laps")


@pytest.mark.parametrize(
    "mode", [["--mode", "parallel"], ["--mode", "hybrid", "--sub-rings", "2"]], ids=lambda m: m[1]
)
def test_three_hosts_in_a_parallel_mode_finish_with_one_model(
    netns: Netns, tmp_path: Path, mode: list[str]
) -> None:
    """The parallel and hybrid modes across hosts: the all-reduce (and the hybrid mode's
    relay) over the hosts' LAN addresses, found by mDNS."""
    hosts = make_hosts(netns, tmp_path, SEEDS)
    procs = [(h, start(netns, h, "--min-peers", "3", "--settle", "2", *mode)) for h in hosts]
    results = finish(procs)
    summaries = check_identical_models(results)
    assert all(f"{mode[1]} rounds" in r.stderr and "relay broke" not in r.stderr for r in results)
    assert summaries[0]["ok"] and summaries[0]["federated_laps"][0] == -1


def test_a_host_whose_columns_do_not_fit_is_refused(netns: Netns, tmp_path: Path) -> None:
    hosts = make_hosts(netns, tmp_path, SEEDS)
    # The misfit is not the lowest peer, so it does not coordinate; if the draw chooses it
    # to lead, its own data do not fit: it stops, and the others draw again without it.
    fit_a, fit_b, misfit = sorted(hosts, key=lambda h: h.peer_id)
    with misfit.data.open(newline="") as f:
        rows = list(csv.reader(f))
    # The misfit codes its region as numbers where the others name it: the column is
    # categorical by the majority, and also in a tie (two peers), whatever subset of peers
    # the leader sees first, so only the misfit can be refused.  (An extra column is no
    # longer a misfit: the federation leaves it out, tests/integration/test_tables.py.)
    region = rows[0].index("region")
    for i, row in enumerate(rows[1:], start=1):
        row[region] = str(i % 5)
    with misfit.data.open("w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)

    # The misfit is up first so the leader sees it before settling; --min-peers 2, as
    # refusing it leaves two members (with 3 the leader would retry for ever).
    first = start(netns, misfit, "--min-peers", "2", "--settle", "3")
    deadline = time.monotonic() + 60
    while "listening on" not in (misfit.state / "start.err").read_text(errors="replace"):
        assert first.poll() is None, (misfit.state / "start.err").read_text()
        assert time.monotonic() < deadline, "the misfit never started listening"
        time.sleep(0.1)
    procs = [(misfit, first)]
    procs += [(h, start(netns, h, "--min-peers", "2", "--settle", "3")) for h in (fit_a, fit_b)]
    refused, *fit = finish(procs)

    assert refused.returncode != 0, refused.tail()
    assert "Traceback" not in refused.stderr, refused.tail(60)
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith("fedup-peer: error:") and "'region'" in last, last
    assert refused.stdout.strip() == ""
    summaries = check_identical_models(fit)
    assert misfit.peer_id not in summaries[0]["members"]
