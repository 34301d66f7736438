"""A process the LAN tests start inside a network namespace (``ip netns exec``).

``peer``: runs :class:`~fedup.net.discovery.MdnsDiscovery`, announces a record
and prints one JSON object per line on stdout: ``{"ready": ...}`` once
announced, then ``{"event": "found"|"updated"|"lost", ...}``.  It reads
commands on stdin: ``stats`` (prints rejections, drops, peers and sightings),
``update HOST...`` (announces a newer record with those addresses) and
``quit`` (or end of input: goodbye and exit).

``forge``: a raw python-zeroconf instance that registers a service with the
given TXT bytes and addresses, as an attacker on the LAN would; prints
``{"ready": true}`` and waits for end of input.

Never run this outside a namespace the test created: it multicasts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import trio


def emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


async def run_peer(args: argparse.Namespace) -> None:
    from fedup.identity import Identity
    from fedup.net.discovery import MdnsDiscovery, NetworkScope
    from fedup.protocol.records import Address, PeerRecord, network_key_id, next_seq

    ident = Identity(bytes.fromhex(args.seed))
    key_id = network_key_id(bytes.fromhex(args.network_key)) if args.network_key else None
    scope = NetworkScope(args.network, key_id)

    def record(hosts: list[str], seq: int) -> object:
        addrs = tuple(Address.checked(h, args.port) for h in hosts)
        return PeerRecord(ident.peer_id, seq, addrs, args.network, key_id).seal(ident)

    async with MdnsDiscovery.open(
        scope=scope,
        interfaces=args.interface or None,
        loopback=args.loopback,
        local_peer=ident.peer_id,
        record_ttl=args.ttl,
    ) as disc:
        events = disc.subscribe()

        async def print_events() -> None:
            async for e in events:
                emit(
                    event=str(e.kind),
                    peer=e.peer_id.text,
                    seq=e.record.record.seq,
                    addrs=[str(a) for a in e.record.record.addresses],
                    cause=str(e.cause) if e.cause else None,
                    t=time.monotonic(),
                )

        seq = next_seq()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(print_events)
            if not args.passive:
                await disc.announce(record(args.host, seq))  # type: ignore[arg-type]
            emit(
                ready=True,
                peer=ident.peer_id.text,
                interfaces=disc.interfaces,
                registration=disc.registration_seconds,
                envelope=disc.local_record.envelope.hex() if disc.local_record else None,
                t=time.monotonic(),
            )
            stdin = trio.lowlevel.FdStream(os.dup(0))
            buffer = b""
            while True:
                chunk = await stdin.receive_some(4096)
                if not chunk:
                    break
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    words = line.decode().split()
                    if not words:
                        continue
                    if words[0] == "quit":
                        nursery.cancel_scope.cancel()
                        return
                    if words[0] == "stats":
                        emit(
                            stats=True,
                            rejections=disc.rejections,
                            drops=disc.drops,
                            peers=sorted(p.text for p in disc.peers()),
                            sightings=[s.to_json() for s in disc.sightings()],
                        )
                    elif words[0] == "update":
                        seq = next_seq(seq)
                        await disc.announce(record(words[1:], seq))  # type: ignore[arg-type]
                        emit(updated=True, seq=seq)
            nursery.cancel_scope.cancel()


def run_forge(args: argparse.Namespace) -> None:
    from zeroconf import IPVersion, ServiceInfo, Zeroconf

    from fedup.protocol.announce import SERVICE_TYPE

    zc = Zeroconf(interfaces=[args.interface], ip_version=IPVersion.V4Only)
    try:
        info = ServiceInfo(
            SERVICE_TYPE,
            f"{args.name}.{SERVICE_TYPE}",
            port=args.port,
            properties=bytes.fromhex(args.txt),
            server=f"{args.name}.local.",
            parsed_addresses=args.address,
            host_ttl=args.ttl,
        )
        zc.register_service(info)
        emit(ready=True, name=info.name)
        sys.stdin.read()
    finally:
        zc.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("peer")
    p.add_argument("--seed", required=True)
    p.add_argument("--port", type=int, default=4100)
    p.add_argument("--host", action="append", default=[])
    p.add_argument("--interface", action="append", default=[])
    p.add_argument("--loopback", action="store_true")
    p.add_argument("--passive", action="store_true")
    p.add_argument("--ttl", type=int, default=120)
    p.add_argument("--network", default="lenders")
    p.add_argument("--network-key", default=None)
    f = sub.add_parser("forge")
    f.add_argument("--txt", required=True)
    f.add_argument("--address", action="append", required=True)
    f.add_argument("--port", type=int, default=4100)
    f.add_argument("--name", required=True)
    f.add_argument("--interface", default="127.0.0.1")
    f.add_argument("--ttl", type=int, default=120)
    args = parser.parse_args()
    if args.mode == "peer":
        trio.run(run_peer, args)
    else:
        run_forge(args)


if __name__ == "__main__":
    main()
