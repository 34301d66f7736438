"""One authenticated connection per ring neighbour, kept for the whole run.

A member hands the model to its successor over an :class:`OutboundLink`: the
first hand-over dials and authenticates once and says ``link`` (the run); every
later blob goes over the same :class:`~fedup.net.channel.SecureChannel`, so a
hop costs no dial and no handshake.  The successor sends its ``passed`` notices
back on the same connection.  Its side is :func:`serve_link`, run by the
listener's handler for a connection that opened with ``link``.

Frames on a link::

    predecessor -> successor   blob frames (fedup.protocol.blob), ``passed``
    successor -> predecessor   blob replies (ACCEPT / ACK / NACK), ``passed``

A blob's replies are told from messages by their shape (a message is a map with
``"t"``).  The predecessor's link runs one reader task that owns the receiving
side: replies go to the blob being sent, ``passed`` goes to the caller's
``on_message``.  A link that breaks (or is closed for idleness by the other
side) is dialled again on the next send; the caller decides whether a failed
hand-over is worth another try.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from fedup.config import Limits
from fedup.errors import ConnectionLostError, PeerTimeoutError, RemoteProtocolError
from fedup.net.blobs import AdmitHeader, DecideBlob, SentBlob, receive_blob, send_blob
from fedup.net.channel import SecureChannel
from fedup.net.framed import FramedStream
from fedup.protocol import cbor
from fedup.protocol.blob import BlobKind
from fedup.protocol.envelope import Signer
from fedup.protocol.messages import Link, Message, decode_message, encode_message
from fedup.protocol.peer_id import PeerId

__all__ = ["OutboundLink", "classify", "serve_link"]

log = logging.getLogger("fedup.net")

Dial = Callable[[PeerId], Awaitable[SecureChannel]]
OnMessage = Callable[[PeerId, Message], None]
REPLY_QUEUE = 4


def classify(frame: bytes, limits: Limits) -> Message | None:
    """The control message ``frame`` holds, or None for a blob frame or reply.

    Raises a :class:`~fedup.errors.RemoteProtocolError` for a message that does not decode.
    """
    if not frame or frame[0] in (0x01, 0x02):  # a chunk
        return None
    try:
        value = cbor.decode(
            frame, max_size=limits.max_message_size, max_depth=limits.max_cbor_depth
        )
    except RemoteProtocolError:
        return None  # not CBOR: the blob layer will say what is wrong with it
    if isinstance(value, dict) and "t" in value:
        return decode_message(frame, limits=limits)
    return None


class OutboundLink:
    """Our connection to one neighbour (our successor) in run ``run_id``.

    Its reader task runs in ``nursery`` while the connection lives.
    """

    def __init__(
        self,
        peer: PeerId,
        *,
        run_id: bytes,
        identity: Signer,
        dial: Dial,
        on_message: OnMessage,
        limits: Limits,
        nursery: trio.Nursery,
        hash_in_thread: bool | None = None,
    ) -> None:
        self.peer = peer
        self.run_id = run_id
        self._identity = identity
        self._dial = dial
        self._on_message = on_message
        self._limits = limits
        self._nursery = nursery
        self._hash_in_thread = hash_in_thread
        self._framed: FramedStream | None = None
        self._replies: trio.MemoryReceiveChannel[bytes] | None = None
        self._sending = trio.Lock()
        self._closed = False
        self.dials = 0
        """Connections opened so far (one per run unless the link broke)."""

    @property
    def connected(self) -> bool:
        return self._framed is not None

    async def send_blob(
        self, *, kind: BlobKind, lap: int, hop: int, epoch: int, data: memoryview | bytes
    ) -> SentBlob:
        """Hand one blob over; returns once the neighbour took it.

        Raises what :func:`~fedup.net.blobs.send_blob` raises, plus
        :class:`~fedup.net.transport.DialError` and friends when (re)connecting
        fails.  After any failure the connection is closed (the other side
        closes too), and the next call dials again.
        """
        async with self._sending:
            framed, replies = await self._connect()
            try:
                return await send_blob(
                    framed,
                    self._identity,
                    run_id=self.run_id,
                    kind=kind,
                    lap=lap,
                    hop=hop,
                    epoch=epoch,
                    recipient=self.peer,
                    data=data,
                    limits=self._limits,
                    hash_in_thread=self._hash_in_thread,
                    replies=lambda: _next_reply(replies, framed.peer),
                )
            except BaseException:
                await self._drop(framed)
                raise

    async def send_message(self, message: Message) -> None:
        """Send a control message (``passed``) to the neighbour, connecting if need be."""
        framed, _ = await self._connect()
        try:
            await framed.send_frame(encode_message(message))
        except BaseException:
            await self._drop(framed)
            raise

    async def _connect(self) -> tuple[FramedStream, trio.MemoryReceiveChannel[bytes]]:
        if self._closed:
            raise ConnectionLostError("the link was closed", peer=self.peer.text)
        if self._framed is not None and self._replies is not None:
            return self._framed, self._replies
        channel = await self._dial(self.peer)
        self.dials += 1
        framed = FramedStream(channel, peer=self.peer.text, limits=self._limits)
        try:
            await framed.send_frame(encode_message(Link(self.run_id)))
        except BaseException:
            await trio.aclose_forcefully(channel)
            raise
        send, receive = trio.open_memory_channel[bytes](REPLY_QUEUE)
        self._framed, self._replies = framed, receive
        self._nursery.start_soon(self._read, framed, send)
        return framed, receive

    async def _read(self, framed: FramedStream, send: trio.MemorySendChannel[bytes]) -> None:
        """Own the receiving side: replies to the sender, messages to ``on_message``."""
        async with send:
            while True:
                try:
                    frame = await framed.receive_frame_or_eof()
                except (RemoteProtocolError, trio.ClosedResourceError) as exc:
                    if isinstance(exc, RemoteProtocolError) and not isinstance(
                        exc, PeerTimeoutError
                    ):
                        log.info("link to %s ended: %s", self.peer, exc)
                    break
                if frame is None:
                    break
                try:
                    message = classify(frame, self._limits)
                except RemoteProtocolError as exc:
                    log.warning("%s sent a malformed message on the link: %s", self.peer, exc)
                    break
                if message is None:
                    try:
                        send.send_nowait(frame)
                    except trio.WouldBlock:
                        log.warning("%s sent replies nobody asked for; closing the link", self.peer)
                        break
                else:
                    self._on_message(self.peer, message)
        await self._drop(framed)

    async def _drop(self, framed: FramedStream) -> None:
        """Close ``framed`` and forget it if it is still the link's connection."""
        if self._framed is framed:
            self._framed, self._replies = None, None
        await trio.aclose_forcefully(framed.stream)

    async def aclose(self) -> None:
        self._closed = True
        if self._framed is not None:
            await self._drop(self._framed)


async def _next_reply(replies: trio.MemoryReceiveChannel[bytes], peer: str) -> bytes:
    try:
        return await replies.receive()
    except (trio.EndOfChannel, trio.ClosedResourceError):
        raise ConnectionLostError("the link closed before the reply", peer=peer) from None


async def serve_link(
    framed: FramedStream,
    remote: PeerId,
    *,
    me: PeerId,
    run_id: bytes,
    admit: AdmitHeader,
    decide: DecideBlob,
    on_message: OnMessage,
    limits: Limits,
    hash_in_thread: bool | None = None,
    taken: Callable[[], None] | None = None,
) -> None:
    """Take blobs from ``remote`` over a connection that opened with ``link`` until it ends.

    Each blob header goes to ``admit`` and each whole blob to ``decide`` (see
    :func:`~fedup.net.blobs.receive_blob`); messages (``passed``) go to
    ``on_message``; ``taken()`` is called once a blob's ACK went out (custody
    changed hands).  A refused or failed blob ends the connection (the sender
    dials again).  Returns when the connection ends; raises nothing but
    cancellation.
    """
    while True:
        try:
            frame = await framed.receive_frame_or_eof()
        except RemoteProtocolError as exc:
            if not isinstance(exc, PeerTimeoutError):
                log.info("link from %s ended: %s", remote, exc)
            return
        if frame is None:
            return
        try:
            message = classify(frame, limits)
        except RemoteProtocolError as exc:
            log.warning("%s sent a malformed message on the link: %s", remote, exc.reason)
            return
        if message is not None:
            on_message(remote, message)
            continue
        try:
            await receive_blob(
                framed,
                me=me,
                remote=remote,
                run_id=run_id,
                limits=limits,
                header_frame=frame,
                admit=admit,
                decide=decide,
                hash_in_thread=hash_in_thread,
            )
        except RemoteProtocolError as exc:
            code = getattr(exc, "code", None)
            if code is not None and not isinstance(exc, ConnectionLostError):
                log.warning("refused a blob from %s (%s): %s", remote, code.value, exc.reason)
            else:
                log.info("a blob from %s was not taken: %s", remote, exc.reason)
            return  # the sender closes too, and dials again for its next blob
        if taken is not None:
            taken()
