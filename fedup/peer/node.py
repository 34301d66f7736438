"""A running peer: listener, discovery, formation and ring training, composed.

Use it from any trio program::

    async with Peer.open(PeerConfig(...), task) as peer:
        summary = await peer.train()

``task`` is a :class:`~fedup.learn.task.Task` (any ``torch.nn.Module`` with its
own training step and evaluation; every member must bring the same
architecture) or a :class:`~fedup.peer.source.TaskSource` (e.g.
:class:`~fedup.peer.source.TabularSource` for CSV data with schema agreement).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager

import attrs
import trio

from fedup.errors import RemoteProtocolError
from fedup.identity import Identity
from fedup.learn.schema import FeatureSchema
from fedup.learn.task import Task
from fedup.net.channel import SecureChannel
from fedup.net.discovery import (
    BootstrapDiscovery,
    Discovery,
    MdnsDiscovery,
    MemoryDiscovery,
    MemoryDiscoveryHub,
    NetworkScope,
    answer_peer_list,
    choose_interfaces,
)
from fedup.net.framed import FramedStream
from fedup.net.transport import Credentials, MemoryNetwork, TcpTransport, Transport
from fedup.peer.config import PeerConfig
from fedup.peer.formation import Formation
from fedup.peer.outputs import RunSummary
from fedup.peer.source import FixedTaskSource, TaskSource, model_digest
from fedup.peer.training import RingRun
from fedup.protocol.messages import BlobRequest, Call, GetPeers, Passed, decode_message
from fedup.protocol.peer_id import PeerId
from fedup.protocol.records import Address, PeerRecord, SignedPeerRecord, network_key_id, next_seq
from fedup.protocol.view import RunSettings

log = logging.getLogger("fedup.peer")


@attrs.define
class MemoryWorld:
    """The in-process network and discovery hub shared by simulated peers."""

    network: MemoryNetwork = attrs.field(factory=MemoryNetwork)
    hub: MemoryDiscoveryHub = attrs.field(factory=MemoryDiscoveryHub)
    _hosts: int = 0

    def new_host(self) -> str:
        """A fresh address (from 10.0.0.0/8) for one simulated host."""
        self._hosts += 1
        n = self._hosts
        return f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"


class Peer:
    """One member of a federation; create it with :meth:`open`."""

    def __init__(
        self,
        config: PeerConfig,
        source: TaskSource,
        identity: Identity,
        transport: Transport,
    ) -> None:
        self.config = config
        self.source = source
        self.identity = identity
        self.peer_id: PeerId = identity.peer_id
        self.transport = transport
        self.discoveries: list[Discovery] = []
        self.record: SignedPeerRecord
        self.addresses: tuple[Address, ...] = ()
        self._task: tuple[tuple[str | None, RunSettings], Task] | None = None
        self.formation = Formation(self)
        self._inbound: dict[PeerId, SignedPeerRecord] = {}
        """Records of peers that connected to us (verified in the handshake)."""
        self.ring: RingRun | None = None
        self._ring_ready = trio.Event()
        """Set once this peer's ring run exists (blobs arriving earlier wait for it)."""

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        config: PeerConfig,
        task: Task | TaskSource,
        *,
        world: MemoryWorld | None = None,
    ) -> AsyncIterator[Peer]:
        """Start listening and discovering; stop everything when the block is left.

        With ``world``, the peer lives on an in-process network and discovery hub
        (the simulator); otherwise on TCP with mDNS and/or bootstrap peers.
        Raises :class:`~fedup.errors.ConfigError` for unusable settings and
        :class:`~fedup.errors.IdentityError` for an unusable key file.
        """
        identity = config.load_identity()
        source = task if isinstance(task, TaskSource) else FixedTaskSource(task)
        credentials = Credentials(identity, config.network, config.network_key)
        transport: Transport = (
            world.network.transport(credentials, limits=config.limits)
            if world is not None
            else TcpTransport(credentials, limits=config.limits)
        )
        self = cls(config, source, identity, transport)
        scope = NetworkScope(
            config.network,
            network_key_id(config.network_key) if config.network_key is not None else None,
        )
        async with AsyncExitStack() as stack:
            listen = config.listen
            if world is not None:
                listen = Address(world.new_host(), 0)
            elif config.loopback and listen.host == "0.0.0.0":
                listen = Address("127.0.0.1", listen.port)
            listener = await stack.enter_async_context(transport.listen(listen, self._handle))
            self.addresses = self._advertised(listener.addresses, world)
            self.record = PeerRecord(
                self.peer_id,
                next_seq(),
                self.addresses,
                config.network,
                scope.key_id,
            ).seal(identity)
            transport.credentials = attrs.evolve(credentials, local_record=self.record)
            if world is not None:
                disc: Discovery = await stack.enter_async_context(
                    MemoryDiscovery.open(
                        world.hub, scope=scope, local_peer=self.peer_id, limits=config.limits
                    )
                )
                self.discoveries.append(disc)
            elif config.mdns:
                disc = await stack.enter_async_context(
                    MdnsDiscovery.open(
                        scope=scope,
                        interfaces=config.interfaces,
                        loopback=config.loopback,
                        local_peer=self.peer_id,
                        limits=config.limits,
                    )
                )
                self.discoveries.append(disc)
            if config.bootstrap:
                boot = await stack.enter_async_context(
                    BootstrapDiscovery.open(
                        transport,
                        config.bootstrap,
                        scope=scope,
                        local_peer=self.peer_id,
                        limits=config.limits,
                    )
                )
                self.discoveries.append(boot)
            for d in self.discoveries:
                await d.announce(self.record)
            log.info(
                "peer %s listening on %s", self.peer_id, ", ".join(str(a) for a in self.addresses)
            )
            yield self

    def _advertised(
        self, bound: Sequence[Address], world: MemoryWorld | None
    ) -> tuple[Address, ...]:
        """The addresses to put in our record: the bound ones, or the LAN IPs for a wildcard."""
        out: list[Address] = []
        for addr in bound:
            if addr.host in ("0.0.0.0", "::"):
                if addr.host == "::":
                    continue
                ips = (
                    ["127.0.0.1"]
                    if self.config.loopback
                    else choose_interfaces(self.config.interfaces)
                )
                out.extend(Address(ip, addr.port) for ip in ips)
            else:
                out.append(addr)
        limit = self.config.limits.max_addresses
        return tuple(dict.fromkeys(out))[:limit]

    # --- what the parts need ------------------------------------------------------------

    def known_peers(self) -> dict[PeerId, SignedPeerRecord]:
        """Verified records of peers on our network, from every discovery backend."""
        found: dict[PeerId, SignedPeerRecord] = dict(self._inbound)
        for d in self.discoveries:
            for peer, signed in d.peers().items():
                if peer not in found or found[peer].record.seq < signed.record.seq:
                    found[peer] = signed
        found.pop(self.peer_id, None)
        return found

    async def dial(self, peer: PeerId, record: SignedPeerRecord | None = None) -> SecureChannel:
        """Connect to ``peer`` (trying each address of its record) and authenticate it."""
        if record is None:
            record = self.known_peers().get(peer)
        if record is None and self.formation.joined is not None:
            record = next(
                (m for m in self.formation.joined.view.members if m.peer_id == peer), None
            )
        if record is None:
            raise RemoteProtocolError("no known address", peer=peer.text)
        last: RemoteProtocolError | None = None
        for address in record.record.addresses:
            try:
                return await self.transport.dial(address, expected_peer=peer)
            except RemoteProtocolError as exc:
                last = exc
        assert last is not None
        raise last

    def task_for(self, schema: FeatureSchema | None, settings: RunSettings) -> Task:
        """The task under ``schema`` and ``settings``, built once (encoding the rows is
        the costly part: formation checks the model digest, then training uses it)."""
        key = (
            schema.digest() if schema is not None else None,
            attrs.evolve(settings, model_digest=b"\0" * 32, schema_digest=b"\0" * 32),
        )
        if self._task is None or self._task[0] != key:
            self._task = (key, self.source.build(schema, settings))
        return self._task[1]

    def run_settings(
        self, schema: FeatureSchema | None, *, base: RunSettings | None = None
    ) -> RunSettings:
        """The run's settings with the model and schema digests filled in."""
        settings = base if base is not None else self.config.run
        task = self.task_for(schema, settings)
        return attrs.evolve(
            settings,
            model_digest=model_digest(task, settings.seed),
            schema_digest=(bytes.fromhex(schema.digest()) if schema is not None else b"\0" * 32),
        )

    # --- serving ------------------------------------------------------------------------

    async def _handle(self, channel: SecureChannel) -> None:
        limits = self.config.limits
        remote = channel.remote_peer
        record = channel.remote_record
        if record is not None:
            # Verified in the handshake (signature, peer ID, our network): a peer that
            # dialed us is a candidate even when no discovery backend saw it.
            current = self._inbound.get(remote)
            if current is None or current.record.seq < record.record.seq:
                if current is not None or len(self._inbound) < 4 * limits.max_members:
                    self._inbound[remote] = record
            for d in self.discoveries:
                if isinstance(d, BootstrapDiscovery):
                    d.observe_inbound(record)
        framed = FramedStream(channel, peer=remote.text, limits=limits)
        with trio.fail_after(limits.frame_timeout):
            first = await framed.receive_frame()
        message = decode_message(first, limits=limits)
        if isinstance(message, GetPeers):
            await answer_peer_list(framed, self.known_peers(), self.record, limits=limits)
        elif isinstance(message, Call):
            await self.formation.on_call(framed, channel, message)
        elif isinstance(message, BlobRequest):
            ring = await self._ring_for(message.run_id)
            await ring.on_blob(framed, channel, message)
        elif isinstance(message, Passed):
            if self.ring is not None:
                self.ring.on_passed(remote, message)
        else:
            raise RemoteProtocolError(f"unexpected request {message.TYPE!r}", peer=remote.text)

    async def _ring_for(self, run_id: bytes) -> RingRun:
        """The ring run a blob is for (waiting, at most ``view_timeout``, while ours is set up)."""
        with trio.move_on_after(self.config.limits.view_timeout):
            await self._ring_ready.wait()
        if self.ring is None or self.ring.run_id != run_id:
            raise RemoteProtocolError(f"blob for unknown run {run_id.hex()[:8]}")
        return self.ring

    # --- the public face ----------------------------------------------------------------

    async def train(self) -> RunSummary:
        """Form a federation, train around the ring until it converges, save the result.

        Returns the run's summary (also written to ``summary.json``).  Raises
        :class:`~fedup.peer.formation.FormationError` if no federation can be
        formed and :class:`~fedup.peer.training.RunError` if the run fails.
        """
        signed = await self.formation.form()
        self.formation.training_started = True
        self.ring = RingRun(self, signed)
        self._ring_ready.set()
        return await self.ring.run()
