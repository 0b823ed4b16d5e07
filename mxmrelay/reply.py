"""An SMTP reply as a value, and as the error that carries it.

Every refusal in the relay, from address syntax to the delivery API's
answer, ends up as one of these, so the protocol has one way to answer and
a rule can never turn into a 250 followed by a silent drop.
"""

from __future__ import annotations

#: RFC 5321 4.5.3.1.5: a reply line is at most 512 octets with its CRLF.
REPLY_LINE_LIMIT = 512
#: How much of a client's input a reply quotes (a parameter, a name).
QUOTE_LIMIT = 64
_ELLIPSIS = "..."


def escape(text: str) -> str:
    """``text`` in printable US-ASCII (RFC 5321 4.2): anything else is
    written as a Python-style ``\\xNN``/``\\uNNNN`` escape, so that an odd
    byte a client sent shows in the reply without breaking it."""
    if text.isascii() and text.isprintable():
        return text
    return "".join(c if " " <= c <= "~" else _escape_char(c) for c in text)


def _escape_char(c: str) -> str:
    n = ord(c)
    if n < 0x100:
        return f"\\x{n:02x}"
    return f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def clip(text: str, limit: int) -> str:
    """At most ``limit`` characters, ``...`` marking a cut."""
    limit = max(limit, 0)
    if len(text) <= limit:
        return text
    return text[:max(limit - len(_ELLIPSIS), 0)] + _ELLIPSIS[:limit]


def quote(client_input: str, limit: int = QUOTE_LIMIT) -> str:
    """Client input as a reply may echo it: escaped, then shortened.

    Every reply that repeats what the client sent goes through this, so
    that a 1,000-octet parameter or a UTF-8 byte comes back as a short
    ASCII hint, not as the client's bytes."""
    return clip(escape(client_input), limit)


class Reply(Exception):
    """A reply: code, enhanced status code (RFC 3463), one line of text.

    A plain class, not attrs: attrs exceptions compare by identity, and a
    reply is a value.

    The last line of defence for the line protocol: whatever the text (an
    API's reason, an address, a rule's finding), the reply is one line of
    printable US-ASCII of at most 512 octets with its CRLF.  Replies that
    quote the client use :func:`quote` first, so that they cut where it
    makes sense; this only guarantees the invariant.
    """

    def __init__(self, code: int, enhanced: str, text: str) -> None:
        # Texts can come from the network (API reasons, addresses): line
        # breaks become spaces rather than escapes, so they read naturally.
        if any(c in text for c in "\r\n\0"):
            text = " ".join(text.replace("\0", " ").split())
        enhanced = escape(enhanced)
        room = REPLY_LINE_LIMIT - 2 - len(f"{code} {enhanced} ")
        text = clip(escape(text), room)
        super().__init__(code, enhanced, text)
        self.code, self.enhanced, self.text = code, enhanced, text

    def encode(self) -> bytes:
        line = clip(escape(f"{self.code} {self.enhanced} {self.text}"), REPLY_LINE_LIMIT - 2)
        return f"{line}\r\n".encode("ascii")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Reply):
            return NotImplemented
        return (self.code, self.enhanced, self.text) == (other.code, other.enhanced, other.text)

    def __hash__(self) -> int:
        return hash((self.code, self.enhanced, self.text))

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"

    def __repr__(self) -> str:
        return f"Reply({self.code}, {self.enhanced!r}, {self.text!r})"


class MultilineReply:
    """A reply of several lines (RFC 5321 4.2.1): one code and enhanced
    code, a text per line, the last line last.

    Every line is built as a :class:`Reply`, so each keeps that type's
    guarantees (printable US-ASCII, at most 512 octets with its CRLF), and
    only the separator after the code differs: ``-`` on every line but the
    last.  A client that reads only the last line (most do) sees exactly
    what a one-line reply with the last text would have said.
    """

    def __init__(self, code: int, enhanced: str, texts: list[str]) -> None:
        assert texts, "a reply has at least one line"
        self.lines = tuple(Reply(code, enhanced, text) for text in texts)

    @property
    def last(self) -> Reply:
        return self.lines[-1]

    def encode(self) -> bytes:
        *before, last = self.lines
        return b"".join(b"%d-%s" % (r.code, r.encode()[4:]) for r in before) + last.encode()

    def __str__(self) -> str:
        return "\n".join(str(r) for r in self.lines)
