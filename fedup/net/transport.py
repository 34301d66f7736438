"""Listeners and dialers that hand out authenticated :class:`SecureChannel` s.

Two transports share one interface (:class:`Transport`), so the peer code
above does not care which one it runs on:

* :class:`TcpTransport`: real sockets, IPv4 and IPv6;
* :class:`MemoryTransport` (made by :class:`MemoryNetwork`): memory streams
  in one process, for tests and the simulator; it runs the same handshake,
  caps and error paths, and works under trio's virtual clock.

Dialing: ``await transport.dial(address, expected_peer=...)`` connects, runs
the handshake (the ``Limits.handshake_timeout`` deadline covers the connect
too) and returns a :class:`SecureChannel`, or raises a
:class:`~fedup.errors.RemoteProtocolError` subclass naming the peer (its
address before authentication): :class:`DialError` (nothing listens, refused,
unreachable), :class:`~fedup.protocol.handshake.HandshakeError` (with a
``code``: wrong network, wrong network key, wrong peer, busy, ...),
:class:`~fedup.errors.PeerTimeoutError` (deadline),
:class:`~fedup.errors.ConnectionLostError` (closed mid-handshake, e.g. by a
listener at its connection cap), :class:`~fedup.protocol.framing.FrameError`.

Listening: ``async with transport.listen(address, handler) as listener:``
binds (port 0 picks a free port; ``listener.addresses`` has the real ones)
and runs ``await handler(channel)`` in its own task for every authenticated
connection, closing the channel when the handler returns.  Caps:

* more than ``Limits.max_connections`` open connections: a new one is closed
  at once, before any byte is read, unless it comes from a *trusted* address
  (a member of our view's; with a network key, one that completed a handshake
  with us or that we completed one with): those may use
  ``Limits.reserved_connections`` more;
* more than ``Limits.max_connections_per_host`` open from its address (an IPv6
  address counts by its /64), or, for an untrusted address, more than
  ``Limits.max_handshakes_per_host`` handshakes in progress from it: closed at
  once, so a flood from one host takes a share of the slots, not every slot;
* more than ``Limits.max_pending_handshakes`` handshakes in progress: a new
  connection gets the abort ``busy`` (after its msg1 is read, so that closing
  does not reset the connection under the abort) and is closed.

Before authentication a connection costs little: its frames are capped at
``Limits.max_handshake_frame_size`` (read in pieces no larger), and its first
frame must arrive within ``Limits.first_frame_timeout``.

Each overload episode is logged once (warning), not once per connection.
Every failure of one connection (bad handshake, wrong network key, bad
record MAC, oversized frame, timeout) is logged once at warning level on the
``fedup.net`` logger, naming the peer, the error class and the reason; an
exception from the handler that is not a ``RemoteProtocolError`` is logged
at error level with its traceback.  The listener keeps serving in all cases.
"""

from __future__ import annotations

import collections
import errno
import ipaddress
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Protocol

import attrs
import trio

from fedup.config import DEFAULT_LIMITS, Limits
from fedup.errors import PeerTimeoutError, RemoteProtocolError
from fedup.net.channel import SecureChannel
from fedup.net.framed import FramedStream
from fedup.net.groups import collapse_single_exception
from fedup.protocol.handshake import (
    AbortCode,
    HandshakeError,
    HandshakeResult,
    InitiatorHandshake,
    ResponderHandshake,
    Signer,
    encode_abort,
)
from fedup.protocol.peer_id import PeerId
from fedup.protocol.records import Address, SignedPeerRecord

__all__ = [
    "ConnectTimeoutError",
    "Credentials",
    "DialError",
    "Handler",
    "Listener",
    "MemoryNetwork",
    "MemoryTransport",
    "TcpTransport",
    "Transport",
    "TrustedHosts",
    "dial_tcp",
    "upgrade_inbound",
    "upgrade_outbound",
]

log = logging.getLogger("fedup.net")

Handler = Callable[[SecureChannel], Awaitable[None]]
"""What a listener runs for each authenticated connection."""

MEMORY_BACKLOG = 128
"""Connections a memory listener queues before dials are refused (like a TCP backlog)."""
_ACCEPT_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_ACCEPT_RETRY = 0.1  # seconds to wait when out of file descriptors (as trio.serve_listeners)


class DialError(RemoteProtocolError):
    """Could not reach the address: nothing listens there, refused, or unreachable."""


class ConnectTimeoutError(DialError, PeerTimeoutError):
    """No connection within the deadline: unreachable (a dial error) and a timeout."""


@attrs.frozen
class Credentials:
    """Who we are on the network: everything a handshake needs besides the stream."""

    identity: Signer
    """Our Ed25519 identity (:class:`fedup.identity.Identity`)."""
    network: str
    """The network (federation) name; peers of other networks are refused."""
    network_key: bytes | None = attrs.field(default=None, repr=False)
    """The 32-byte pre-shared network key, or None for an open network."""
    local_record: SignedPeerRecord | None = None
    """Our signed peer record, sent inside the handshake (None: send none)."""

    def initiator(self, limits: Limits, expected_peer: PeerId | None) -> InitiatorHandshake:
        """A dialing handshake with these credentials; LocalProtocolError if unusable."""
        return InitiatorHandshake(
            self.identity,
            network=self.network,
            network_key=self.network_key,
            expected_peer=expected_peer,
            local_record=self.local_record,
            limits=limits,
        )

    def responder(self, limits: Limits) -> ResponderHandshake:
        """An accepting handshake with these credentials; LocalProtocolError if unusable."""
        return ResponderHandshake(
            self.identity,
            network=self.network,
            network_key=self.network_key,
            local_record=self.local_record,
            limits=limits,
        )


# -- the handshake over a stream ------------------------------------------------


async def upgrade_outbound(
    stream: trio.abc.Stream,
    *,
    peer: str,
    credentials: Credentials,
    limits: Limits = DEFAULT_LIMITS,
    expected_peer: PeerId | None = None,
    deadline: float | None = None,
) -> SecureChannel:
    """Run the initiator's handshake on ``stream`` and return the channel.

    ``peer`` names the other side in errors until it is authenticated;
    ``deadline`` (trio time) defaults to now + ``Limits.handshake_timeout``.
    On failure the stream is closed (after sending an abort when there is
    one) and the error raised names the peer: :class:`HandshakeError`,
    :class:`~fedup.errors.PeerTimeoutError`,
    :class:`~fedup.errors.ConnectionLostError`,
    :class:`~fedup.protocol.framing.FrameError`; and
    :class:`~fedup.errors.LocalProtocolError` for unusable ``credentials``.
    """
    try:
        handshake = credentials.initiator(limits, expected_peer)
    except BaseException:  # LocalProtocolError: unusable credentials
        await trio.aclose_forcefully(stream)
        raise
    framed = _handshake_framing(stream, peer, limits)

    async def steps() -> HandshakeResult:
        await framed.send_frame(handshake.start())
        await framed.send_frame(handshake.receive_msg2(await framed.receive_frame()))
        return handshake.result

    return SecureChannel(framed, await _drive(framed, steps, limits, deadline))


async def upgrade_inbound(
    stream: trio.abc.Stream,
    *,
    peer: str,
    credentials: Credentials,
    limits: Limits = DEFAULT_LIMITS,
    deadline: float | None = None,
) -> SecureChannel:
    """Run the responder's handshake on ``stream``; as :func:`upgrade_outbound`."""
    try:
        handshake = credentials.responder(limits)
    except BaseException:  # LocalProtocolError: unusable credentials
        await trio.aclose_forcefully(stream)
        raise
    framed = _handshake_framing(stream, peer, limits)

    async def steps() -> HandshakeResult:
        with trio.move_on_after(limits.first_frame_timeout) as first:
            msg1 = await framed.receive_frame()
        if first.cancelled_caught:
            raise PeerTimeoutError(
                f"sent no handshake within {limits.first_frame_timeout:g} s", peer=peer
            )
        await framed.send_frame(handshake.receive_msg1(msg1))
        return handshake.receive_msg3(await framed.receive_frame())

    return SecureChannel(framed, await _drive(framed, steps, limits, deadline))


def _handshake_framing(stream: trio.abc.Stream, peer: str, limits: Limits) -> FramedStream:
    """Framing under the small pre-authentication cap; :func:`_drive` raises it after."""
    cap = min(limits.max_handshake_frame_size, limits.max_frame_size)
    return FramedStream(stream, peer=peer, limits=limits, max_frame_size=cap)


async def _drive(
    framed: FramedStream,
    steps: Callable[[], Awaitable[HandshakeResult]],
    limits: Limits,
    deadline: float | None,
) -> HandshakeResult:
    if deadline is None:
        deadline = trio.current_time() + limits.handshake_timeout
    try:
        with trio.fail_at(deadline):
            result = await steps()
        framed.raise_max_frame_size(limits.max_frame_size)
        return result
    except HandshakeError as exc:
        if exc.abort is not None:
            with trio.move_on_at(deadline):
                try:
                    await framed.send_frame(exc.abort)
                except RemoteProtocolError:
                    pass
        await trio.aclose_forcefully(framed.stream)
        raise exc.with_peer(exc.peer or framed.peer) from exc.__cause__
    except trio.TooSlowError:
        await trio.aclose_forcefully(framed.stream)
        raise PeerTimeoutError(
            f"handshake did not complete within {limits.handshake_timeout:g} s", peer=framed.peer
        ) from None
    except BaseException:
        await trio.aclose_forcefully(framed.stream)
        raise


def _check_credentials(credentials: Credentials, limits: Limits) -> None:
    """Raise LocalProtocolError now, rather than on every connection, for bad settings."""
    credentials.responder(limits)


async def _refuse_busy(stream: trio.abc.Stream, peer: str, limits: Limits) -> None:
    """Read msg1 (so closing does not reset the connection), answer ``busy``, close."""
    framed = _handshake_framing(stream, peer, limits)
    with trio.move_on_after(min(limits.first_frame_timeout, limits.handshake_timeout)):
        try:
            await framed.receive_frame()
            await framed.send_frame(
                encode_abort(AbortCode.BUSY, "too many handshakes in progress; try again later")
            )
        except RemoteProtocolError:
            pass
    await trio.aclose_forcefully(stream)


# -- the common interface --------------------------------------------------------


class Transport(Protocol):
    """What the peer code needs of a transport; TCP and memory both provide it."""

    credentials: Credentials
    limits: Limits
    trusted_hosts: TrustedHosts
    """Addresses that completed a handshake with us (listeners keep slots for them)."""

    async def dial(self, address: Address, *, expected_peer: PeerId | None = None) -> SecureChannel:
        """Connect to ``address`` and authenticate; see the module docstring for errors."""
        ...

    def listen(self, address: Address, handler: Handler) -> AbstractAsyncContextManager[Listener]:
        """Serve ``handler`` on ``address``; the context manager yields the :class:`Listener`."""
        ...


Accept = Callable[[], Awaitable[tuple[trio.abc.Stream, str, str]]]
"""Waits for the next connection: ``(stream, name of the peer, its source host)``."""


class Listener:
    """A running listener: its bound addresses and its load.  Made by ``listen()``."""

    def __init__(
        self, transport: Transport, handler: Handler, addresses: tuple[Address, ...]
    ) -> None:
        self.addresses = addresses
        """The addresses actually bound (with the real port when 0 was asked for)."""
        self._transport = transport
        self._handler = handler
        self._connections = 0
        self._pending = 0
        self._open_by_host: collections.Counter[str] = collections.Counter()
        self._pending_by_host: collections.Counter[str] = collections.Counter()
        self._refused = {"connections": 0, "handshakes": 0, "host": 0, "host-handshakes": 0}
        self._capped: dict[str, set[str]] = {"host": set(), "host-handshakes": set()}
        """The source addresses refused by a per-address cap in the current episode."""

    @property
    def connections(self) -> int:
        """Connections open now (handshaking, refusing ``busy``, or in the handler)."""
        return self._connections

    @property
    def pending_handshakes(self) -> int:
        """Handshakes in progress now."""
        return self._pending

    async def _accept_loop(self, accept: Accept, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream, peer, host = await accept()
            except OSError as exc:
                if exc.errno not in _ACCEPT_ERRNOS:
                    raise
                log.error("accept failed (%s); retrying in %g s", exc, _ACCEPT_RETRY)
                await trio.sleep(_ACCEPT_RETRY)
                continue
            source = source_key(host)
            if not self._admit(peer, source):
                await trio.aclose_forcefully(stream)
                continue
            self._connections += 1
            self._open_by_host[source] += 1
            self._pending_by_host[source] += 1
            nursery.start_soon(self._serve_connection, stream, peer, source)

    def _admit(self, peer: str, source: str) -> bool:
        """Whether a new connection from ``source`` gets a slot (checked before any byte)."""
        limits = self._transport.limits
        trusted = self._transport.trusted_hosts.contains(source)
        cap = limits.max_connections + (limits.reserved_connections if trusted else 0)
        if self._connections >= cap:
            self._refuse(
                "connections",
                "closing new connections: %d open (max_connections); first refused: %s",
                limits.max_connections,
                peer,
            )
            return False
        if self._open_by_host[source] >= limits.max_connections_per_host:
            what = (
                "closing new connections from an address with %d open "
                "(max_connections_per_host); first refused: %s"
            )
            self._refuse_from(source, "host", what, limits.max_connections_per_host, peer)
            return False
        if not trusted and self._pending_by_host[source] >= limits.max_handshakes_per_host:
            what = (
                "closing new connections from an address with %d handshakes in progress "
                "(max_handshakes_per_host); first refused: %s"
            )
            self._refuse_from(source, "host-handshakes", what, limits.max_handshakes_per_host, peer)
            return False
        return True

    async def _serve_connection(self, stream: trio.abc.Stream, peer: str, source: str) -> None:
        limits = self._transport.limits
        try:
            try:
                trusted = self._transport.trusted_hosts.contains(source)
                reserve = limits.reserved_connections if trusted else 0
                if self._pending >= limits.max_pending_handshakes + reserve:
                    self._refuse(
                        "handshakes",
                        "answering 'busy' to new connections: %d handshakes in progress "
                        "(max_pending_handshakes); first refused: %s",
                        limits.max_pending_handshakes,
                        peer,
                    )
                    await _refuse_busy(stream, peer, limits)
                    return
                channel = await self._handshake(stream, peer)
            finally:
                _decrement(self._pending_by_host, source)
                self._host_recovered(
                    "host-handshakes", self._pending_by_host, limits.max_handshakes_per_host
                )
            if channel is None:
                return
            if self._transport.credentials.network_key is not None:
                # Only the network key makes a completed handshake mean anything: on an
                # open network anyone completes one.
                self._transport.trusted_hosts.add(source)
            log.debug("accepted %s from %s", channel.remote_peer.text, peer)
            await self._run_handler(channel)
        finally:
            self._connections -= 1
            _decrement(self._open_by_host, source)
            self._recovered("connections", self._connections < limits.max_connections)
            self._host_recovered("host", self._open_by_host, limits.max_connections_per_host)

    async def _handshake(self, stream: trio.abc.Stream, peer: str) -> SecureChannel | None:
        limits = self._transport.limits
        self._pending += 1
        try:
            return await upgrade_inbound(
                stream, peer=peer, credentials=self._transport.credentials, limits=limits
            )
        except RemoteProtocolError as exc:
            _warn("handshake with", peer, exc)
        except Exception:  # a bug: loud, but it must not stop the listener
            log.exception("handshake with %s raised", peer)
        finally:
            self._pending -= 1
            self._recovered("handshakes", self._pending < limits.max_pending_handshakes)
        return None

    async def _run_handler(self, channel: SecureChannel) -> None:
        try:
            await self._handler(channel)
        except RemoteProtocolError as exc:
            _warn("connection with", channel.remote_peer.text, exc)
        except Exception:
            log.exception("handler for the connection with %s raised", channel.remote_peer.text)
        finally:
            # Also when the listener shuts down (cancelled): try to say close-notify, briefly,
            # so that the peer sees a clean end rather than a truncation.
            with (
                trio.CancelScope(shield=True),
                trio.move_on_after(self._transport.limits.close_notify_timeout),
            ):
                await channel.aclose()

    def _refuse(self, kind: str, message: str, cap: int, peer: str) -> None:
        """Log the first refusal of an overload episode only."""
        if self._refused[kind] == 0:
            log.warning(message, cap, peer)
        self._refused[kind] += 1

    def _refuse_from(self, source: str, kind: str, message: str, cap: int, peer: str) -> None:
        """A per-address refusal: logged once per episode, the address remembered until it
        is back below the cap."""
        self._refuse(kind, message, cap, peer)
        self._capped[kind].add(source)

    def _host_recovered(self, kind: str, counter: collections.Counter[str], cap: int) -> None:
        capped = self._capped[kind]
        if capped and all(counter[s] < cap for s in capped):
            capped.clear()
            self._recovered(kind, True)

    def _recovered(self, kind: str, below_cap: bool) -> None:
        if below_cap and self._refused[kind]:
            log.info("%s back below the cap after %d refusal(s)", kind, self._refused[kind])
            self._refused[kind] = 0


def _decrement(counter: collections.Counter[str], key: str) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]


def source_key(host: str) -> str:
    """What the per-address caps count by: the address, or an IPv6 address's /64
    (one host commonly holds a whole /64, so counting single addresses would give it
    2^64 of them)."""
    if ":" not in host:
        return host
    try:
        return str(ipaddress.IPv6Network((host.partition("%")[0], 64), strict=False))
    except ValueError:
        return host


class TrustedHosts:
    """Source addresses that have completed a handshake with us (bounded, oldest out first).

    A listener keeps reserved slots for them and does not apply the per-host
    handshake cap to them.  An address is only a hint (several peers may share
    one, and a stranger may share a member's), so trust here buys a slot to try
    a handshake in, never anything the handshake itself decides.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._hosts: dict[str, None] = {}

    def add(self, host: str) -> None:
        self._hosts.pop(host, None)
        self._hosts[host] = None
        if len(self._hosts) > self._limit:
            del self._hosts[next(iter(self._hosts))]

    def contains(self, host: str) -> bool:
        return host in self._hosts

    def __len__(self) -> int:
        return len(self._hosts)


def _warn(what: str, peer: str, exc: RemoteProtocolError) -> None:
    log.warning("%s %s failed: %s: %s", what, exc.peer or peer, type(exc).__name__, exc.reason)


@asynccontextmanager
async def _serving(
    listener: Listener, accepts: list[Accept], on_exit: Callable[[], Awaitable[None]]
) -> AsyncIterator[Listener]:
    # Connection tasks never raise; a single error (the body's, or an accept failure)
    # goes on unwrapped, so that callers can catch it by its type.
    try:
        with collapse_single_exception():
            async with trio.open_nursery() as nursery:
                for accept in accepts:
                    nursery.start_soon(listener._accept_loop, accept, nursery)
                try:
                    yield listener
                finally:
                    nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await on_exit()


# -- TCP ------------------------------------------------------------------------------


async def _dial_tcp(
    address: Address, credentials: Credentials, limits: Limits, expected_peer: PeerId | None
) -> SecureChannel:
    peer = str(address)
    deadline = trio.current_time() + limits.handshake_timeout
    try:
        with trio.fail_at(deadline):
            stream = await trio.open_tcp_stream(address.host, address.port)
    except trio.TooSlowError:
        raise ConnectTimeoutError(
            f"could not connect within {limits.handshake_timeout:g} s", peer=peer
        ) from None
    except OSError as exc:
        raise DialError(f"cannot connect: {_os_reason(exc)}", peer=peer) from exc
    return await upgrade_outbound(
        stream,
        peer=peer,
        credentials=credentials,
        limits=limits,
        expected_peer=expected_peer,
        deadline=deadline,
    )


async def dial_tcp(
    address: Address,
    *,
    identity: Signer,
    network: str,
    network_key: bytes | None = None,
    expected_peer: PeerId | None = None,
    local_record: SignedPeerRecord | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> SecureChannel:
    """Connect over TCP (IPv4 or IPv6) and authenticate; see the module docstring for errors."""
    credentials = Credentials(identity, network, network_key, local_record)
    return await _dial_tcp(address, credentials, limits, expected_peer)


class TcpTransport:
    """TCP listeners and dialers.  ``credentials`` may be replaced (e.g. a newer record)."""

    def __init__(self, credentials: Credentials, *, limits: Limits = DEFAULT_LIMITS) -> None:
        self.credentials = credentials
        self.limits = limits
        self.trusted_hosts = TrustedHosts(limits.max_trusted_hosts)

    async def dial(self, address: Address, *, expected_peer: PeerId | None = None) -> SecureChannel:
        """Connect to ``address`` and authenticate; see the module docstring for errors."""
        channel = await _dial_tcp(address, self.credentials, self.limits, expected_peer)
        if self.credentials.network_key is not None:  # see Listener._serve_connection
            self.trusted_hosts.add(source_key(address.host))
        return channel

    def listen(self, address: Address, handler: Handler) -> AbstractAsyncContextManager[Listener]:
        """Listen on ``address`` (port 0: any free port).

        Raises ``OSError`` (on entry) if it cannot bind, and
        :class:`~fedup.errors.LocalProtocolError` at once for unusable credentials.
        """
        _check_credentials(self.credentials, self.limits)
        return self._listen(address, handler)

    @asynccontextmanager
    async def _listen(self, address: Address, handler: Handler) -> AsyncIterator[Listener]:
        sockets = await trio.open_tcp_listeners(address.port, host=address.host)
        addresses = tuple(Address(*_split(s.socket.getsockname())) for s in sockets)

        def acceptor(socket_listener: trio.SocketListener) -> Accept:
            async def accept() -> tuple[trio.abc.Stream, str, str]:
                stream = await socket_listener.accept()
                try:
                    host, port = _split(stream.socket.getpeername())
                except OSError:
                    return stream, "unknown address", "unknown address"
                return stream, str(Address(host, port)), host

            return accept

        async def close_all() -> None:
            for s in sockets:
                await trio.aclose_forcefully(s)

        listener = Listener(self, handler, addresses)
        async with _serving(listener, [acceptor(s) for s in sockets], close_all) as running:
            yield running


@asynccontextmanager
async def loopback_channel_pair(
    dialer: Credentials, listener: Credentials, *, limits: Limits = DEFAULT_LIMITS
) -> AsyncIterator[tuple[SecureChannel, SecureChannel]]:
    """Both ends of one authenticated channel over loopback TCP: ``(dialer's, listener's)``.

    The real transport and handshake without a peer around them, for tests and
    benchmarks of what runs on a channel.  Both ends are closed on exit.
    """
    accepted_send, accepted_receive = trio.open_memory_channel[SecureChannel](1)
    finished = trio.Event()

    async def handler(channel: SecureChannel) -> None:
        await accepted_send.send(channel)
        await finished.wait()  # the listener closes its end when this returns

    server = TcpTransport(listener, limits=limits)
    async with server.listen(Address("127.0.0.1", 0), handler) as running:
        client = TcpTransport(dialer, limits=limits)
        dialed = await client.dial(running.addresses[0], expected_peer=listener.identity.peer_id)
        try:
            accepted = await accepted_receive.receive()
            yield dialed, accepted
        finally:
            finished.set()
            await dialed.aclose()


def _os_reason(exc: OSError) -> str:
    """The first OS-level reason (trio wraps per-attempt errors in a group)."""
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup) and isinstance(cause.exceptions[0], OSError):
        exc = cause.exceptions[0]
    return exc.strerror or str(exc)


def _split(sockaddr: tuple[Any, ...]) -> tuple[str, int]:
    """(host, port) of a socket address (IPv6 ones have two more fields)."""
    return str(sockaddr[0]), int(sockaddr[1])


# -- in memory ---------------------------------------------------------------------------


class MemoryNetwork:
    """An in-process network of memory listeners, addressed like TCP ones.

    ``net.transport(credentials)`` makes a transport for one peer; addresses
    are any :class:`Address` (``Address("10.0.0.1", 0)`` picks a free port).
    :meth:`connect` opens a raw, unauthenticated stream to a listener, for
    tests that play the attacker.
    """

    def __init__(self) -> None:
        self._listeners: dict[Address, trio.MemorySendChannel[tuple[trio.abc.Stream, str]]] = {}
        self._ports = itertools.count(40000)
        self._dialers = itertools.count(1)

    def transport(
        self, credentials: Credentials, *, limits: Limits = DEFAULT_LIMITS
    ) -> MemoryTransport:
        """A transport for one peer on this network."""
        return MemoryTransport(self, credentials, limits=limits)

    async def connect(self, address: Address, *, source: str | None = None) -> trio.abc.Stream:
        """Open a raw stream to the listener at ``address``; ``source`` names us to it.

        Raises :class:`DialError` if nothing listens there or its backlog is full.
        """
        await trio.lowlevel.checkpoint()
        queue = self._listeners.get(address)
        if queue is None:
            raise DialError("connection refused: nothing listens there", peer=str(address))
        # Imported here: only the in-memory network needs it, and it imports pytest
        # where that is installed (a quarter of a second at every command's start).
        from trio.testing import memory_stream_pair

        ours, theirs = memory_stream_pair()
        name = source if source is not None else f"memory-dialer-{next(self._dialers)}"
        try:
            queue.send_nowait((theirs, name))
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            raise DialError("connection refused: backlog full", peer=str(address)) from None
        return ours

    def _bind(
        self, address: Address
    ) -> tuple[Address, trio.MemoryReceiveChannel[tuple[trio.abc.Stream, str]]]:
        if address.port == 0:
            address = Address(address.host, next(self._ports))
        if address in self._listeners:
            raise OSError(errno.EADDRINUSE, f"{address} is already in use")
        send, receive = trio.open_memory_channel[tuple[trio.abc.Stream, str]](MEMORY_BACKLOG)
        self._listeners[address] = send
        return address, receive

    def _unbind(self, address: Address) -> None:
        queue = self._listeners.pop(address, None)
        if queue is not None:
            queue.close()


class MemoryTransport:
    """One peer's transport on a :class:`MemoryNetwork`; same interface as TCP."""

    def __init__(
        self, network: MemoryNetwork, credentials: Credentials, *, limits: Limits = DEFAULT_LIMITS
    ) -> None:
        self.network = network
        self.credentials = credentials
        self.limits = limits
        self.trusted_hosts = TrustedHosts(limits.max_trusted_hosts)

    async def dial(self, address: Address, *, expected_peer: PeerId | None = None) -> SecureChannel:
        """Connect to ``address`` and authenticate; see the module docstring for errors."""
        deadline = trio.current_time() + self.limits.handshake_timeout
        stream = await self._connect(address)
        return await upgrade_outbound(
            stream,
            peer=str(address),
            credentials=self.credentials,
            limits=self.limits,
            expected_peer=expected_peer,
            deadline=deadline,
        )

    async def _connect(self, address: Address) -> trio.abc.Stream:
        """The stream of a new connection to ``address`` (DialError if none listens)."""
        return await self.network.connect(address)

    def listen(self, address: Address, handler: Handler) -> AbstractAsyncContextManager[Listener]:
        """Listen on ``address`` (port 0: a free port); errors as for :class:`TcpTransport`."""
        _check_credentials(self.credentials, self.limits)
        return self._listen(address, handler)

    @asynccontextmanager
    async def _listen(self, address: Address, handler: Handler) -> AsyncIterator[Listener]:
        bound, queue = self.network._bind(address)

        async def accept() -> tuple[trio.abc.Stream, str, str]:
            stream, name = await queue.receive()
            return stream, name, name  # a memory dialer's name stands for its address

        async def close_all() -> None:
            self.network._unbind(bound)
            while True:  # close connections that were never accepted
                try:
                    stream, _ = queue.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                await trio.aclose_forcefully(stream)
            queue.close()

        listener = Listener(self, handler, (bound,))
        async with _serving(listener, [accept], close_all) as running:
            yield running
