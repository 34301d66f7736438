"""The trio driver of the formation machine: connections, timers, checks; no rules.

:class:`FormationDriver` feeds :class:`~fedup.protocol.formation.FormationMachine`
what happens (discovery news, calls, offers, views, acknowledgements, lost
connections, fired timers) and carries out what it returns.  The rules are
all the machine's; what needs the learning layer (reading a data summary,
merging summaries into a schema, checking a view against our own data and
model) is done here, in a worker thread when the peer trains in threads, and
its verdict fed back.

Each connection is a :class:`_Conversation`: a writer task sends its frames in
order, and its reader feeds the machine.  Nothing here blocks the event loop
for long: every wait has a deadline from :class:`~fedup.config.Limits`.
"""

from __future__ import annotations

import bisect
import logging
import secrets
from collections.abc import Awaitable, Callable, Iterable

import attrs
import trio

from fedup.config import Limits
from fedup.errors import FedupError, RemoteProtocolError
from fedup.learn.schema import DataSummary, FeatureSchema, SchemaMismatchError, admit
from fedup.net.channel import SecureChannel
from fedup.net.framed import FramedStream
from fedup.net.timers import Timers
from fedup.net.transport import DialError
from fedup.peer import events as ev
from fedup.peer.events import EventHub
from fedup.peer.tamper import Tamper
from fedup.peer.tasks import TaskBuilder
from fedup.protocol import cbor
from fedup.protocol import formation_events as fe
from fedup.protocol.draw import (
    MAX_ROSTER_EPOCH,
    NONCE_SIZE,
    DrawProof,
    Roster,
    SignedRoster,
    commitment,
    proof_problem,
    reveal_of,
    verify_roster,
)
from fedup.protocol.envelope import Signer, seal_envelope
from fedup.protocol.formation import FormationMachine, Stage
from fedup.protocol.handshake import AbortCode, HandshakeError
from fedup.protocol.messages import (
    Ack,
    Call,
    Commit,
    Follow,
    Message,
    Offer,
    Refuse,
    RosterMessage,
    ViewMessage,
    decode_message,
    encode_message,
)
from fedup.protocol.peer_id import PeerId
from fedup.protocol.records import SignedPeerRecord, verify_peer_record
from fedup.protocol.refusal import RefusalCode
from fedup.protocol.view import (
    VIEW_DOMAIN,
    VIEW_TYPE,
    MembershipView,
    RunSettings,
    SignedView,
    provenance_capacity_problem,
    verify_view,
)

__all__ = ["FormationDriver", "FormationError"]

log = logging.getLogger("fedup.federation")

Dial = Callable[[PeerId], Awaitable[SecureChannel]]
OUTBOX = 16


TWO_MEMBERS = (
    "this federation has two members: each can work out the other's exact data summary "
    "(rows, positives, column means and deviations) from federation.json, and its "
    "validation results from the lap history, by subtracting its own; with three or more "
    "members only sums of the others are exposed (docs/federation.md, 'What is shared')"
)


class FormationError(FedupError):
    """The federation could not be formed (too few peers fit, or none answered)."""


class _Conversation:
    """One connection of formation, in one direction; frames out in order."""

    def __init__(self, peer: PeerId, framed: FramedStream, *, inbound: bool) -> None:
        self.peer = peer
        self.framed = framed
        self.inbound = inbound
        self._send, self._receive = trio.open_memory_channel[bytes | None](OUTBOX)
        self.closed = False

    def send(self, message: Message) -> None:
        self._push(encode_message(message))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._push(None)

    def _push(self, item: bytes | None) -> None:
        try:
            self._send.send_nowait(item)
        except (trio.WouldBlock, trio.ClosedResourceError):
            self.closed = True  # a peer that does not read its frames is dropped

    async def write(self) -> None:
        """Send queued frames in order; close the connection after the last one."""
        try:
            async with self._receive:
                async for item in self._receive:
                    if item is None:
                        break
                    await self.framed.send_frame(item)
        except RemoteProtocolError as exc:
            log.info("formation connection with %s ended: %s", self.peer, exc.reason)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                await self.framed.aclose()
            await trio.aclose_forcefully(self.framed.stream)


@attrs.frozen
class Membership:
    """What formation produced: the view that holds."""

    signed: SignedView

    @property
    def view(self) -> MembershipView:
        return self.signed.view


class FormationDriver:
    """One peer's formation, driven on trio."""

    def __init__(
        self,
        *,
        identity: Signer,
        record: Callable[[], SignedPeerRecord],
        dial: Callable[[PeerId, SignedPeerRecord | None], Awaitable[SecureChannel]],
        builder: TaskBuilder,
        settings: RunSettings,
        min_peers: int,
        settle: float,
        limits: Limits,
        events: EventHub,
        run_id: bytes | None = None,
    ) -> None:
        self.me = identity.peer_id
        self._events = events
        self._identity = identity
        self._record = record
        self._dial = dial
        self._builder = builder
        self._settings = settings
        self._limits = limits
        self._fixed_run_id = run_id
        self.draw_nonces: Callable[[PeerId, bytes], bytes] | None = None
        """Where our draw nonces come from, given the coordinator and run (None: random;
        a simulation with a seed sets it)."""
        self.machine = FormationMachine(
            self.me, min_peers=min_peers, settle=settle, limits=limits, new_run_id=self._run_id
        )
        self._timers = Timers(lambda name: self.feed(fe.TimerFired(name)))
        self._records: dict[PeerId, SignedPeerRecord] = {}
        self._outbound: dict[PeerId, _Conversation] = {}
        self._inbound: dict[PeerId, _Conversation] = {}
        self._summaries: dict[PeerId, DataSummary | None] = {}
        self.summaries_from: set[PeerId] = set()
        """Every peer whose data summary reached us (only a drawn leader gets any)."""
        self._proposals: dict[int, SignedView | SignedRoster] = {}
        """Leading: the view (or coordinating: the roster) signed for each epoch of the
        current run."""
        self._received: dict[bytes, SignedView] = {}
        """Member: views we acknowledged, by digest."""
        self._nonces: dict[tuple[PeerId, bytes], bytes] = {}
        """Our draw nonces, by coordinator and run ID: fresh for every coordinator, so a
        peer that saw our reveals in one draw cannot foresee them in the next."""
        self._rosters: dict[bytes, SignedRoster] = {}
        """Member: rosters we checked, by digest."""
        self._proofs: dict[bytes, DrawProof] = {}
        """Draws done (roster digest -> roster and reveals): shown if we were drawn."""
        self._schema_value: object = None
        self._nursery: trio.Nursery | None = None
        self._done = trio.Event()
        self.tamper: Tamper | None = None
        """Set only by a simulation that makes this member hostile (fedup.sim.hostile)."""
        self.result: Membership | None = None
        self.failure: str | None = None

    def _run_id(self) -> bytes:
        return self._fixed_run_id or secrets.token_bytes(16)

    # --- running ----------------------------------------------------------------------

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the timers and the connections' tasks (for the peer's whole life)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._timers.run)
            task_status.started()
            self.feed(fe.Start())
            await trio.sleep_forever()

    async def form(self) -> Membership:
        """Wait until this peer is in a view that holds; raises :class:`FormationError`."""
        await self._done.wait()
        if self.result is None:
            raise FormationError(self.failure or "formation ended")
        return self.result

    @property
    def stage(self) -> Stage:
        return self.machine.stage

    def candidate(self, record: SignedPeerRecord) -> None:
        """A verified record of a peer of our network (discovery, or it dialed us)."""
        self.candidates((record,))

    def candidates(self, records: Iterable[SignedPeerRecord]) -> None:
        """Verified records of peers of our network, taken as one event (a batch of
        discovery's news)."""
        peers = []
        held = self._records
        me = self.me.raw
        for record in records:  # every member hears of every other: kept to dict work
            peer = record.record.peer_id
            if peer.raw == me:
                continue
            current = held.get(peer)
            if current is None or current.record.seq < record.record.seq:
                held[peer] = record
            peers.append(peer)
        if len(peers) == 1:
            self.feed(fe.PeerSeen(peers[0]))
        elif peers:
            self.feed(fe.PeersSeen(tuple(peers)))

    def lost(self, peer: PeerId) -> None:
        self.feed(fe.PeerLost(peer))

    def found(self) -> int:
        return self.machine.found()

    # --- feeding the machine and carrying out its actions -------------------------------

    def feed(self, event: fe.Event) -> None:
        stage = self.machine.stage
        for action in self.machine.handle(event):
            self._carry_out(action)
        if self.machine.stage is not stage:
            self._events.emit(ev.FormationStage(self.machine.stage.value, self.machine.leader))

    def _carry_out(self, a: fe.Action) -> None:
        if isinstance(a, fe.SetTimer):
            self._timers.set(a.name, a.seconds)
        elif isinstance(a, fe.CancelTimer):
            self._timers.cancel(a.name)
        elif isinstance(a, fe.Call):
            call = Call(a.run_id)
            if a.roster is not None:
                call = Call(a.run_id, self._proofs[a.roster].to_cbor(), a.roster)
            for peer in a.peers:
                self._spawn(self._call, peer, call)
        elif isinstance(a, fe.Probe):
            for peer in a.peers:
                self._spawn(self._probe, peer)
        elif isinstance(a, fe.AnswerOffer):
            kind = self._builder.source.kind
            if a.draw:  # a coordinator learns no data: only a commitment to our draw nonces
                nonces = self._nonces_for(a.leader, a.run_id)
                offer = Offer(a.run_id, None, kind, commitment(nonces))
            else:
                offer = Offer(a.run_id, self._builder.summary(), kind)
            self._to(a.leader, True, offer)
        elif isinstance(a, fe.AnswerFollow):
            self._to(a.caller, True, Follow(a.run_id, a.leader))
            self._close(a.caller, True)
        elif isinstance(a, fe.SendRefuse):
            self._to(a.peer, a.inbound, Refuse(a.run_id, a.code, a.reason))
        elif isinstance(a, fe.Propose):
            if a.commits is not None:
                self._sign_roster(a.run_id, a.epoch, a.commits)
            else:
                self._spawn(self._propose, a.run_id, a.epoch, a.members)
        elif isinstance(a, fe.SendView):
            signed = self._proposals[a.epoch]
            if isinstance(signed, SignedRoster):
                self._to(a.peer, False, RosterMessage(signed.envelope))
            else:
                self._to(a.peer, False, ViewMessage(signed.envelope))
        elif isinstance(a, fe.SendAck):
            reveal = None
            if a.digest in self._rosters:  # with the nonce that opens our commitment
                reveal = reveal_of(self._nonces_for(a.leader, a.run_id), a.epoch)
            self._to(a.leader, True, Ack(a.run_id, a.epoch, a.digest, reveal))
        elif isinstance(a, fe.SendCommit):
            reveals = dict(a.reveals) if a.reveals is not None else None
            records = None
            if reveals is not None:
                signed = self._proposals[a.epoch]
                assert isinstance(signed, SignedRoster) and signed.digest == a.digest
                self._proofs.setdefault(a.digest, DrawProof(signed.envelope, reveals))
                if a.peer == a.drawn:  # it calls them all next
                    held = (self._records.get(p) for p in signed.roster.member_ids)
                    records = (self._record().envelope, *(r.envelope for r in held if r))
            self._to(a.peer, False, Commit(a.run_id, a.epoch, a.digest, reveals, records))
        elif isinstance(a, fe.Close):
            self._close(a.peer, a.inbound)
        elif isinstance(a, fe.Joined):
            self._joined(a)
        elif isinstance(a, fe.Failed):
            self.failure = a.reason
            self._timers.cancel_all()
            self._done.set()
        elif isinstance(a, fe.Note):
            log.log(logging.WARNING if a.level == "warning" else logging.INFO, "%s", a.text)
        elif isinstance(a, fe.Ignored):
            log.debug("formation ignored %s when %s: %s", a.event, a.stage.value, a.why)

    def _nonces_for(self, coordinator: PeerId, run_id: bytes) -> bytes:
        key = (coordinator, run_id)
        if key not in self._nonces:
            size = NONCE_SIZE * (MAX_ROSTER_EPOCH + 1)
            made = self.draw_nonces
            self._nonces[key] = made(*key) if made is not None else secrets.token_bytes(size)
        return self._nonces[key]

    def _spawn(self, fn: Callable[..., Awaitable[None]], *args: object) -> None:
        assert self._nursery is not None, "serve() runs the driver"
        self._nursery.start_soon(fn, *args)

    def _to(self, peer: PeerId, inbound: bool, message: Message) -> None:
        conv = (self._inbound if inbound else self._outbound).get(peer)
        if conv is not None:
            conv.send(message)

    def _close(self, peer: PeerId, inbound: bool) -> None:
        conv = (self._inbound if inbound else self._outbound).pop(peer, None)
        if conv is not None:
            conv.close()

    def _joined(self, joined: fe.Joined) -> None:
        if joined.leader == self.me:
            proposed = self._proposals[joined.epoch]
            assert isinstance(proposed, SignedView), "a roster is never joined"
            signed = proposed
        else:
            signed = self._received[joined.digest]
        self.result = Membership(signed)
        log.info(
            "federation formed: run %s, %d members, epoch %d, led by %s",
            joined.run_id.hex()[:8],
            len(signed.view.members),
            joined.epoch,
            joined.leader.short,
        )
        if len(signed.view.members) == 2:
            log.warning("%s", TWO_MEMBERS)
        # Formation is over: what it kept (rosters, proofs, nonces, summaries) goes.
        for kept in (self._proposals, self._received, self._rosters, self._proofs):
            kept.clear()
        self._nonces.clear()
        self._summaries.clear()
        self._done.set()

    async def _probe(self, peer: PeerId) -> None:
        """Handshake with ``peer`` and close: does a real peer of our network answer?

        Refused or unreachable, another peer or another network answering: it is not
        one (``alive`` False).  ``busy``: nothing proved.  A handshake that timed out or a
        connection closed at once (a listener at its cap closes without a word): nothing
        proved, but it counts toward giving up on it (``strike``).
        """
        # Half a call's patience: a caller whose call we hold until our probes end still
        # gets its answer within its call_timeout.
        deadline = self._limits.call_timeout / 2
        try:
            with trio.fail_after(deadline):
                channel = await self._dial(peer, self._records.get(peer))
        except trio.TooSlowError:
            self.feed(fe.ProbeDone(peer, None, f"no answer within {deadline:g} s", strike=True))
            return
        except DialError as exc:
            self.feed(fe.ProbeDone(peer, False, str(exc)))
            return
        except HandshakeError as exc:
            if exc.code == AbortCode.BUSY:
                self.feed(fe.ProbeDone(peer, None, str(exc)))
            else:
                self.feed(fe.ProbeDone(peer, False, str(exc)))
            return
        except (RemoteProtocolError, OSError) as exc:
            self.feed(fe.ProbeDone(peer, None, str(exc), strike=True))
            return
        with trio.move_on_after(self._limits.close_notify_timeout):
            await channel.aclose()
        self.feed(fe.ProbeDone(peer, True))

    # --- leading ------------------------------------------------------------------------

    async def _call(self, peer: PeerId, call: Call) -> None:
        """Dial ``peer``, call it, feed its answer, then read its acknowledgements."""
        limits = self._limits
        run_id = call.run_id
        try:
            with trio.fail_after(limits.call_timeout):
                channel = await self._dial(peer, self._records.get(peer))
                framed = FramedStream(channel, peer=peer.text, limits=limits)
                await framed.send_frame(encode_message(call))
                reply = decode_message(await framed.receive_frame(), limits=limits)
        except (RemoteProtocolError, trio.TooSlowError, OSError) as exc:
            why = str(exc) or f"no answer within {limits.call_timeout:g} s"
            self.feed(fe.CallFailed(peer, why))
            return
        conv = _Conversation(peer, framed, inbound=False)
        old = self._outbound.pop(peer, None)
        if old is not None:
            old.close()
        self._outbound[peer] = conv
        assert self._nursery is not None
        self._nursery.start_soon(conv.write)
        if channel.remote_record is not None:
            self._records[peer] = channel.remote_record
        if isinstance(reply, Offer) and reply.run_id == run_id:
            problem = await self._read_offer(peer, reply)
            self.feed(fe.OfferArrived(peer, run_id, problem, reply.commit))
        elif isinstance(reply, Follow):
            self.feed(fe.FollowArrived(peer, reply.leader))
        elif isinstance(reply, Refuse):
            self.feed(fe.RefuseArrived(peer, reply.code, reply.reason))
        else:
            self.feed(fe.CallFailed(peer, f"answered the call with {reply.TYPE!r}"))
        await self._read_candidate(conv, run_id)

    async def _read_offer(self, peer: PeerId, offer: Offer) -> str | None:
        """Why ``peer``'s offer cannot be used, or None (its summary is kept)."""
        if offer.task != self._builder.source.kind:
            return f"task {offer.task!r} is not {self._builder.source.kind!r}"
        if offer.commit is not None:  # an answer to a draw's call: no summary is wanted
            return None
        if offer.summary is None:
            self._summaries[peer] = None
            return None
        self.summaries_from.add(peer)
        try:
            self._summaries[peer] = DataSummary.from_dict(offer.summary)
        except RemoteProtocolError as exc:
            return f"a bad data summary: {exc.reason}"
        return None

    async def _read_candidate(self, conv: _Conversation, run_id: bytes) -> None:
        """Feed a candidate's acknowledgements and refusals until its connection ends."""
        why = "closed the connection"
        while not conv.closed:
            try:
                frame = await conv.framed.receive_frame_or_eof()
                if frame is None:
                    break
                message = decode_message(frame, limits=self._limits)
            except RemoteProtocolError as exc:
                why = exc.reason
                break
            if isinstance(message, Ack):
                ack = fe.AckArrived(
                    conv.peer, message.run_id, message.epoch, message.digest, message.reveal
                )
                self.feed(ack)
            elif isinstance(message, Refuse):
                self.feed(fe.RefuseArrived(conv.peer, message.code, message.reason))
            else:
                why = f"sent {message.TYPE!r} while forming"
                break
        if self._outbound.get(conv.peer) is conv:
            del self._outbound[conv.peer]
            conv.close()
            self.feed(fe.ConnectionLost(conv.peer, why))

    def _sign_roster(
        self, run_id: bytes, epoch: int, commits: tuple[tuple[PeerId, bytes], ...]
    ) -> None:
        """Sign the draw roster of ``epoch`` and feed ViewReady (a signature: no thread)."""
        signed = Roster(run_id, epoch, self.me, commits).seal(self._identity)
        self._proposals[epoch] = signed
        members = frozenset(p for p, _ in commits)
        self._spawn(self._feed_later, fe.ViewReady(run_id, epoch, signed.digest, members))

    async def _feed_later(self, event: fe.Event) -> None:
        self.feed(event)

    async def _propose(self, run_id: bytes, epoch: int, members: frozenset[PeerId]) -> None:
        """Admit the offers of ``members``, sign the view of ``epoch``, feed ViewReady."""
        summaries = {p: self._summaries.get(p) for p in members}  # a snapshot for the thread
        try:
            schema, refused = await self._builder.run(self._admit, summaries)
            settings = await self._builder.run(self._builder.settings_for, schema, self._settings)
            problem = provenance_capacity_problem(len(members) + 1, settings.max_laps, self._limits)
            if problem is not None:
                raise FormationError(f"cannot propose a view: {problem}")
        except FormationError as exc:
            log.error("%s", exc)
            self.failure = str(exc)
            self._done.set()
            return
        kept = sorted(p for p in members if p not in dict(refused))
        records = [self._record(), *(self._records[p] for p in kept)]
        view = MembershipView(
            run_id,
            epoch,
            self.me,
            tuple(sorted(records, key=lambda r: r.peer_id)),
            settings,
            schema.to_dict() if schema is not None else None,
        )
        signed = view.seal(self._identity)
        if self.tamper is not None:
            signed = _sign_tampered(self._identity, view, self.tamper)
        self._proposals[epoch] = signed
        self.feed(fe.ViewReady(run_id, epoch, signed.digest, frozenset(kept), tuple(refused)))

    def _admit(
        self, offers: dict[PeerId, DataSummary | None]
    ) -> tuple[FeatureSchema | None, list[tuple[PeerId, str]]]:
        """Merge our summary with the members' (runs in a worker thread)."""
        source = self._builder.source
        if source.target is None:
            return None, []
        mine_value = self._builder.summary()
        if mine_value is None:
            return None, []
        mine = DataSummary.from_dict(mine_value)
        members = sorted(offers)
        missing = [p for p in members if offers[p] is None]
        present = [(p, s) for p in members if (s := offers[p]) is not None]
        admission = admit([mine, *(s for _, s in present)], source.target)
        if 0 not in admission.admitted:
            raise FormationError(
                f"my own data do not fit the federation's schema: {admission.refused[0].reason}"
            )
        refused = [(p, "sent no data summary") for p in missing]
        refused += [
            (p, admission.refused[i].reason)
            for i, (p, _) in enumerate(present, start=1)
            if i not in admission.admitted
        ]
        for column, lacking in sorted(admission.left_out.items()):
            who = ", ".join(str(present[i - 1][0]) for i in lacking[:4])
            more = f" and {len(lacking) - 4} more" if len(lacking) > 4 else ""
            log.warning("the federation leaves out column %r: %s%s lack it", column, who, more)
        return admission.schema, refused

    # --- answering a call (runs in the connection handler's task) -----------------------

    async def on_call(self, framed: FramedStream, channel: SecureChannel, call: Call) -> None:
        """Answer a leader's call and take part in its proposal until it ends."""
        leader = channel.remote_peer
        if channel.remote_record is not None:
            self.candidate(channel.remote_record)
        problem = self._draw_problem(leader, call)
        if problem is not None:
            log.warning("refusing the call of %s: %s", leader, problem)
            with trio.move_on_after(self._limits.close_notify_timeout):
                refuse = Refuse(call.run_id, RefusalCode.BAD_VIEW, f"a bad draw: {problem}")
                await framed.send_frame(encode_message(refuse))
            return
        conv = _Conversation(leader, framed, inbound=True)
        old = self._inbound.pop(leader, None)
        if old is not None:
            old.close()
        self._inbound[leader] = conv
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conv.write)
            self.feed(fe.CallArrived(leader, call.run_id, call.roster))
            await self._read_leader(conv)

    def _draw_problem(self, leader: PeerId, call: Call) -> str | None:
        """Why the draw a leader's call shows does not choose it, or None (a draw we
        computed ourselves from the coordinator's commit is not checked again)."""
        known = self.machine.drawn
        if call.draw is None or call.roster is None:
            return None
        if known is not None and (known.leader, known.roster) == (leader, call.roster):
            return None
        return proof_problem(call.draw, call.roster, leader, limits=self._limits)

    async def _read_leader(self, conv: _Conversation) -> None:
        why = "closed the connection"
        while not conv.closed:
            try:
                frame = await conv.framed.receive_frame_or_eof()
                if frame is None:
                    break
                message = decode_message(frame, limits=self._limits)
            except RemoteProtocolError as exc:
                why = exc.reason
                break
            if isinstance(message, ViewMessage):
                self.feed(await self._check_view(conv.peer, message.envelope))
            elif isinstance(message, RosterMessage):
                self.feed(self._check_roster(conv.peer, message.envelope))
            elif isinstance(message, Commit):
                reveals = None
                if message.reveals is not None:
                    reveals = tuple(message.reveals.items())  # ascending: decode_reveals checked
                    roster = self._rosters.get(message.digest)
                    if roster is not None:
                        self._proofs[message.digest] = DrawProof(roster.envelope, message.reveals)
                        self._learn_records(roster.roster, message.records or ())
                self.feed(
                    fe.CommitArrived(
                        conv.peer, message.run_id, message.epoch, message.digest, reveals
                    )
                )
            elif isinstance(message, Refuse):
                self.feed(fe.RefuseArrived(conv.peer, message.code, message.reason))
            else:
                why = f"sent {message.TYPE!r} while forming"
                break
        if self._inbound.get(conv.peer) is conv:
            del self._inbound[conv.peer]
            conv.close()
            self.feed(fe.ConnectionLost(conv.peer, why))

    async def _check_view(self, leader: PeerId, envelope: bytes) -> fe.ViewArrived:
        """Verify a view and check it against our data and model (in a worker thread)."""
        run_id = self.machine.run_id or b"\0" * 16
        try:
            signed = verify_view(envelope, limits=self._limits)
        except RemoteProtocolError as exc:
            return fe.ViewArrived(leader, run_id, self.machine.epoch + 1, b"", exc.reason)
        view = signed.view
        problem, ours = await self._builder.run(self._fit, signed, leader)
        if problem is None:
            self._received[signed.digest] = signed
        return fe.ViewArrived(leader, view.run_id, view.epoch, signed.digest, problem, ours)

    def _learn_records(self, roster: Roster, envelopes: tuple[bytes, ...]) -> None:
        """Keep the records of the roster's members that came with our draw's commit (we
        were drawn and call them next); one that does not verify is skipped."""
        members = roster.member_ids
        for envelope in envelopes:
            try:
                signed = verify_peer_record(envelope, limits=self._limits)
            except RemoteProtocolError as exc:
                log.info("a record with the draw's commit is unusable: %s", exc.reason)
                continue
            peer = signed.peer_id
            held = self._records.get(peer)
            if (
                peer in members
                and peer != self.me
                and (held is None or held.record.seq < signed.record.seq)
            ):
                self._records[peer] = signed

    def _check_roster(self, coordinator: PeerId, envelope: bytes) -> fe.ViewArrived:
        """Verify a draw roster: signed by the caller, with our commitment in it."""
        run_id = self.machine.run_id or b"\0" * 16
        try:
            signed = verify_roster(envelope, limits=self._limits)
        except RemoteProtocolError as exc:
            return fe.ViewArrived(coordinator, run_id, self.machine.epoch + 1, b"", exc.reason)
        roster = signed.roster
        nonces = self._nonces.get((coordinator, roster.run_id))
        problem = None
        if roster.coordinator != coordinator:
            problem = "the roster is not signed by the peer that called us"
        elif nonces is None or _commit_of(roster, self.me) != commitment(nonces):
            problem = "the roster does not carry my commitment"
        else:
            self._rosters[signed.digest] = signed
        return fe.ViewArrived(
            coordinator, roster.run_id, roster.epoch, signed.digest, problem, roster=roster
        )

    def _fit(self, signed: SignedView, leader: PeerId) -> tuple[str | None, bool]:
        """Why we cannot take this view, and whether that is our own data's fault."""
        view = signed.view
        source = self._builder.source
        if view.leader != leader:
            return "the view is not signed by the peer that called us", False
        if self.me not in view.member_ids:
            return "I am not a member of this view", False
        try:
            schema = source.parse_schema(view.schema)
        except RemoteProtocolError as exc:
            return f"bad schema: {exc.reason}", False
        if schema is not None and schema.digest() != view.settings.schema_digest.hex():
            return "the schema does not match its digest", False
        try:
            if schema is not None:
                source.check_schema(schema)
            expected = self._builder.settings_for(schema, view.settings)
        except SchemaMismatchError as exc:
            return exc.reason, True
        if expected.model_digest != view.settings.model_digest:
            return "my model's layout differs from the leader's", True
        return None, False

    # --- a ring blob before the commit --------------------------------------------------

    def acked_view(self, run_id: bytes) -> SignedView | None:
        """The view of ``run_id`` we acknowledged and wait to see commit, if any."""
        m = self.machine
        if m.stage is Stage.ACKED and m.run_id == run_id and m.digest is not None:
            return self._received.get(m.digest)
        return None

    def ring_blob(self, sender: PeerId, run_id: bytes, digest: bytes) -> bool:
        """A blob of the run naming view ``digest`` arrived: True if we now are joined."""
        if self.machine.stage is Stage.ACKED:
            self.feed(fe.RingBlobArrived(sender, run_id, digest))
        return self.result is not None and self.result.signed.digest == digest


def _sign_tampered(identity: Signer, view: MembershipView, tamper: Tamper) -> SignedView:
    """A hostile leader's view: the map it signs is the tamper's."""
    value = cbor.decode(view.to_cbor(), max_size=1 << 24, max_depth=16)
    assert isinstance(value, dict)
    envelope = seal_envelope(
        identity.sign,
        identity.public_key,
        domain=VIEW_DOMAIN,
        payload_type=VIEW_TYPE,
        payload=cbor.encode(tamper.view(value)),
    )
    return SignedView(view, envelope.to_cbor())


def _commit_of(roster: Roster, peer: PeerId) -> bytes | None:
    """``roster.commit_of(peer)`` by bisection: the commitments are ascending by peer ID
    (verify_roster checked it), and every candidate of a roster looks itself up."""
    commits = roster.commits
    i = bisect.bisect_left(commits, peer.raw, key=_raw_of_first)
    if i < len(commits) and commits[i][0].raw == peer.raw:
        return commits[i][1]
    return None


def _raw_of_first(pair: tuple[PeerId, bytes]) -> bytes:
    return pair[0].raw
