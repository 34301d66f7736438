"""Forming the federation: settle, elect the lowest peer, propose a view, collect acks.

The rules (docs/federation.md):

1. A peer waits until it knows at least ``min_peers`` members (itself
   included; known = a verified signed record) and no new peer appeared for
   ``settle`` seconds.
2. The lowest peer ID among them leads.  It dials every candidate
   (authenticating it), sends ``call``; each answers ``offer`` (its data
   summary), ``follow`` (a lower leader it knows) or ``refuse``.  A leader told
   to follow a lower peer stands down.
3. The leader merges the summaries into one feature schema, refuses peers
   whose columns do not fit (naming the columns), and signs a view: run ID,
   epoch, members with their records, settings, schema.  Each member verifies
   it and acknowledges its digest; training starts only when every member of
   the view acknowledged.  A member that does not is left out and the view is
   re-signed with the next epoch.  The leader then closes the connections:
   cleanly for the members of the final view (their view holds), after a
   ``refuse`` for members that acknowledged an earlier epoch but were left out,
   or for every member if it gives the proposal up.
4. A candidate follows the lowest proposer it can verify: a call from a
   higher peer than one it knows is answered with ``follow``; a leader called
   by a lower peer while it leads stands down.  A peer that acknowledged a
   view refuses calls from other leaders.
5. A peer the leader refuses (its columns do not fit), or that cannot accept
   the leader's view (its model's layout differs), ends with
   :class:`FormationError` naming the reason.
"""

from __future__ import annotations

import logging
import secrets
from typing import TYPE_CHECKING

import attrs
import trio

from fedup.errors import FedupError, RemoteProtocolError
from fedup.learn.schema import DataSummary, FeatureSchema, SchemaMismatchError, admit
from fedup.net.channel import SecureChannel
from fedup.net.framed import FramedStream
from fedup.protocol.messages import (
    Ack,
    Call,
    Follow,
    Offer,
    Refuse,
    ViewMessage,
    decode_message,
    encode_message,
)
from fedup.protocol.peer_id import PeerId
from fedup.protocol.records import SignedPeerRecord
from fedup.protocol.view import MembershipView, SignedView, verify_view

if TYPE_CHECKING:
    from fedup.peer.node import Peer

log = logging.getLogger("fedup.federation")


class FormationError(FedupError):
    """The federation could not be formed (too few peers fit, or none answered)."""


@attrs.define
class _Candidate:
    peer: PeerId
    framed: FramedStream
    record: SignedPeerRecord
    summary: DataSummary | None = None
    acked: bool = False
    """It acknowledged a view of this proposal (so it waits for the outcome)."""


class Formation:
    """One peer's part in forming a federation (as leader or as follower)."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self.schema: FeatureSchema | None = None
        """The schema merged when this peer leads (None for tasks without one)."""
        self.joined: SignedView | None = None
        self.refused: FormationError | None = None
        """Set when the leader refused us (e.g. our columns do not fit) or we cannot
        accept its view (e.g. our model's layout differs): formation failed."""
        self._joined_event = trio.Event()
        """Set when this peer joined a view or was refused: formation is decided."""
        self._following: PeerId | None = None
        self._ignored: set[PeerId] = set()
        self._lead_scope: trio.CancelScope | None = None
        self._proposal_from: PeerId | None = None
        """The leader whose proposal we acknowledged and whose outcome we await."""
        self.training_started = False

    # --- electing ------------------------------------------------------------------

    def candidates(self) -> dict[PeerId, SignedPeerRecord]:
        """Verified peers we may federate with (not ignored), ourselves included."""
        found = {p: r for p, r in self.peer.known_peers().items() if p not in self._ignored}
        found[self.peer.peer_id] = self.peer.record
        return found

    async def settle(self) -> None:
        """Wait for ``min_peers`` candidates and ``settle`` seconds without a new one.

        Returns at once when a leader's view was acknowledged meanwhile: a member
        called by a leader it learned of only through the call (or that knows
        fewer than ``min_peers`` peers itself) must not keep settling while the
        ring waits for it.
        """
        config = self.peer.config
        seen = set(self.candidates())
        quiet_since = trio.current_time()
        while self.joined is None and self.refused is None:
            now = trio.current_time()
            current = set(self.candidates())
            if current - seen:
                quiet_since = now
            seen = current
            if len(current) >= config.min_peers and now - quiet_since >= config.settle:
                return
            with trio.move_on_after(min(0.25, max(config.settle / 4, 0.01))):
                await self._joined_event.wait()

    async def form(self) -> SignedView:
        """Settle, elect, and lead or follow until this peer is in an acknowledged view.

        Raises :class:`FormationError` if the leader refused us (the reason names
        the columns that do not fit, for example).
        """
        limits = self.peer.config.limits
        with trio.move_on_after(limits.peer_wait_timeout):
            return await self._form()
        found = len(self.candidates())
        raise FormationError(
            f"no federation formed within {limits.peer_wait_timeout:g} s: found {found} of "
            f"the {self.peer.config.min_peers} peers needed (this one included)"
            if found < self.peer.config.min_peers
            else f"no federation formed within {limits.peer_wait_timeout:g} s "
            f"although {found} peers were found; see the log for why"
        )

    async def _form(self) -> SignedView:
        limits = self.peer.config.limits
        while self.joined is None:
            await self.settle()
            if self.refused is not None:
                raise self.refused
            if self.joined is not None:
                break
            leader = min(self.candidates())
            if leader == self.peer.peer_id and self._following is None:
                log.info(
                    "electing myself (%s) among %d candidates", leader.short, len(self.candidates())
                )
                signed: SignedView | None = None
                with trio.CancelScope() as scope:  # cancelled when a lower peer calls us
                    self._lead_scope = scope
                    signed = await self._lead()
                self._lead_scope = None
                if signed is not None:
                    self.joined = signed
                    break
                continue
            log.info("waiting for %s to call", (self._following or leader).short)
            with trio.move_on_after(limits.formation_timeout):
                await self._joined_event.wait()
            if self.refused is not None:
                raise self.refused
            if self.joined is None:
                silent = self._following or leader
                log.warning("%s did not form a federation in time; re-electing without it", silent)
                self._ignored.add(silent)
                self._following = None
        return self.joined

    # --- leading ---------------------------------------------------------------------

    async def _lead(self) -> SignedView | None:
        peer = self.peer
        config, limits = peer.config, peer.config.limits
        run_id = peer.config.run_id or secrets.token_bytes(16)
        others = {p: r for p, r in self.candidates().items() if p != peer.peer_id}
        calls: dict[PeerId, _Candidate] = {}
        stand_down: list[PeerId] = []

        async def call(target: PeerId, record: SignedPeerRecord) -> None:
            try:
                with trio.fail_after(limits.call_timeout):
                    channel = await peer.dial(target, record)
                    framed = FramedStream(channel, peer=target.text, limits=limits)
                    await framed.send_frame(encode_message(Call(run_id)))
                    reply = decode_message(await framed.receive_frame(), limits=limits)
            except (RemoteProtocolError, trio.TooSlowError, OSError) as exc:
                why = str(exc) or f"no answer within {limits.call_timeout:g} s"
                log.warning("call to %s failed: %s", target, why)
                return
            if isinstance(reply, Offer) and reply.run_id == run_id:
                try:
                    summary = (
                        None if reply.summary is None else DataSummary.from_dict(reply.summary)
                    )
                except RemoteProtocolError as exc:
                    log.warning("%s sent a bad summary: %s", target, exc.reason)
                    await framed.aclose()
                    return
                if reply.task != peer.source.kind:
                    await _refuse(
                        framed, run_id, f"task {reply.task!r} is not {peer.source.kind!r}"
                    )
                    return
                calls[target] = _Candidate(target, framed, channel.remote_record or record, summary)
            elif isinstance(reply, Follow) and reply.leader < peer.peer_id:
                log.info(
                    "%s follows %s, which is lower than me: standing down", target, reply.leader
                )
                stand_down.append(reply.leader)
                await framed.aclose()
            else:
                log.info("%s declined the call: %s", target, reply)
                await framed.aclose()

        result: SignedView | None = None
        try:
            async with trio.open_nursery() as nursery:
                for target, record in sorted(others.items()):
                    nursery.start_soon(call, target, record)
            if stand_down:
                self._following = min(stand_down)
                return None
            members = await self._admit(run_id, calls)
            if len(members) + 1 < config.min_peers:
                log.warning(
                    "only %d peers joined, %d needed; trying again",
                    len(members) + 1,
                    config.min_peers,
                )
                return None
            result = await self._propose(run_id, members)
            return result
        finally:
            # Closing cleanly tells the members of the view that it holds; members that
            # acknowledged an earlier epoch but are not in it (or every member, if we
            # give up, are cancelled or fail) are told ``refuse`` first.
            keep = set(result.view.member_ids) if result is not None else set()
            why = "left out of the view" if result is not None else "the proposal was given up"
            await _close_all(
                [c.framed for c in calls.values()],
                limits.close_notify_timeout,
                farewell={
                    id(c.framed): encode_message(Refuse(run_id, why))
                    for c in calls.values()
                    if c.acked and c.peer not in keep
                },
            )

    async def _admit(self, run_id: bytes, calls: dict[PeerId, _Candidate]) -> list[_Candidate]:
        """Merge summaries; refuse peers whose columns do not fit; return the others."""
        peer = self.peer
        source = peer.source
        ordered = sorted(calls.values(), key=lambda c: c.peer)
        if source.target is None:
            return ordered
        mine = DataSummary.from_dict(source.summary())
        summaries = [mine] + [c.summary for c in ordered]
        if any(s is None for s in summaries):
            return [c for c in ordered if c.summary is not None]
        admission = admit([s for s in summaries if s is not None], source.target)
        if 0 not in admission.admitted:
            raise FormationError(
                f"my own data do not fit the federation's schema: {admission.refused[0].reason}"
            )
        self.schema = admission.schema
        kept = []
        for i, cand in enumerate(ordered, start=1):
            if i in admission.admitted:
                kept.append(cand)
            else:
                reason = admission.refused[i].reason
                log.warning("refusing %s: %s", cand.peer, reason)
                await _refuse(cand.framed, run_id, reason)
        return kept

    async def _propose(self, run_id: bytes, members: list[_Candidate]) -> SignedView | None:
        peer = self.peer
        limits = peer.config.limits
        schema = self.schema
        epoch = 0
        while True:
            records = sorted([peer.record, *(c.record for c in members)], key=lambda r: r.peer_id)
            settings = peer.run_settings(schema)
            view = MembershipView(
                run_id,
                epoch,
                peer.peer_id,
                tuple(records),
                settings,
                schema.to_dict() if schema is not None else None,
            )
            signed = view.seal(peer.identity)
            acked: list[_Candidate] = []

            async def offer_view(
                cand: _Candidate, signed: SignedView = signed, acked: list[_Candidate] = acked
            ) -> None:
                try:
                    with trio.fail_after(limits.view_timeout):
                        await cand.framed.send_frame(encode_message(ViewMessage(signed.envelope)))
                        reply = decode_message(await cand.framed.receive_frame(), limits=limits)
                except (RemoteProtocolError, trio.TooSlowError) as exc:
                    log.warning("%s did not acknowledge the view: %s", cand.peer, exc)
                    return
                if isinstance(reply, Ack) and reply.digest == signed.digest:
                    cand.acked = True
                    acked.append(cand)
                else:
                    log.warning("%s did not acknowledge the view: %s", cand.peer, reply)

            async with trio.open_nursery() as nursery:
                for cand in members:
                    nursery.start_soon(offer_view, cand)
            if len(acked) == len(members):
                log.info(
                    "federation formed: run %s, %d members, epoch %d",
                    run_id.hex()[:8], len(records), epoch,
                )  # fmt: skip
                return signed
            members = sorted(acked, key=lambda c: c.peer)
            if len(members) + 1 < peer.config.min_peers:
                return None
            epoch += 1

    # --- following (runs in the connection handler) ---------------------------------------

    async def on_call(self, framed: FramedStream, channel: SecureChannel, call: Call) -> None:
        """Answer a call; if we offer, take part in the caller's proposal.

        After our ``ack`` the view is only proposed: the leader may re-sign it with
        the next epoch (a member did not acknowledge), which we check and
        acknowledge again, or give it up (``refuse``).  The view acknowledged last
        becomes ours when the leader closes the connection cleanly: every member
        of it acknowledged.  A ``refuse`` before any view (our columns do not fit)
        or a view we cannot accept ends our formation with :class:`FormationError`.
        """
        peer = self.peer
        limits = peer.config.limits
        proposer = channel.remote_peer
        if self.training_started:
            await _refuse(framed, call.run_id, "already training in another run")
            return
        bound = self.joined.view.leader if self.joined is not None else self._proposal_from
        if bound is not None and bound != proposer:
            # We acknowledged another leader's view: its ring counts on us.
            await _refuse(framed, call.run_id, f"already in the federation of {bound}")
            return
        known = set(self.candidates()) | {proposer}
        lowest = min(known)
        if proposer != lowest:
            log.info(
                "%s called, but %s is lower: telling it to follow", proposer.short, lowest.short
            )
            await framed.send_frame(encode_message(Follow(call.run_id, lowest)))
            return
        # The caller is the lowest peer we know: follow it (standing down if we lead).
        self._following = proposer
        if self._lead_scope is not None:
            self._lead_scope.cancel()
        summary = peer.source.summary()
        await framed.send_frame(encode_message(Offer(call.run_id, summary, peer.source.kind)))
        acked: SignedView | None = None
        try:
            while True:
                # The leader answers once all its calls ended, and re-proposes within
                # one round of acknowledgements.
                try:
                    with trio.fail_after(limits.call_timeout + limits.view_timeout):
                        frame = await framed.receive_frame_or_eof()
                except (RemoteProtocolError, trio.TooSlowError) as exc:
                    log.warning("%s went silent while forming: %s", proposer, str(exc) or "timeout")
                    return
                if frame is None:
                    if acked is not None:  # closed cleanly: the view holds
                        self.joined = acked
                        self._joined_event.set()
                    return
                message = decode_message(frame, limits=limits)
                if isinstance(message, Refuse):
                    if acked is not None:
                        log.info("%s gave up the proposal: %s", proposer, message.reason)
                        return
                    # The lowest peer we know does not want us: formation ends here
                    # for this peer, with the leader's reason.
                    self._fail(FormationError(f"{proposer} refused us: {message.reason}"))
                    return
                if not isinstance(message, ViewMessage):
                    raise RemoteProtocolError(f"expected a view, got {message}", peer=proposer.text)
                signed = verify_view(message.envelope, limits=limits)
                if acked is not None and signed.view.epoch <= acked.view.epoch:
                    raise RemoteProtocolError(
                        f"view epoch {signed.view.epoch} after epoch {acked.view.epoch}",
                        peer=proposer.text,
                    )
                problem = self._check_view(signed, proposer, call.run_id)
                if problem is not None:
                    log.warning("refusing the view of %s: %s", proposer, problem)
                    await _refuse(framed, call.run_id, problem)
                    self._fail(FormationError(f"cannot join the view of {proposer}: {problem}"))
                    return
                await framed.send_frame(
                    encode_message(Ack(call.run_id, signed.view.epoch, signed.digest))
                )
                acked = signed
                self._proposal_from = proposer
        finally:
            if self._proposal_from == proposer and self.joined is None:
                self._proposal_from = None

    def _fail(self, error: FormationError) -> None:
        self.refused = error
        self._joined_event.set()

    def _check_view(self, signed: SignedView, proposer: PeerId, run_id: bytes) -> str | None:
        view = signed.view
        peer = self.peer
        if view.run_id != run_id or view.leader != proposer:
            return "the view is not for the run I was called to"
        if peer.peer_id not in view.member_ids:
            return "I am not a member of this view"
        try:
            schema = peer.source.parse_schema(view.schema)
            if schema is not None:
                if schema.digest() != view.settings.schema_digest.hex():
                    return "the schema does not match its digest"
                peer.source.check_schema(schema)
            expected = peer.run_settings(schema, base=view.settings)
        except SchemaMismatchError as exc:
            return exc.reason
        except RemoteProtocolError as exc:
            return f"bad schema: {exc.reason}"
        if expected.model_digest != view.settings.model_digest:
            return "my model's layout differs from the leader's"
        return None


async def _close_all(
    streams: list[FramedStream], timeout: float, farewell: dict[int, bytes] | None = None
) -> None:
    """Close every stream (after sending ``farewell[id(stream)]`` if given), politely for
    up to ``timeout`` s in all, also when we are being cancelled."""
    with trio.CancelScope(shield=True), trio.move_on_after(timeout):
        for framed in streams:
            last = (farewell or {}).get(id(framed))
            if last is not None:
                try:
                    await framed.send_frame(last)
                except RemoteProtocolError:
                    pass
            await framed.aclose()
    for framed in streams:  # those the deadline cut short (a no-op for the closed ones)
        await trio.aclose_forcefully(framed.stream)


async def _refuse(framed: FramedStream, run_id: bytes, reason: str) -> None:
    try:
        with trio.move_on_after(2.0):
            await framed.send_frame(encode_message(Refuse(run_id, reason[:1000])))
    except RemoteProtocolError:
        pass
    await framed.aclose()
