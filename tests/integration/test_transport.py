"""TCP and memory transports: listen, dial, learn records, fail with typed errors, close."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator

import attrs
import pytest
import trio
import trio.testing

from fedup.config import DEFAULT_LIMITS
from fedup.errors import ConnectionLostError, LocalProtocolError, PeerTimeoutError
from fedup.identity import Identity
from fedup.net.channel import SecureChannel
from fedup.net.transport import (
    Credentials,
    DialError,
    MemoryNetwork,
    TcpTransport,
    Transport,
    dial_tcp,
)
from fedup.protocol.handshake import HandshakeError, ResponderHandshake
from fedup.protocol.records import Address, PeerRecord

ALICE = Identity(b"\x01" * 32)
BOB = Identity(b"\x02" * 32)
NET = "lenders"
LIMITS = attrs.evolve(DEFAULT_LIMITS, handshake_timeout=2.0, idle_timeout=5.0, frame_timeout=2.0)


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


IPV6 = _ipv6_loopback()


@pytest.fixture(params=["memory", "tcp4", "tcp6"])
def kind(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "tcp6" and not IPV6:
        pytest.skip("IPv6 loopback (::1) is not available on this host")
    yield request.param


def make(kind: str, net: MemoryNetwork, creds: Credentials) -> Transport:
    if kind == "memory":
        return net.transport(creds, limits=LIMITS)
    return TcpTransport(creds, limits=LIMITS)


def where(kind: str) -> Address:
    return {
        "memory": Address("10.0.0.2", 0),
        "tcp4": Address("127.0.0.1", 0),
        "tcp6": Address("::1", 0),
    }[kind]


async def echo(channel: SecureChannel) -> None:
    while data := await channel.receive_some():
        await channel.send_all(data)


async def test_dial_listen_echo_and_records(kind: str) -> None:
    net = MemoryNetwork()
    rec_a = PeerRecord(ALICE.peer_id, 1, (Address("10.0.0.1", 4100),), NET).seal(ALICE)
    rec_b = PeerRecord(BOB.peer_id, 1, (Address("10.0.0.2", 4100),), NET).seal(BOB)
    seen: list[SecureChannel] = []

    async def handler(channel: SecureChannel) -> None:
        seen.append(channel)
        await echo(channel)

    server = make(kind, net, Credentials(BOB, NET, local_record=rec_b))
    client = make(kind, net, Credentials(ALICE, NET, local_record=rec_a))
    async with server.listen(where(kind), handler) as listener:
        (address,) = listener.addresses
        assert address.port != 0 and address.host == where(kind).host
        channel = await client.dial(address, expected_peer=BOB.peer_id)
        assert channel.remote_peer == BOB.peer_id
        assert channel.remote_record == rec_b
        await channel.send_all(b"hello" * 100_000)
        got = bytearray()
        while len(got) < 500_000:
            got += await channel.receive_some()
        assert got == b"hello" * 100_000
        await channel.aclose()
        assert seen[0].remote_peer == ALICE.peer_id
        assert seen[0].remote_record == rec_a
        assert seen[0].transcript_hash == channel.transcript_hash


async def test_new_credentials_apply_to_the_next_handshake(kind: str) -> None:
    net = MemoryNetwork()
    records = [
        PeerRecord(BOB.peer_id, seq, (Address("10.0.0.2", 4100 + seq),), NET).seal(BOB)
        for seq in (1, 2)
    ]
    server = make(kind, net, Credentials(BOB, NET, local_record=records[0]))
    client = make(kind, net, Credentials(ALICE, NET))
    async with server.listen(where(kind), echo) as listener:
        first = await client.dial(listener.addresses[0])
        server.credentials = attrs.evolve(server.credentials, local_record=records[1])
        second = await client.dial(listener.addresses[0])
        assert first.remote_record == records[0]
        assert second.remote_record == records[1]
        await first.aclose()
        await second.aclose()


async def test_nothing_listening_is_a_dial_error(kind: str) -> None:
    net = MemoryNetwork()
    client = make(kind, net, Credentials(ALICE, NET))
    async with make(kind, net, Credentials(BOB, NET)).listen(where(kind), echo) as listener:
        address = listener.addresses[0]
    with pytest.raises(DialError) as info:  # the listener is gone
        await client.dial(address)
    assert info.value.peer == str(address)
    assert "refused" in info.value.reason


async def test_handler_exception_is_logged_and_listener_keeps_serving(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    net = MemoryNetwork()
    calls = 0

    async def handler(channel: SecureChannel) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise KeyError("bug in the handler")
        await echo(channel)

    client = make(kind, net, Credentials(ALICE, NET))
    with caplog.at_level(logging.WARNING, logger="fedup.net"):
        async with make(kind, net, Credentials(BOB, NET)).listen(where(kind), handler) as listener:
            first = await client.dial(listener.addresses[0])
            assert await first.receive_some() == b""  # the listener closed it cleanly
            second = await client.dial(listener.addresses[0])
            await second.send_all(b"still here")
            assert await second.receive_some() == b"still here"
            await second.aclose()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert errors[0].exc_info is not None and errors[0].exc_info[0] is KeyError
    assert ALICE.peer_id.text in errors[0].getMessage()


async def test_closing_the_listener_closes_its_connections(kind: str) -> None:
    net = MemoryNetwork()
    client = make(kind, net, Credentials(ALICE, NET))
    entered = trio.Event()

    async def handler(channel: SecureChannel) -> None:
        entered.set()
        await trio.sleep_forever()

    async with make(kind, net, Credentials(BOB, NET)).listen(where(kind), handler) as listener:
        channel = await client.dial(listener.addresses[0])
        await entered.wait()
    with trio.fail_after(5):
        assert await channel.receive_some() == b""  # close-notify from the cancelled handler


async def test_memory_address_in_use_and_port_zero() -> None:
    net = MemoryNetwork()
    transport = net.transport(Credentials(BOB, NET))
    async with transport.listen(Address("10.0.0.2", 4100), echo) as listener:
        assert listener.addresses == (Address("10.0.0.2", 4100),)
        with pytest.raises(OSError, match="in use"):
            async with transport.listen(Address("10.0.0.2", 4100), echo):
                pass  # pragma: no cover
        async with transport.listen(Address("10.0.0.2", 0), echo) as other:
            assert other.addresses[0].port not in (0, 4100)


async def test_dial_tcp_function_and_body_errors_are_not_wrapped() -> None:
    async with TcpTransport(Credentials(BOB, NET)).listen(Address("127.0.0.1", 0), echo) as lis:
        with pytest.raises(HandshakeError) as info:  # a plain error, not an ExceptionGroup
            await dial_tcp(
                lis.addresses[0], identity=ALICE, network=NET, expected_peer=ALICE.peer_id
            )
        assert info.value.code == "wrong-peer"
        channel = await dial_tcp(lis.addresses[0], identity=ALICE, network=NET)
        await channel.aclose()


async def test_dial_deadline_covers_a_silent_tcp_server() -> None:
    """A TCP server that accepts and never answers: the dialer gives up at the deadline."""
    limits = attrs.evolve(LIMITS, handshake_timeout=0.3)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    start = trio.current_time()
    with pytest.raises(PeerTimeoutError) as info:
        await dial_tcp(Address("127.0.0.1", port), identity=ALICE, network=NET, limits=limits)
    assert 0.3 <= trio.current_time() - start < 2.0
    assert "within 0.3 s" in info.value.reason
    for lis in listeners:
        await lis.aclose()


async def test_memory_network_raw_connect_names_the_source(
    caplog: pytest.LogCaptureFixture,
) -> None:
    net = MemoryNetwork()
    with caplog.at_level(logging.WARNING, logger="fedup.net"):
        async with net.transport(Credentials(BOB, NET)).listen(Address("10.0.0.2", 0), echo) as lis:
            raw = await net.connect(lis.addresses[0], source="10.0.0.9:5555")
            await raw.send_all(b"\x00\x00\x00\x01\xff")  # one frame that is not CBOR
            assert await raw.receive_some() != b""  # the abort "protocol"
            with pytest.raises(DialError, match="nothing listens"):
                await net.connect(Address("10.0.0.3", 1))
            await trio.testing.wait_all_tasks_blocked()
    (warning,) = caplog.records
    assert "handshake with 10.0.0.9:5555 failed: HandshakeError: malformed msg1" in (
        warning.getMessage()
    )


async def test_a_bug_in_the_handshake_is_logged_and_does_not_stop_the_listener(
    kind: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    net = MemoryNetwork()
    original = ResponderHandshake.receive_msg1
    calls = 0

    def buggy(self: ResponderHandshake, data: bytes) -> bytes:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ValueError("a bug")
        return original(self, data)

    monkeypatch.setattr(ResponderHandshake, "receive_msg1", buggy)
    client = make(kind, net, Credentials(ALICE, NET))
    with caplog.at_level(logging.WARNING, logger="fedup.net"):
        async with make(kind, net, Credentials(BOB, NET)).listen(where(kind), echo) as listener:
            with pytest.raises(ConnectionLostError):
                await client.dial(listener.addresses[0])
            channel = await client.dial(listener.addresses[0])
            await channel.aclose()
    (error,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert error.exc_info is not None and error.exc_info[0] is ValueError


async def test_unusable_credentials_fail_at_listen(kind: str) -> None:
    net = MemoryNetwork()
    record = PeerRecord(ALICE.peer_id, 1, (Address("10.0.0.1", 4100),), NET).seal(ALICE)
    server = make(kind, net, Credentials(BOB, NET, local_record=record))  # ALICE's record
    with pytest.raises(LocalProtocolError):
        server.listen(where(kind), echo)
