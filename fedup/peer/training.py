"""Ring training across the network: receive, train a hop, hand on, heal, finish.

The learning itself is :func:`fedup.learn.ring.train_hop`; this module moves
the :class:`~fedup.learn.ring.RingState` between members and keeps the rules of
``docs/federation.md``:

* Positions ``(lap, hop)`` follow :mod:`fedup.protocol.laps`; the receiving
  member's replay guard only accepts newer positions.
* Custody: a sender keeps the state it handed on until the successor says
  ``passed`` (the model moved on again).  If the successor cannot be reached
  or refuses, it is declared dead and the sender hands its copy to the next
  live member.  If it stays silent for ``hop_timeout``, the sender hands its
  copy on the same way and declares it dead once the next member took it; if
  that member already has a newer model, only the ``passed`` was late and the
  successor stays in the ring.  The dead set travels in every
  blob, so the others learn it from the next message; the view epoch is the
  view's epoch plus the number of dead members, and blobs from a lower epoch
  are refused.
* A member declared dead while it was alive (slow, or cut off for a moment)
  is *excluded*: it trains no more, but it is not left without the result.
  The member that ends the run also sends the final model to every member it
  counts as dead; an excluded member waits up to ``excluded_wait`` for it,
  saves it like everyone else, and hands it on to nobody.
* When :func:`train_hop` says the run is done, that member saves the final
  model and sends it around the ring as a ``final`` blob; every member
  verifies, evaluates it on its own validation split, saves it and hands it on,
  until it is back at the member that started the distribution.
* Every wait has a deadline: a member holding no model waits at most
  ``hop_timeout`` times the number of live members for the next one (an
  excluded member: ``excluded_wait`` for the final model).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
import trio

from fedup.config import Limits
from fedup.errors import FedupError, RemoteProtocolError
from fedup.learn.ring import (
    FederationStats,
    RingSettings,
    RingState,
    evaluate_state,
    final_weights,
    initial_state,
    train_hop,
)
from fedup.learn.weights import bytes_to_state, state_to_bytes
from fedup.net.blobs import receive_blob, send_blob
from fedup.net.channel import SecureChannel
from fedup.net.framed import FramedStream
from fedup.net.groups import collapse_single_exception
from fedup.net.transport import DialError
from fedup.peer.outputs import RunOutputs, RunSummary, run_settings_json
from fedup.protocol.blob import BlobHeader, BlobKind, BlobRefusedError, BlobReplayGuard
from fedup.protocol.laps import Position, next_position
from fedup.protocol.messages import BlobRequest, Passed, encode_message
from fedup.protocol.payload import decode_payload, encode_payload
from fedup.protocol.peer_id import PeerId
from fedup.protocol.ring import Ring
from fedup.protocol.view import SignedView

if TYPE_CHECKING:
    from fedup.peer.node import Peer

T = TypeVar("T")

log = logging.getLogger("fedup.federation")


class RunError(FedupError):
    """The run could not finish (e.g. no model arrived in time, or we were excluded)."""


class RingRun:
    """This peer's part in one run, from the acknowledged view to the final model."""

    def __init__(self, peer: Peer, signed: SignedView) -> None:
        self.peer = peer
        self.signed = signed
        self.view = signed.view
        self.run_id = self.view.run_id
        self.me = peer.peer_id
        self.limits = peer.config.limits
        settings = self.view.settings
        self.schema = peer.source.parse_schema(self.view.schema)
        self.task = peer.task_for(self.schema, settings)
        self.ring_settings = RingSettings.for_run(settings)
        self.template = initial_state(self.task, self.ring_settings)
        n = len(self.view.members)
        if self.schema is not None:
            rows, positive = self.schema.n_rows, self.schema.n_positive
        else:  # a custom task shares no counts: assume members of this one's size
            rows, positive = self.task.n_train * n, 0
        self.federation = FederationStats(n, rows, positive)
        self.dead: set[PeerId] = set()
        self.excluded: str | None = None
        """Why the others count us as dead, once we learn that they do."""
        self.guard = BlobReplayGuard()
        self._inbox_send, self._inbox = trio.open_memory_channel[
            tuple[BlobHeader, RingState, frozenset[PeerId], PeerId | None]
        ](n + 4)
        self._passed: dict[tuple[PeerId, Position], trio.Event] = {}
        self.finished: RunSummary | None = None
        self.model_bytes_sent = 0
        self._nursery: trio.Nursery | None = None
        out = peer.config.out_dir
        if out is None:
            out = peer.config.resolved_state_dir() / "runs" / self.run_id.hex()
        self.outputs = RunOutputs(Path(out))
        self.members = self.view.member_ids

    # --- the ring as this peer knows it ---------------------------------------------------

    @property
    def ring(self) -> Ring:
        return Ring.of(self.members, self.dead)

    @property
    def epoch(self) -> int:
        return self.view.epoch + len(self.dead)

    def _exclude(self, why: str) -> None:
        if self.excluded is None:
            self.excluded = why
            log.warning(
                "excluded from run %s: %s; training no more, waiting up to %g s for the "
                "final model",
                self.run_id.hex()[:8], why, self.limits.excluded_wait,
            )  # fmt: skip

    def _declare_dead(self, peer: PeerId, why: str) -> None:
        if peer not in self.dead and peer != self.me:
            log.warning("skipping %s: %s (epoch now %d)", peer, why, self.epoch + 1)
            self.dead.add(peer)
            self.outputs.log({"type": "dead", "peer": peer.text, "why": why, "epoch": self.epoch})

    # --- the main loop ----------------------------------------------------------------------

    async def run(self) -> RunSummary:
        """Train until the final model is saved here; return the summary."""
        log.info(
            "run %s: %d members, ring %s",
            self.run_id.hex()[:8], len(self.members), " -> ".join(p.short for p in self.members),
        )  # fmt: skip
        self.outputs.save_federation(
            {
                "run_id": self.run_id.hex(),
                "epoch": self.view.epoch,
                "leader": self.view.leader.text,
                "members": [p.text for p in self.members],
                "settings": run_settings_json(self.view.settings),
                "schema": self.schema.to_dict() if self.schema is not None else None,
            }
        )
        with collapse_single_exception():
            await self._run()
        assert self.finished is not None
        return self.finished

    async def _run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self.me == self.ring.leader:
                await self._hop(self.template, Position(0, 0), predecessor=None)
            while self.finished is None:
                if self.excluded is None:
                    wait = self.limits.hop_timeout * max(1, len(self.ring.live))
                else:
                    wait = self.limits.excluded_wait
                with trio.move_on_after(wait) as scope:
                    header, state, dead, origin = await self._inbox.receive()
                if scope.cancelled_caught:
                    if self.excluded is not None:
                        raise RunError(
                            f"excluded from the run ({self.excluded}), and no final model "
                            f"arrived within {wait:g} s"
                        )
                    raise RunError(f"no model arrived for {wait:g} s; the ring is broken")
                if self.me in dead:
                    self._exclude(f"{header.sender} counts us as dead")
                self.dead |= dead - {self.me}
                if header.kind == "final":
                    await self._finish(state, origin or header.sender)
                elif self.excluded is None:
                    await self._hop(state, Position(header.lap, header.hop), header.sender)
                else:
                    log.warning("ignoring a model from %s: we are excluded", header.sender)
            nursery.cancel_scope.cancel()

    async def _hop(self, state: RingState, pos: Position, predecessor: PeerId | None) -> None:
        new, metrics = await self._compute(
            train_hop, self.task, state, self.ring_settings, pos.lap, pos.hop, self.federation
        )
        self._log_hop(new, metrics)
        if metrics.done:
            await self._finish(new, self.me)
            return
        forwarded = await self._forward(new, pos)
        if self.excluded is not None:
            return
        if predecessor is not None and forwarded:
            assert self._nursery is not None
            self._nursery.start_soon(self._tell_passed, predecessor, pos)
        if not forwarded:
            log.warning("no other member is reachable: finishing alone")
            await self._finish(new, self.me, reason="members-lost")

    async def _compute(self, fn: Callable[..., T], *args: Any) -> T:
        """Run torch work in a worker thread (``train_in_thread``), else inline."""
        if self.peer.config.train_in_thread:
            return await trio.to_thread.run_sync(fn, *args)
        result = fn(*args)
        await trio.lowlevel.checkpoint()
        return result

    def _log_hop(self, state: RingState, metrics: Any) -> None:
        cand = metrics.candidate
        self.outputs.log(
            {
                "type": "hop",
                "lap": metrics.lap,
                "hop": metrics.hop,
                "steps": metrics.steps,
                "samples": metrics.samples,
                "train_loss": metrics.train_loss,
                "candidate_val_loss": cand.loss if cand is not None else None,
                "candidate_val_n": cand.n if cand is not None else None,
                "seconds": metrics.seconds,
                "epoch": self.epoch,
            }
        )
        self._log_laps(state)
        closed = metrics.closed
        trained = (
            f"trained {metrics.samples} samples (loss {metrics.train_loss:.4f})"
            if metrics.samples
            else "evaluated only"
        )
        log.info(
            "lap %d hop %d: %s%s",
            metrics.lap, metrics.hop, trained,
            f"; federated val loss of lap {closed.lap}: {closed.loss:.4f}" if closed else "",
        )  # fmt: skip

    def _log_laps(self, state: RingState) -> None:
        """A ``lap`` line for each lap in the ring metadata not logged yet."""
        for h in state.meta.history:
            self.outputs.log_lap(
                {"lap": h.lap, "federated_val_loss": h.loss, "accuracy": h.accuracy,
                 "auc": None if math.isnan(h.auc) else h.auc, "n": h.n, "samples": h.samples}
            )  # fmt: skip

    # --- handing on -------------------------------------------------------------------------

    def _payload(
        self,
        state: RingState,
        origin: PeerId | None = None,
        dead: frozenset[PeerId] | None = None,
    ) -> bytearray:
        dead = frozenset(self.dead) if dead is None else dead
        return ring_payload(state, dead, origin)

    def _next(
        self, pos: Position, dead: frozenset[PeerId] | None = None
    ) -> tuple[PeerId, Position] | None:
        """Where the model trained here at ``pos`` goes next (with ``dead`` skipped)."""
        ring = self.ring if dead is None else Ring.of(self.members, dead)
        if not ring.successors(self.me):
            return None
        return next_position(ring, self.me, pos)

    async def _forward(self, state: RingState, pos: Position) -> bool:
        """Hand ``state`` (trained at ``pos``) to the next live member; False if none is left
        or if it tells us that we were excluded (:attr:`excluded` is then set)."""
        while True:
            step = self._next(pos)
            if step is None:
                return False
            target, npos = step
            data = self._payload(state)
            error = await self._send(target, "model", npos, data)
            if error is not None and error.worth_retrying:
                # One broken connection is not a dead member: try once more.
                log.info("handing the model to %s failed (%s); trying once more", target, error)
                await trio.sleep(min(1.0, self.limits.handshake_timeout))
                error = await self._send(target, "model", npos, data)
            if error is None:
                assert self._nursery is not None
                self._nursery.start_soon(self._watch, target, npos, state, pos)
                return True
            if error.refused and "epoch" in error.why:
                self._exclude(f"{target} refused our model: {error}")
                return False
            self._declare_dead(target, error.why)

    async def _send(
        self,
        target: PeerId,
        kind: BlobKind,
        pos: Position,
        data: bytearray,
        epoch: int | None = None,
    ) -> HandOverFailure | None:
        """Send one blob (at our epoch unless ``epoch``); None once ``target`` took
        custody, else why not."""
        try:
            with trio.fail_after(self.limits.blob_timeout + self.limits.handshake_timeout):
                channel = await self.peer.dial(target)
                framed = FramedStream(channel, peer=target.text, limits=self.limits)
                try:
                    await framed.send_frame(encode_message(BlobRequest(self.run_id)))
                    await send_blob(
                        framed,
                        self.peer.identity,
                        run_id=self.run_id,
                        kind=kind,
                        lap=pos.lap,
                        hop=pos.hop,
                        epoch=self.epoch if epoch is None else epoch,
                        recipient=target,
                        data=data,
                    )
                finally:
                    await framed.aclose()
            self.model_bytes_sent += len(data)
        except trio.TooSlowError:
            return HandOverFailure("timed out")
        except BlobRefusedError as exc:
            return HandOverFailure(f"refused: {exc.reason}", refused=True)
        except DialError as exc:
            return HandOverFailure(exc.reason, unreachable=True)
        except RemoteProtocolError as exc:
            return HandOverFailure(exc.reason)
        except OSError as exc:
            return HandOverFailure(f"unreachable: {exc}", unreachable=True)
        return None

    async def _watch(self, target: PeerId, npos: Position, state: RingState, pos: Position) -> None:
        """Keep our copy until ``target`` says the model moved on; else skip it.

        After ``hop_timeout`` without ``passed`` the copy goes to the next live
        member with ``target`` counted as dead; only once that member takes it is
        ``target`` declared dead here.  If it refuses because it already has a
        newer model, the ring moved on through ``target`` (only its ``passed``
        was late): ``target`` is not declared dead, so a working member is never
        excluded on a late message.  An unreachable member on the way is
        skipped too.
        """
        event = self._passed.setdefault((target, npos), trio.Event())
        with trio.move_on_after(self.limits.hop_timeout):
            await event.wait()
            return
        suspects = {target: f"silent for {self.limits.hop_timeout:g} s after taking the model"}
        while self.finished is None and target not in self.dead:
            dead = frozenset(self.dead | set(suspects))
            step = self._next(pos, dead)
            if step is None:
                return
            error = await self._send(
                step[0],
                "model",
                step[1],
                self._payload(state, dead=dead),
                epoch=self.view.epoch + len(dead),
            )
            if error is None:
                for peer, why in suspects.items():
                    self._declare_dead(peer, why)
                assert self._nursery is not None
                self._nursery.start_soon(self._watch, step[0], step[1], state, pos)
                return
            if error.refused:
                log.info("%s already has a newer model (%s): the ring moved on", step[0], error)
                return
            suspects[step[0]] = error.why

    async def _tell_passed(self, predecessor: PeerId, pos: Position) -> None:
        try:
            with trio.move_on_after(self.limits.handshake_timeout + self.limits.frame_timeout):
                channel = await self.peer.dial(predecessor)
                framed = FramedStream(channel, peer=predecessor.text, limits=self.limits)
                await framed.send_frame(encode_message(Passed(self.run_id, pos.lap, pos.hop)))
                await framed.aclose()
        except (RemoteProtocolError, OSError) as exc:
            log.info("could not tell %s the model moved on: %s", predecessor, exc)

    def on_passed(self, remote: PeerId, message: Passed) -> None:
        """``remote`` says the model we gave it (at lap, hop) moved on."""
        if message.run_id == self.run_id:
            self._passed.setdefault(
                (remote, Position(message.lap, message.hop)), trio.Event()
            ).set()

    # --- receiving --------------------------------------------------------------------------

    async def on_blob(
        self, framed: FramedStream, channel: SecureChannel, request: BlobRequest
    ) -> None:
        """Receive one blob on a connection whose request was ``blob``."""
        remote = channel.remote_peer
        if remote not in self.members:
            raise RemoteProtocolError(
                "sent a blob but is not a member of the run", peer=remote.text
            )
        decoded: list[tuple[RingState, frozenset[PeerId], PeerId | None]] = []

        def check(header: BlobHeader, data: memoryview) -> None:
            state, dead, origin = read_ring_payload(data, self.template, self.limits)
            if any(p not in self.members for p in dead):
                raise RemoteProtocolError("dead list names a non-member")
            decoded.append((state, dead, origin))

        received = await receive_blob(
            framed,
            me=self.me,
            remote=remote,
            run_id=self.run_id,
            guard=self.guard,
            min_epoch=self.epoch,
            check=check,
        )
        state, dead, origin = decoded[0]
        await self._inbox_send.send((received.header, state, dead, origin))

    # --- finishing --------------------------------------------------------------------------

    async def _finish(self, state: RingState, origin: PeerId, reason: str | None = None) -> None:
        if self.finished is not None:
            return
        meta = state.meta
        self._log_laps(state)  # the final model carries the laps closed since our last hop
        weights = final_weights(state)
        own = await self._compute(evaluate_state, self.task, state)
        sha = self.outputs.save_model(weights, {"fedup_run_id": self.run_id.hex(), "format": "pt"})
        history = list(meta.history)
        best = next((h for h in history if h.lap == meta.best_lap), None)
        stop = reason or ("converged" if meta.stale >= self.ring_settings.patience else "max-laps")
        self.finished = RunSummary(
            run_id=self.run_id.hex(),
            peer_id=self.me.text,
            leader=self.view.leader.text,
            members=[p.text for p in self.members],
            laps=max((h.lap for h in history), default=-1) + 1,
            converged=stop == "converged",
            stop_reason=stop,
            federated_val_loss=[h.loss for h in history],
            federated_laps=[h.lap for h in history],
            best_lap=meta.best_lap,
            final_val_loss=own.loss,
            final_val_accuracy=own.accuracy,
            data_passes=(best.samples / self.federation.n_rows)
            if best is not None and self.federation.n_rows
            else math.nan,
            model_sha256=sha,
            dead=[p.text for p in sorted(self.dead)],
            model_bytes_sent=self.model_bytes_sent,
            out_dir=str(self.outputs.directory),
            excluded=self.excluded,
        )
        self.outputs.save_summary(self.finished)
        log.info(
            "run %s finished (%s): best lap %d, final val loss here %.4f, model %s",
            self.run_id.hex()[:8], stop, meta.best_lap, own.loss, sha[:12],
        )  # fmt: skip
        if self.excluded is not None:
            return  # the others finished without us: nobody to hand it on to
        await self._distribute_final(state, origin)
        self.finished = attrs.evolve(
            self.finished,
            model_bytes_sent=self.model_bytes_sent,
            dead=[p.text for p in sorted(self.dead)],
        )
        self.outputs.save_summary(self.finished)

    async def _distribute_final(self, state: RingState, origin: PeerId) -> None:
        """Hand the final model on until it is back where its distribution started.

        The member that started it (``origin``) also sends it to every member it
        counts as dead, at once: one that was only slow or cut off for a while is
        waiting for it (excluded), and one that is gone costs a failed dial.
        """
        pos = Position(max(state.meta.lap, 0), 0)
        dead = frozenset(self.dead)
        data = self._payload(state, origin, dead)
        for target in self.ring.successors(self.me):
            if target == origin:
                break
            error = await self._send(target, "final", pos, data)
            if error is None:
                break
            self._declare_dead(target, error.why)
        if origin != self.me or not self.dead:
            return
        if self.dead != dead:  # the blob must name every member we now count as dead
            data = self._payload(state, origin)
        async with trio.open_nursery() as nursery:
            for target in sorted(self.dead):
                nursery.start_soon(self._send_final_to_dead, target, pos, data)

    async def _send_final_to_dead(self, target: PeerId, pos: Position, data: bytearray) -> None:
        error = await self._send(target, "final", pos, data)
        if error is None:
            log.info("gave the final model to %s, which we count as dead (it was excluded)", target)
        else:
            log.info("could not give the final model to %s (counted as dead): %s", target, error)


def ring_payload(state: RingState, dead: frozenset[PeerId], origin: PeerId | None) -> bytearray:
    """The bytes of a ring blob: the state's metadata and tensors, the dead set, the origin."""
    return encode_payload(state.meta.to_dict(), dead, origin, state_to_bytes(state.tensors))


def read_ring_payload(
    data: memoryview | bytearray, template: RingState, limits: Limits
) -> tuple[RingState, frozenset[PeerId], PeerId | None]:
    """Decode and check a ring blob against ``template`` (names, dtypes, shapes, metadata).

    Raises :class:`~fedup.errors.RemoteProtocolError` for anything malformed.
    """
    payload = decode_payload(data, limits=limits)
    tensors = bytes_to_state(payload.state, like=template.tensors, limits=limits)
    state = RingState.from_parts(tensors, payload.ring, template=template)
    return state, payload.dead, payload.origin


@attrs.frozen
class HandOverFailure:
    """Why a blob did not reach a member."""

    why: str
    refused: bool = False
    """The member answered no (a NACK): it is alive."""
    unreachable: bool = False
    """Nothing listens there, or no connection could be made: the member is gone."""

    @property
    def worth_retrying(self) -> bool:
        """A connection that broke half-way or timed out may have been the network's
        fault; a refusal is an answer, and an unreachable member is gone."""
        return not (self.refused or self.unreachable)

    def __str__(self) -> str:
        return self.why
