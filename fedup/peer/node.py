"""A running peer: listener, discovery, formation and custody, composed.

Use it from any trio program::

    async with Peer.open(PeerConfig(...), task) as peer:
        summary = await peer.train()

``task`` is a :class:`~fedup.learn.task.Task` (any ``torch.nn.Module`` with its
own training step and evaluation; every member must bring the same
architecture) or a :class:`~fedup.peer.source.TaskSource` (e.g.
:class:`~fedup.peer.source.TabularSource` for CSV data with schema agreement).

The parts are narrow and do not know each other: the formation driver and the
custody driver each get what they need (an identity, a way to dial a member,
the task builder, the limits), and this class routes connections to them by
their first frame and moves the peer through its lifecycle
(:mod:`fedup.protocol.lifecycle`), publishing events (:mod:`fedup.peer.events`).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any, Protocol

import attrs
import trio

from fedup.errors import ConfigError, FileError, PeerTimeoutError, RemoteProtocolError
from fedup.files import make_dirs
from fedup.identity import Identity
from fedup.learn.task import Task
from fedup.net.allreduce_driver import AllReduceInbox, is_allreduce_frame
from fedup.net.batches import batches
from fedup.net.channel import SecureChannel
from fedup.net.discovery import (
    BootstrapDiscovery,
    Discovery,
    DiscoveryEvent,
    EventKind,
    MdnsDiscovery,
    MemoryDiscovery,
    MemoryDiscoveryHub,
    NetworkScope,
    answer_peer_list,
    choose_interfaces,
)
from fedup.net.framed import FramedStream
from fedup.net.groups import collapse_single_exception
from fedup.net.transport import (
    Credentials,
    MemoryNetwork,
    TcpTransport,
    Transport,
    source_key,
)
from fedup.peer import events as ev
from fedup.peer.config import PeerConfig
from fedup.peer.custody_driver import CustodyDriver, RunError
from fedup.peer.formation_driver import FormationDriver, FormationError
from fedup.peer.hybrid_driver import HybridRun
from fedup.peer.outputs import RUN_FILES, RunSummary, check_out_dir
from fedup.peer.parallel_driver import ParallelRun
from fedup.peer.personal import personalize
from fedup.peer.run_state_file import RunStateFile, Saved
from fedup.peer.source import FixedTaskSource, TaskSource
from fedup.peer.tamper import Tamper
from fedup.peer.tasks import TaskBuilder
from fedup.protocol.allreduce_messages import decode_chunk_message
from fedup.protocol.lifecycle import Life, Lifecycle
from fedup.protocol.messages import Call, GetPeers, Link, Refuse, decode_message, encode_message
from fedup.protocol.peer_id import PeerId
from fedup.protocol.records import Address, PeerRecord, SignedPeerRecord, network_key_id, next_seq
from fedup.protocol.refusal import RefusalCode
from fedup.protocol.relay import decode_relay_message, is_relay_frame
from fedup.protocol.view import SignedView

log = logging.getLogger("fedup.peer")

__all__ = ["Environment", "Peer"]


class Environment(Protocol):
    """An in-process network and discovery hub (the simulator's :class:`~fedup.sim.MemoryWorld`)."""

    @property
    def network(self) -> MemoryNetwork: ...

    @property
    def hub(self) -> MemoryDiscoveryHub: ...

    def new_host(self) -> str: ...

    def tamper_for(self, peer: PeerId) -> Tamper | None:
        """A hostile member's tamper (fedup.sim.hostile), or None for an honest one."""
        ...

    def train_delay(self, peer: PeerId) -> float:
        """Seconds a simulated slow member's hops take on top of training (0: none)."""
        ...

    def draw_nonces(self, peer: PeerId) -> Callable[[PeerId, bytes], bytes] | None:
        """Where ``peer``'s draw nonces come from (None: random)."""
        ...


def _listen_error(address: Address, exc: OSError) -> ConfigError:
    """Why ``address`` cannot be listened on, and what to pass instead."""
    if exc.errno == errno.EADDRINUSE:
        why = f"port {address.port} is in use by another program"
        fix = "pass another --listen port, or 0 to pick a free one"
    elif exc.errno == errno.EADDRNOTAVAIL:
        why = f"this host has no address {address.host}"
        fix = f"pass --listen with one of this host's addresses, or 0.0.0.0:{address.port}"
    elif exc.errno == errno.EACCES:
        why = f"not allowed to listen on port {address.port}"
        fix = "pass a --listen port of 1024 or more, or 0 to pick a free one"
    else:
        why = exc.strerror or str(exc)
        fix = "pass another --listen address"
    return ConfigError(f"cannot listen on {address}: {why}; {fix}")


def _saved_run(
    config: PeerConfig, identity: Identity, *, simulated: bool
) -> tuple[RunStateFile | None, Saved | None]:
    """This peer's run-state file, and the run saved in it (None: none to resume).
    Raises :class:`~fedup.errors.ConfigError` for a file it cannot use."""
    path = config.run_state_path()
    if path is None:
        return None, None
    make_dirs(path.parent)
    state_file = RunStateFile(
        path, identity.peer_id, config.network, config.limits, durable=not simulated
    )
    return state_file, state_file.load()


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
        self.builder = TaskBuilder(source, in_thread=config.train_in_thread)
        self.events = ev.EventHub(identity.peer_id)
        self.life = Lifecycle()
        self._inbound: dict[PeerId, SignedPeerRecord] = {}
        """Records of peers that connected to us (verified in the handshake)."""
        self.formation = FormationDriver(
            identity=identity,
            record=lambda: self.record,
            dial=self.dial,
            builder=self.builder,
            settings=config.run,
            min_peers=config.min_peers,
            settle=config.settle,
            limits=config.limits,
            events=self.events,
            run_id=config.run_id,
        )
        self.custody: CustodyDriver | None = None
        self.parallel: ParallelRun | None = None
        """The parallel run, in the parallel mode (there is no custody then)."""
        self.allreduce_inbox = AllReduceInbox(limits=config.limits)
        self.relay_inbox = AllReduceInbox(limits=config.limits)
        """The hybrid mode's relay messages (:mod:`fedup.peer.hybrid_driver`)."""
        """The parallel mode's all-reduce messages from members (bounded; one per peer)."""
        self.tamper: Tamper | None = None
        """Set only by a simulation that makes this member hostile (fedup.sim.hostile)."""
        self.train_delay = 0.0
        """Set only by a simulation that makes this member slow."""
        self._custody_lock = trio.Lock()
        self._nursery: trio.Nursery | None = None
        self.state_file: RunStateFile | None = None
        self.simulated = False
        """On the simulator's in-process network (its files are not fsynced)."""
        """Where this peer saves its run (None: it saves none)."""
        self.saved: Saved | None = None
        """The run this peer resumes (saved before it was stopped), if any."""

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        config: PeerConfig,
        task: Task | TaskSource,
        *,
        world: Environment | None = None,
    ) -> AsyncIterator[Peer]:
        """Start listening and discovering; stop everything when the block is left.

        With ``world``, the peer lives on an in-process network and discovery hub
        (the simulator); otherwise on TCP with mDNS and/or bootstrap peers.
        The output folder is checked first (:func:`~fedup.peer.outputs.check_out_dir`;
        without ``config.out_dir``, the state directory's ``runs`` folder), then the
        peer listens, then it starts discovery.
        Raises :class:`~fedup.errors.ConfigError` for unusable settings (an output
        folder it cannot use, a listen address it cannot bind),
        :class:`~fedup.errors.IdentityError` for an unusable key file and
        :class:`~fedup.errors.FileError` for a state directory others can write.
        """
        identity = config.load_identity()
        state_file, saved = _saved_run(config, identity, simulated=world is not None)
        if config.out_dir is not None:
            # A resumed run goes on writing into its own folder (its files are its own).
            resumed = saved is not None and Path(saved.state.out_dir) == config.out_dir.absolute()
            check_out_dir(config.out_dir, outputs=() if resumed else RUN_FILES)
        else:
            check_out_dir(config.resolved_state_dir() / "runs", outputs=())
        source = task if isinstance(task, TaskSource) else FixedTaskSource(task)
        credentials = Credentials(identity, config.network, config.network_key)
        transport: Transport = (
            world.network.transport(credentials, limits=config.limits)
            if world is not None
            else TcpTransport(credentials, limits=config.limits)
        )
        self = cls(config, source, identity, transport)
        self.state_file, self.saved = state_file, saved
        self.simulated = world is not None
        if world is not None:
            self.tamper = world.tamper_for(self.peer_id)
            self.formation.tamper = self.tamper
            self.train_delay = world.train_delay(self.peer_id)
            self.formation.draw_nonces = world.draw_nonces(self.peer_id)
        scope = NetworkScope(
            config.network,
            network_key_id(config.network_key) if config.network_key is not None else None,
        )
        with collapse_single_exception():  # the caller's error, not wrapped in a group
            async with AsyncExitStack() as stack:
                yield await self._start(stack, world, scope)

    async def _start(
        self, stack: AsyncExitStack, world: Environment | None, scope: NetworkScope
    ) -> Peer:
        config, transport, identity = self.config, self.transport, self.identity
        credentials = transport.credentials
        listen = config.listen
        if world is not None:
            listen = Address(world.new_host(), 0)
        elif config.loopback and listen.host == "0.0.0.0":
            listen = Address("127.0.0.1", listen.port)
        listen = self._resumed_listen(listen, world)
        try:
            listener = await stack.enter_async_context(transport.listen(listen, self._handle))
        except OSError as exc:
            raise _listen_error(listen, exc) from None
        self.addresses = self._advertised(listener.addresses, world)
        self.record = PeerRecord(
            self.peer_id, next_seq(), self.addresses, config.network, scope.key_id
        ).seal(identity)
        transport.credentials = attrs.evolve(credentials, local_record=self.record)
        await self._open_discovery(stack, scope, world)
        nursery = await stack.enter_async_context(trio.open_nursery())
        self._nursery = nursery
        for d in self.discoveries:
            nursery.start_soon(self._follow_discovery, d)
        if self.saved is None:  # a resumed peer is in its run already: it forms nothing
            await nursery.start(self.formation.serve)
        for d in self.discoveries:
            await d.announce(self.record)
        self._step("listening")
        log.info("peer %s listening on %s", self.peer_id, ", ".join(str(a) for a in self.addresses))
        stack.callback(self.events.close)
        stack.callback(nursery.cancel_scope.cancel)
        return self

    def _resumed_listen(self, listen: Address, world: Environment | None) -> Address:
        """Where a resumed peer listens: where the run's members know it (its record in
        the saved view), so they reach it again; a port given explicitly is kept."""
        if self.saved is None:
            return listen
        mine = next(m for m in self.saved.view.view.members if m.peer_id == self.peer_id)
        addresses = mine.record.addresses
        if not addresses:
            return listen
        if world is not None:
            return addresses[0]
        if listen.port not in (0, addresses[0].port):
            log.warning(
                "resuming on port %d, not %d where the run's members know this peer: they "
                "reach it only if it is taken back at its new address",
                listen.port,
                addresses[0].port,
            )
            return listen
        return Address(listen.host, addresses[0].port)

    async def _open_discovery(
        self, stack: AsyncExitStack, scope: NetworkScope, world: Environment | None
    ) -> None:
        config = self.config
        if world is not None:
            self.discoveries.append(
                await stack.enter_async_context(
                    MemoryDiscovery.open(
                        world.hub, scope=scope, local_peer=self.peer_id, limits=config.limits
                    )
                )
            )
        elif config.mdns:
            self.discoveries.append(
                await stack.enter_async_context(
                    MdnsDiscovery.open(
                        scope=scope,
                        interfaces=config.interfaces,
                        loopback=config.loopback,
                        local_peer=self.peer_id,
                        limits=config.limits,
                    )
                )
            )
        if config.bootstrap:
            self.discoveries.append(
                await stack.enter_async_context(
                    BootstrapDiscovery.open(
                        self.transport,
                        config.bootstrap,
                        scope=scope,
                        local_peer=self.peer_id,
                        limits=config.limits,
                    )
                )
            )

    def _advertised(
        self, bound: Sequence[Address], world: Environment | None
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

    async def _follow_discovery(self, discovery: Discovery) -> None:
        """Hand discovery's news to formation as it comes (no polling)."""
        events = discovery.subscribe()
        if self.saved is not None:
            return  # resumed: the members are the saved view's; nothing to form
        self.formation.candidates(discovery.peers().values())
        async with events:
            async for batch in batches(events):
                self._discovered(batch)
                await trio.lowlevel.checkpoint()

    def _discovered(self, batch: Sequence[DiscoveryEvent]) -> None:
        """Discovery's news in the order it came; the records found or updated in a row
        go to formation as one batch."""
        found: list[SignedPeerRecord] = []
        for event in batch:
            if event.kind is not EventKind.LOST:
                found.append(event.record)
                continue
            self.formation.candidates(found)
            found = []
            if event.peer_id not in self.known_peers():
                self.formation.lost(event.peer_id)
        self.formation.candidates(found)

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
            record = self._record_of(peer)
        if record is None:
            raise RemoteProtocolError("no known address", peer=peer.text)
        last: RemoteProtocolError | None = None
        for address in record.record.addresses:
            try:
                channel = await self.transport.dial(address, expected_peer=peer)
            except RemoteProtocolError as exc:
                last = exc
            else:
                self._proven(peer)
                return channel
        assert last is not None
        raise last

    def _proven(self, peer: PeerId) -> None:
        """``peer`` completed a handshake with us: discovery keeps its place for it."""
        for d in self.discoveries:
            d.prove(peer)

    def _record_of(self, peer: PeerId) -> SignedPeerRecord | None:
        view = self.custody.view if self.custody is not None else None
        if view is not None:  # the view's records: what the members agreed on
            for member in view.members:
                if member.peer_id == peer:
                    return member
        for d in self.discoveries:
            found = d.peers().get(peer)
            if found is not None:
                return found
        return self._inbound.get(peer)

    # --- serving ------------------------------------------------------------------------

    async def _handle(self, channel: SecureChannel) -> None:
        limits = self.config.limits
        remote = channel.remote_peer
        record = channel.remote_record
        self._proven(remote)
        if record is not None:
            # Verified in the handshake (signature, peer ID, our network): a peer that
            # dialed us is a candidate even when no discovery backend saw it.
            current = self._inbound.get(remote)
            if current is None or current.record.seq < record.record.seq:
                if current is not None or len(self._inbound) < 4 * limits.max_members:
                    self._inbound[remote] = record
                    if self.saved is None:
                        self.formation.candidate(record)
            for d in self.discoveries:
                if isinstance(d, BootstrapDiscovery):
                    d.observe_inbound(record)
        framed = FramedStream(channel, peer=remote.text, limits=limits)
        try:
            with trio.fail_after(limits.frame_timeout):
                first = await framed.receive_frame_or_eof()
        except trio.TooSlowError:
            # A peer that passed the handshake and then says nothing is refused like any
            # other misbehaving peer: the listener logs one warning naming it.
            raise PeerTimeoutError(
                f"sent no request within {limits.frame_timeout:g} s", peer=remote.text
            ) from None
        if first is None:  # a probe: it authenticated and closed (formation checks candidates)
            log.debug("%s closed after the handshake", remote)
            return
        if is_allreduce_frame(first) or is_relay_frame(first):
            relay = is_relay_frame(first)
            if not self._in_a_parallel_run(remote, first, relay=relay):
                kind = "a relay" if relay else "an all-reduce"
                raise RemoteProtocolError(
                    f"sent {kind} message, and is in no run of ours that has them",
                    peer=remote.text,
                )
            inbox = self.relay_inbox if relay else self.allreduce_inbox
            await inbox.serve(framed, remote, first)
            return
        message = decode_message(first, limits=limits)
        if isinstance(message, GetPeers):
            await answer_peer_list(framed, self.known_peers(), self.record, limits=limits)
        elif isinstance(message, Call):
            if self.saved is not None:
                run = self.saved.view.view.run_id.hex()[:8]
                why = f"this peer is resuming run {run} and forms no other"
                with trio.move_on_after(limits.close_notify_timeout):
                    refusal = Refuse(message.run_id, RefusalCode.BUSY, why)
                    await framed.send_frame(encode_message(refusal))
                return
            await self.formation.on_call(framed, channel, message)
        elif isinstance(message, Link):
            try:
                custody = await self._custody_for_link(message.run_id, remote)
            except FileError as exc:  # our own output folder, not the peer's doing
                log.error("cannot take run %s from %s: %s", message.run_id.hex()[:8], remote, exc)
                return
            if custody is None:
                raise RemoteProtocolError(
                    f"opened a link for run {message.run_id.hex()[:8]}, which is not ours",
                    peer=remote.text,
                )
            await custody.serve_link(framed, remote)
        else:
            raise RemoteProtocolError(f"unexpected request {message.TYPE!r}", peer=remote.text)

    def _in_a_parallel_run(self, remote: PeerId, first: bytes, *, relay: bool = False) -> bool:
        """Whether ``remote`` is a member of the parallel or hybrid run ``first`` names (a
        hybrid one for a ``relay`` message; the run we joined, or one whose view we
        acknowledged: a member that had the leader's commit sooner may send its first
        chunks before ours arrives)."""
        largest = self.config.limits.max_allreduce_chunk
        message = (
            decode_relay_message(first, max_part=largest)
            if relay
            else decode_chunk_message(first, max_payload=largest)
        )
        joined = self.formation.result
        signed = (
            joined.signed
            if joined is not None and joined.view.run_id == message.run_id
            else self.formation.acked_view(message.run_id)
        )
        modes = ("hybrid",) if relay else ("parallel", "hybrid")
        return (
            signed is not None
            and signed.view.settings.algorithm in modes
            and remote in signed.view.member_ids
        )

    async def _custody_for_link(self, run_id: bytes, remote: PeerId) -> CustodyDriver | None:
        """The custody a link of ``run_id`` is for: ours (waiting while it is built: a
        neighbour that built its own sooner may hand over the first model before ours
        is ready), or that of the view we acknowledged (its first blob may show that
        view holds before the leader's commit arrives)."""
        if self.custody is not None:
            return self.custody if self.custody.run_id == run_id else None
        if self.saved is not None:  # resumed: take the link once the run is taken up
            if (
                run_id != self.saved.view.view.run_id
                or remote not in self.saved.view.view.member_ids
            ):
                return None
            return await self._custody_for(self.saved.view)
        joined = self.formation.result
        if joined is not None and joined.view.run_id == run_id:
            # Formed, and our custody is still being built (its template): wait for it.
            if remote not in joined.view.member_ids or not _rings(joined.signed):
                return None
            return await self._custody_for(joined.signed)
        pending = self.formation.acked_view(run_id)
        if pending is None or remote not in pending.view.member_ids or not _rings(pending):
            return None
        return await self._custody_for(pending)

    async def _custody_for(self, signed: SignedView) -> CustodyDriver:
        """The custody of ``signed``'s run, made once (its template is built off the loop)."""
        async with self._custody_lock:
            if self.custody is not None and self.custody.run_id == signed.view.run_id:
                return self.custody
            template = await CustodyDriver.template_for(self.builder, signed)
            out = self.config.run_dir(signed.view.run_id)
            custody = CustodyDriver(
                identity=self.identity,
                signed=signed,
                builder=self.builder,
                template=template,
                dial=self.dial,
                out_dir=out,
                limits=self.config.limits,
                events=self.events,
                confirm=self.formation.ring_blob,
                tamper=self.tamper,
                train_delay=self.train_delay,
                state_file=self.state_file,
                durable=not self.simulated,
            )
            for member in signed.view.members:  # their connections keep reserved slots
                for address in member.record.addresses:
                    self.transport.trusted_hosts.add(source_key(address.host))
            assert self._nursery is not None
            await self._nursery.start(custody.serve)
            self.custody = custody
            saved = self.saved
            if saved is not None and saved.view.view.run_id == signed.view.run_id:
                custody.resume(saved.state)
            return custody

    def _step(self, step: str) -> None:
        if self.life.can(step):
            self.events.emit(ev.LifeChanged(self.life.step(step, trio.current_time())))

    # --- the public face ----------------------------------------------------------------

    @property
    def state(self) -> Life:
        """Where this peer is in its life."""
        return self.life.state

    async def train(self) -> RunSummary:
        """Form a federation, train around the ring until it converges, save the result.

        Returns the run's summary (also written to ``summary.json``; its ``ok``
        says whether the run ended by its stopping rule with a trained model).
        Raises :class:`~fedup.peer.formation_driver.FormationError` if no
        federation can be formed, :class:`~fedup.peer.custody_driver.RunError`
        if the run fails here, and :class:`~fedup.errors.FileError` if the output
        folder cannot be used (see :class:`~fedup.peer.outputs.RunOutputs`).
        """
        if self.saved is not None:
            return await self._resume(self.saved)
        try:
            membership = await self.formation.form()
        except FormationError as exc:
            self._step("failed")
            self.events.emit(ev.Failed(str(exc)))
            raise
        self._step("joined")
        view = membership.view
        addresses = tuple(m.record.addresses for m in view.members)
        self.events.emit(
            ev.Formed(
                view.run_id, view.epoch, view.leader, view.member_ids, addresses, view.settings
            )
        )
        if not _rings(membership.signed):
            return await self._run_parallel(membership.signed)
        custody = await self._custody_for(membership.signed)
        self.events.watch(self._on_event)
        custody.begin()
        return await self._finish_run(custody)

    async def _run_parallel(self, signed: SignedView) -> RunSummary:
        """Train the run of ``signed`` in parallel rounds (:mod:`fedup.peer.parallel_driver`;
        the hybrid mode's, :mod:`fedup.peer.hybrid_driver`)."""
        common: dict[str, Any] = dict(
            identity=self.identity,
            signed=signed,
            builder=self.builder,
            dial=self.dial,
            inbox=self.allreduce_inbox,
            out_dir=self.config.run_dir(signed.view.run_id),
            limits=self.config.limits,
            events=self.events,
            durable=not self.simulated,
            train_delay=self.train_delay,
        )
        run = (
            HybridRun(relay_inbox=self.relay_inbox, **common)
            if signed.view.settings.algorithm == "hybrid"
            else ParallelRun(**common)
        )
        self.parallel = run
        self.events.watch(self._on_event)
        try:
            return await self._finish_run(run)
        finally:
            run.outputs.close()

    async def _resume(self, saved: Saved) -> RunSummary:
        """Go on with the run saved before this peer was stopped (no new formation)."""
        self._step("joined")
        view = saved.view.view
        addresses = tuple(m.record.addresses for m in view.members)
        self.events.emit(
            ev.Formed(
                view.run_id, view.epoch, view.leader, view.member_ids, addresses, view.settings
            )
        )
        self.events.watch(self._on_event)
        custody = await self._custody_for(saved.view)  # resumed there, once
        return await self._finish_run(custody)

    async def _finish_run(self, run: CustodyDriver | ParallelRun) -> RunSummary:
        try:
            summary = await run.run()
            summary = await personalize(
                self.builder, run.task, run.outputs, summary, run.view.settings
            )
        except RunError:
            self._step("failed")
            raise
        self._step("finishing")
        self._step("done")
        return summary

    def _on_event(self, peer: PeerId, at: float, event: ev.PeerEvent) -> None:
        if isinstance(event, ev.Excluded):
            self._step("excluded")
        elif isinstance(event, ev.Finished):
            self._step("finishing")


def _rings(signed: SignedView) -> bool:
    """Whether the run of ``signed`` trains around the ring (custody), not in parallel."""
    return signed.view.settings.algorithm == "ring"
