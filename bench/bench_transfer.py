"""How fast a ResNet-18-sized model goes from one peer to the next, against the crypto floor.

Two peers in one trio process, connected over loopback TCP through the real
handshake and :class:`~fedup.net.channel.SecureChannel`.  One transfer, timed
from state dict to state dict, is: encode (``state_to_bytes``), hash and sign
the header, encrypt, send, receive, decrypt, reassemble, verify the digest,
acknowledge, decode (``bytes_to_state`` checked against the model, zero copy).
The connection and handshake are set up once, outside the timing.

Figures are medians of ``REPEATS`` runs (``best_*``: the fastest run).

The machine must be otherwise idle, with at least two cores for this process.
Both peers run here, so one transfer costs about 1.6 cores' worth of CPU: the
trio thread encrypts, decrypts and moves the bytes, while worker threads run
the sender's and the receiver's BLAKE2b (two passes, by protocol) alongside;
the crypto floor below uses one core.  With a single free core (another
process busy on the second) the ratio drops to about 0.57 although nothing in
FedUp changed.  So the run also reports the CPU it used (``transfer_cpu_ms``,
``cores_used``) and what *other* processes used meanwhile
(``other_load_cores``, from ``/proc/stat``; -1 where unavailable), and warns on
stderr when the timed transfers did not have two cores to themselves.

Reference figures, measured in the same run on the same bytes:

* the *crypto floor*: secretstream encrypt + decrypt of the blob in 1 MiB
  chunks plus one BLAKE2b pass, single thread, nothing else;
* *raw loopback*: the blob through plain trio TCP (``send_all`` /
  ``receive_some``), no framing, no crypto.

Receiver memory, relative to the blob size, in separate transfers of the
already encoded blob (so the sender's blob is part of the baseline): the rise
of the process's peak RSS (``VmHWM`` of ``/proc/self/status``, reset through
``/proc/self/clear_refs``; -1 where unavailable), which counts every byte the
receiver touches including its memory-mapped receive buffer and the decoded
state, plus the sender's small per-chunk buffers; and the rise of
:mod:`tracemalloc`'s peak (Python and numpy allocations only: it does not see
memory maps).

Run ``python bench/bench_transfer.py``; ``main()`` returns the figures.
"""

from __future__ import annotations

import gc
import hashlib
import os
import statistics
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import attrs
import torch
import trio

from fedup.config import DEFAULT_LIMITS
from fedup.identity import Identity
from fedup.learn.weights import bytes_to_state, state_to_bytes
from fedup.net.blobs import receive_blob, send_blob
from fedup.net.framed import FramedStream
from fedup.net.transport import Credentials, loopback_channel_pair
from fedup.protocol.blob import BlobReplayGuard
from fedup.protocol.secretstream import Decryptor, Encryptor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tensors import resnet18_state

REPEATS = 7
MiB = 1024 * 1024
ALICE = Identity(b"\x0a" * 32)
BOB = Identity(b"\x0b" * 32)
RUN = b"bench-transfer-1"
BUSY_OTHERS = 0.2
"""Cores used by other processes during the timed transfers above which we warn."""


def torch_state() -> dict[str, torch.Tensor]:
    """ResNet-18's state dict (exact shapes, ~11.7M parameters) as torch tensors."""
    return {name: torch.from_numpy(array) for name, array in resnet18_state().items()}


# --------------------------------------------------------------------------
# connection set-up


async def _tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    accepted: list[trio.SocketStream] = []
    async with trio.open_nursery() as nursery:

        async def accept() -> None:
            stream = await listeners[0].accept()
            assert isinstance(stream, trio.SocketStream)
            accepted.append(stream)

        nursery.start_soon(accept)
        dialed = await trio.open_tcp_stream("127.0.0.1", port)
    await listeners[0].aclose()
    return dialed, accepted[0]


# --------------------------------------------------------------------------
# the measured transfer


async def transfer(
    alice: FramedStream,
    bob: FramedStream,
    state: dict[str, torch.Tensor],
    guard: BlobReplayGuard,
    lap: int,
    *,
    blob: memoryview | None = None,
) -> dict[str, torch.Tensor]:
    """One hop, state dict to state dict; returns Bob's decoded state."""
    out: list[dict[str, torch.Tensor]] = []

    async def sender() -> None:
        data = state_to_bytes(state) if blob is None else blob
        await send_blob(
            alice,
            ALICE,
            run_id=RUN,
            kind="model",
            lap=lap,
            hop=1,
            epoch=1,
            recipient=BOB.peer_id,
            data=data,
        )

    async def receiver() -> None:
        received = await receive_blob(
            bob, me=BOB.peer_id, remote=ALICE.peer_id, run_id=RUN, guard=guard
        )
        out.append(bytes_to_state(received.data, like=state))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        nursery.start_soon(receiver)
    return out[0]


def crypto_floor(blob: memoryview, chunk: int) -> float:
    """Seconds for secretstream encrypt + decrypt (``chunk``-byte pieces) + one BLAKE2b."""
    view = memoryview(blob)
    key = bytes(range(32))
    t0 = time.perf_counter()
    enc = Encryptor(key)
    sealed = [enc.push(view[i : i + chunk]) for i in range(0, len(blob), chunk)]
    dec = Decryptor(key, enc.header)
    for piece in sealed:
        dec.pull(piece)
    hashlib.blake2b(blob, digest_size=32).digest()
    return time.perf_counter() - t0


async def raw_loopback(blob: memoryview) -> float:
    """Seconds to move ``blob`` through plain trio loopback TCP."""
    a, b = await _tcp_pair()
    total = len(blob)
    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.send_all, blob)
        got = 0
        while got < total:
            got += len(await b.receive_some(MiB))
    elapsed = time.perf_counter() - t0
    await a.aclose()
    await b.aclose()
    return elapsed


def _system_busy_seconds() -> float | None:
    """CPU seconds the whole machine spent busy (or stolen), from ``/proc/stat``; None if absent."""
    try:
        with open("/proc/stat") as stat:
            fields = stat.readline().split()
    except OSError:
        return None
    # cpu user nice system idle iowait irq softirq steal ...
    busy = sum(int(fields[i]) for i in (1, 2, 3, 6, 7, 8) if i < len(fields))
    return busy / os.sysconf("SC_CLK_TCK")


@attrs.frozen
class _Usage:
    """CPU used during the timed transfers."""

    wall: float
    own_cpu: float
    """This process, every thread (user + system)."""
    other_cores: float
    """Average cores used by everything else on the machine; -1 if unknown."""


async def _transfers(
    alice: FramedStream,
    bob: FramedStream,
    state: dict[str, torch.Tensor],
    blob: memoryview,
    repeats: int,
) -> tuple[list[float], _Usage, int, int]:
    """Time ``repeats`` transfers, then measure memory.

    Returns (seconds each, CPU usage during them, RSS peak, traced peak).
    """
    guard = BlobReplayGuard()
    lap = 0
    decoded = await transfer(alice, bob, state, guard, lap)  # warm-up, and check
    assert all(torch.equal(decoded[n], t) for n, t in state.items())
    del decoded
    effective: list[float] = []
    wall = own_cpu = 0.0
    busy_start = _system_busy_seconds()
    window_cpu, window_start = time.process_time(), time.perf_counter()
    for _ in range(repeats):
        lap += 1
        gc.collect()
        c0 = time.process_time()
        t0 = time.perf_counter()
        decoded = await transfer(alice, bob, state, guard, lap)
        effective.append(time.perf_counter() - t0)
        own_cpu += time.process_time() - c0
        wall += effective[-1]
        del decoded
    busy_end, window_cpu, window = (
        _system_busy_seconds(),
        time.process_time() - window_cpu,
        time.perf_counter() - window_start,
    )
    if busy_start is None or busy_end is None:
        other = -1.0
    else:  # over the whole loop (gc.collect() included), as /proc/stat sees it
        other = max(0.0, (busy_end - busy_start) - window_cpu) / window
    usage = _Usage(wall=wall, own_cpu=own_cpu, other_cores=other)

    # Receiver memory, in separate transfers of the already encoded blob.
    gc.collect()
    base = _reset_peak_rss()
    lap += 1
    decoded = await transfer(alice, bob, state, guard, lap, blob=blob)
    rss_peak = _status_bytes("VmHWM") - base if base is not None else -1
    del decoded
    gc.collect()
    tracemalloc.start()
    traced_base = tracemalloc.get_traced_memory()[0]
    lap += 1
    decoded = await transfer(alice, bob, state, guard, lap, blob=blob)
    traced_peak = tracemalloc.get_traced_memory()[1] - traced_base
    tracemalloc.stop()
    del decoded
    return effective, usage, rss_peak, traced_peak


def _status_bytes(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status``, in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak_rss() -> int | None:
    """Reset the peak RSS (VmHWM) to the current RSS; return it, or None if not Linux."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return _status_bytes("VmRSS")
    except OSError:
        return None


async def _main(repeats: int, verbose: bool) -> dict[str, float]:
    limits = DEFAULT_LIMITS
    state = torch_state()
    blob = state_to_bytes(state)
    size = len(blob)
    async with loopback_channel_pair(
        Credentials(ALICE, "bench"), Credentials(BOB, "bench"), limits=limits
    ) as (a_chan, b_chan):
        alice = FramedStream(a_chan, peer="bob", limits=limits)
        bob = FramedStream(b_chan, peer="alice", limits=limits)
        effective, usage, rss_peak, traced_peak = await _transfers(alice, bob, state, blob, repeats)
    floor = [crypto_floor(blob, limits.blob_chunk_size) for _ in range(repeats)]
    raw = [await raw_loopback(blob) for _ in range(repeats)]

    eff_s, floor_s, raw_s = (statistics.median(x) for x in (effective, floor, raw))
    figures = {
        "blob_bytes": float(size),
        "tensors": float(len(state)),
        "effective_mib_s": size / MiB / eff_s,
        "crypto_floor_mib_s": size / MiB / floor_s,
        "raw_loopback_mib_s": size / MiB / raw_s,
        "effective_over_crypto_floor": floor_s / eff_s,
        "effective_over_raw": raw_s / eff_s,
        "best_effective_mib_s": size / MiB / min(effective),
        "best_effective_over_best_floor": min(floor) / min(effective),
        "transfer_ms": eff_s * 1000,
        "transfer_cpu_ms": usage.own_cpu / repeats * 1000,
        "cores_used": usage.own_cpu / usage.wall,
        "cores_available": _cores_available(),
        "other_load_cores": usage.other_cores,
        "receiver_peak_rss_bytes": float(rss_peak),
        "receiver_peak_rss_over_blob": rss_peak / size,
        "receiver_peak_traced_over_blob": traced_peak / size,
    }
    if verbose:
        for name, value in figures.items():
            print(f"{name:30s} {value:14.2f}")
    cores = _cores_available()
    if cores < 2 or usage.other_cores > BUSY_OTHERS:
        print(
            f"warning: the transfers did not have two cores to themselves ({cores:g} "
            f"available, other processes used {usage.other_cores:.2f} cores meanwhile); one "
            f"transfer takes {usage.own_cpu / repeats * 1000:.0f} ms of CPU over its threads, "
            "the crypto floor runs on one core, so effective_over_crypto_floor is "
            "understated: rerun on an idle machine with two free cores",
            file=sys.stderr,
        )
    return figures


def _cores_available() -> float:
    """CPUs this process may run on: its affinity, capped by a cgroup v2 CPU quota."""
    try:
        cores: float = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, int(quota) / int(period))
    except (OSError, ValueError):
        pass
    return cores


def main(repeats: int = REPEATS, *, verbose: bool = True) -> dict[str, Any]:
    """Run the benchmark; return every figure (MiB/s, ratios, bytes, milliseconds)."""
    return trio.run(_main, repeats, verbose)


if __name__ == "__main__":
    main()
