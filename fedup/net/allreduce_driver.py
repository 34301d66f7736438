"""The trio driver of one ring all-reduce attempt, over the peers' encrypted channels.

:class:`~fedup.protocol.allreduce.AllReduceMachine` decides everything about one
attempt (``docs/parallel.md``); :func:`all_reduce` only feeds it and carries out what
it says, the way the handshake's ``_drive`` in :mod:`fedup.net.transport` does:

* it feeds :class:`Begin` with this member's part of the vector, then every message
  from the :class:`AllReduceInbox`, each with the current trio time;
* ``Send``: one frame to the ring successor through the caller's ``send`` (usually
  :meth:`SuccessorLink.send`: one framed :class:`~fedup.net.channel.SecureChannel`,
  dialled on the first send), bounded by ``Limits.frame_timeout``; a send that fails
  or takes longer abandons the attempt (:class:`Failed` ``abandoned``, naming the
  successor);
* ``Reduce``: the injected ``add(chunk, start, stop, received) -> bytes`` (numpy here
  and in the tests, torch in the parallel mode; this layer imports no torch), in a
  worker thread for chunks of :data:`THREAD_ADD_MIN` bytes or more;
* ``Store``: the chunk's final bytes into the caller's ``result`` buffer;
* ``SetTimer`` / ``CancelTimer``: the one deadline that bounds every wait for a message;
* ``Refused``: a warning naming the sender and the reason (the machine is unchanged;
  the attempt goes on);
* ``Done`` / ``Failed``: returned.

Inbound, the peer's connection handler routes a connection whose first frame is an
all-reduce message (:func:`is_allreduce_frame`) to :meth:`AllReduceInbox.serve`,
which hands that frame and every later one to the inbox.  The inbox outlives attempts
(a predecessor may send its first reduce-scatter chunks while this member still
trains): messages wait there, bounded by ``Limits.max_allreduce_inbox`` bytes; a
message beyond the budget is refused and its connection closed.  A member's message
for a later attempt of this round, or for the next round, is held in the inbox for
that attempt (its predecessor may be there already); older ones, ones further ahead
and a non-member's are the machine's to refuse.

No test here sleeps: the deadlines are the machine's and ``Limits``', so a trio
``MockClock`` drives them.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable
from types import TracebackType

import attrs
import numpy as np
import trio

from fedup.config import DEFAULT_LIMITS, Limits
from fedup.errors import LocalProtocolError, RemoteProtocolError
from fedup.net.channel import SecureChannel
from fedup.net.framed import FramedStream
from fedup.protocol import cbor
from fedup.protocol.allreduce import (
    Abandon,
    Action,
    AllReduceMachine,
    Begin,
    CancelTimer,
    Done,
    Event,
    Failed,
    Ignored,
    MessageArrived,
    Reduce,
    Reduced,
    Refused,
    Send,
    SetTimer,
    Store,
    TimerFired,
)
from fedup.protocol.allreduce_messages import (
    ELEMENT_SIZE,
    MESSAGE_OVERHEAD,
    MESSAGE_TYPE,
    ChunkMessageError,
    decode_chunk_message,
)
from fedup.protocol.peer_id import PeerId

__all__ = [
    "THREAD_ADD_MIN",
    "Add",
    "AllReduceInbox",
    "SuccessorLink",
    "all_reduce",
    "float32_adder",
    "is_allreduce_frame",
]

log = logging.getLogger("fedup.net")

THREAD_ADD_MIN = 256 * 1024
"""Chunks of this many bytes (64K floats) or more are added in a worker thread, so that
a slow adder (torch on a busy host) does not hold up the event loop; smaller ones
inline, where a thread's hand-off would cost more than the add."""
ENTRY_COST = 128
"""Bytes an inbox entry is counted for besides its data (the tuple, the peer ID), so
that a flood of empty frames is bounded too."""

_PREFIX = cbor.encode({"t": MESSAGE_TYPE})[1:]
"""Every all-reduce message starts with a map header and then this: ``t`` is its only
one-letter key, so the deterministic encoding (the only one the strict decoder takes)
puts it first."""

Add = Callable[[int, int, int, bytes], bytes]
"""``add(chunk, start, stop, received)``: ``received`` (float32, little-endian) plus this
member's own elements ``[start, stop)``, as ``received + own`` in float32."""
SendMessage = Callable[[bytes], Awaitable[None]]
Alive = Callable[[PeerId], Awaitable[bool]]
"""``alive(peer)``: whether ``peer`` completes a handshake now (bounded by the caller)."""
Dial = Callable[[PeerId], Awaitable[SecureChannel]]


def is_allreduce_frame(frame: bytes) -> bool:
    """Whether ``frame`` is meant as an all-reduce message (a map of 9 or 10 pairs whose
    ``t`` is ``"allreduce"``); nothing else is decoded.  Such frames do not go through
    :func:`fedup.protocol.messages.decode_message` (a chunk may exceed
    ``max_message_size``): the machine decodes and checks them."""
    return (
        len(frame) > 1 + len(_PREFIX) and frame[0] in (0xA9, 0xAA) and frame[1:].startswith(_PREFIX)
    )


def float32_adder(local: bytes | bytearray | memoryview) -> Add:
    """An :data:`Add` over ``local``, this member's whole vector of float32 (numpy)."""
    own = np.frombuffer(local, dtype="<f4")

    def add(chunk: int, start: int, stop: int, received: bytes) -> bytes:
        total = np.frombuffer(received, dtype="<f4") + own[start:stop]
        return bytes(total.astype("<f4", copy=False).tobytes())

    return add


class AllReduceInbox:
    """Messages from authenticated peers, waiting for this run's all-reduce attempts.

    One per run (it outlives attempts).  :meth:`deliver` and :meth:`serve` put messages
    in; :func:`all_reduce` takes them out.  At most ``limits.max_allreduce_inbox`` bytes
    are held (each message counted with :data:`ENTRY_COST`); a message that is larger
    than any chunk message can be, or that would exceed the budget, is refused.
    """

    def __init__(self, *, limits: Limits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self.max_message = MESSAGE_OVERHEAD + limits.max_allreduce_chunk
        self._queue: deque[tuple[PeerId, bytes]] = deque()
        self._later: deque[tuple[PeerId, bytes]] = deque()
        self._held = 0
        self._arrived = trio.Event()
        self.refused = 0
        """Messages refused so far (too large, or beyond the budget)."""

    @property
    def held(self) -> int:
        """Bytes counted against the budget now."""
        return self._held

    def __len__(self) -> int:
        return len(self._queue)

    def deliver(self, sender: PeerId, data: bytes) -> str | None:
        """Queue ``data`` from ``sender`` (the peer its channel authenticated).

        Returns None when queued, or why it was refused (logged as a warning naming the
        sender): larger than ``MESSAGE_OVERHEAD + max_allreduce_chunk``, or beyond
        ``max_allreduce_inbox`` bytes held.  Never blocks.
        """
        cost = len(data) + ENTRY_COST
        why = None
        if len(data) > self.max_message:
            why = f"sent a {len(data)}-byte all-reduce message; none exceeds {self.max_message}"
        elif self._held + cost > self.limits.max_allreduce_inbox:
            why = (
                f"sent an all-reduce message beyond the {self.limits.max_allreduce_inbox} bytes "
                f"held for this member's attempts ({self._held} held)"
            )
        if why is not None:
            self.refused += 1
            log.warning("refused an all-reduce message from %s: %s", sender, why)
            return why
        self._queue.append((sender, bytes(data)))
        self._held += cost
        self._arrived.set()
        return None

    async def serve(self, framed: FramedStream, remote: PeerId, first: bytes | None = None) -> None:
        """Deliver ``first`` (the frame the connection opened with) and every later frame
        from ``remote`` until the connection ends.  A refused message ends the connection
        (its sender's next send fails, and its attempt names this member).  Returns when
        the connection ends; raises nothing but cancellation."""
        frame = first
        while True:
            if frame is not None and self.deliver(remote, frame) is not None:
                return
            try:
                frame = await framed.receive_frame_or_eof()
            except RemoteProtocolError as exc:
                log.info("all-reduce connection from %s ended: %s", remote, exc.reason)
                return
            if frame is None:
                return

    def hold(self, sender: PeerId, data: bytes) -> None:
        """Keep a message just taken for a later attempt (:func:`all_reduce` does this
        for the next attempt's messages); it still counts against the budget, and
        :meth:`release_held` puts it back, ahead of everything queued since."""
        self._later.append((sender, data))
        self._held += len(data) + ENTRY_COST

    def release_held(self) -> None:
        """Put the held messages back at the front of the queue, in their order."""
        while self._later:
            self._queue.appendleft(self._later.pop())
        if self._queue:
            self._arrived.set()

    def take(self) -> tuple[PeerId, bytes] | None:
        """The oldest message and its sender, or None (the driver's side)."""
        if not self._queue:
            return None
        sender, data = self._queue.popleft()
        self._held -= len(data) + ENTRY_COST
        if not self._queue:
            self._arrived = trio.Event()
        return sender, data

    async def wait(self) -> None:
        """Return once a message is waiting (at once if one is)."""
        await self._arrived.wait()


class SuccessorLink:
    """One framed, encrypted stream to the ring successor ``peer``, dialled on the first
    :meth:`send` (``dial`` returns an authenticated :class:`SecureChannel`, e.g.
    ``transport.dial(address, expected_peer=peer)``).  After a failed send the stream is
    closed; the next send dials again.  Use it as an async context manager, or call
    :meth:`aclose`."""

    def __init__(self, peer: PeerId, *, dial: Dial, limits: Limits = DEFAULT_LIMITS) -> None:
        self.peer = peer
        self._dial = dial
        self._limits = limits
        self._framed: FramedStream | None = None
        self._last_send = -math.inf
        self.dials = 0
        """Connections opened so far."""

    async def send(self, data: bytes) -> None:
        """Send one message; raises what dialling and :meth:`FramedStream.send_frame`
        raise (:class:`~fedup.errors.RemoteProtocolError` subclasses naming the peer).
        A stream this link sent nothing on for half of ``idle_timeout`` is closed and
        dialled again first: the receiver closes one idle for ``idle_timeout``, and a
        write into it could be lost without an error."""
        now = trio.current_time()
        if self._framed is not None and now - self._last_send > self._limits.idle_timeout / 2:
            await self.aclose()
        self._last_send = now
        if self._framed is None:
            channel = await self._dial(self.peer)
            self.dials += 1
            self._framed = FramedStream(channel, peer=self.peer.text, limits=self._limits)
        framed = self._framed
        try:
            await framed.send_frame(data)
        except BaseException:
            self._framed = None
            await trio.aclose_forcefully(framed.stream)
            raise

    async def aclose(self) -> None:
        """Close the stream (close-notify first, within ``close_notify_timeout``)."""
        framed, self._framed = self._framed, None
        if framed is not None:
            with trio.move_on_after(self._limits.close_notify_timeout) as scope:
                await framed.stream.aclose()
            if scope.cancelled_caught:
                await trio.aclose_forcefully(framed.stream)

    async def __aenter__(self) -> SuccessorLink:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


async def all_reduce(
    machine: AllReduceMachine,
    local: bytes | bytearray | memoryview,
    *,
    send: SendMessage,
    inbox: AllReduceInbox,
    add: Add,
    result: bytearray | memoryview,
    limits: Limits | None = None,
    add_in_thread: bool | None = None,
    alive: Alive | None = None,
) -> Done | Failed:
    """Run ``machine``'s attempt to its end; returns its :class:`Done` or :class:`Failed`.

    ``local`` is this member's whole vector (float32, ``4 x machine.plan.length``
    bytes); ``send(data)`` sends one message to ``machine.successor``; ``add`` answers
    ``Reduce`` (:data:`Add`; in a worker thread when ``add_in_thread`` is True, or is
    None and the chunk has :data:`THREAD_ADD_MIN` bytes or more); ``result`` (as long as
    ``local``) receives every stored chunk, so on :class:`Done` it holds the sum, the
    same bytes at every member.  ``limits`` defaults to the machine's.  Messages
    held for a later attempt by an earlier call come first.

    Every wait is bounded: a wait for a message by the machine's deadline (a
    :class:`Failed` ``timeout`` naming the predecessor), a send (with its dial) by
    ``limits.frame_timeout`` (a :class:`Failed` ``abandoned`` whose ``peer`` is the
    successor).  A refused message is logged and the attempt goes on.  Raises
    :class:`~fedup.errors.LocalProtocolError` for buffers of the wrong size, or what
    ``add`` raises (the caller's bug), and nothing for a peer's bytes.
    """
    limits = machine.limits if limits is None else limits
    size = ELEMENT_SIZE * machine.plan.length
    if len(local) != size or len(result) != size:
        raise LocalProtocolError(
            f"all_reduce needs local and result of {size} bytes; got {len(local)} and {len(result)}"
        )
    inbox.release_held()
    start, stop = machine.plan.span(machine.first_chunk)
    own = bytes(memoryview(local)[ELEMENT_SIZE * start : ELEMENT_SIZE * stop])
    pending: deque[Action] = deque(machine.handle(Begin(own), trio.current_time()))
    deadline: float | None = None
    while True:
        while pending:
            action = pending.popleft()
            if isinstance(action, Done | Failed):
                return action
            if isinstance(action, Send):
                failure = await _send(send, action, limits)
                if failure is not None:
                    ended = machine.handle(Abandon(failure), trio.current_time())
                    pending = deque(
                        attrs.evolve(a, peer=action.to) if isinstance(a, Failed) else a
                        for a in ended
                    )
            elif isinstance(action, Reduce):
                summed = await _add(add, action, add_in_thread)
                pending.extend(machine.handle(Reduced(action.chunk, summed), trio.current_time()))
            elif isinstance(action, Store):
                result[ELEMENT_SIZE * action.start : ELEMENT_SIZE * action.stop] = action.data
            elif isinstance(action, SetTimer):
                deadline = action.at
            elif isinstance(action, CancelTimer):
                deadline = None
            elif isinstance(action, Refused):
                log.warning(
                    "all-reduce refused a message (%s): %s", action.refusal.value, action.reason
                )
            elif isinstance(action, Ignored):
                log.debug("all-reduce ignored %s: %s", action.event, action.why)
        if deadline is None:
            raise LocalProtocolError("the all-reduce machine waits without a deadline")
        event = await _next_event(machine, inbox, deadline, alive, limits.probe_interval)
        pending.extend(machine.handle(event, trio.current_time()))


async def _next_event(
    machine: AllReduceMachine,
    inbox: AllReduceInbox,
    deadline: float,
    alive: Alive | None = None,
    interval: float = math.inf,
) -> Event:
    """The next message, or :class:`TimerFired` once ``deadline`` passed with none (a
    message already waiting is taken even when the deadline passed while we worked).
    A message for the next attempt is held in the inbox, not fed to this one.  With
    ``alive``, every ``interval`` of waiting the predecessor is asked after, and
    :class:`Abandon` comes back when it does not answer."""
    probe_at = trio.current_time() + interval if alive is not None else math.inf
    abandon_at, gone = math.inf, ""
    while True:
        taken = inbox.take()
        later = None if taken is None else _for_next_attempt(machine, *taken)
        if taken is not None and later is not None:
            log.debug("all-reduce: %s sent a message for a later %s; held", taken[0], later)
            inbox.hold(*taken)
            if later == "attempt" and math.isinf(abandon_at):
                # It gave this attempt up; what it sent before may still be on its way
                # on the attempt's own connection: wait that long, not the deadline.
                abandon_at = trio.current_time() + machine.limits.probe_interval
                gone = f"{taken[0]} moved on to a later attempt"
            continue
        if taken is not None:
            return MessageArrived(*taken)
        now = trio.current_time()
        if now >= deadline:
            return TimerFired()
        if now >= abandon_at:
            return Abandon(gone)
        with trio.move_on_at(min(deadline, probe_at, abandon_at)) as scope:
            await inbox.wait()
        if not scope.cancelled_caught or trio.current_time() < probe_at or alive is None:
            continue
        if not await alive(machine.predecessor):
            return Abandon(f"{machine.predecessor} sent nothing and does not answer")
        probe_at = trio.current_time() + interval


def _for_next_attempt(machine: AllReduceMachine, sender: PeerId, data: bytes) -> str | None:
    """``"attempt"`` when ``data`` from ``sender`` (a member of this attempt) is a
    well-formed message of this run and epoch for a later attempt of this round,
    ``"round"`` when for the next round: it waits for that attempt instead of being
    refused by this one.  None for anything else (further ahead, older, malformed, from
    a non-member): this machine's to refuse, so a member cannot park messages here for
    ever.  A member's message for a later attempt means it gave this one up (it sends
    to this member only after all its messages of the attempts before, on one
    connection each): the caller gives this attempt up ``probe_interval`` later rather
    than wait out its deadline."""
    if sender not in machine.members or not is_allreduce_frame(data):
        return None
    try:
        m = decode_chunk_message(data, max_payload=machine.limits.max_allreduce_chunk)
    except ChunkMessageError:
        return None
    c = machine.context
    if m.run_id != c.run_id or m.epoch != c.epoch:
        return None
    if m.round == c.round and m.attempt > c.attempt:
        return "attempt"
    return "round" if m.round == c.round + 1 else None


async def _send(send: SendMessage, action: Send, limits: Limits) -> str | None:
    """Send ``action``'s message; None when sent, else why not (naming the successor)."""
    what = f"{action.phase.value}/{action.step} chunk {action.chunk}"
    try:
        with trio.fail_after(limits.frame_timeout):
            await send(action.data)
    except trio.TooSlowError:
        return f"could not send {what} to {action.to} within {limits.frame_timeout:g} s"
    except (RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        return f"could not send {what} to {action.to}: {exc}"
    except OSError as exc:
        return f"could not send {what} to {action.to}: {exc.strerror or exc}"
    return None


async def _add(add: Add, action: Reduce, in_thread: bool | None) -> bytes:
    if in_thread is None:
        in_thread = len(action.received) >= THREAD_ADD_MIN
    args = (action.chunk, action.start, action.stop, action.received)
    if in_thread:
        return await trio.to_thread.run_sync(add, *args)
    return add(*args)
