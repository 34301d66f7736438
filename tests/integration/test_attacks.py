"""Attacks on a listener, over real loopback TCP (IPv4, IPv6) and over memory streams.

Each attack must end in the documented typed error, be logged once at warning
level by the listener, and leave the listener serving a legitimate peer, which
every test checks explicitly at the end.  Memory runs use trio's virtual clock
(deadlines are exact); TCP runs use short real deadlines.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager

import attrs
import pytest
import trio
import trio.testing

from fedup.config import DEFAULT_LIMITS, Limits
from fedup.errors import ConnectionLostError, PeerTimeoutError, RemoteProtocolError
from fedup.identity import Identity
from fedup.net.channel import (
    ChannelError,
    ChannelFrameError,
    ChannelLostError,
    ChannelTimeoutError,
    SecureChannel,
)
from fedup.net.transport import (
    Credentials,
    Listener,
    MemoryNetwork,
    TcpTransport,
    Transport,
    source_key,
    upgrade_outbound,
)
from fedup.protocol import cbor
from fedup.protocol.framing import FrameDecoder, FrameError, encode_frame
from fedup.protocol.handshake import HandshakeError, InitiatorHandshake
from fedup.protocol.records import Address, network_key_id

SERVER = Identity(b"\x0a" * 32)
LEGIT = Identity(b"\x0b" * 32)
MALLORY = Identity(b"\x0c" * 32)
NET = "lenders"
KEY = b"\x42" * 32

TCP_LIMITS = attrs.evolve(
    DEFAULT_LIMITS,
    handshake_timeout=1.0,
    idle_timeout=3.0,
    frame_timeout=0.5,
    max_frame_size=64 * 1024,
    max_connections=4,
    max_pending_handshakes=2,
)
MEMORY_LIMITS = attrs.evolve(
    TCP_LIMITS, handshake_timeout=10.0, idle_timeout=60.0, frame_timeout=30.0
)


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.fixture(params=["memory", "tcp4", "tcp6"])
def kind(request: pytest.FixtureRequest) -> Iterator[str]:
    # Skipped here, in a plain fixture: a skip raised inside a trio test loses its reason.
    only = request.node.get_closest_marker("kinds")
    if only is not None and request.param not in only.args:
        pytest.skip(only.kwargs["reason"])
    if request.param == "tcp6" and not _ipv6_loopback():
        pytest.skip("IPv6 loopback (::1) is not available on this host")
    yield request.param


@pytest.fixture
def clock(kind: str) -> trio.testing.MockClock | None:
    """Virtual time for memory streams; real sockets need the real clock."""
    return trio.testing.MockClock(autojump_threshold=0) if kind == "memory" else None


class Env:
    """One kind of network: makes transports, listens, opens raw (attacker) streams."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.net = MemoryNetwork()
        self.limits: Limits = MEMORY_LIMITS if kind == "memory" else TCP_LIMITS
        self.here = {"memory": "10.0.0.2", "tcp4": "127.0.0.1", "tcp6": "::1"}[kind]

    def transport(self, identity: Identity, *, key: bytes | None = None) -> Transport:
        creds = Credentials(identity, NET, network_key=key)
        if self.kind == "memory":
            return self.net.transport(creds, limits=self.limits)
        return TcpTransport(creds, limits=self.limits)

    async def raw(self, address: Address) -> trio.abc.Stream:
        if self.kind == "memory":
            return await self.net.connect(address)
        return await trio.open_tcp_stream(address.host, address.port)

    async def dial_through(
        self,
        address: Address,
        policy: Callable[[int, bytes], list[bytes]],
        identity: Identity = LEGIT,
        *,
        key: bytes | None = None,
    ) -> SecureChannel:
        """Dial with an attacker rewriting our outgoing frames in transit."""
        return await upgrade_outbound(
            FrameTamper(await self.raw(address), policy),
            peer=str(address),
            credentials=Credentials(identity, NET, network_key=key),
            limits=self.limits,
            expected_peer=SERVER.peer_id,
        )


class FrameTamper(trio.abc.Stream):
    """A man in the middle on the dialer's outgoing bytes: ``policy(index, frame)`` returns
    the frames to forward instead.  Frame 0 is msg1, 1 is msg3, 2 the stream header, 3 the
    first record."""

    def __init__(self, inner: trio.abc.Stream, policy: Callable[[int, bytes], list[bytes]]):
        self.inner = inner
        self.policy = policy
        self.decoder = FrameDecoder(max_size=1 << 30)
        self.index = 0

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.decoder.feed(data)
        out = []
        for frame in self.decoder.frames():
            out += [encode_frame(f, max_size=1 << 30) for f in self.policy(self.index, frame)]
            self.index += 1
        if out:
            await self.inner.send_all(b"".join(out))
        else:
            await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.fixture
def env(kind: str) -> Env:
    return Env(kind)


@asynccontextmanager
async def serving(
    env: Env, *, key: bytes | None = None
) -> AsyncIterator[tuple[Listener, list[BaseException]]]:
    """The listener under attack: an echo server that records what broke its connections."""
    errors: list[BaseException] = []

    async def handler(channel: SecureChannel) -> None:
        try:
            while data := await channel.receive_some():
                await channel.send_all(data)
        except Exception as exc:
            exc.at = trio.current_time()  # type: ignore[attr-defined]
            errors.append(exc)
            raise

    async with env.transport(SERVER, key=key).listen(Address(env.here, 0), handler) as listener:
        yield listener, errors


async def settle(listener: Listener) -> None:
    """Wait until the listener has finished with every connection."""
    with trio.fail_after(20):
        while listener.connections:
            await trio.sleep(0.005)


async def assert_serves_legit(env: Env, listener: Listener, *, key: bytes | None = None) -> None:
    channel = await env.transport(LEGIT, key=key).dial(
        listener.addresses[0], expected_peer=SERVER.peer_id
    )
    await channel.send_all(b"ping")
    assert await channel.receive_some() == b"ping"
    await channel.aclose()
    await settle(listener)


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "fedup.net" and r.levelno == logging.WARNING
    ]


@pytest.fixture(autouse=True)
def _capture(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fedup.net")


def keep(index: int, frame: bytes) -> list[bytes]:
    return [frame]


# -- who is at the other end -------------------------------------------------------------------


async def test_wrong_identity(
    env: Env, clock: trio.testing.MockClock | None, caplog: pytest.LogCaptureFixture
) -> None:
    async with serving(env) as (listener, _):
        with pytest.raises(HandshakeError) as info:  # we meant MALLORY; SERVER answered
            await env.transport(LEGIT).dial(listener.addresses[0], expected_peer=MALLORY.peer_id)
        assert info.value.code == "wrong-peer"
        assert SERVER.peer_id.text in info.value.reason
        await settle(listener)
        (warning,) = warnings_of(caplog)
        assert "HandshakeError: the dialer expected another peer" in warning
        await assert_serves_legit(env, listener)
    assert len(warnings_of(caplog)) == 1


@pytest.mark.parametrize("dialer_key", [None, b"\x43" * 32], ids=["none", "other"])
async def test_wrong_network_key(
    env: Env,
    clock: trio.testing.MockClock | None,
    caplog: pytest.LogCaptureFixture,
    dialer_key: bytes | None,
) -> None:
    async with serving(env, key=KEY) as (listener, _):
        with pytest.raises(HandshakeError) as info:
            await env.transport(MALLORY, key=dialer_key).dial(listener.addresses[0])
        assert info.value.code == "wrong-network-key"
        assert "wrong network key" in info.value.reason
        await settle(listener)
        (warning,) = warnings_of(caplog)
        assert "HandshakeError: wrong network key" in warning
        await assert_serves_legit(env, listener, key=KEY)
    assert len(warnings_of(caplog)) == 1


async def test_wrong_network_key_with_a_forged_fingerprint(
    env: Env, clock: trio.testing.MockClock | None, caplog: pytest.LogCaptureFixture
) -> None:
    """msg1 claims the right key's fingerprint; the handshake still fails on both sides."""

    def forge(index: int, frame: bytes) -> list[bytes]:
        if index == 0:
            msg1 = cbor.decode(frame, max_size=1 << 16, max_depth=1)
            assert isinstance(msg1, dict)
            msg1["netkey"] = network_key_id(KEY)
            return [cbor.encode(msg1)]
        return [frame]

    async with serving(env, key=KEY) as (listener, _):
        with pytest.raises(HandshakeError) as info:
            await env.dial_through(listener.addresses[0], forge, MALLORY, key=b"\x43" * 32)
        assert info.value.code == "wrong-network-key"
        await settle(listener)
        (warning,) = warnings_of(caplog)
        assert "HandshakeError: wrong network key" in warning
        await assert_serves_legit(env, listener, key=KEY)


async def test_replayed_handshake(
    env: Env, clock: trio.testing.MockClock | None, caplog: pytest.LogCaptureFixture
) -> None:
    recorded: list[bytes] = []

    def record(index: int, frame: bytes) -> list[bytes]:
        recorded.append(frame)
        return [frame]

    async with serving(env) as (listener, _):
        channel = await env.dial_through(listener.addresses[0], record)
        await channel.aclose()
        await settle(listener)
        raw = await env.raw(listener.addresses[0])  # replay msg1, then the old msg3
        await raw.send_all(encode_frame(recorded[0], max_size=1 << 20))
        decoder = FrameDecoder(max_size=1 << 20)
        while decoder.next_frame() is None:
            decoder.feed(await raw.receive_some())
        await raw.send_all(encode_frame(recorded[1], max_size=1 << 20))
        await settle(listener)
        (warning,) = warnings_of(caplog)
        assert "HandshakeError: wrong network key: cannot open the box of msg3" in warning
        await raw.aclose()
        await assert_serves_legit(env, listener)


# -- records on an established channel ----------------------------------------------------------


async def _attack_records(
    env: Env, caplog: pytest.LogCaptureFixture, policy: Callable[[int, bytes], list[bytes]]
) -> BaseException:
    """Send three records through ``policy``; return what broke the listener's side."""
    async with serving(env) as (listener, errors):
        channel = await env.dial_through(listener.addresses[0], policy)
        for word in (b"one", b"two", b"three"):
            await channel.send_all(word)
        await settle_or_close(listener, channel)
        (error,) = errors
        (warning,) = warnings_of(caplog)
        assert f"connection with {LEGIT.peer_id.text} failed: {type(error).__name__}" in warning
        assert isinstance(error, RemoteProtocolError) and error.peer == LEGIT.peer_id.text
        await assert_serves_legit(env, listener)
    assert len(warnings_of(caplog)) == 1
    return error


async def settle_or_close(listener: Listener, channel: SecureChannel) -> None:
    """Let the listener fail the connection, then close our end."""
    with trio.move_on_after(5):
        while await channel.receive_some():
            pass
    await trio.aclose_forcefully(channel)
    await settle(listener)


def flip_in(target: int) -> Callable[[int, bytes], list[bytes]]:
    def policy(index: int, frame: bytes) -> list[bytes]:
        if index == target:
            return [frame[:-1] + bytes([frame[-1] ^ 0x80])]
        return [frame]

    return policy


async def test_tampered_record(
    env: Env, clock: trio.testing.MockClock | None, caplog: pytest.LogCaptureFixture
) -> None:
    error = await _attack_records(env, caplog, flip_in(4))  # the second record
    assert type(error) is ChannelError
    assert "record failed authentication" in error.reason


async def test_replayed_record(
    env: Env, clock: trio.testing.MockClock | None, caplog: pytest.LogCaptureFixture
) -> None:
    def duplicate(index: int, frame: bytes) -> list[bytes]:
        return [frame, frame] if index == 3 else [frame]

    error = await _attack_records(env, caplog, duplicate)
    assert type(error) is ChannelError
    assert "record failed authentication" in error.reason


async def test_reordered_records(
    env: Env, clock: trio.testing.MockClock | None, caplog: pytest.LogCaptureFixture
) -> None:
    held: list[bytes] = []

    def swap(index: int, frame: bytes) -> list[bytes]:
        if index == 3:
            held.append(frame)
            return []
        if index == 4:
            return [frame, *held]
        return [frame]

    error = await _attack_records(env, caplog, swap)
    assert type(error) is ChannelError
    assert "record failed authentication" in error.reason


async def test_dropped_record(
    env: Env, clock: trio.testing.MockClock | None, caplog: pytest.LogCaptureFixture
) -> None:
    error = await _attack_records(env, caplog, lambda i, f: [] if i == 3 else [f])
    assert type(error) is ChannelError


async def test_truncated_stream(
    env: Env, clock: trio.testing.MockClock | None, caplog: pytest.LogCaptureFixture
) -> None:
    """The close-notify (frame 6, after three records) is cut off in transit."""
    async with serving(env) as (listener, errors):
        channel = await env.dial_through(listener.addresses[0], lambda i, f: [] if i == 6 else [f])
        for word in (b"one", b"two", b"three"):
            await channel.send_all(word)
        got = b""
        while got != b"onetwothree":
            got += await channel.receive_some()
        await channel.aclose()
        await settle(listener)
        (error,) = errors
        assert isinstance(error, ChannelLostError) and isinstance(error, ConnectionLostError)
        assert "truncated: connection ended without close-notify" in error.reason
        (warning,) = warnings_of(caplog)
        assert "ChannelLostError: truncated" in warning
        await assert_serves_legit(env, listener)


# -- frames and time ---------------------------------------------------------------------------


async def test_oversized_frame_header_in_the_channel(
    env: Env, clock: trio.testing.MockClock | None, caplog: pytest.LogCaptureFixture
) -> None:
    async with serving(env) as (listener, errors):
        channel = await env.transport(LEGIT).dial(listener.addresses[0])
        huge = env.limits.max_frame_size + 1
        await channel.transport_stream.send_all(huge.to_bytes(4, "big"))
        await settle_or_close(listener, channel)
        (error,) = errors
        assert isinstance(error, ChannelFrameError) and isinstance(error, FrameError)
        assert f"frame length {huge} exceeds the limit" in error.reason
        (warning,) = warnings_of(caplog)
        assert "ChannelFrameError: frame length" in warning
        await assert_serves_legit(env, listener)


async def test_oversized_frame_header_in_the_handshake(
    env: Env, clock: trio.testing.MockClock | None, caplog: pytest.LogCaptureFixture
) -> None:
    async with serving(env) as (listener, _):
        raw = await env.raw(listener.addresses[0])
        await raw.send_all((2**32 - 1).to_bytes(4, "big"))
        await settle(listener)
        (warning,) = warnings_of(caplog)
        assert "handshake with" in warning and "FrameError: frame length 4294967295" in warning
        await raw.aclose()
        await assert_serves_legit(env, listener)


async def test_handshake_frames_are_capped_far_below_channel_frames(
    env: Env, clock: trio.testing.MockClock | None, caplog: pytest.LogCaptureFixture
) -> None:
    """Before authentication a frame may not be larger than max_handshake_frame_size."""
    cap = env.limits.max_handshake_frame_size
    assert cap * 4 <= env.limits.max_frame_size
    async with serving(env) as (listener, _):
        raw = await env.raw(listener.addresses[0])
        await raw.send_all((cap + 1).to_bytes(4, "big") + bytes(64))
        await settle(listener)
        (warning,) = warnings_of(caplog)
        assert f"FrameError: frame length {cap + 1} exceeds the limit of {cap}" in warning
        await raw.aclose()
        await assert_serves_legit(env, listener)


async def test_slow_trickle(
    env: Env, clock: trio.testing.MockClock | None, caplog: pytest.LogCaptureFixture
) -> None:
    """A record trickled at 4 bytes per frame_timeout/8: each read is quick, the frame is not."""
    frame_timeout = env.limits.frame_timeout
    async with serving(env) as (listener, errors):
        channel = await env.transport(LEGIT).dial(listener.addresses[0])
        raw = channel.transport_stream
        start = trio.current_time()
        with trio.move_on_after(frame_timeout * 4):
            try:
                for i in range(100):
                    await raw.send_all(bytes([0, 0, 1, 0] if i == 0 else [0, 0, 0, 0]))
                    await trio.sleep(frame_timeout / 8)
            except trio.BrokenResourceError:
                pass  # the listener cut us off
        await settle_or_close(listener, channel)
        (error,) = errors
        assert isinstance(error, ChannelTimeoutError) and isinstance(error, PeerTimeoutError)
        assert f"did not complete a frame within {frame_timeout:g} s" in error.reason
        if env.kind == "memory":  # virtual time: cut at the exact deadline
            assert error.at - start == pytest.approx(frame_timeout)  # type: ignore[attr-defined]
        (warning,) = warnings_of(caplog)
        assert "ChannelTimeoutError: did not complete a frame" in warning
        assert trio.current_time() - start >= frame_timeout
        await assert_serves_legit(env, listener)


async def test_slow_handshake(
    env: Env, clock: trio.testing.MockClock | None, caplog: pytest.LogCaptureFixture
) -> None:
    """msg1 arrives one byte at a time: the whole handshake has one deadline."""
    msg1 = encode_frame(InitiatorHandshake(MALLORY, network=NET).start(), max_size=1 << 16)
    timeout = env.limits.handshake_timeout
    env.limits = attrs.evolve(  # neither the frame deadline nor the first frame's
        env.limits, frame_timeout=timeout * 10, first_frame_timeout=timeout * 10
    )
    async with serving(env) as (listener, _):
        raw = await env.raw(listener.addresses[0])
        start = trio.current_time()
        with trio.move_on_after(timeout * 3):
            try:
                for byte in msg1:
                    await raw.send_all(bytes([byte]))
                    await trio.sleep(timeout / 10)
            except trio.BrokenResourceError:
                pass  # the listener cut us off
        await settle(listener)
        elapsed = trio.current_time() - start
        if env.kind == "memory":
            assert elapsed == pytest.approx(timeout, abs=timeout / 10 + 1e-6)
        else:
            assert timeout <= elapsed < timeout * 3
        (warning,) = warnings_of(caplog)
        assert f"PeerTimeoutError: handshake did not complete within {timeout:g} s" in warning
        await raw.aclose()
        await assert_serves_legit(env, listener)


# -- floods ----------------------------------------------------------------------------------------


async def _first_frame_or_eof(stream: trio.abc.Stream) -> bytes | None:
    decoder = FrameDecoder(max_size=1 << 20)
    try:
        while (frame := decoder.next_frame()) is None:
            data = await stream.receive_some()
            if not data:
                return None
            decoder.feed(data)
    except (trio.BrokenResourceError, OSError):  # a reset counts as closed
        return None
    return frame


async def test_connection_flood(
    env: Env, clock: trio.testing.MockClock | None, caplog: pytest.LogCaptureFixture
) -> None:
    """Six stalling attackers against max_connections=4, max_pending_handshakes=2."""
    limits = env.limits
    assert (limits.max_connections, limits.max_pending_handshakes) == (4, 2)
    async with serving(env) as (listener, _):
        address = listener.addresses[0]
        attackers = [await env.raw(address) for _ in range(6)]
        with trio.fail_after(10):
            while listener.connections < 4:  # the listener has accepted what it will
                await trio.sleep(0.005)
        for stream in attackers:
            msg1 = InitiatorHandshake(MALLORY, network=NET).start()
            try:
                await stream.send_all(encode_frame(msg1, max_size=1 << 16))
            except (trio.BrokenResourceError, OSError):
                pass  # already closed by the listener
        answers = [await _first_frame_or_eof(stream) for stream in attackers]
        closed = [a for a in answers if a is None]
        decoded = [cbor.decode(a, max_size=1 << 16, max_depth=1) for a in answers if a]
        busy = [d for d in decoded if isinstance(d, dict) and d.get("abort") == "busy"]
        served = [d for d in decoded if isinstance(d, dict) and "box" in d]
        assert (len(served), len(busy), len(closed)) == (2, 2, 2)
        assert answers[4] is None and answers[5] is None  # the last two were over the cap

        # While the two stalled handshakes hold every handshake slot, a legit peer is refused.
        with pytest.raises(HandshakeError) as info:
            await env.transport(LEGIT).dial(address, expected_peer=SERVER.peer_id)
        assert info.value.code == "busy"

        await settle(listener)  # the stalled handshakes time out
        for stream in attackers:
            await trio.aclose_forcefully(stream)
        messages = warnings_of(caplog)
        assert sum("closing new connections" in m for m in messages) == 1  # for two refusals
        assert sum("answering 'busy'" in m for m in messages) == 1  # for three, legit included
        assert sum("PeerTimeoutError: handshake did not complete" in m for m in messages) == 2
        await assert_serves_legit(env, listener)


async def test_flood_of_connections_that_send_nothing(
    env: Env, clock: trio.testing.MockClock | None, caplog: pytest.LogCaptureFixture
) -> None:
    """Three times the cap in idle connections: none holds a slot past the first frame's deadline
    (or the handshake's, when that is shorter)."""
    limits = env.limits
    timeout = min(limits.first_frame_timeout, limits.handshake_timeout)
    reason = (
        f"sent no handshake within {timeout:g} s"
        if limits.first_frame_timeout < limits.handshake_timeout
        else f"handshake did not complete within {timeout:g} s"
    )
    async with serving(env) as (listener, _):
        attackers = [await env.raw(listener.addresses[0]) for _ in range(12)]
        start = trio.current_time()
        with trio.fail_after(10):
            while listener.connections < 4:
                await trio.sleep(0.005)
        await settle(listener)
        elapsed = trio.current_time() - start
        if env.kind == "memory":
            assert elapsed == pytest.approx(timeout, abs=0.01)
        else:
            assert timeout * 0.9 <= elapsed < timeout * 3
        answers = [await _first_frame_or_eof(stream) for stream in attackers]
        assert answers == [None] * 12  # nobody got anything but a closed connection
        messages = warnings_of(caplog)
        assert sum("closing new connections" in m for m in messages) == 1  # once per episode
        assert sum("answering 'busy'" in m for m in messages) == 1
        assert sum(f"PeerTimeoutError: {reason}" in m for m in messages) == 2
        await assert_serves_legit(env, listener)
        for stream in attackers:
            await trio.aclose_forcefully(stream)


async def _raw_from(env: Env, address: Address, source: str) -> trio.abc.Stream:
    """A raw connection to ``address`` from the source address ``source``."""
    if env.kind == "memory":
        return await env.net.connect(address, source=source)
    return await trio.open_tcp_stream(address.host, address.port, local_address=source)


@pytest.mark.kinds(
    "memory", "tcp4", reason="IPv6 loopback has a single address; the flood needs a second one"
)
@pytest.mark.parametrize("authenticated", [False, True], ids=["stranger", "authenticated"])
async def test_a_flood_from_one_address_leaves_dials_working(
    env: Env,
    clock: trio.testing.MockClock | None,
    caplog: pytest.LogCaptureFixture,
    authenticated: bool,
) -> None:
    """Twelve idle connections from one address take one handshake slot, not every slot;
    also when the flooder first completes a handshake (anyone can on an open network)."""
    env.limits = attrs.evolve(
        env.limits, max_handshakes_per_host=1, reserved_connections=2, max_connections_per_host=2
    )
    flooder = "10.66.66.66" if env.kind == "memory" else "127.0.0.2"
    async with serving(env) as (listener, _):
        address = listener.addresses[0]
        if authenticated:
            first = await upgrade_outbound(
                await _raw_from(env, address, flooder),
                peer=str(address),
                credentials=Credentials(MALLORY, NET),
                limits=env.limits,
            )
            await first.aclose()
            await settle(listener)
        attackers = [await _raw_from(env, address, flooder) for _ in range(12)]
        with trio.fail_after(10):
            while listener.connections < 1:
                await trio.sleep(0.005)
        await trio.sleep(0.05)  # let the listener take every connection it will
        assert listener.connections == 1 and listener.pending_handshakes == 1
        # A first-time dialer (its address never completed a handshake) gets in at once.
        channel = await env.transport(LEGIT).dial(address, expected_peer=SERVER.peer_id)
        await channel.send_all(b"ping")
        assert await channel.receive_some() == b"ping"
        answers = [await _first_frame_or_eof(stream) for stream in attackers[1:]]
        assert answers == [None] * 11  # over the per-address cap: closed before a byte is read
        messages = warnings_of(caplog)
        assert sum("(max_handshakes_per_host)" in m for m in messages) == 1  # once per episode
        assert not listener._transport.trusted_hosts.contains(flooder)  # open network: no trust
        await channel.aclose()
        for stream in attackers:
            await trio.aclose_forcefully(stream)
        await settle(listener)


@pytest.mark.kinds(
    "tcp4", reason="needs two addresses (tcp4); memory dialers have a fresh name each time"
)
async def test_trusted_addresses_keep_reserved_slots(
    env: Env, clock: trio.testing.MockClock | None, caplog: pytest.LogCaptureFixture
) -> None:
    """Every ordinary slot held by a flood: an address that completed a handshake under the
    network key gets in (on an open network a handshake proves nothing: no trust)."""
    env.limits = attrs.evolve(env.limits, max_handshakes_per_host=100, max_connections_per_host=100)
    async with serving(env, key=KEY) as (listener, _):
        address = listener.addresses[0]
        legit = env.transport(LEGIT, key=KEY)
        first = await legit.dial(address, expected_peer=SERVER.peer_id)
        await first.aclose()
        await settle(listener)
        cap = env.limits.max_connections
        attackers = [await _raw_from(env, address, "127.0.0.2") for _ in range(cap + 4)]
        with trio.fail_after(10):
            while listener.connections < cap:
                await trio.sleep(0.005)
        await trio.sleep(0.05)
        assert listener.connections == cap  # the flood holds every ordinary slot
        stranger = await _raw_from(env, address, "127.0.0.3")  # a new address is shut out
        assert await _first_frame_or_eof(stranger) is None
        channel = await legit.dial(address, expected_peer=SERVER.peer_id)  # a known one is not
        await channel.send_all(b"ping")
        assert await channel.receive_some() == b"ping"
        await channel.aclose()
        for stream in attackers:
            await trio.aclose_forcefully(stream)
        await settle(listener)


def test_an_ipv6_source_counts_by_its_64() -> None:
    """One host commonly holds a whole /64: counting single addresses would give it 2^64."""
    assert (
        source_key("2001:db8:1:2::1") == source_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    )
    assert source_key("2001:db8:1:3::1") != source_key("2001:db8:1:2::1")
    assert source_key("fe80::1%eth0") == "fe80::/64"
    assert source_key("192.0.2.7") == "192.0.2.7"
    assert source_key("memory-dialer-3") == "memory-dialer-3"
