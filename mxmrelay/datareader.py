"""DATA: the message's framing, and the message that takes it in chunks.

DATA is handled in chunks, not lines: the terminator is found with one
``bytes.find`` per chunk, dot-unstuffing is one ``replace``, and checks for
bare line endings and long lines are counts and strided searches, so a
100 KB message costs a handful of C calls instead of ~1,300 Python ones.
Nothing here knows of sockets or of the session: :class:`DataReader` is fed
bytes and says where the message ended.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from twisted.logger import Logger
from twisted.mail.smtp import IMessage

from mxmrelay.reply import Reply

#: RFC 5321 4.5.3.1.6: 998 characters and CRLF, counted after the
#: dot-unstuffing (a line sent as "." + 998 characters is within it).
TEXT_LINE_LIMIT = 998

_TERMINATOR = b"\r\n.\r\n"
_LINE_ENDING = re.compile(rb"\r\n|\r|\n")

log = Logger(namespace="mxmrelay.smtp")


class IBulkMessage(IMessage):
    """An ``IMessage`` that also takes DATA in chunks of whole lines.

    Chunks are already dot-unstuffed, with CRLF line endings; the
    protocol never calls ``lineReceived``.  ``write`` may raise a
    :class:`~mxmrelay.reply.Reply` to refuse the rest of the message (the
    protocol then reads to the end of DATA and gives that reply).
    ``eomReceived`` fires with the send id for the 250 reply, or fails
    with a ``Reply``.
    """

    def write(data: bytes) -> None:
        """Take the next chunk of the message."""


class DataReader:
    """DATA framing, as a pure state machine over chunks of bytes.

    The stream is handled as if it began with CRLF (``_carry`` starts so),
    so that every line start is a CRLF: the terminator is always
    ``CRLF.CRLF``, never a bare-LF or bare-CR form (SMTP smuggling), and
    dot-unstuffing is one ``replace``.  Complete lines go to ``sink`` in
    chunks; a partial line waits in ``_carry``.  After an error (size, long
    line, or a ``Reply`` raised by ``sink``) nothing more is stored, but
    the reader goes on to the terminator, so the session stays in step.
    """

    def __init__(self, sink: Callable[[bytes], None], discard: Callable[[], None],
                 max_size: int) -> None:
        self._sink = sink
        self._discard = discard
        self._max_size = max_size
        self._carry = b"\r\n"
        self._first = True
        self.size = 0
        self.error: Reply | None = None

    def feed(self, data: bytes) -> bytes | None:
        """Take bytes; at the terminator, return what followed it."""
        buf = self._carry + data
        end = buf.find(_TERMINATOR)
        if end >= 0:
            self._carry = b""
            if self.error is None:
                self._emit(buf[:end + 2])
            return buf[end + 5:]
        if self.error is not None:
            self._carry = buf[-4:]
            return None
        # Cut before the last line ending (a CRLF kept whole, or a bare LF
        # or CR: bare endings are lines too), so that the carry is one
        # partial line.  A CR at the very end may be the first half of the
        # next CRLF: it is no ending yet.
        cut = buf.rfind(b"\n")
        if cut > 0 and buf[cut - 1] == 0x0D:
            cut -= 1
        bare_cr = buf.rfind(b"\r", 0, len(buf) - 1)
        if bare_cr > cut:
            cut = bare_cr
        ending = 2 if buf.startswith(b"\r\n", cut) else 1
        start = cut + ending
        partial = len(buf) - start - (1 if buf.endswith(b"\r") else 0)
        if buf.startswith(b".", start):
            partial -= 1  # the stuffed dot is not part of the line
        if partial > TEXT_LINE_LIMIT:
            # The line in progress is already too long: stop keeping it.
            self._fail(Reply(500, "5.5.2", "Line too long"))
            self._carry = buf[-4:]
            return None
        self._carry = buf[cut:]
        if cut > 0:
            self._emit(buf[:cut])
        return None

    def _emit(self, region: bytes) -> None:
        """Pass on complete lines (each preceded by its CRLF)."""
        crlf = region.count(b"\r\n")
        if crlf != region.count(b"\n") or crlf != region.count(b"\r"):
            # Bare CR or LF: normalised to CRLF (documented policy).  They
            # never end DATA, so they cannot smuggle a second message.
            region = _LINE_ENDING.sub(b"\r\n", region)
        # Dot-unstuffing; ``replace`` hands back the same object when there
        # is nothing to replace, so no separate search first.
        region = region.replace(b"\r\n.", b"\r\n")
        # Measured after unstuffing: the limit is on the line's text.
        if _has_long_line(region, TEXT_LINE_LIMIT):
            self._fail(Reply(500, "5.5.2", "Line too long"))
            return
        if self._first:
            self._first = False
            region = region[2:]
        self.size += len(region)
        if self.size > self._max_size:
            self._fail(Reply(552, "5.3.4", "Message size exceeds fixed maximum message size"))
            return
        try:
            self._sink(region)
        except Reply as reply:
            self._fail(reply)
        except OSError as e:  # the spool's disk is full, or out of descriptors
            log.error("spool write failed: {error}", error=e)
            self._fail(Reply(452, "4.3.1", "Insufficient system storage"))

    def _fail(self, reply: Reply) -> None:
        if self.error is None:
            self.error = reply
            self._discard()


def _has_long_line(region: bytes, limit: int) -> bool:
    """Does ``region`` hold a line longer than ``limit`` characters?

    A run of more than ``limit`` characters without LF covers at least one
    whole window of ``(limit + 1) // 2`` characters at a multiple of that
    size, so only those windows are searched, each with one C call; a
    window without LF is then measured exactly.
    """
    n = len(region)
    if n <= limit:
        return False
    step = (limit + 1) // 2
    find = region.find
    for start in range(0, n - step + 1, step):
        if find(b"\n", start, start + step) < 0:
            line_start = region.rfind(b"\n", 0, start) + 1
            line_end = find(b"\n", start)
            if line_end < 0:
                line_end = n
            elif region[line_end - 1:line_end] == b"\r":
                line_end -= 1
            if line_end - line_start > limit:
                return True
    return False
