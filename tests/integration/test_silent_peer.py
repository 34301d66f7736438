"""An authenticated peer that connects to a running peer and then says nothing.

It holds the network key and passes the handshake, so only the serving peer's own
deadline for the first request ends the connection.  That must be one warning that
names the peer and the reason (no traceback, nothing at error level), and the peer
must go on serving.  Memory network, trio's virtual clock.
"""

from __future__ import annotations

import logging
from pathlib import Path

import attrs
import pytest
import trio
import trio.testing

from fedup.config import DEFAULT_LIMITS
from fedup.identity import Identity
from fedup.learn.loans import generate_lender
from fedup.net.discovery import request_peer_list
from fedup.net.transport import Credentials, Transport
from fedup.peer import Peer, PeerConfig, TabularSource
from fedup.sim.world import MemoryWorld

NETWORK = "lenders"
KEY = b"\x42" * 32
LIMITS = attrs.evolve(DEFAULT_LIMITS, frame_timeout=5.0, idle_timeout=60.0)
SERVER = Identity(b"\x01" * 32)
SILENT = Identity(b"\x02" * 32)
POLITE = Identity(b"\x03" * 32)


async def test_a_silent_authenticated_peer_is_a_logged_refusal_not_a_traceback(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    world = MemoryWorld()
    config = PeerConfig(
        identity=SERVER,
        out_dir=tmp_path / "out",
        network=NETWORK,
        network_key=KEY,
        min_peers=3,  # it waits for members: nothing but the strangers talks to it
        train_in_thread=False,
        limits=LIMITS,
    )
    source = TabularSource(generate_lender(1, n_rows=200).table, target="default")
    async with Peer.open(config, source, world=world) as peer:
        (address,) = peer.addresses

        def transport(identity: Identity) -> Transport:
            creds = Credentials(identity, NETWORK, network_key=KEY)
            return world.network.transport(creds, limits=LIMITS)

        silent = await transport(SILENT).dial(address, expected_peer=SERVER.peer_id)
        started = trio.current_time()
        with trio.move_on_after(3 * LIMITS.frame_timeout):
            assert await silent.receive_some(1) == b""  # the server ends it
        assert trio.current_time() - started == pytest.approx(LIMITS.frame_timeout)
        await silent.aclose()

        # The peer still serves: another peer of the network gets its peer list.
        polite = await transport(POLITE).dial(address, expected_peer=SERVER.peer_id)
        reply = await request_peer_list(polite, limits=LIMITS)
        await polite.aclose()
        assert reply.records  # at least the server's own record

    about_silent = [r for r in caplog.records if SILENT.peer_id.text in r.getMessage()]
    assert [r.levelno for r in about_silent] == [logging.WARNING], [
        r.getMessage() for r in about_silent
    ]
    message = about_silent[0].getMessage()
    assert f"sent no request within {LIMITS.frame_timeout:g} s" in message
    assert "TooSlowError" not in message
    assert not [r for r in caplog.records if r.exc_info is not None]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
