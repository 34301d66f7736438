"""A running peer's events (:mod:`fedup.peer.events`) onto a :class:`~fedup.ui.board.RunBoard`.

:func:`apply` turns one event into board updates; :func:`follow` reads a
bounded subscription (:meth:`~fedup.peer.events.EventHub.subscribe`), so a
slow reader misses events rather than ever holding up the peer.  The
simulator's display calls :func:`apply` for every simulated peer's events:
each reports its own hops, so the board holds every member's.
"""

from __future__ import annotations

import trio

from fedup.peer import events as ev
from fedup.protocol.lifecycle import Life
from fedup.protocol.peer_id import PeerId
from fedup.protocol.view import run_settings_json
from fedup.ui.board import LapPoint, RunBoard

__all__ = ["apply", "follow"]


def apply(board: RunBoard, peer: PeerId, event: ev.PeerEvent) -> None:
    """What ``event``, reported by ``peer``, changes on ``board``."""
    me = peer.text
    if isinstance(event, ev.LifeChanged):
        if event.state is Life.FORMING:
            board.set_stage("looking for peers")
        elif event.state is Life.EXCLUDED:
            board.set_stage("excluded: waiting for the final model")
    elif isinstance(event, ev.FormationStage):
        if not board.members:
            board.set_stage(f"forming ({event.stage})")
    elif isinstance(event, ev.Formed):
        members = [p.text for p in event.members]
        addresses = {
            p.text: [str(a) for a in addrs]
            for p, addrs in zip(event.members, event.addresses, strict=False)
        }
        board.formed(
            run_id=event.run_id.hex(),
            epoch=event.epoch,
            leader=event.leader.text,
            members=members,
            addresses=addresses,
            settings=run_settings_json(event.settings) if event.settings is not None else None,
        )
    elif isinstance(event, ev.Training):
        board.training(me, event.lap, event.hop)
    elif isinstance(event, ev.HopTrained):
        board.hop_trained(me, event.lap, event.hop, event.train_loss)
    elif isinstance(event, ev.HandedOver):
        board.handed_over(event.to.text, event.kind, event.lap, event.hop)
    elif isinstance(event, ev.LapNoted):
        board.lap_noted(LapPoint(event.lap, event.loss, event.accuracy, event.auc, event.samples))
    elif isinstance(event, ev.DeclaredDead):
        board.declared_dead(event.dead.text, event.cause)
    elif isinstance(event, ev.TakenBack):
        board.taken_back(event.peer.text)
    elif isinstance(event, ev.Excluded):
        board.excluded(me, event.why)
    elif isinstance(event, ev.Finished):
        board.finished(
            me,
            event.stop_reason,
            event.ended_by.text if event.ended_by is not None else None,
            event.model_sha256,
        )
    elif isinstance(event, ev.Failed):
        board.failed(me, event.reason)
    # LapClosed (the closer's own view of a lap: LapNoted covers it), Refused: logged.


async def follow(
    board: RunBoard,
    peer: PeerId,
    events: trio.MemoryReceiveChannel[tuple[float, ev.PeerEvent]],
) -> None:
    """Apply every event of a subscription to ``board`` until the channel closes."""
    async with events:
        async for _, event in events:
            apply(board, peer, event)
