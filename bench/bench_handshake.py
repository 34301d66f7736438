"""How long a connection takes to become a secure channel, and what the channel then moves.

Over loopback TCP in one trio process (dialer and listener share one thread):

* ``dial``: from ``TcpTransport.dial`` to the returned :class:`SecureChannel`
  (TCP connect, msg1, msg2, msg3 sent); the responder checks msg3 after that;
* ``dial_echo``: the same plus one byte echoed back through the channel, so
  it includes the responder finishing the handshake and one round trip;
* ``cpu``: both handshake state machines back to back, no I/O (the crypto and
  CBOR cost of one handshake for both sides);
* ``channel_mib_s``: 64 MiB through one channel (1 MiB ``send_all`` calls),
  timed until the receiver has it all, against ``secretstream_floor_mib_s``:
  encrypting and decrypting the same bytes in 1 MiB chunks, nothing else.

Median and p90 over ``ROUNDS`` handshakes after a warm-up.  Run
``python bench/bench_handshake.py``; ``main()`` returns the figures as a dict.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import trio

from fedup.identity import Identity
from fedup.net.channel import SecureChannel
from fedup.net.transport import Credentials, TcpTransport
from fedup.protocol.handshake import InitiatorHandshake, ResponderHandshake
from fedup.protocol.records import Address
from fedup.protocol.secretstream import Decryptor, Encryptor

ROUNDS = 300
WARMUP = 20
MiB = 1024 * 1024
STREAM_MIB = 64
ALICE = Identity(b"\x0a" * 32)
BOB = Identity(b"\x0b" * 32)
NET = "bench"


def _quantiles(samples: list[float]) -> tuple[float, float, float]:
    """(min, median, p90) in milliseconds."""
    ms = sorted(s * 1000 for s in samples)
    return ms[0], statistics.median(ms), ms[int(0.9 * (len(ms) - 1))]


def cpu_handshake() -> float:
    start = time.perf_counter()
    ini = InitiatorHandshake(ALICE, network=NET, expected_peer=BOB.peer_id)
    resp = ResponderHandshake(BOB, network=NET)
    msg2 = resp.receive_msg1(ini.start())
    resp.receive_msg3(ini.receive_msg2(msg2))
    return time.perf_counter() - start


def secretstream_floor() -> float:
    """MiB/s of encrypt + decrypt of STREAM_MIB in 1 MiB chunks, one thread."""
    chunk = os.urandom(MiB)
    key = os.urandom(32)
    start = time.perf_counter()
    enc = Encryptor(key)
    dec = Decryptor(key, enc.header)
    for _ in range(STREAM_MIB):
        dec.pull(enc.push(chunk))
    return STREAM_MIB / (time.perf_counter() - start)


async def measure() -> dict[str, float]:
    dial_times: list[float] = []
    echo_times: list[float] = []
    received = trio.Event()
    total = 0

    async def handler(channel: SecureChannel) -> None:
        nonlocal total
        while data := await channel.receive_some():
            if len(data) == 1:
                await channel.send_all(data)
                continue
            total += len(data)
            if total >= STREAM_MIB * MiB:
                received.set()

    client = TcpTransport(Credentials(ALICE, NET))
    server = TcpTransport(Credentials(BOB, NET))
    async with server.listen(Address("127.0.0.1", 0), handler) as listener:
        address = listener.addresses[0]
        for i in range(WARMUP + ROUNDS):
            start = time.perf_counter()
            channel = await client.dial(address, expected_peer=BOB.peer_id)
            dialed = time.perf_counter()
            await channel.send_all(b"x")
            assert await channel.receive_some() == b"x"
            echoed = time.perf_counter()
            await channel.aclose()
            if i >= WARMUP:
                dial_times.append(dialed - start)
                echo_times.append(echoed - start)

        channel = await client.dial(address, expected_peer=BOB.peer_id)
        chunk = os.urandom(MiB)
        start = time.perf_counter()
        for _ in range(STREAM_MIB):
            await channel.send_all(chunk)
        await received.wait()
        stream_rate = STREAM_MIB / (time.perf_counter() - start)
        await channel.aclose()

    figures: dict[str, float] = {}
    for name, samples in (("dial", dial_times), ("dial_echo", echo_times)):
        low, median, p90 = _quantiles(samples)
        figures[f"{name}_median_ms"] = median
        figures[f"{name}_p90_ms"] = p90
        figures[f"{name}_min_ms"] = low
    figures["channel_mib_s"] = stream_rate
    return figures


def main() -> dict[str, Any]:
    """Run the benchmark, print one line per figure, return the figures."""
    cpu = [cpu_handshake() for _ in range(WARMUP + ROUNDS)][WARMUP:]
    figures: dict[str, Any] = {"rounds": ROUNDS}
    figures.update(trio.run(measure))
    _, cpu_median, cpu_p90 = _quantiles(cpu)
    figures["cpu_median_ms"] = cpu_median
    figures["cpu_p90_ms"] = cpu_p90
    floor = secretstream_floor()
    figures["secretstream_floor_mib_s"] = floor
    figures["channel_over_floor"] = figures["channel_mib_s"] / floor
    for name, value in figures.items():
        print(f"{name:<28}{value:>14.2f}")
    return figures


if __name__ == "__main__":
    main()
