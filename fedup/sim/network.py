"""The simulator's network: memory streams with latency, bandwidth and dropped connections.

:class:`SimNetwork` is a :class:`~fedup.net.transport.MemoryNetwork` whose
connections are :class:`LinkStream` pairs instead of plain memory streams, so
the peers run the real handshake, channel, framing and blob code over links
that take time:

* each direction of a connection delivers its bytes ``latency`` seconds after
  they were sent, and a link carries ``bandwidth`` bytes per second (a send
  waits while its bytes are being "serialised", as a full TCP buffer would);
* a connection can be *dropped* after a number of bytes: both ends then get
  :class:`trio.BrokenResourceError`, as after a TCP reset;
* a set of peers can be *cut off* from the others (a partition, as when their
  hosts' links go down): connections across the cut are dropped at once, and
  dials across it fail as unreachable until the cut heals;
* bytes are counted per peer, sent and received, handshakes included.

Peers are named by their index in the simulation (``index_of``); links are
directed ``(sender, receiver)`` pairs.  Everything runs on trio's clock, so
under :class:`trio.testing.MockClock` delays cost no real time.
"""

from __future__ import annotations

import collections
import math
import operator
from collections.abc import Callable, Collection, Mapping
from contextlib import AbstractAsyncContextManager

import attrs
import trio

from fedup.config import DEFAULT_LIMITS, Limits
from fedup.net.transport import (
    Credentials,
    DialError,
    Handler,
    Listener,
    MemoryNetwork,
    MemoryTransport,
)
from fedup.protocol.peer_id import PeerId
from fedup.protocol.records import Address

__all__ = ["Link", "LinkStream", "SimNetwork", "SimTransport"]


@attrs.frozen
class Link:
    """How one direction of a connection behaves."""

    latency: float = 0.0
    """One-way delay in seconds, added to every byte."""
    bandwidth: float = math.inf
    """Bytes per second the link carries (``inf``: no limit)."""

    def __attrs_post_init__(self) -> None:
        if not (self.latency >= 0 and self.bandwidth > 0):
            raise ValueError("a link needs latency >= 0 and bandwidth > 0")


class _Connection:
    """What both ends of one connection share: its ends, drop point and state."""

    def __init__(
        self,
        cut_after: int | None,
        on_drop: Callable[[], None],
        *,
        ends: tuple[int, int] = (-1, -1),
        on_closed: Callable[[], None] = lambda: None,
    ) -> None:
        self.src, self.dst = ends
        """The dialer's and the listener's simulation indices."""
        self.cut_after = cut_after
        """Bytes (both directions together) after which the connection breaks."""
        self.carried = 0
        self.broken = False
        self.pipes: list[_Pipe] = []
        self.open_ends = 2
        self._on_drop = on_drop
        self._on_closed = on_closed

    def end_closed(self) -> None:
        """One end was closed; once both are, the connection is over."""
        self.open_ends -= 1
        if self.open_ends == 0:
            self._on_closed()

    def drop(self) -> None:
        if self.broken:
            return
        self.broken = True
        self._on_drop()
        for pipe in self.pipes:
            pipe.send.close()  # wakes a waiting receiver, which then sees ``broken``


class _Pipe:
    """One direction of a connection: chunks in flight with their delivery times."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.send, self.receive = trio.open_memory_channel[tuple[float, bytes]](math.inf)
        self.free_at = -math.inf
        """When the link has finished serialising what was sent so far."""


class LinkStream(trio.abc.Stream):
    """One end of a simulated connection (a :class:`trio.abc.Stream`).

    Made in pairs by :meth:`SimNetwork.open_link`.  ``on_send`` and
    ``on_receive`` are told the size of every chunk (for the byte counts).
    """

    def __init__(
        self,
        conn: _Connection,
        out: _Pipe,
        inp: _Pipe,
        counters: tuple[collections.Counter[str], str] | None = None,
    ) -> None:
        self._conn = conn
        self._out = out
        self._in = inp
        self._counters = counters
        self._leftover = b""
        self._offset = 0
        """Where the unread part of ``_leftover`` starts (read in pieces without copying
        the rest each time)."""
        self._pending: tuple[float, bytes] | None = None
        """A chunk taken from the pipe that is still in flight (kept if a receive is cancelled)."""
        self._closed = False
        self._sending = False
        self._receiving = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._sending = True
        try:
            await trio.lowlevel.checkpoint()
            if self._closed:
                raise trio.ClosedResourceError("the stream was closed")
            if self._conn.broken:
                raise trio.BrokenResourceError("the connection was dropped")
            chunk = bytes(data)
            if not chunk:
                return
            conn = self._conn
            drop = conn.cut_after is not None and conn.carried + len(chunk) > conn.cut_after
            if drop:
                assert conn.cut_after is not None
                chunk = chunk[: conn.cut_after - conn.carried]
            conn.carried += len(chunk)
            link = self._out.link
            now = trio.current_time()
            self._out.free_at = max(now, self._out.free_at) + len(chunk) / link.bandwidth
            if chunk:
                try:
                    self._out.send.send_nowait((self._out.free_at + link.latency, chunk))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    raise trio.BrokenResourceError("the other end closed") from None
                if self._counters is not None:
                    counter, me = self._counters
                    counter[me] += len(chunk)
            if drop:
                conn.drop()
                raise trio.BrokenResourceError("the connection was dropped")
            if self._out.free_at > now:
                await trio.sleep_until(self._out.free_at)
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()
        if self._closed:
            raise trio.ClosedResourceError("the stream was closed")

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is not None:
            max_bytes = operator.index(max_bytes)  # TypeError for a non-integer
            if max_bytes < 1:
                raise ValueError("max_bytes must be at least 1")
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this stream")
        self._receiving = True
        try:
            await trio.lowlevel.checkpoint()
            if self._closed:
                raise trio.ClosedResourceError("the stream was closed")
            if not self._leftover:
                if self._pending is None:
                    try:
                        self._pending = await self._in.receive.receive()
                    except trio.EndOfChannel:
                        if self._conn.broken:
                            raise trio.BrokenResourceError("the connection was dropped") from None
                        return b""
                    except trio.ClosedResourceError:
                        raise trio.ClosedResourceError("the stream was closed") from None
                deliver_at, chunk = self._pending
                if deliver_at > trio.current_time():  # (no link delay: it is here already)
                    await trio.sleep_until(deliver_at)  # if cancelled, the chunk stays pending
                self._pending = None
                if self._conn.broken:
                    raise trio.BrokenResourceError("the connection was dropped")
                self._leftover, self._offset = chunk, 0
                if self._counters is not None:
                    counter, me = self._counters
                    counter[me + ":received"] += len(chunk)
            chunk, start = self._leftover, self._offset
            n = len(chunk) - start if max_bytes is None else min(max_bytes, len(chunk) - start)
            if start + n == len(chunk):  # all read: the chunk is not kept
                self._leftover, self._offset = b"", 0
                return chunk if start == 0 else chunk[start:]
            self._offset = start + n
            return chunk[start : start + n]
        finally:
            self._receiving = False

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._out.send.close()  # the other end reads what is in flight, then EOF
            self._in.receive.close()  # its later sends fail, as after a reset
            self._conn.end_closed()
        await trio.lowlevel.checkpoint()


@attrs.define
class _Armed:
    """A drop waiting for the next connection from ``src`` to ``dst``."""

    src: int
    dst: int
    after_bytes: int


class SimNetwork(MemoryNetwork):
    """A :class:`MemoryNetwork` whose connections have latency, bandwidth and faults.

    ``link`` applies to every directed pair without an entry in ``links``.
    ``index_of`` names each peer (by its peer ID) with its simulation index.
    """

    def __init__(
        self,
        *,
        link: Link = Link(),
        links: Mapping[tuple[int, int], Link] | None = None,
        index_of: Mapping[PeerId, int] | None = None,
    ) -> None:
        super().__init__()
        self.link = link
        self.links = dict(links or {})
        self.index_of = dict(index_of or {})
        self.bytes: collections.Counter[str] = collections.Counter()
        """Bytes by peer index: ``"3"`` sent by peer 3, ``"3:received"`` received by it."""
        self.connections: collections.Counter[tuple[int, int]] = collections.Counter()
        """Connections opened, by (dialer, listener)."""
        self.dropped: list[tuple[int, int, float]] = []
        """Connections dropped: (dialer, listener, trio time)."""
        self.unreachable: list[tuple[int, int, float]] = []
        """Dials that failed because a cut separated the two: (dialer, listener, trio time)."""
        self._hosts: dict[str, int] = {}
        self._armed: list[_Armed] = []
        self._cuts: list[frozenset[int]] = []
        self._open: set[_Connection] = set()
        """Connections not yet dropped (the ones a cut may break)."""

    def transport(
        self, credentials: Credentials, *, limits: Limits = DEFAULT_LIMITS
    ) -> MemoryTransport:
        """A transport for the peer whose identity is in ``credentials``."""
        index = self.index_of.get(credentials.identity.peer_id)
        return SimTransport(self, credentials, limits=limits, index=index)

    # --- faults -------------------------------------------------------------------

    def link_for(self, src: int, dst: int) -> Link:
        return self.links.get((src, dst), self.link)

    def arm_drop(self, src: int, dst: int, after_bytes: int) -> None:
        """The next connection ``src`` opens to ``dst`` breaks after ``after_bytes`` bytes."""
        self._armed.append(_Armed(src, dst, after_bytes))

    def cut_off(self, peers: Collection[int]) -> frozenset[int]:
        """Cut ``peers`` off from every other peer until :meth:`heal` (a partition).

        Connections between a cut peer and one on the other side are dropped now
        (both ends get :class:`trio.BrokenResourceError`); dials across the cut fail
        with :class:`~fedup.net.transport.DialError` (unreachable).  Peers on the same
        side still reach each other.  Returns the cut, to pass to :meth:`heal`.
        """
        cut = frozenset(peers)
        self._cuts.append(cut)
        for conn in [c for c in self._open if self.separated(c.src, c.dst)]:
            conn.drop()
        return cut

    def heal(self, cut: frozenset[int]) -> None:
        """End a cut that :meth:`cut_off` made (others in force stay)."""
        self._cuts.remove(cut)

    def separated(self, a: int, b: int) -> bool:
        """Whether a cut in force lies between peers ``a`` and ``b``."""
        return any((a in cut) != (b in cut) for cut in self._cuts)

    # --- connections ----------------------------------------------------------------

    def register(self, host: str, index: int) -> None:
        self._hosts[host] = index

    async def open_link(self, src: int, address: Address) -> trio.abc.Stream:
        """Open a connection from peer ``src`` to the listener at ``address``.

        Raises :class:`~fedup.net.transport.DialError` if nothing listens there, or
        if a cut lies between the two.
        """
        await trio.lowlevel.checkpoint()
        queue = self._listeners.get(address)
        dst = self._hosts.get(address.host)
        if queue is None or dst is None:
            raise DialError("connection refused: nothing listens there", peer=str(address))
        if self.separated(src, dst):
            self.unreachable.append((src, dst, trio.current_time()))
            raise DialError("network unreachable: the link is down", peer=str(address))
        cut = None
        for armed in self._armed:
            if (armed.src, armed.dst) == (src, dst):
                self._armed.remove(armed)
                cut = armed.after_bytes
                break

        def on_drop() -> None:
            self._open.discard(conn)
            self.dropped.append((src, dst, trio.current_time()))

        conn = _Connection(
            cut, on_drop, ends=(src, dst), on_closed=lambda: self._open.discard(conn)
        )
        self._open.add(conn)
        forward, backward = _Pipe(self.link_for(src, dst)), _Pipe(self.link_for(dst, src))
        conn.pipes = [forward, backward]
        ours = LinkStream(conn, forward, backward, (self.bytes, str(src)))
        theirs = LinkStream(conn, backward, forward, (self.bytes, str(dst)))
        try:
            queue.send_nowait((theirs, f"sim-peer-{src}"))
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            raise DialError("connection refused: backlog full", peer=str(address)) from None
        self.connections[(src, dst)] += 1
        return ours


class SimTransport(MemoryTransport):
    """One simulated peer's transport: dials through :meth:`SimNetwork.open_link`."""

    network: SimNetwork

    def __init__(
        self,
        network: SimNetwork,
        credentials: Credentials,
        *,
        limits: Limits = DEFAULT_LIMITS,
        index: int | None = None,
    ) -> None:
        super().__init__(network, credentials, limits=limits)
        self.index = index

    async def _connect(self, address: Address) -> trio.abc.Stream:
        if self.index is None:  # not a simulated peer (a test's attacker): a plain stream
            return await super()._connect(address)
        return await self.network.open_link(self.index, address)

    def listen(self, address: Address, handler: Handler) -> AbstractAsyncContextManager[Listener]:
        if self.index is not None:
            self.network.register(address.host, self.index)
        return super().listen(address, handler)
