"""``multipart/form-data`` as the relay sends it, read from the spooled body.

Parsed here rather than by ``twisted.web`` or the ``email`` package so that
only the small metadata part is ever held in memory: the message part is
located in the spooled body (:func:`message_end`) and copied into its
SQLite BLOB in chunks, on the database thread, never read whole.
"""

from __future__ import annotations

import re
from email.headerregistry import ContentDispositionHeader, ContentTypeHeader
from email.policy import HTTP
from typing import IO

from mxmrelay_refapi.contract import BadRequest

__all__ = ["CHUNK", "boundary", "message_end", "message_parts", "parse_head"]

# RFC 2046 bchars: 1..70 characters, not ending in a space.
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,./:=? -]{0,69}[0-9A-Za-z'()+_,./:=?-]")

#: The metadata part is a small JSON object; anything bigger is not one.
_METADATA_MAX = 256 * 1024
_PART_HEADERS_MAX = 8 * 1024
#: How much of the body is read to find both parts' headers and the metadata.
_HEAD_MAX = _METADATA_MAX + 2 * _PART_HEADERS_MAX + 1024
#: The unit in which message bytes are scanned and copied.
CHUNK = 1024 * 1024


def boundary(content_type: bytes | None) -> bytes:
    if content_type is None:
        raise BadRequest("Content-Type must be multipart/form-data")
    header = HTTP.header_factory("content-type", content_type.decode("latin-1"))
    if not isinstance(header, ContentTypeHeader) or header.content_type != "multipart/form-data":
        raise BadRequest("Content-Type must be multipart/form-data")
    value = header.params.get("boundary")
    if not isinstance(value, str) or not _BOUNDARY.fullmatch(value):
        raise BadRequest("Content-Type: missing or invalid multipart boundary")
    return value.encode("ascii")


def parse_head(body: IO[bytes], boundary: bytes) -> tuple[bytes, int]:
    """Find both parts; return the metadata bytes and where the message starts.

    Only the start of the body is read: the metadata part is small and
    comes first, and the message part's end is found later, on the
    database thread, by :func:`message_end`.
    """
    body.seek(0)
    head = body.read(_HEAD_MAX)
    dash = b"--" + boundary
    if head.startswith(dash):
        pos = len(dash)
    else:  # A preamble, which multipart allows and ignores.
        found = head.find(b"\r\n" + dash)
        if found < 0:
            raise BadRequest("body: no multipart boundary found")
        pos = found + 2 + len(dash)
    pos = _after_delimiter(head, pos)
    pos = _part_headers(head, pos, "metadata", "application/json")
    end = head.find(b"\r\n" + dash, pos)
    if end < 0:
        raise BadRequest(f"metadata part: unterminated or over {_METADATA_MAX} bytes")
    metadata = head[pos:end]
    if len(metadata) > _METADATA_MAX:
        raise BadRequest(f"metadata part: over {_METADATA_MAX} bytes")
    pos = _after_delimiter(head, end + 2 + len(dash))
    pos = _part_headers(head, pos, "message", "message/rfc822")
    return metadata, pos


def _after_delimiter(head: bytes, pos: int) -> int:
    """Skip the rest of a boundary line that must open another part."""
    if head.startswith(b"--", pos):
        raise BadRequest("body: expected exactly two parts (metadata, message), found fewer")
    eol = head.find(b"\r\n", pos)
    if eol < 0 or head[pos:eol].strip(b" \t"):
        raise BadRequest("body: malformed boundary line")
    return eol + 2


def _part_headers(head: bytes, pos: int, name: str, content_type: str) -> int:
    """Check one part's headers; return where its body starts."""
    where = f"part {name!r}"
    end = head.find(b"\r\n\r\n", pos - 2)
    if end < 0 or end - pos > _PART_HEADERS_MAX:
        raise BadRequest(f"{where}: headers unterminated or too long")
    fields: dict[str, str] = {}
    block = head[pos:end]
    try:
        lines = block.decode("ascii").split("\r\n") if block else []
    except UnicodeDecodeError:
        raise BadRequest(f"{where}: headers must be ASCII") from None
    for line in lines:
        field, colon, value = line.partition(":")
        if not colon or not field or field != field.strip() or field.lower() in fields:
            raise BadRequest(f"{where}: malformed header line {line[:80]!r}")
        fields[field.lower()] = value.strip()
    disposition = HTTP.header_factory("content-disposition", fields.get("content-disposition", ""))
    if (
        not isinstance(disposition, ContentDispositionHeader)
        or disposition.content_disposition != "form-data"
        or disposition.params.get("name") != name
    ):
        raise BadRequest(f'body: expected Content-Disposition: form-data; name="{name}" here')
    ctype = HTTP.header_factory("content-type", fields.get("content-type", "text/plain"))
    if not isinstance(ctype, ContentTypeHeader) or ctype.content_type != content_type:
        raise BadRequest(f"{where}: Content-Type must be {content_type}")
    charset = ctype.params.get("charset")
    if charset is not None and str(charset).lower() not in ("utf-8", "us-ascii"):
        raise BadRequest(f"{where}: charset must be utf-8")
    encoding = fields.get("content-transfer-encoding", "binary").lower()
    if encoding not in ("binary", "8bit", "7bit"):
        raise BadRequest(f"{where}: Content-Transfer-Encoding must be binary")
    return end + 4


#: The largest ``submitted_headers`` part (the relay's own header limit, 1 MiB).
_SUBMITTED_MAX = 1024 * 1024 + 2


def message_parts(body: IO[bytes], start: int, boundary: bytes) -> tuple[int, bytes | None]:
    """Where the message part ends, and the ``submitted_headers`` part
    that a sandbox send carries after it (None: no third part)."""
    end = message_end(body, start, boundary, third=True)
    delimiter = b"\r\n--" + boundary
    body.seek(end + len(delimiter))
    head = body.read(_SUBMITTED_MAX + _PART_HEADERS_MAX + len(delimiter) + 8)
    if head.startswith(b"--"):
        return end, None
    pos = _after_delimiter(head, 0)
    pos = _part_headers(head, pos, "submitted_headers", "text/rfc822-headers")
    close = head.find(delimiter + b"--", pos)
    if close < 0 or close - pos > _SUBMITTED_MAX:
        raise BadRequest("part 'submitted_headers': not closed by the final boundary, or "
                         f"over {_SUBMITTED_MAX} bytes")
    return end, head[pos:close]


def message_end(body: IO[bytes], start: int, boundary: bytes, *, third: bool = False) -> int:
    """Where the message part ends: right before ``CRLF--boundary--``.

    The boundary cannot occur inside a part, so the first delimiter line
    after the message's start must be the close delimiter; any other is a
    third part.  (A line that merely begins with the boundary, followed by
    more characters, is message content.)
    """
    delimiter = b"\r\n--" + boundary
    pos = start
    while True:
        found = _find(body, delimiter, pos)
        if found < 0:
            raise BadRequest("part 'message': not closed by the final boundary")
        body.seek(found + len(delimiter))
        after = body.read(80)
        if after.startswith(b"--"):
            break
        if after.lstrip(b" \t").startswith(b"\r\n"):
            if third:
                break
            raise BadRequest("body: expected exactly two parts (metadata, message), found more")
        pos = found + 1
    if found == start:
        raise BadRequest("part 'message': empty")
    return found


def _find(body: IO[bytes], needle: bytes, pos: int) -> int:
    """The offset of ``needle`` in ``body`` from ``pos``, or -1; a chunk at a time.

    So that a many-megabyte message is never held whole.
    """
    keep = len(needle) - 1
    body.seek(pos)
    window = b""  # holds the body's bytes from offset ``pos`` on
    while True:
        chunk = body.read(CHUNK)
        if not chunk:
            return -1
        window += chunk
        found = window.find(needle)
        if found >= 0:
            return pos + found
        drop = max(0, len(window) - keep)
        pos, window = pos + drop, window[drop:]

