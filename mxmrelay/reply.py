"""An SMTP reply as a value, and as the error that carries it.

Every refusal in the relay, from address syntax to the delivery API's
answer, ends up as one of these, so the protocol has one way to answer and
a rule can never turn into a 250 followed by a silent drop.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class Reply(Exception):
    code: int
    enhanced: str
    text: str

    def __attrs_post_init__(self) -> None:
        # Reply texts come from the network (API reasons, addresses): they
        # must never break the line protocol.
        if any(c in self.text for c in "\r\n\0"):
            object.__setattr__(self, "text", " ".join(self.text.split()).replace("\0", ""))

    def encode(self) -> bytes:
        return f"{self.code} {self.enhanced} {self.text}\r\n".encode("utf-8", "replace")

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"
