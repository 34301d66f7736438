"""The authenticated key exchange that opens every FedUp connection (pure, no I/O).

Three messages, SIGMA-I / Noise-XX shaped (``docs/protocol-handshake.md`` is
the full specification, with byte layouts and a test vector)::

    msg1  I -> R   {"v": 1, "net": tstr, "netkey": bstr16 / null, "e": bstr32}
    msg2  R -> I   {"e": bstr32, "box": AEAD(k_r, h1, {"id", "sig", "rec"})}
    msg3  I -> R   {"box": AEAD(k_i, h2, {"id", "sig", "rec"})}
    or, instead of any of them:  {"abort": code, "why": tstr}

Both sides contribute a fresh X25519 key (``e``), so the session keys are new
on every connection (forward secrecy).  Each side proves its Ed25519 identity
by signing the transcript hash under its own domain, inside a box that only
the holder of the other ephemeral key (and the network key) can open, so an
observer learns neither identity and nobody can relay or splice a handshake.

The classes follow h11: bytes in, bytes out, no sockets, no clocks.  The
initiator calls :meth:`InitiatorHandshake.start` (msg1) and
:meth:`InitiatorHandshake.receive_msg2` (returns msg3); the responder calls
:meth:`ResponderHandshake.receive_msg1` (returns msg2) and
:meth:`ResponderHandshake.receive_msg3` (returns the result).  Every problem
with the peer's bytes raises :class:`HandshakeError`, whose ``code`` says what
went wrong and whose ``abort`` holds the message to send to the peer before
closing (None when the peer aborted first).  A state machine that raised once
is finished: later calls raise :class:`~fedup.errors.LocalProtocolError`.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
import secrets

import attrs
import nacl.bindings as sodium
import nacl.exceptions
import nacl.signing

from fedup.config import DEFAULT_LIMITS, Limits
from fedup.errors import LocalProtocolError, RemoteProtocolError
from fedup.protocol import cbor
from fedup.protocol.envelope import SIGNATURE_SIZE, Signer, signed_bytes, uvarint
from fedup.protocol.peer_id import PUBLIC_KEY_SIZE, PeerId
from fedup.protocol.records import (
    NETWORK_KEY_ID_SIZE,
    SignedPeerRecord,
    network_key_id,
    verify_peer_record,
)
from fedup.protocol.schema import FieldReader

__all__ = [
    "PROTOCOL_NAME",
    "VERSION",
    "AbortCode",
    "HandshakeError",
    "HandshakeResult",
    "InitiatorHandshake",
    "ResponderHandshake",
    "Signer",
    "decode_abort",
    "encode_abort",
]

PROTOCOL_NAME = b"fedup-handshake-v1"
"""First item absorbed into every transcript; changes with any incompatible revision."""
VERSION = 1
KEY_SIZE = 32
HASH_SIZE = 32
RESPONDER_DOMAIN = "fedup-handshake-responder"
INITIATOR_DOMAIN = "fedup-handshake-initiator"
SIGNED_TYPE = "fedup/handshake/1"
KDF_PERSON = b"fedup-hs-v1-kdf"
LABEL_RESPONDER_BOX = b"responder-box"
LABEL_INITIATOR_BOX = b"initiator-box"
LABEL_INITIATOR_TO_RESPONDER = b"initiator-to-responder"
LABEL_RESPONDER_TO_INITIATOR = b"responder-to-initiator"
MAX_ABORT_CODE = 32
MAX_ABORT_WHY = 256
_BOX_OVERHEAD = sodium.crypto_aead_xchacha20poly1305_ietf_ABYTES  # 16
_ZERO_NONCE = bytes(sodium.crypto_aead_xchacha20poly1305_ietf_NPUBBYTES)  # 24 zero bytes
_CODE_RE = re.compile(r"[a-z0-9-]+")


class AbortCode(enum.StrEnum):
    """Reasons a side gives in an abort message; they make errors readable, not safe."""

    VERSION = "version"
    WRONG_NETWORK = "wrong-network"
    WRONG_NETWORK_KEY = "wrong-network-key"
    BUSY = "busy"
    WRONG_PEER = "wrong-peer"
    SELF_DIAL = "self-dial"
    AUTH = "auth"
    BAD_RECORD = "bad-record"
    PROTOCOL = "protocol"


_DESCRIPTIONS: dict[str, str] = {
    AbortCode.VERSION: "unsupported handshake version",
    AbortCode.WRONG_NETWORK: "wrong network",
    AbortCode.WRONG_NETWORK_KEY: "wrong network key",
    AbortCode.BUSY: "the peer is busy",
    AbortCode.WRONG_PEER: "the dialer expected another peer",
    AbortCode.SELF_DIAL: "a peer dialed itself",
    AbortCode.AUTH: "authentication failed",
    AbortCode.BAD_RECORD: "invalid peer record",
    AbortCode.PROTOCOL: "handshake protocol violation",
}


class HandshakeError(RemoteProtocolError):
    """The handshake failed; ``code`` is an :class:`AbortCode` value (or a peer's own code).

    ``abort`` is the abort message to send to the peer before closing, or
    None when there is nothing to send (the peer aborted first).
    """

    def __init__(
        self, reason: str, *, code: str, abort: bytes | None = None, peer: str | None = None
    ) -> None:
        super().__init__(reason, peer=peer)
        self.code = code
        self.abort = abort

    def with_peer(self, peer: str) -> HandshakeError:
        err = HandshakeError(self.reason, code=self.code, abort=self.abort, peer=peer)
        err.__cause__ = self.__cause__
        return err


def _fail(code: AbortCode, reason: str, *, why: str | None = None) -> HandshakeError:
    """An error detected locally: the peer gets an abort with ``why`` (default: reason)."""
    return HandshakeError(reason, code=code, abort=encode_abort(code, why or reason))


def encode_abort(code: str, why: str) -> bytes:
    """The abort message ``{"abort": code, "why": why}`` (``why`` cut to 256 bytes)."""
    if not _CODE_RE.fullmatch(code) or len(code) > MAX_ABORT_CODE:
        raise LocalProtocolError(f"invalid abort code {code!r}")
    text = why.encode("utf-8")[:MAX_ABORT_WHY].decode("utf-8", "ignore")
    return cbor.encode({"abort": code, "why": text})


def decode_abort(data: bytes, *, limits: Limits = DEFAULT_LIMITS) -> HandshakeError | None:
    """Return the error a well-formed abort message reports, or None if ``data`` is not one."""
    try:
        value = cbor.decode(data, max_size=limits.max_message_size, max_depth=1)
        if not isinstance(value, dict) or "abort" not in value:
            return None
        return _peer_aborted(value)
    except RemoteProtocolError:
        return None


def _peer_aborted(value: dict[object, object]) -> HandshakeError:
    fields = FieldReader(value, "abort")
    code = fields.text("abort", max_bytes=MAX_ABORT_CODE)
    why = fields.text("why", max_bytes=MAX_ABORT_WHY, allow_empty=True)
    fields.done()
    if not _CODE_RE.fullmatch(code):
        raise fields.fail("abort", "must be lowercase letters, digits and '-'")
    described = _DESCRIPTIONS.get(code, f"aborted ({code})")
    return HandshakeError(f"{described} (the peer aborted the handshake: {why!r})", code=code)


@attrs.frozen
class HandshakeResult:
    """What a completed handshake established."""

    remote_peer: PeerId
    """The authenticated peer: derived from the key whose signature verified."""
    remote_record: SignedPeerRecord | None
    """The peer's verified signed record, if it sent one (its addresses, its ``seq``)."""
    send_key: bytes = attrs.field(repr=False)
    """32-byte key for what we send (the secretstream key of our direction)."""
    receive_key: bytes = attrs.field(repr=False)
    """32-byte key for what we receive."""
    transcript_hash: bytes
    """h3, the hash of the whole handshake; equal on both sides (channel binding)."""


def kdf(psk: bytes, ee: bytes, transcript: bytes, label: bytes) -> bytes:
    """``BLAKE2b-256(key=psk, person="fedup-hs-v1-kdf", data=ee || transcript || label)``."""
    return hashlib.blake2b(
        ee + transcript + label, digest_size=KEY_SIZE, key=psk, person=KDF_PERSON
    ).digest()


class _Transcript:
    """Running BLAKE2b-256 over length-prefixed items, starting with the protocol name."""

    def __init__(self) -> None:
        self._hash = hashlib.blake2b(digest_size=HASH_SIZE)
        self.absorb(PROTOCOL_NAME)

    def absorb(self, item: bytes) -> bytes:
        """Add ``uvarint(len(item)) || item`` and return the hash so far."""
        self._hash.update(uvarint(len(item)))
        self._hash.update(item)
        return self._hash.copy().digest()


def _dh(private: bytes, public: bytes) -> bytes:
    try:
        shared = sodium.crypto_scalarmult(private, public)
    except nacl.exceptions.CryptoError:  # libsodium refuses an all-zero result
        shared = bytes(KEY_SIZE)
    if hmac.compare_digest(shared, bytes(KEY_SIZE)):
        raise _fail(AbortCode.PROTOCOL, "ephemeral key is a low-order point")
    return shared


def _seal(key: bytes, transcript: bytes, plaintext: bytes) -> bytes:
    # Each box key is derived for exactly one message, so a fixed nonce is safe.
    return sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(
        plaintext, transcript, _ZERO_NONCE, key
    )


def _open(key: bytes, transcript: bytes, box: bytes) -> bytes | None:
    if len(box) < _BOX_OVERHEAD:
        return None
    try:
        return sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(box, transcript, _ZERO_NONCE, key)
    except nacl.exceptions.CryptoError:
        return None


def _nullable_bytes(
    fields: FieldReader, key: str, *, size: int | None = None, max_size: int | None = None
) -> bytes | None:
    """A field that must be present, as a byte string or null."""
    if not fields.has(key):
        raise fields.fail(key, "is missing (use null for none)")
    if fields.optional(key):
        return fields.bytestr(key, size=size, max_size=max_size)
    return None


PeerRecordPair = tuple[PeerId, SignedPeerRecord | None]


class _Side:
    """What both roles share: our identity, the network, limits, the transcript."""

    _role = ""

    def __init__(
        self,
        identity: Signer,
        *,
        network: str,
        network_key: bytes | None,
        local_record: SignedPeerRecord | None,
        limits: Limits,
        ephemeral_key: bytes | None,
    ) -> None:
        if not network or len(network.encode("utf-8")) > limits.max_network_name:
            raise LocalProtocolError(f"network name must be 1..{limits.max_network_name} bytes")
        if network_key is not None and len(network_key) != KEY_SIZE:
            raise LocalProtocolError("a network key has 32 bytes")
        netkey_id = None if network_key is None else network_key_id(network_key)
        if local_record is not None and (
            local_record.peer_id != identity.peer_id
            or local_record.record.network != network
            or local_record.record.network_key_id != netkey_id
        ):
            raise LocalProtocolError("local_record must be this identity's record for this network")
        if ephemeral_key is not None and len(ephemeral_key) != KEY_SIZE:
            raise LocalProtocolError("an X25519 private key has 32 bytes")
        self.identity = identity
        self.network = network
        self.limits = limits
        self._psk = network_key if network_key is not None else bytes(KEY_SIZE)
        self._netkey_id = netkey_id
        self._local_record = local_record
        self._e_priv = ephemeral_key if ephemeral_key is not None else secrets.token_bytes(KEY_SIZE)
        self._e_pub = sodium.crypto_scalarmult_base(self._e_priv)
        self._transcript = _Transcript()
        self._state = "start"
        self._result: HandshakeResult | None = None

    def _expect(self, state: str, call: str) -> None:
        if self._state != state:
            raise LocalProtocolError(f"{self._role}: {call} called in state {self._state!r}")

    def _guard(self, what: str, exc: RemoteProtocolError) -> HandshakeError:
        """Turn any error about the peer's bytes into a HandshakeError; finish the machine."""
        self._state = "failed"
        if isinstance(exc, HandshakeError):
            return exc
        return _fail(AbortCode.PROTOCOL, f"malformed {what}: {exc.reason}")

    def _fields(self, data: bytes, what: str) -> FieldReader:
        value = cbor.decode(data, max_size=self.limits.max_message_size, max_depth=1)
        if isinstance(value, dict) and "abort" in value:
            raise _peer_aborted(value)
        return FieldReader(value, what)

    def _identity_box(self, domain: str, transcript: bytes) -> bytes:
        signature = self.identity.sign(
            signed_bytes(domain.encode(), SIGNED_TYPE.encode(), transcript)
        )
        record = None if self._local_record is None else self._local_record.envelope
        return cbor.encode({"id": self.identity.public_key, "sig": signature, "rec": record})

    def _open_identity(
        self, key: bytes, transcript: bytes, box: bytes, what: str, domain: str
    ) -> tuple[PeerId, SignedPeerRecord | None]:
        plain = _open(key, transcript, box)
        if plain is None:
            raise _fail(
                AbortCode.WRONG_NETWORK_KEY,
                f"wrong network key: cannot open the box of {what} (the network keys differ, "
                "or the message was tampered with or replayed)",
                why="cannot open your box: the network keys differ",
            )
        fields = FieldReader(
            cbor.decode(plain, max_size=self.limits.max_message_size, max_depth=1), f"{what} box"
        )
        public_key = fields.bytestr("id", size=PUBLIC_KEY_SIZE)
        signature = fields.bytestr("sig", size=SIGNATURE_SIZE)
        envelope = _nullable_bytes(fields, "rec", max_size=self.limits.max_record_size)
        fields.done()
        try:
            nacl.signing.VerifyKey(public_key).verify(
                signed_bytes(domain.encode(), SIGNED_TYPE.encode(), transcript), signature
            )
        except nacl.exceptions.CryptoError:
            raise _fail(AbortCode.AUTH, f"bad identity signature in {what}") from None
        peer = PeerId.from_public_key(public_key)
        if envelope is None:
            return peer, None
        try:
            record = verify_peer_record(envelope, limits=self.limits)
        except RemoteProtocolError as exc:
            raise _fail(AbortCode.BAD_RECORD, f"peer record in {what}: {exc.reason}") from None
        if record.peer_id != peer:
            raise _fail(AbortCode.BAD_RECORD, f"peer record in {what} is of another peer")
        if record.record.network != self.network or record.record.network_key_id != self._netkey_id:
            raise _fail(AbortCode.BAD_RECORD, f"peer record in {what} is for another network")
        return peer, record

    def _finish(self, remote: PeerRecordPair, ee: bytes, h3: bytes, *, initiator: bool) -> None:
        i2r = kdf(self._psk, ee, h3, LABEL_INITIATOR_TO_RESPONDER)
        r2i = kdf(self._psk, ee, h3, LABEL_RESPONDER_TO_INITIATOR)
        send, receive = (i2r, r2i) if initiator else (r2i, i2r)
        self._result = HandshakeResult(remote[0], remote[1], send, receive, h3)
        self._e_priv = b""  # forget the ephemeral secret
        self._state = "done"

    @property
    def result(self) -> HandshakeResult:
        """The outcome; raises :class:`~fedup.errors.LocalProtocolError` before completion."""
        if self._result is None:
            raise LocalProtocolError(f"{self._role}: handshake not complete ({self._state})")
        return self._result


class InitiatorHandshake(_Side):
    """The dialing side.  ``expected_peer`` is the peer we mean to reach, if known.

    ``ephemeral_key`` fixes the X25519 private key, for test vectors only.
    Raises :class:`~fedup.errors.LocalProtocolError` for a bad network name or
    key, or a ``local_record`` that is not this identity's for this network.
    """

    _role = "initiator"

    def __init__(
        self,
        identity: Signer,
        *,
        network: str,
        network_key: bytes | None = None,
        expected_peer: PeerId | None = None,
        local_record: SignedPeerRecord | None = None,
        limits: Limits = DEFAULT_LIMITS,
        ephemeral_key: bytes | None = None,
    ) -> None:
        super().__init__(
            identity,
            network=network,
            network_key=network_key,
            local_record=local_record,
            limits=limits,
            ephemeral_key=ephemeral_key,
        )
        self.expected_peer = expected_peer

    def start(self) -> bytes:
        """Return msg1 (plaintext: version, network, key fingerprint, ephemeral key)."""
        self._expect("start", "start()")
        msg1 = cbor.encode(
            {"v": VERSION, "net": self.network, "netkey": self._netkey_id, "e": self._e_pub}
        )
        self._transcript.absorb(msg1)
        self._state = "sent-msg1"
        return msg1

    def receive_msg2(self, data: bytes) -> bytes:
        """Check msg2 and return msg3; :attr:`result` is then available.

        Raises :class:`HandshakeError` with code ``wrong-network-key`` if the
        box does not open, ``auth`` for a bad signature, ``bad-record`` for a
        bad record, ``self-dial`` if we reached ourselves, ``wrong-peer`` if
        the authenticated peer is not ``expected_peer``, the peer's code if it
        aborted, and ``protocol`` for anything malformed.
        """
        self._expect("sent-msg1", "receive_msg2()")
        try:
            return self._receive_msg2(bytes(data))
        except RemoteProtocolError as exc:
            raise self._guard("msg2", exc) from exc

    def _receive_msg2(self, data: bytes) -> bytes:
        fields = self._fields(data, "msg2")
        e_remote = fields.bytestr("e", size=KEY_SIZE)
        box = fields.bytestr("box", max_size=self.limits.max_message_size)
        fields.done()
        ee = _dh(self._e_priv, e_remote)
        h1 = self._transcript.absorb(e_remote)
        k_r = kdf(self._psk, ee, h1, LABEL_RESPONDER_BOX)
        remote = self._open_identity(k_r, h1, box, "msg2", RESPONDER_DOMAIN)
        if remote[0] == self.identity.peer_id:
            raise _fail(AbortCode.SELF_DIAL, "dialed ourselves: the responder is this peer")
        if self.expected_peer is not None and remote[0] != self.expected_peer:
            raise _fail(
                AbortCode.WRONG_PEER,
                f"wrong peer: expected {self.expected_peer}, but {remote[0]} answered",
                why=f"expected {self.expected_peer}",
            )
        h2 = self._transcript.absorb(data)
        k_i = kdf(self._psk, ee, h2, LABEL_INITIATOR_BOX)
        msg3 = cbor.encode({"box": _seal(k_i, h2, self._identity_box(INITIATOR_DOMAIN, h2))})
        h3 = self._transcript.absorb(msg3)
        self._finish(remote, ee, h3, initiator=True)
        return msg3


class ResponderHandshake(_Side):
    """The accepting side.  Arguments as for :class:`InitiatorHandshake`, without a peer."""

    _role = "responder"

    def __init__(
        self,
        identity: Signer,
        *,
        network: str,
        network_key: bytes | None = None,
        local_record: SignedPeerRecord | None = None,
        limits: Limits = DEFAULT_LIMITS,
        ephemeral_key: bytes | None = None,
    ) -> None:
        super().__init__(
            identity,
            network=network,
            network_key=network_key,
            local_record=local_record,
            limits=limits,
            ephemeral_key=ephemeral_key,
        )
        self._ee = b""
        self._h2 = b""

    def receive_msg1(self, data: bytes) -> bytes:
        """Check msg1 and return msg2.

        Raises :class:`HandshakeError` with code ``version``,
        ``wrong-network``, ``wrong-network-key`` (fingerprints differ),
        ``protocol`` (malformed, low-order key), or the peer's code.
        """
        self._expect("start", "receive_msg1()")
        try:
            return self._receive_msg1(bytes(data))
        except RemoteProtocolError as exc:
            raise self._guard("msg1", exc) from exc

    def _receive_msg1(self, data: bytes) -> bytes:
        fields = self._fields(data, "msg1")
        version = fields.uint("v")
        if version != VERSION:
            raise _fail(
                AbortCode.VERSION,
                f"unsupported handshake version {version} (this peer speaks {VERSION})",
                why=f"this peer speaks handshake version {VERSION}",
            )
        network = fields.text("net", max_bytes=self.limits.max_network_name)
        netkey = _nullable_bytes(fields, "netkey", size=NETWORK_KEY_ID_SIZE)
        e_remote = fields.bytestr("e", size=KEY_SIZE)
        fields.done()
        if network != self.network:
            raise _fail(
                AbortCode.WRONG_NETWORK,
                f"wrong network: the peer is in {network!r}, this peer in {self.network!r}",
                why="this peer is in another network",  # its name is not told to strangers
            )
        if netkey != self._netkey_id:
            problem = (
                "this network has a network key and the peer has none"
                if netkey is None
                else "the peer has a network key and this network has none"
                if self._netkey_id is None
                else "the network key fingerprints differ"
            )
            raise _fail(AbortCode.WRONG_NETWORK_KEY, f"wrong network key: {problem}")
        ee = _dh(self._e_priv, e_remote)
        self._transcript.absorb(data)
        h1 = self._transcript.absorb(self._e_pub)
        k_r = kdf(self._psk, ee, h1, LABEL_RESPONDER_BOX)
        msg2 = cbor.encode(
            {"e": self._e_pub, "box": _seal(k_r, h1, self._identity_box(RESPONDER_DOMAIN, h1))}
        )
        self._h2 = self._transcript.absorb(msg2)
        self._ee = ee
        self._state = "sent-msg2"
        return msg2

    def receive_msg3(self, data: bytes) -> HandshakeResult:
        """Check msg3 and return the result.

        Raises :class:`HandshakeError` with code ``wrong-network-key`` if the
        box does not open (also when the initiator aborted with that code),
        ``auth``, ``bad-record``, ``self-dial`` (the initiator is this peer),
        the peer's own code (e.g. ``wrong-peer``), or ``protocol``.
        """
        self._expect("sent-msg2", "receive_msg3()")
        try:
            return self._receive_msg3(bytes(data))
        except RemoteProtocolError as exc:
            raise self._guard("msg3", exc) from exc

    def _receive_msg3(self, data: bytes) -> HandshakeResult:
        fields = self._fields(data, "msg3")
        box = fields.bytestr("box", max_size=self.limits.max_message_size)
        fields.done()
        k_i = kdf(self._psk, self._ee, self._h2, LABEL_INITIATOR_BOX)
        remote = self._open_identity(k_i, self._h2, box, "msg3", INITIATOR_DOMAIN)
        if remote[0] == self.identity.peer_id:
            raise _fail(AbortCode.SELF_DIAL, "dialed ourselves: the initiator is this peer")
        h3 = self._transcript.absorb(data)
        self._finish(remote, self._ee, h3, initiator=False)
        self._ee = b""
        return self.result
