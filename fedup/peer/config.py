"""The settings of one peer: who it is, where it listens, how it finds others, how it trains."""

from __future__ import annotations

from pathlib import Path

import attrs

from fedup.config import DEFAULT_LIMITS, Limits
from fedup.errors import ConfigError
from fedup.identity import Identity, default_state_dir, load_or_create_identity
from fedup.protocol.records import Address
from fedup.protocol.view import RunSettings

DEFAULT_NETWORK = "fedup"


@attrs.frozen
class PeerConfig:
    """Everything a :class:`~fedup.peer.Peer` needs besides its task.

    Limits and deadlines are in ``limits`` (:class:`fedup.config.Limits`).
    """

    state_dir: Path | None = None
    """Identity and runs live here (default: ``$FEDUP_STATE_DIR`` or the user data dir)."""
    identity: Identity | None = None
    """Use this identity instead of the state directory's key file (tests, simulator)."""
    out_dir: Path | None = None
    """Where the run's outputs go (default: ``<state_dir>/runs/<run id>``)."""
    network: str = DEFAULT_NETWORK
    """Network name: peers of other networks are ignored."""
    network_key: bytes | None = None
    """32-byte pre-shared key: peers without it cannot complete a handshake."""
    listen: Address = attrs.field(factory=lambda: Address("0.0.0.0", 0))
    """TCP address to listen on (port 0: any free port)."""
    interfaces: tuple[str, ...] | None = None
    """mDNS interfaces (names or IPv4 addresses); None: the LAN interfaces that are up."""
    loopback: bool = False
    """mDNS and listening on 127.0.0.1 only: several peers on one host."""
    mdns: bool = True
    """Use mDNS discovery (``--no-mdns`` turns it off)."""
    bootstrap: tuple[Address, ...] = ()
    """Known peers to dial directly (beyond one LAN)."""
    min_peers: int = 2
    """Members (this peer included) needed before forming a federation."""
    settle: float = 3.0
    """Seconds without a new peer appearing before the federation forms."""
    run: RunSettings = attrs.field(factory=RunSettings)
    """Training settings; the leader's settings are the run's."""
    limits: Limits = DEFAULT_LIMITS
    run_id: bytes | None = None
    """The run ID this peer uses if it leads (16 bytes); None: a fresh random one.
    The simulator fixes it so that the same seed gives byte-identical model files."""
    train_in_thread: bool = True
    """Train hops in a worker thread so the peer keeps serving; the simulator turns it off
    to run on trio's virtual clock (which does not wait for threads)."""

    def __attrs_post_init__(self) -> None:
        if self.min_peers < 1:
            raise ConfigError("min_peers must be at least 1")
        if self.settle < 0:
            raise ConfigError("settle must not be negative")
        if self.run_id is not None and len(self.run_id) != 16:
            raise ConfigError("a run ID has 16 bytes")
        if self.network_key is not None and len(self.network_key) != 32:
            raise ConfigError("a network key has 32 bytes")
        if not self.network or len(self.network.encode()) > self.limits.max_network_name:
            raise ConfigError(f"network name must be 1 to {self.limits.max_network_name} bytes")

    def resolved_state_dir(self) -> Path:
        return self.state_dir if self.state_dir is not None else default_state_dir()

    def run_dir(self, run_id: bytes) -> Path:
        """Where the run ``run_id`` writes its outputs: ``out_dir``, else the state
        directory's ``runs/<run id>``."""
        if self.out_dir is not None:
            return self.out_dir
        return self.resolved_state_dir() / "runs" / run_id.hex()

    def run_state_path(self) -> Path | None:
        """Where this peer saves its run to resume it after a restart: the state
        directory's ``run-state.cbor``, when the identity comes from a state directory
        or ``state_dir`` is given; None (nothing saved) for a peer given only an
        identity (the simulator's peers, unless it gives them state directories)."""
        if self.identity is not None and self.state_dir is None:
            return None
        return self.resolved_state_dir() / "run-state.cbor"

    def load_identity(self) -> Identity:
        if self.identity is not None:
            return self.identity
        return load_or_create_identity(self.resolved_state_dir())
