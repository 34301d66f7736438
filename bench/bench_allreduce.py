"""What one ring all-reduce round costs per member, from the protocol core's own messages.

For 3, 10 and 50 members and two vectors (the demo's loan MLP, and a model of 500,000
parameters), N :class:`~fedup.protocol.allreduce.AllReduceMachine` run one attempt in
memory (every member begins, then messages are delivered in order; the driver's
additions done with numpy).  Printed per size:

* ``bytes_per_member``: the bytes of every message a member sends (payload, fields and
  the owner's signature: what goes into the encrypted channel), and ``x_model``, that
  over the model's bytes (issue 13's goal: at most 2.2);
* ``payload_x_model``: the payload alone over the model's bytes, 2 (N - 1) / N of it
  when N divides the vector;
* ``overhead_bytes``: what the messages add to the payload, per member;
* ``machine_ms``: the CPU time a member spends inside the machine per round (decoding,
  checks, signing and verifying the final chunks; not the additions), whose growth with
  N is the protocol's own overhead per round.

The goal holds only where a chunk is much larger than a message's fixed part: the loan
MLP's 4,417 parameters split 50 ways are 354-byte chunks, each with its fields and,
in the all-gather, a 64-byte signature.  Run ``python bench/bench_allreduce.py``.
"""

from __future__ import annotations

import time
from collections import deque

import numpy as np

from fedup.identity import Identity
from fedup.protocol.allreduce import (
    AllReduceMachine,
    Begin,
    Done,
    MessageArrived,
    Reduce,
    Reduced,
    Send,
    Store,
)
from fedup.protocol.peer_id import PeerId
from fedup.protocol.ring import ring_order

SIZES = (3, 10, 50)
LOAN_MLP_PARAMS = 4_417
"""The demo's model (``model_bytes`` 17,668 in a simulation's ``fedavg_clock``)."""
VECTORS = (("loan MLP", LOAN_MLP_PARAMS), ("500k parameters", 500_000))


def one_round(n: int, params: int) -> dict[str, float]:
    identities = [Identity(i.to_bytes(2, "big") * 16) for i in range(1, n + 1)]
    by_id = {i.peer_id: i for i in identities}
    order = ring_order(by_id)
    length = params + 1  # weight x params, then the weight
    rng = np.random.default_rng(0)
    vectors = [rng.standard_normal(length).astype("<f4") for _ in range(n)]
    machines = [
        AllReduceMachine(
            by_id[p],
            run_id=bytes(16),
            epoch=0,
            round=0,
            attempt=0,
            members=order,
            length=length,
        )
        for p in order
    ]
    index = {p: i for i, p in enumerate(order)}
    inbox: deque[tuple[int, PeerId, bytes]] = deque()
    sent = [0] * n
    busy = [0.0] * n
    result = [np.zeros(length, dtype="<f4") for _ in range(n)]
    done = 0

    def feed(i: int, event: object) -> None:
        nonlocal done
        begun = time.process_time()
        actions = machines[i].handle(event, 0.0)  # type: ignore[arg-type]
        busy[i] += time.process_time() - begun
        for action in actions:
            if isinstance(action, Send):
                inbox.append((index[action.to], order[i], action.data))
                sent[i] += len(action.data)
            elif isinstance(action, Reduce):
                own = vectors[i][action.start : action.stop]
                received = np.frombuffer(action.received, dtype="<f4")
                feed(i, Reduced(action.chunk, (received + own).tobytes()))
            elif isinstance(action, Store):
                result[i][action.start : action.stop] = np.frombuffer(action.data, "<f4")
            elif isinstance(action, Done):
                done += 1

    for i, m in enumerate(machines):
        start, stop = m.plan.span(m.first_chunk)
        feed(i, Begin(vectors[i][start:stop].tobytes()))
    while inbox:
        to, sender, data = inbox.popleft()
        feed(to, MessageArrived(sender, data))
    assert done == n and all(np.array_equal(result[0], r) for r in result[1:])
    model = 4 * length
    per_member = sum(sent) / n
    plan = machines[0].plan  # member i sends 2V - bytes(chunk i) - bytes(chunk i + 1)
    spans = [plan.span(c) for c in range(n)]
    own_and_next = sum(4 * (b - a) for i in range(n) for a, b in (spans[i], spans[(i + 1) % n]))
    sent_payload = 2 * model - own_and_next / n
    return {
        "bytes_per_member": per_member,
        "x_model": per_member / model,
        "payload_x_model": sent_payload / model,
        "overhead_bytes": per_member - sent_payload,
        "machine_ms": 1000 * sum(busy) / n,
    }


def main() -> dict[str, dict[str, float]]:
    figures: dict[str, dict[str, float]] = {}
    for name, params in VECTORS:
        for n in SIZES:
            f = one_round(n, params)
            figures[f"{name}, {n} members"] = f
            print(
                f"{name:>14} {n:3d} members: {f['bytes_per_member'] / 1024:10.1f} KiB sent "
                f"per member = {f['x_model']:.3f} x the model (payload "
                f"{f['payload_x_model']:.3f} x, overhead {f['overhead_bytes'] / 1024:.1f} KiB); "
                f"machine {f['machine_ms']:.2f} ms per member"
            )
    return figures


if __name__ == "__main__":
    main()
