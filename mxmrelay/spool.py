"""The message body store: one copy of each message, in memory or on disk.

Small messages stay in memory; past ``memory_limit`` the spool rolls over
to an unlinked temporary file, so a 50 MB message costs a file, not 50 MB
of RSS.  The header section is kept apart as it arrives (the rules need
it, and it is small and bounded), the body is never read back into memory
whole: the forwarder streams it from the spool.
"""

from __future__ import annotations

import hashlib
import tempfile
from typing import IO

from mxmrelay.reply import Reply

#: The largest header section the rules will parse.
MAX_HEADER_SECTION = 1024 * 1024

_HEADER_END = b"\r\n\r\n"


class Spool:
    """Collects one message: header section apart, body spooled."""

    def __init__(self, memory_limit: int) -> None:
        self._head = bytearray()
        #: Where the body (starting with the blank line) begins; None until
        #: the end of the header section has been seen.
        self.body_offset: int | None = None
        self._file: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=memory_limit)
        self._digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        """Append a chunk (CRLF line endings, already unstuffed)."""
        if self.body_offset is None:
            data = self._take_head(data)
            if not data:
                return
        self._file.write(data)
        self._digest.update(data)
        self.size += len(data)

    def _take_head(self, data: bytes) -> bytes:
        head = self._head
        start = len(head)
        head += data
        if start == 0 and head.startswith(b"\r\n"):
            end = 0
        else:
            end = head.find(_HEADER_END, max(0, start - 3))
            # The limit is on the section itself, its last CRLF included,
            # whichever way the data is chunked.  Its end not in sight yet,
            # the section holds all that has come, bar the "\r" of a
            # partial "\r\n\r" (a message without a body is all section).
            if end < 0:
                if len(head) - head.endswith(b"\r\n\r") > MAX_HEADER_SECTION:
                    raise _too_long()
                return b""
            end += 2
            if end > MAX_HEADER_SECTION:
                raise _too_long()
        rest = bytes(head[end:])
        del head[end:]
        self.body_offset = end
        return rest

    @property
    def header_section(self) -> bytes:
        """The header section (all of the message if it has no body)."""
        return bytes(self._head)

    def body_digest(self) -> bytes:
        """SHA-256 of everything after the header section."""
        return self._digest.digest()

    def body(self) -> IO[bytes]:
        """The body, as a file positioned at its start."""
        self._file.seek(0)
        return self._file

    def close(self) -> None:
        self._file.close()


def _too_long() -> Reply:
    return Reply(552, "5.3.4", f"Header section exceeds {MAX_HEADER_SECTION} bytes")
