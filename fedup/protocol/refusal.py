"""Typed refusals: why a peer said no, as a code both sides agree on, plus words for logs.

A refusal (the ``refuse`` message of formation, a blob's NACK) carries a
:class:`RefusalCode` and a human-readable reason.  Decisions are taken on the
code, never on the words: a sender that is refused for *content* (its blob was
out of turn, malformed, beyond a bound) knows its receiver is alive and must
not count it as dead, while only :attr:`RefusalCode.EXCLUDED` tells a sender
that the others count it as dead (after the handshake's ``AbortCode``).

Every reason that crosses the wire is cut to a byte budget by :func:`cut_utf8`,
the one helper for it: it never splits a multi-byte character and marks the
cut, so a long reason in any script arrives shortened, never refused.
"""

from __future__ import annotations

import enum

__all__ = ["REASON_MAX_BYTES", "RefusalCode", "cut_utf8", "printable"]

REASON_MAX_BYTES = 512
"""Largest refusal reason on the wire, in UTF-8 bytes (after :func:`cut_utf8`)."""


class RefusalCode(enum.Enum):
    """Why a peer refused a message or a blob (wire form: the value, a short text)."""

    # --- content: the sender is alive and wrong (never a reason to count it dead) --------
    MALFORMED = "malformed"
    """Bytes, fields or signatures that do not decode or verify."""
    NOT_MEMBER = "not-member"
    """The sender (or a peer it names) is not a member of the run."""
    WRONG_RUN = "wrong-run"
    """Another run than the receiver's."""
    OUT_OF_TURN = "out-of-turn"
    """Not from the receiver's live predecessor, or not the next position."""
    STALE = "stale"
    """Not newer than what the receiver already holds: the ring moved on."""
    BAD_META = "bad-meta"
    """Ring metadata inconsistent with the header, with the rules, or with history."""
    BAD_STATE = "bad-state"
    """Tensors that do not fit the model, are not finite, or exceed the magnitude bound."""
    BAD_CLAIM = "bad-claim"
    """A dead notice that is forged, out of order, or about someone it may not name."""
    NOT_FINAL = "not-final"
    """A final model whose metadata does not satisfy the stopping rule."""
    BAD_PROVENANCE = "bad-provenance"
    """A chain of hop statements that is forged, broken, out of the ring's order, or does
    not end with the sender's statement about the model it sends."""
    MISSING_HOPS = "missing-hops"
    """Hop statements that continue one the receiver does not hold: the sender left out
    statements between the receiver's last one and them."""
    TOO_LARGE = "too-large"
    """Beyond a size limit."""
    # --- state: the receiver is alive and cannot take it now or any more ---------------
    EXCLUDED = "excluded"
    """The receiver counts the sender as dead (a valid dead notice names it)."""
    FINISHED = "finished"
    """The receiver already holds the final model of the run."""
    BUSY = "busy"
    """Try again later (e.g. the receiver has not joined the run yet)."""
    # --- formation ------------------------------------------------------------------------
    MISFIT = "misfit"
    """The candidate's data or model do not fit the federation."""
    BAD_VIEW = "bad-view"
    """A view that breaks the rules (settings out of bounds, wrong run, not a member)."""
    COMMITTED = "committed"
    """Already bound to another leader's view or training in another run."""
    GIVEN_UP = "given-up"
    """The leader gave the proposal up (too few members left) or left this member out."""
    TIMEOUT = "timeout"
    """A deadline passed."""

    @classmethod
    def parse(cls, text: str) -> RefusalCode | None:
        """The code named by ``text``, or None for a name this version does not know."""
        try:
            return cls(text)
        except ValueError:
            return None

    @property
    def is_content(self) -> bool:
        """True when the refusal is about what was sent, not about the receiver's state."""
        return self in _CONTENT


_CONTENT = frozenset(
    {
        RefusalCode.MALFORMED,
        RefusalCode.NOT_MEMBER,
        RefusalCode.WRONG_RUN,
        RefusalCode.OUT_OF_TURN,
        RefusalCode.BAD_META,
        RefusalCode.BAD_STATE,
        RefusalCode.BAD_CLAIM,
        RefusalCode.NOT_FINAL,
        RefusalCode.BAD_PROVENANCE,
        RefusalCode.MISSING_HOPS,
        RefusalCode.TOO_LARGE,
    }
)


def printable(text: str) -> str:
    """Escape control and other unprintable characters (a peer's text goes to logs)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def cut_utf8(text: str, max_bytes: int = REASON_MAX_BYTES) -> str:
    """``text`` in at most ``max_bytes`` UTF-8 bytes: whole characters, ``...`` marking a cut.

    The one place where a reason is shortened for the wire, so that every decoder's
    byte limit is met whatever the script (a character is never split).
    """
    raw = text.encode("utf-8")
    if len(raw) <= max_bytes:
        return text
    if max_bytes < 3:
        return raw[:max_bytes].decode("utf-8", "ignore")
    return raw[: max_bytes - 3].decode("utf-8", "ignore") + "..."
