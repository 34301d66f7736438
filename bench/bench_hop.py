"""What the protocol costs per hop of ring training: everything but the training itself.

Real peers (``fedup.Peer.open`` / ``peer.train()``) in one trio process, on
loopback TCP with the real handshake and encryption, bootstrap addresses and
no mDNS; each has a synthetic lender (2,000 rows) and the default tabular MLP,
one torch thread, hops trained in a worker thread as ``fedup-peer start``
does.  A fixed number of laps (``max_laps``, and ``patience`` as large so the
run never stops early), for a ring of 3 peers and one of 6.

How it is measured: one model travels round the ring, so at any moment either
a peer is training it or it is in the protocol's hands.  The benchmark
replaces ``train_hop`` in :mod:`fedup.peer.training` (where the peers look it
up) with a wrapper that notes the wall clock when each hop's training starts
and ends; the peers share the process, hence one clock.  A hop's *overhead*
is the gap from the end of one peer's training to the start of the next
peer's: logging the hop, encoding the state and the payload, sending the blob
over the link to the successor (one connection per neighbour, dialled once per
run), the receiver's checks (signature, digest, the custody machine's rules)
and decoding, and the hand-offs to and from the training thread.  The
custody ``passed`` message goes out after the model was handed on, alongside
the next hop, so it counts only as far as it delays the ring.  The gaps of
a lap add up to the lap's wall time minus its hops' training time (so
``mean`` is that per hop), and they also give the spread.  The first lap is
a warm-up and not counted; the evaluation-only lap and the hop that ends the
run are.  The timed hops are checked against the hop lines of every peer's
``metrics.jsonl`` (each seen once) and against each other (none overlapping).

All peers share one thread for their I/O and crypto and one GIL, so work that
separate machines would do in parallel queues here: a sender starting its
``passed`` message to its predecessor while its successor receives, say.  The
figures are an upper bound in that respect.

Figures, for N = 3 and 6 peers (``hop_N_peers_*``): the overhead's median,
p90 and mean in milliseconds, the hops counted, the median training time of a
hop (for scale), and ``overhead_over_floor``: the median overhead divided by
the floor's.

The *floor*, measured in the same run: one bare secure transfer of the same
model state (the ring state's payload, ``blob_bytes``) between two identities
over loopback TCP, with signed records in the handshake as peers send them:
dial and handshake (``floor_dial_ms``), then the blob sent, verified and
acknowledged and the connection closed (``floor_blob_ms``), together
``floor_transfer_ms`` (medians).  What a hop does on top, CPU only and also
measured here: encoding the state into its payload (``encode_ms``) and
decoding and checking it (``decode_ms``).

The run is ``ROUNDS`` rounds of (each ring, then the floor): on a shared
virtual machine whose speed drifts during a run, both sides of a ratio move
alike, and each ``..._over_floor`` is the median of the rounds' ratios.

Goals: median overhead under 10 ms, flat in N (``overhead_6_over_3`` near 1), and
within 1.25x the floor (``hop_N_peers_overhead_over_floor``; the landed code, which
dialled and shook hands for every blob and every ``passed``, took 1.76x).
Measured by hand before this benchmark existed: median 3.8 ms, p90 4.1 ms for
3 peers, of which about 3.0 ms the blob send and 1 ms dial and handshake.

Run ``python bench/bench_hop.py`` (``--sizes 3 --laps 5 --repeats 50`` for a
quicker run); ``main()`` returns the figures as a dict.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import torch
import trio

import fedup.peer.custody_driver as training
from fedup import Address, Identity, Peer, PeerConfig, RunSettings, TabularSource
from fedup.config import DEFAULT_LIMITS
from fedup.learn.loans import generate_lender
from fedup.learn.ring import RingState
from fedup.learn.ring_payload import RingCodec
from fedup.net.blobs import receive_blob, send_blob
from fedup.net.channel import SecureChannel
from fedup.net.framed import FramedStream
from fedup.net.transport import Credentials, TcpTransport
from fedup.protocol.blob import BlobReplayGuard
from fedup.protocol.records import PeerRecord, next_seq

SIZES = (3, 6)
LAPS = 20
REPEATS = 100
ROUNDS = 3
WARMUP = 10
ROWS = 2000
GOAL_MS = 10.0
RATIO_GOAL = 1.25
"""The federation-engine issue's goal: a hop's overhead within 1.25x one bare secure
transfer of the same state (dial, handshake, blob); the landed code took 1.76x."""
RUN_TIMEOUT = 120.0
NET = "bench-hop"
FLOOR_RUN = b"bench-hop-floor!"


def _quantiles(samples: list[float]) -> tuple[float, float, float]:
    """(median, p90, mean) of seconds, in milliseconds."""
    ms = sorted(s * 1000 for s in samples)
    return statistics.median(ms), ms[int(0.9 * (len(ms) - 1))], statistics.fmean(ms)


# --------------------------------------------------------------------------
# the ring


@attrs.frozen
class Span:
    """One call of ``train_hop``: the hop's position and its wall-clock start and end."""

    lap: int
    hop: int
    start: float
    end: float


@contextmanager
def observed_hops() -> Iterator[list[Span]]:
    """Time every ``train_hop`` the peers call (they look it up in
    ``fedup.peer.custody_driver``)."""
    spans: list[Span] = []
    real = training.train_hop

    def timed(*args: Any, **kw: Any) -> Any:
        start = time.perf_counter()
        new, metrics = real(*args, **kw)
        spans.append(Span(metrics.lap, metrics.hop, start, time.perf_counter()))
        return new, metrics

    training.train_hop = timed
    try:
        yield spans
    finally:
        training.train_hop = real


async def ring(n: int, laps: int, out: Path) -> tuple[list[Span], RingState]:
    """Train ``n`` peers for ``laps`` laps over loopback TCP; return the hops' spans and
    the ring's initial state (the model state that travels)."""
    settings = RunSettings(max_laps=laps, patience=laps)
    sources = [
        TabularSource(generate_lender(100 + i, n_rows=ROWS).table, target="default")
        for i in range(n)
    ]

    def config(i: int, bootstrap: tuple[Address, ...]) -> PeerConfig:
        return PeerConfig(
            identity=Identity.generate(),
            out_dir=out / f"peer{i}",
            network=NET,
            listen=Address("127.0.0.1", 0),
            mdns=False,
            bootstrap=bootstrap,
            min_peers=n,
            settle=0.3,
            run=settings,
        )

    templates: list[RingState] = []

    async def member(
        i: int, bootstrap: tuple[Address, ...], *, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with Peer.open(config(i, bootstrap), sources[i]) as peer:
            task_status.started(peer.addresses)
            await peer.train()
            assert peer.custody is not None
            templates.append(peer.custody.template)

    # Every other peer bootstraps from the first one, as a user would start them.
    with observed_hops() as spans, trio.fail_after(RUN_TIMEOUT):
        async with trio.open_nursery() as nursery:
            first: tuple[Address, ...] = await nursery.start(member, 0, ())
            for i in range(1, n):
                nursery.start_soon(member, i, first)
    _check(spans, out)
    return spans, templates[0]


def _check(spans: list[Span], out: Path) -> None:
    """Every hop the peers logged was timed once, and no two hops overlapped."""
    logged = []
    for path in out.glob("peer*/metrics.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record["type"] == "hop":
                logged.append((record["lap"], record["hop"]))
    timed = [(s.lap, s.hop) for s in spans]
    if sorted(logged) != sorted(timed):
        raise RuntimeError(f"timed {len(timed)} hops but the peers logged {len(logged)}")
    ordered = sorted(spans, key=lambda s: s.start)
    if any(b.start < a.end for a, b in itertools.pairwise(ordered)):
        raise RuntimeError("two hops overlapped: the ring did not run as one model")


def overheads(spans: list[Span]) -> list[float]:
    """Seconds from the end of each hop's training to the start of the next, after lap 0."""
    ordered = sorted(spans, key=lambda s: s.start)
    return [b.start - a.end for a, b in itertools.pairwise(ordered) if b.lap >= 1]


# --------------------------------------------------------------------------
# the floor and the codec


def payload_of(state: RingState) -> memoryview:
    """The blob a peer sends for ``state`` (its run's codec, made once per run)."""
    return RingCodec(state, limits=DEFAULT_LIMITS).encode(state, view=b"v" * 32)


def cpu_times(template: RingState, repeats: int) -> tuple[list[float], list[float]]:
    """Seconds to encode the state into its payload as a member does after training
    (its tensors once, checked, then the framing), and to decode and check it."""
    codec = RingCodec(template, limits=DEFAULT_LIMITS)
    encodes, decodes = [], []
    for i in range(WARMUP + repeats):
        start = time.perf_counter()
        body = codec.body(template)
        if codec.problem(template, body) is not None:
            raise RuntimeError("the template state does not pass its own check")
        data = codec.encode(template, view=b"v" * 32, body=body)
        encoded = time.perf_counter()
        codec.decode(data)
        if i >= WARMUP:
            encodes.append(encoded - start)
            decodes.append(time.perf_counter() - encoded)
    return encodes, decodes


def _credentials(identity: Identity, address: Address) -> Credentials:
    """A peer's credentials, with the signed record it sends in every handshake."""
    record = PeerRecord(identity.peer_id, next_seq(), (address,), NET).seal(identity)
    return Credentials(identity, NET, local_record=record)


async def transfer_floor(payload: memoryview, repeats: int) -> tuple[list[float], list[float]]:
    """Seconds of dial + handshake, and of sending the blob until acknowledged + closing."""
    alice, bob = Identity.generate(), Identity.generate()
    guard = BlobReplayGuard()
    limits = DEFAULT_LIMITS

    async def handler(channel: SecureChannel) -> None:
        framed = FramedStream(channel, peer="alice", limits=limits)
        await receive_blob(
            framed, me=bob.peer_id, remote=alice.peer_id, run_id=FLOOR_RUN, guard=guard
        )

    dials: list[float] = []
    blobs: list[float] = []
    client = TcpTransport(_credentials(alice, Address("127.0.0.1", 9)), limits=limits)
    server = TcpTransport(Credentials(bob, NET), limits=limits)
    async with server.listen(Address("127.0.0.1", 0), handler) as listener:
        server.credentials = _credentials(bob, listener.addresses[0])
        for i in range(WARMUP + repeats):
            start = time.perf_counter()
            channel = await client.dial(listener.addresses[0], expected_peer=bob.peer_id)
            dialed = time.perf_counter()
            framed = FramedStream(channel, peer="bob", limits=limits)
            await send_blob(
                framed, alice, run_id=FLOOR_RUN, kind="model", lap=i, hop=0, epoch=0,
                recipient=bob.peer_id, data=payload,
            )  # fmt: skip
            await framed.aclose()
            if i >= WARMUP:
                dials.append(dialed - start)
                blobs.append(time.perf_counter() - dialed)
    return dials, blobs


# --------------------------------------------------------------------------


async def measure(
    sizes: tuple[int, ...], laps: int, repeats: int, rounds: int = ROUNDS
) -> dict[str, Any]:
    """Rounds of (each ring, then the floor), so that a host whose speed drifts during
    the run (shared virtual machines do) moves both sides of a ratio alike; the
    figures are medians over all rounds, each ratio the median of the rounds' ratios."""
    figures: dict[str, Any] = {}
    gaps: dict[int, list[float]] = {n: [] for n in sizes}
    trains: dict[int, list[float]] = {n: [] for n in sizes}
    ratios: dict[int, list[float]] = {n: [] for n in sizes}
    dials: list[float] = []
    blobs: list[float] = []
    template: RingState | None = None
    with tempfile.TemporaryDirectory(prefix="fedup-bench-hop-") as tmp:
        for r in range(rounds):
            round_medians = {}
            for n in sizes:
                spans, template = await ring(n, laps, Path(tmp) / f"round{r}-ring{n}")
                these = overheads(spans)
                gaps[n] += these
                round_medians[n] = statistics.median(these)
                trains[n] += [s.end - s.start for s in spans if s.lap >= 1]
            assert template is not None
            d, b = await transfer_floor(payload_of(template), repeats)
            dials += d
            blobs += b
            floor = statistics.median(x + y for x, y in zip(d, b, strict=True))
            for n in sizes:
                ratios[n].append(round_medians[n] / floor)
    assert template is not None
    medians = {}
    for n in sizes:
        median, p90, mean = _quantiles(gaps[n])
        medians[n] = median
        figures[f"hop_{n}_peers_overhead_median_ms"] = median
        figures[f"hop_{n}_peers_overhead_p90_ms"] = p90
        figures[f"hop_{n}_peers_overhead_mean_ms"] = mean
        figures[f"hop_{n}_peers_hops"] = len(gaps[n])
        figures[f"hop_{n}_peers_train_median_ms"] = statistics.median(trains[n]) * 1000
    payload = payload_of(template)
    encodes, decodes = cpu_times(template, repeats)
    floor_ms = statistics.median(d + b for d, b in zip(dials, blobs, strict=True)) * 1000
    figures["blob_bytes"] = payload.nbytes
    figures["floor_dial_ms"] = statistics.median(dials) * 1000
    figures["floor_blob_ms"] = statistics.median(blobs) * 1000
    figures["floor_transfer_ms"] = floor_ms
    figures["encode_ms"] = statistics.median(encodes) * 1000
    figures["decode_ms"] = statistics.median(decodes) * 1000
    for n in sizes:
        figures[f"hop_{n}_peers_overhead_over_floor"] = statistics.median(ratios[n])
    small, big = min(medians), max(medians)
    if big != small:
        figures[f"overhead_{big}_over_{small}"] = medians[big] / medians[small]
    figures["goal_met"] = all(m < GOAL_MS for m in medians.values())
    figures["ratio_goal_met"] = all(statistics.median(ratios[n]) <= RATIO_GOAL for n in sizes)
    return figures


def main(
    sizes: tuple[int, ...] = SIZES, laps: int = LAPS, repeats: int = REPEATS
) -> dict[str, Any]:
    """Run the benchmark, print one line per figure, return the figures."""
    torch.set_num_threads(1)
    figures = trio.run(measure, sizes, laps, repeats)
    for name, value in figures.items():
        if name == "goal_met":
            print(f"{f'goal_overhead_under_{GOAL_MS:g}ms':<36}{'met' if value else 'NOT met':>14}")
        elif name == "ratio_goal_met":
            label = f"goal_overhead_under_{RATIO_GOAL:g}x_floor"
            print(f"{label:<36}{'met' if value else 'NOT met':>14}")
        elif isinstance(value, int):
            print(f"{name:<36}{value:>14}")
        else:
            print(f"{name:<36}{value:>14.2f}")
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="ring sizes, e.g. 3,6")
    parser.add_argument("--laps", type=int, default=LAPS, help="training laps per ring")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="floor transfers timed")
    args = parser.parse_args()
    main(tuple(int(s) for s in args.sizes.split(",")), args.laps, args.repeats)
