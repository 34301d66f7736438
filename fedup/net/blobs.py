"""Sending and receiving model blobs over a :class:`~fedup.net.framed.FramedStream`.

The rules live in :mod:`fedup.protocol.blob` (and ``docs/protocol-blob.md``):
its two pure machines decide, this module moves the frames, keeps time, owns
the receive buffer and runs the hashing (:mod:`fedup.net.blob_buffers`):

* :func:`send_blob` drives a :class:`~fedup.protocol.blob.BlobSender`: sends
  its signed header, feeds it the ACCEPT, sends the chunks it hands out
  (slices of the caller's buffer) while a worker thread hashes them, sends the
  END it signs over that digest, and returns once the receiver acknowledged
  custody.
* :func:`receive_blob` checks the header, answers ACCEPT or a NACK with the
  error's :class:`~fedup.protocol.refusal.RefusalCode`, feeds the chunks to a
  :class:`~fedup.protocol.blob.BlobReceiver` whose sink reassembles them while
  a worker thread hashes them, has it check the END against that digest,
  records the blob in the replay guard, and answers ACK.

Blobs under :data:`THREAD_HASH_MIN` are hashed inline.  Both functions run
under ``Limits.blob_timeout`` as a whole (from the header to the ACK), on top
of the per-frame deadlines of the :class:`FramedStream`, so a peer that
trickles chunks is cut off.  Every failure is a
:class:`~fedup.errors.RemoteProtocolError` subclass naming the peer.

After an error the stream is in a known state only when the header was
refused (both sides are then between blobs); in every other case close it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import attrs
import trio

from fedup.config import Limits
from fedup.errors import (
    ConnectionLostError,
    LocalProtocolError,
    PeerTimeoutError,
    RemoteProtocolError,
    SilentPeerError,
)
from fedup.net.blob_buffers import BlobHasher, ReceiveSink
from fedup.net.framed import FramedStream
from fedup.net.groups import collapse_single_exception
from fedup.protocol.blob import (
    BlobError,
    BlobHeader,
    BlobKind,
    BlobReceiver,
    BlobRefusedError,
    BlobReplayGuard,
    BlobReply,
    BlobSender,
    Buffer,
    blob_header_id,
    refusal_code,
    verify_blob_header,
)
from fedup.protocol.envelope import Signer
from fedup.protocol.peer_id import PeerId
from fedup.protocol.refusal import RefusalCode

__all__ = ["THREAD_HASH_MIN", "ReceivedBlob", "SentBlob", "receive_blob", "send_blob"]

THREAD_HASH_MIN = 2 * 1024 * 1024
"""Blobs of at least this size are hashed in a worker thread, concurrently with the I/O."""
HASH_QUEUE = 4
"""Chunks that may wait for the hashing thread before the I/O waits for it."""

CheckBlob = Callable[[BlobHeader, memoryview], None]
DecideBlob = Callable[[BlobHeader, memoryview, bytes], "bytes | None"]
"""``decide(header, data, digest)``: take the blob (return the custody receipt for the
ACK, or None) or refuse it (raise a RemoteProtocolError with ``code``, maybe ``proof``)."""
AdmitHeader = Callable[[BlobHeader], None]
"""``admit(header)``: raise a coded RemoteProtocolError to refuse a blob before its bytes."""
Replies = Callable[[], Awaitable[bytes]]
"""Where a sender reads the receiver's replies (default: the next frame of its stream)."""


@attrs.frozen
class SentBlob:
    """A blob the receiver took."""

    digest: bytes
    receipt: bytes | None
    """The custody receipt its ACK carried (unchecked: the caller knows what to expect)."""


@attrs.frozen
class ReceivedBlob:
    """A blob whose header, end and digest were verified."""

    header: BlobHeader
    """The verified header (who sent it, for which run, lap, hop and epoch)."""
    data: memoryview
    """The blob's bytes, writable (the tensor codec can view them without copying)."""
    digest: bytes
    """BLAKE2b-256 of ``data``, as signed by the sender."""
    acknowledged: bool = True
    """False if the ACK could not be delivered (the sender may believe we did not take it)."""


async def send_blob(
    stream: FramedStream,
    identity: Signer,
    *,
    run_id: bytes,
    kind: BlobKind,
    lap: int,
    hop: int,
    epoch: int,
    recipient: PeerId,
    data: Buffer,
    limits: Limits | None = None,
    hash_in_thread: bool | None = None,
    replies: Replies | None = None,
) -> SentBlob:
    """Send ``data`` as one blob to ``recipient``; return its digest (and the receipt the
    ACK carried) once it took custody.

    ``replies`` reads the receiver's next reply where a reader task owns the
    stream's receiving side (a neighbour link); by default the stream's next frame.

    ``data`` is sent as slices (no copy of the whole blob) and hashed while
    it is sent: do not modify it until this returns.  ``limits`` defaults to
    the stream's.  ``hash_in_thread`` forces hashing in a worker thread (True)
    or inline (False); by default blobs of :data:`THREAD_HASH_MIN` bytes or
    more use a thread.  Tests on trio's virtual clock with ``autojump`` should
    pass False: virtual time does not wait for threads.

    Raises:
        LocalProtocolError: ``data`` exceeds ``max_blob_size``, a chunk does
            not fit the stream's frame size, or a header field is invalid.
        BlobRefusedError: the receiver answered NACK; ``code`` is its
            :class:`~fedup.protocol.refusal.RefusalCode`, ``reason`` quotes it.
        BlobReplyError: the receiver answered something that is not a reply
            to this blob.
        PeerTimeoutError: the whole exchange took longer than ``blob_timeout``
            (or one frame longer than the stream's deadlines).
        ConnectionLostError, FrameError: the connection broke or was garbled.
    """
    limits = stream.limits if limits is None else limits
    view = memoryview(data)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    if limits.blob_chunk_size + 1 > stream.max_frame_size:
        raise LocalProtocolError(
            f"blob_chunk_size={limits.blob_chunk_size} does not fit a frame of "
            f"{stream.max_frame_size} bytes"
        )
    header = BlobHeader(
        run_id=run_id,
        kind=kind,
        lap=lap,
        hop=hop,
        epoch=epoch,
        sender=identity.peer_id,
        recipient=recipient,
        size=view.nbytes,
        chunk_size=limits.blob_chunk_size,
    )
    sender = BlobSender(identity, header, view, limits=limits)
    hasher = BlobHasher()

    async def send_chunks(hashed: Callable[[], Awaitable[None]]) -> None:
        while sender.state == "CHUNKS":
            kind_byte, piece = sender.next_chunk()
            hasher.queue(piece)
            await hashed()
            await stream.send_frame(b"".join((kind_byte, piece)))

    next_reply: Replies = replies if replies is not None else stream.receive_frame
    try:
        with trio.fail_after(limits.blob_timeout):
            await stream.send_frame(sender.header_frame)
            # The receiver answers a header at once (it looks only at the header): on a
            # link that went down, TCP would retransmit for minutes; silence means dead.
            quick = min(limits.reply_timeout, limits.hop_timeout / 4)
            with trio.move_on_after(quick) as waited:
                await _take_reply(stream, sender, next_reply)
            if waited.cancelled_caught:
                raise SilentPeerError(
                    f"did not answer the {header.label}'s header within {quick:g} s",
                    peer=stream.peer,
                )
            try:
                await _with_hashing(hasher, _threaded(hash_in_thread, header), send_chunks)
            except ConnectionLostError as lost:
                await _raise_nack_if_any(stream, sender, lost, next_reply)
                raise
            digest = hasher.digest()
            await stream.send_frame(sender.end_frame(digest))
            await _take_reply(stream, sender, next_reply)
    except trio.TooSlowError:
        raise PeerTimeoutError(
            f"did not take the {header.label} within {limits.blob_timeout:g} s",
            peer=stream.peer,
        ) from None
    return SentBlob(digest, sender.receipt)


async def _take_reply(stream: FramedStream, sender: BlobSender, replies: Replies) -> None:
    """Feed the next reply to ``sender``; its errors name the peer."""
    frame = await replies()
    try:
        sender.receive_reply(frame)
    except BlobError as exc:
        raise exc.with_peer(stream.peer) from None


async def _raise_nack_if_any(
    stream: FramedStream, sender: BlobSender, lost: ConnectionLostError, replies: Replies
) -> None:
    """After a failed send, read a NACK the receiver may have left; raise it if found."""
    with trio.move_on_after(stream.limits.blob_nack_timeout):
        try:
            frame = await replies()
            sender.receive_reply(frame)
        except BlobRefusedError as exc:
            raise exc.with_peer(stream.peer) from lost
        except RemoteProtocolError:
            return


async def receive_blob(
    stream: FramedStream,
    *,
    me: PeerId,
    remote: PeerId,
    run_id: bytes,
    guard: BlobReplayGuard | None = None,
    limits: Limits | None = None,
    max_size: int | None = None,
    min_epoch: int = 0,
    header_frame: bytes | None = None,
    check: CheckBlob | None = None,
    hash_in_thread: bool | None = None,
    admit: AdmitHeader | None = None,
    decide: DecideBlob | None = None,
) -> ReceivedBlob:
    """Receive one blob from ``remote`` (the channel's authenticated peer).

    ``header_frame`` is the header if the caller already read it (e.g. a
    dispatcher that looked at the frame); otherwise the next frame is read.
    ``check(header, data)`` runs after the digest was verified and before
    custody is acknowledged (e.g. decode the tensors against the expected
    model); a :class:`~fedup.errors.RemoteProtocolError` it raises is sent to
    the sender as the NACK's reason, with the error's ``code`` attribute as the
    NACK's code if it has one (a :class:`~fedup.protocol.refusal.RefusalCode`),
    else ``MALFORMED``.  ``limits`` defaults to the stream's; ``hash_in_thread``
    as for :func:`send_blob`.  Ring custody (the custody machine) refuses a
    header early with ``admit(header)`` and decides about the whole blob with
    ``decide(header, data, digest)``, which returns the custody receipt the ACK
    carries; an error it raises may carry a ``proof`` (sent with the NACK).

    Raises (all naming the peer; the peer got a NACK with the error's code and
    reason where the connection still allowed it; ``TIMEOUT`` for a deadline):

    * a :class:`~fedup.protocol.blob.BlobError` subclass for each header
      check of :func:`~fedup.protocol.blob.verify_blob_header` (the stream
      stays usable: both sides are between blobs), for bad chunk frames
      (:class:`~fedup.protocol.blob.BlobDataError`), a bad END, a digest
      mismatch (:class:`~fedup.protocol.blob.BlobDigestError`), or an end of
      stream before the END (:class:`~fedup.protocol.blob.BlobTruncatedError`);
    * :class:`~fedup.errors.PeerTimeoutError` if the blob is not complete
      within ``blob_timeout`` of its header (or a frame misses its deadline);
    * whatever ``check`` raised;
    * :class:`~fedup.errors.ConnectionLostError`, ``FrameError`` for a broken
      or garbled connection.
    """
    limits = stream.limits if limits is None else limits
    if header_frame is None:
        header_frame = await stream.receive_frame()
    try:
        header = verify_blob_header(
            header_frame,
            me=me,
            remote=remote,
            run_id=run_id,
            limits=limits,
            max_size=max_size,
            min_epoch=min_epoch,
            guard=guard,
        )
        if admit is not None:
            admit(header)
    except RemoteProtocolError as exc:
        await _refuse(stream, refusal_code(exc), exc.reason, getattr(exc, "proof", ()))
        if exc.peer is None:
            raise exc.with_peer(stream.peer) from exc.__cause__
        raise
    sink = ReceiveSink(header.size)
    receiver = BlobReceiver(header, header_frame, sink)

    async def receive_chunks(hashed: Callable[[], Awaitable[None]]) -> None:
        while not receiver.done:
            frame = await stream.receive_frame_or_eof()
            if frame is None:
                receiver.eof()
            else:
                receiver.feed_chunk(frame)
                await hashed()

    try:
        with trio.fail_after(limits.blob_timeout):
            await stream.send_frame(BlobReply.accept(blob_header_id(header_frame)).to_cbor())
            await _with_hashing(sink.hasher, _threaded(hash_in_thread, header), receive_chunks)
            end_frame = await stream.receive_frame_or_eof()
            if end_frame is None:
                receiver.eof()
            receiver.finish(end_frame or b"", sink.hasher.digest(), limits=limits)
            data = sink.buffer.take()
            if check is not None:
                check(header, data)
            assert receiver.digest is not None
            receipt = decide(header, data, receiver.digest) if decide is not None else None
            if guard is not None:
                guard.commit(header)
    except trio.TooSlowError:
        sink.clear()
        reason = (
            f"did not deliver the {header.label} within {limits.blob_timeout:g} s "
            f"(got {receiver.received} bytes)"
        )
        await _refuse(stream, RefusalCode.TIMEOUT, f"blob deadline passed: {reason}")
        raise PeerTimeoutError(reason, peer=stream.peer) from None
    except RemoteProtocolError as exc:
        sink.clear()
        if not isinstance(exc, ConnectionLostError):
            code = RefusalCode.TIMEOUT if isinstance(exc, PeerTimeoutError) else refusal_code(exc)
            await _refuse(stream, code, exc.reason, getattr(exc, "proof", ()))
        if exc.peer is None:
            raise exc.with_peer(stream.peer) from exc.__cause__
        raise
    except BaseException:
        sink.clear()
        raise
    assert receiver.digest is not None
    acknowledged = True
    try:
        with trio.fail_after(limits.frame_timeout):
            await stream.send_frame(BlobReply.ack(receiver.digest, receipt).to_cbor())
    except (RemoteProtocolError, trio.TooSlowError):
        acknowledged = False
    return ReceivedBlob(header, data, receiver.digest, acknowledged)


def _threaded(hash_in_thread: bool | None, header: BlobHeader) -> bool:
    return header.size >= THREAD_HASH_MIN if hash_in_thread is None else hash_in_thread


async def _with_hashing(
    hasher: BlobHasher,
    threaded: bool,
    body: Callable[[Callable[[], Awaitable[None]]], Awaitable[None]],
) -> None:
    """Run ``body(hashed)``; each ``await hashed()`` hands the queued pieces to the hasher.

    Inline, or (``threaded``) in a worker thread so that hashing piece k
    overlaps the sending (encrypting) or receiving (decrypting) of piece
    k + 1; at most :data:`HASH_QUEUE` hand-offs wait before ``hashed()``
    blocks.  Exceptions from ``body`` propagate as they are (not wrapped in
    an exception group); cancellation waits for the piece being hashed.
    """
    if not threaded:

        async def inline() -> None:
            hasher.hash_pending()

        await body(inline)
        return
    send_token, receive_token = trio.open_memory_channel[None](HASH_QUEUE)
    with collapse_single_exception():  # body's error cancels the worker and goes on unwrapped
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_hash_worker, hasher, receive_token)
            async with send_token:
                await body(lambda: send_token.send(None))


async def _hash_worker(hasher: BlobHasher, tokens: trio.MemoryReceiveChannel[None]) -> None:
    async with tokens:
        async for _ in tokens:
            while True:  # one thread hop hashes everything queued so far
                try:
                    tokens.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            await trio.to_thread.run_sync(hasher.hash_pending)


async def _refuse(
    stream: FramedStream, code: RefusalCode, reason: str, proof: tuple[bytes, ...] = ()
) -> None:
    """Best effort: tell the sender why its blob is refused (never raises)."""
    with trio.move_on_after(stream.limits.blob_nack_timeout):
        try:
            await stream.send_frame(BlobReply.nack(code, reason, proof).to_cbor())
        except RemoteProtocolError:
            pass
