"""The limits and deadlines of transport, discovery, federation and the federation page,
each with a reason.

(Caps that belong to one message's format are constants next to that format.)

Nothing that arrives from the network is trusted, so every size is bounded
before memory is allocated for it and every wait has a deadline.  The numbers
live here, not in the modules that enforce them, so that an operator can see
them all at once and a test can shrink them.  ``Limits.describe()`` lists
every field with its reason (``docs/protocol.md`` prints the same table).
"""

from __future__ import annotations

from typing import Any

import attrs

KiB = 1024
MiB = 1024 * KiB


def _limit(default: Any, reason: str) -> Any:
    return attrs.field(default=default, metadata={"reason": reason})


@attrs.frozen(cache_hash=True)
class Limits:
    """Sizes, counts and deadlines.  Sizes are bytes, deadlines seconds."""

    # --- encoding -------------------------------------------------------
    max_frame_size: int = _limit(
        2 * MiB,
        "one length-prefixed frame: a 1 MiB blob chunk plus its seal and header fits "
        "with room; larger frames only buy bigger buffers per connection",
    )
    max_handshake_frame_size: int = _limit(
        8 * KiB,
        "one frame before the peer has authenticated (the handshake): the largest, msg2 or "
        "msg3 with a max_record_size record, is under 3 KiB; far below max_frame_size, so "
        "that a connection without the network key costs a few KiB, not megabytes",
    )
    max_message_size: int = _limit(
        512 * KiB,
        "one CBOR control message (records, views, acks, metrics): the largest, a "
        "membership view of max_members members with their ~300-byte records, fits",
    )
    max_cbor_depth: int = _limit(
        16,
        "nesting depth of CBOR from peers; our deepest message nests 5 levels, and a "
        "bound stops stack exhaustion from hostile input",
    )
    max_record_size: int = _limit(
        2 * KiB,
        "one signed peer-record envelope; it also has to fit in an mDNS TXT record "
        "(a few hundred bytes), so 2 KiB is generous",
    )
    max_addresses: int = _limit(
        16, "addresses in one peer record; a host with more interfaces lists its best 16"
    )
    max_network_name: int = _limit(
        64, "bytes of a network name (UTF-8); it travels in every record"
    )
    max_members: int = _limit(
        1024,
        "members of one federation: the simulator's largest tested run has 1,000 peers; "
        "bounds the view, the dead-notice chain and every per-member table",
    )
    # --- model blobs ----------------------------------------------------
    max_blob_size: int = _limit(
        512 * MiB,
        "encoded weights of one model: ResNet-18 is 47 MB; 512 MiB admits models ten "
        "times larger while keeping a hostile size claim from exhausting memory",
    )
    max_tensors: int = _limit(
        4096, "tensors in one model state; ResNet-50 has ~320, transformers ~1-2 thousand"
    )
    max_tensor_rank: int = _limit(8, "dimensions of one tensor; real layers use at most 5")
    max_tensor_name: int = _limit(
        256, "bytes of one tensor name such as 'layer4.1.bn2.running_var'"
    )
    blob_chunk_size: int = _limit(
        1 * MiB,
        "plaintext bytes per encrypted blob chunk: large enough that per-chunk Python "
        "overhead is negligible, small enough that a receiver buffers little",
    )
    max_weight_magnitude: float = _limit(
        1e8,
        "largest absolute value in a ring state (weights, optimizer moments, step counts) "
        "accepted or handed on: sane models stay far below it (Adam would need 1e8 steps), "
        "while finite but huge weights (1e30) made the next member's training overflow to NaN",
    )
    max_provenance_hops: int = _limit(
        524_288,
        "signed hop statements in a model's provenance chain, which travels in every blob "
        "(about 350 bytes each; with the largest allowed, at most about 270 MB): a run of "
        "max_members members "
        "needs at most (max_laps + 1) x members + 1 of them, so this holds 1,024 members "
        "for 510 laps (the default max_laps is 500); a view whose run could need more is "
        "refused",
    )
    # --- deadlines --------------------------------------------------------
    handshake_timeout: float = _limit(
        10.0, "a whole handshake on a LAN takes milliseconds; 10 s tolerates a loaded host"
    )
    frame_timeout: float = _limit(
        30.0,
        "from the first byte of a frame to its last; a peer trickling bytes is cut off "
        "even if every single read is quick",
    )
    blob_timeout: float = _limit(
        600.0,
        "one whole blob transfer; 512 MiB at a slow 1 MiB/s still fits, a stalled or "
        "trickling sender does not hold a receiver longer",
    )
    reply_timeout: float = _limit(
        10.0,
        "a neighbour answers a blob's header within this (or a quarter of hop_timeout, "
        "if less): it looks only at the header; silence means the link is down (TCP "
        "would retransmit for minutes on a host cut off)",
    )
    blob_nack_timeout: float = _limit(
        2.0,
        "time spent telling a refused sender why, or reading why we were refused; the "
        "connection is closed right after either way",
    )
    idle_timeout: float = _limit(
        120.0, "a connection on which nothing arrives for this long is closed"
    )
    close_notify_timeout: float = _limit(
        1.0,
        "how long a closing listener waits for a peer to take close-notify; then it just "
        "closes (the peer then sees a truncated channel, which is reported, not trusted)",
    )
    # --- discovery --------------------------------------------------------
    discovery_record_ttl: int = _limit(
        120,
        "TTL of our mDNS SRV/A records (RFC 6762 section 10 uses 120 s for host records); "
        "a peer that vanishes without a goodbye is reported lost this long after",
    )
    discovery_resolve_timeout: float = _limit(
        3.0, "resolving one mDNS service (SRV, TXT, A) on a LAN takes milliseconds"
    )
    discovery_shutdown_timeout: float = _limit(
        5.0, "sending mDNS goodbyes and closing zeroconf; shutdown never hangs longer"
    )
    max_discovery_sources: int = _limit(
        2048,
        "distinct announcement sources tracked at once (about 1 KiB each); twice "
        "max_members, so a federation of the largest size fits beside strangers, while "
        "memory stays bounded under an announcement flood",
    )
    max_known_peers: int = _limit(
        4096,
        "peers whose newest record sequence number is remembered (a replay of an older "
        "record is refused); four times max_members, a few hundred KiB at most",
    )
    discovery_queue_size: int = _limit(
        1024,
        "zeroconf-thread events queued for trio; beyond this they are dropped and counted, "
        "never blocking zeroconf's thread",
    )
    bootstrap_exchange_timeout: float = _limit(
        10.0,
        "asking a bootstrap peer for the peers it knows (one small frame each way, after "
        "the handshake); a silent bootstrap is given up on and retried later",
    )
    # --- federation ---------------------------------------------------------
    call_timeout: float = _limit(
        30.0,
        "a candidate answers the leader's call (with its data summary) within this; "
        "it only has to summarise columns it already loaded",
    )
    view_timeout: float = _limit(
        60.0,
        "a member waits this long for the view after its offer, and the leader as long "
        "for every acknowledgement; a member that does not acknowledge is left out",
    )
    peer_wait_timeout: float = _limit(
        900.0,
        "a peer gives up forming a federation after this long (too few peers found, or "
        "none would take it) and says so, instead of waiting for ever",
    )
    formation_timeout: float = _limit(
        60.0,
        "a peer waits this long for a lower peer (a coordinator) or the leader a draw "
        "chose to call it, then forgets the silent one and starts again; and settles after "
        "this long even if new candidates keep appearing",
    )
    hop_timeout: float = _limit(
        300.0,
        "from handing the model on to hearing it moved on: one hop's training plus one "
        "transfer; a successor silent longer is presumed dead and skipped",
    )
    max_returns: int = _limit(
        4,
        "times one member may be taken back into a run after being counted as dead (a "
        "restart, a cut-off link, a hop slower than hop_timeout); each return and the "
        "death before it are two ~400-byte notices every ring blob carries",
    )
    minority_wait: float = _limit(
        600.0,
        "a member that cannot hand the model on without counting half the view or more "
        "as dead (a partition, or many members down at once) keeps trying this long, then "
        "stops with members-lost: only a majority of the view may go on and end the run",
    )
    return_interval: float = _limit(
        15.0,
        "a member counted as dead sends its return request to every member again this "
        "often until it is taken back (a request sent while links were down is lost)",
    )
    excluded_wait: float = _limit(
        3600.0,
        "a member the others counted as dead while it was alive trains no more and waits "
        "this long for the final model (sent to it when the run ends); longer runs end "
        "there with an error",
    )
    # --- the parallel mode's ring all-reduce (fedup/protocol/allreduce.py) -------
    max_allreduce_chunk: int = _limit(
        1 * MiB,
        "payload bytes of one all-reduce chunk, which travels in one message: with its "
        "fields and signature (under 256 bytes) it fits one max_frame_size frame; a larger "
        "vector is summed in segments (one all-reduce each, chunks within this with a "
        "majority of the members), and the hybrid relay's model travels in parts of this",
    )
    allreduce_step_timeout: float = _limit(
        90.0,
        "an all-reduce member waits this long for the next chunk from its ring predecessor "
        "(timed from when it is ready for it): one chunk's transfer (1 MiB takes 1 s at "
        "1 MiB/s) plus the lag of a slower member's training, since every member starts "
        "from the same model with the same number of steps; silence longer names the "
        "predecessor. Below idle_timeout, so that a late but timely chunk never finds its "
        "connection closed for idleness",
    )
    allreduce_attempts: int = _limit(
        3,
        "attempts of one parallel round's all-reduce: after a failed one, each member "
        "probes every member of the attempt and tries again with those that answer (a "
        "crashed member is left out at once); a member that answers but never sends "
        "fails every attempt, and the run ends after this many instead of waiting on it",
    )
    max_allreduce_inbox: int = _limit(
        256 * MiB,
        "all-reduce messages held for this member's attempts: a predecessor may send all "
        "its reduce-scatter chunks (about one vector: 64M float32 parameters here) before "
        "this member has trained and begun; beyond, a message is refused and its "
        "connection closed, so a flood costs no more",
    )
    relay_hop_timeout: float = _limit(
        60.0,
        "the hybrid mode: a sub-ring member waits this long per hop before its own for the "
        "model from its predecessor (one member's hop of training, a fraction of an epoch, "
        "plus the model's transfer); silence longer breaks the sub-ring's relay for the "
        "round, which it sends on at once, and the round is averaged without that sub-ring",
    )
    probe_interval: float = _limit(
        10.0,
        "a member waiting for a silent peer that may be gone (a hybrid sub-ring's "
        "predecessor, an all-reduce predecessor in the hybrid mode's long first waits) "
        "checks this often that it completes a handshake, and stops waiting when it does "
        "not: a crashed member is known in seconds; and a member whose all-reduce "
        "predecessor moved on to a later attempt waits this long for the current one's "
        "last messages before giving it up",
    )
    # --- connections ------------------------------------------------------
    max_connections: int = _limit(
        64, "concurrent connections a peer serves; a federation has tens of members"
    )
    max_pending_handshakes: int = _limit(
        16, "handshakes in progress at once; caps the cost of a connection flood"
    )
    max_connections_per_host: int = _limit(
        32,
        "connections open at once from one source address (an IPv6 address counts by its "
        "/64), handshaking or authenticated: several peers may share one address (a NAT, a "
        "test host), while a flood from one host, even one that authenticates on an open "
        "network, leaves the other half of max_connections",
    )
    max_handshakes_per_host: int = _limit(
        4,
        "handshakes in progress at once from one untrusted source address; a flood from "
        "one host takes these, not every handshake slot",
    )
    reserved_connections: int = _limit(
        16,
        "connections (and handshakes) beyond max_connections (and max_pending_handshakes) "
        "kept for trusted addresses (members of our view; with a network key, addresses "
        "that completed a handshake), so that a flood of new connections cannot lock them "
        "out",
    )
    max_trusted_hosts: int = _limit(
        4096,
        "source addresses remembered as trusted (the oldest is forgotten first); four "
        "times max_members",
    )
    first_frame_timeout: float = _limit(
        2.0,
        "a dialer sends its first handshake message right after connecting; a connection "
        "silent this long is closed instead of holding a slot for the whole "
        "handshake_timeout",
    )
    # --- the federation page (fedup-peer start --ui, fedup-peer show) ---------
    ui_max_viewers: int = _limit(
        16,
        "live viewers of the federation page at once (each holds an event stream, a task "
        "and its own updates); a page is for the few people watching a run, more get 503",
    )
    ui_update_interval: float = _limit(
        0.5,
        "a viewer gets at most one update per this many seconds: hops can come faster "
        "than anyone reads, and each update costs a send",
    )
    ui_send_timeout: float = _limit(
        10.0,
        "a viewer that does not take an update within this is dropped, so one that stops "
        "reading holds no viewer slot",
    )
    ui_keepalive: float = _limit(
        15.0,
        "an idle event stream sends a comment this often, so a viewer that went away is "
        "noticed and proxies keep the stream open",
    )
    ui_event_buffer: int = _limit(
        1024,
        "events the display's subscription holds for it: a display that falls behind "
        "misses events rather than ever holding up the peer",
    )

    @classmethod
    def markdown_table(cls) -> str:
        """The limits as the Markdown table of docs/protocol.md."""
        rows = ["| limit | default | why |", "| --- | --- | --- |"]
        rows += [f"| `{name}` | {default!r} | {why} |" for name, default, why in cls.describe()]
        return "\n".join(rows)

    @classmethod
    def describe(cls) -> list[tuple[str, Any, str]]:
        """Return ``(name, default, reason)`` for every limit, in declaration order."""
        return [(f.name, f.default, f.metadata["reason"]) for f in attrs.fields(cls)]


DEFAULT_LIMITS = Limits()
