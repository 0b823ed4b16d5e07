"""The decision, in the reply: what the rules did to a message, stated in
the lines of a multi-line ``250`` before ``250 2.0.0 Ok: queued as <id>``.

A client's own log is where a developer looks first when a recipient did
not get a Cc or a From address is not the one in the template; these
lines put the answer there.  The last line is the one-line reply every
client already parses (the id its last token), so a client that reads
only the last line sees no change.

What the lines may say, and why: only what the client sent (its
envelope, its From display name, its tags) and what the relay decided
about it (which address is the To, which the BCC, what was dropped, the
flags in force).  Never the return path (the platform's bounce address),
the user or anything of the credentials, and never a header value the
rules did not act on.  Every line goes through :class:`MultilineReply`,
so it is printable US-ASCII of at most 512 octets with its CRLF whatever
the client sent; a long list of tags is cut with ``...`` and its count.
"""

from __future__ import annotations

import attrs

from mxmrelay.reply import REPLY_LINE_LIMIT, MultilineReply, clip, escape, quote
from mxmrelay.rules import Send

#: The X-Mxm-Flags bits by name, as the service description names them.
FLAG_NAMES = ((1, "open"), (2, "click"), (4, "unsubscribe-list"), (8, "no-bounce-list"))
#: The room for a line's text: 512 octets less CRLF and ``250-2.0.0 ``.
TEXT_ROOM = REPLY_LINE_LIMIT - 2 - len("250-2.0.0 ")
#: How much of a From display name the line quotes.
NAME_LIMIT = 80


def flag_names(flags: int) -> str:
    """``3 (open, click)``; ``0 (none)``."""
    names = [name for bit, name in FLAG_NAMES if flags & bit]
    return f"{flags} ({', '.join(names) or 'none'})"


def _address(address: str) -> str:
    return f"<{escape(address)}>"


def _tags(prefix: str, tags: tuple[str, ...]) -> str:
    """``prefix`` then the tags, cut to fit one line with their count."""
    if not tags:
        return prefix + "tags=none"
    text = escape(",".join(tags))
    line = f"{prefix}tags={text}"
    if len(line) <= TEXT_ROOM:
        return line
    suffix = f" ({len(tags)} tags)"
    room = TEXT_ROOM - len(prefix) - len("tags=") - len(suffix)
    return f"{prefix}tags={clip(text, room)}{suffix}"


def decision_lines(send: Send, mail_from: str, *, sandbox: bool = False) -> list[str]:
    """The texts of the lines before the last, in order."""
    lines = []
    if sandbox:
        lines.append("sandbox: stored and shown, nothing delivered")
    lines.append(f"to={_address(send.to)}")
    dropped = []
    if send.dropped_recipients:
        n = send.dropped_recipients
        dropped.append(f"{n} recipient{'s' if n != 1 else ''}")
    dropped.extend(send.removed_fields)
    bcc = "bcc=none" if send.bcc is None else f"bcc={_address(send.bcc)} (no tracking)"
    lines.append(bcc + (f"; dropped: {', '.join(dropped)}" if dropped else ""))
    sender = f"from={_address(mail_from)}"
    if send.from_name is not None:
        sender += f" {quote(send.from_name, NAME_LIMIT)}"
    # An address as long as SMTP allows leaves room for the rest; if it
    # did not, the reply's own clipping would still keep the line legal.
    lines.append(_tags(f"{clip(sender, TEXT_ROOM // 2)} ; flags={flag_names(send.flags)} ; ",
                       send.tags))
    return lines


@attrs.frozen
class Queued:
    """The answer to a message the delivery API holds: its id, and the
    decision lines to give before the ``queued as`` line (none: one line)."""

    id: str
    lines: tuple[str, ...] = ()

    def reply(self) -> MultilineReply:
        return MultilineReply(250, "2.0.0", [*self.lines, f"Ok: queued as {self.id}"])

    def encode(self) -> bytes:
        return self.reply().encode()
