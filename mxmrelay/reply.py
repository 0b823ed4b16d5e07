"""An SMTP reply as a value, and as the error that carries it.

Every refusal in the relay, from address syntax to the delivery API's
answer, ends up as one of these, so the protocol has one way to answer and
a rule can never turn into a 250 followed by a silent drop.
"""

from __future__ import annotations


class Reply(Exception):
    """A reply: code, enhanced status code (RFC 3463), one line of text.

    A plain class, not attrs: attrs exceptions compare by identity, and a
    reply is a value.
    """

    def __init__(self, code: int, enhanced: str, text: str) -> None:
        # Texts can come from the network (API reasons, addresses): they
        # must never break the line protocol.
        if any(c in text for c in "\r\n\0"):
            text = " ".join(text.replace("\0", " ").split())
        super().__init__(code, enhanced, text)
        self.code, self.enhanced, self.text = code, enhanced, text

    def encode(self) -> bytes:
        return f"{self.code} {self.enhanced} {self.text}\r\n".encode("utf-8", "replace")

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
