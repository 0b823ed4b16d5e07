"""Reading a stored message for people: its header fields and text parts.

Pure functions over bytes that customers' systems wrote, so every one of
them copes with anything (bad UTF-8, broken encoded-words, MIME the
``email`` package chokes on) and never raises: the pages show what was sent.
Storage uses :func:`header_field` too, to keep each send's Subject apart.
"""

from __future__ import annotations

import email
import email.errors
import email.header
import email.policy
import re

__all__ = ["BODY_TEXT_MAX", "body_parts", "display_header", "header_field", "parse_headers",
           "split_message"]

#: How much body text the one-send page shows, over all its text parts.
BODY_TEXT_MAX = 200 * 1024


def split_message(message: bytes) -> tuple[bytes, bytes]:
    """Split at the first empty line into the header block and the body."""
    if message.startswith((b"\r\n", b"\n")):
        return b"", message.split(b"\n", 1)[1]
    match = re.search(rb"\r?\n\r?\n", message)
    if match is None:
        return message, b""
    return message[: match.start()], message[match.end() :]


def parse_headers(block: bytes) -> list[tuple[str, str]]:
    """The header fields, unfolded and decoded for display, in order.

    Decoding never fails: bad UTF-8 and bad encoded-words are shown as they
    are (with U+FFFD), because this page is for looking at what was sent.
    """
    return [(n.decode("utf-8", "replace"), display_header(v)) for n, v in _fields(block)]


def header_field(block: bytes, name: bytes) -> bytes | None:
    """The first ``name`` field's value, unfolded but not decoded, or None."""
    wanted = name.lower()
    return next((v for n, v in _fields(block) if n.lower() == wanted), None)


def _fields(block: bytes) -> list[tuple[bytes, bytes]]:
    """The header block's (name, value) pairs, values unfolded and stripped."""
    fields: list[tuple[bytes, bytes]] = []
    for line in re.split(rb"\r?\n", block):
        if line[:1] in (b" ", b"\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + b" " + line.strip())
        elif line:
            name, _, value = line.partition(b":")
            fields.append((name.strip(), value.strip()))
    return fields


def display_header(value: bytes) -> str:
    """A header value as text, RFC 2047 encoded-words decoded where valid."""
    text = value.decode("utf-8", "replace")
    try:
        return str(email.header.make_header(email.header.decode_header(text)))
    except (LookupError, ValueError, email.errors.HeaderParseError):
        return text


def body_parts(message: bytes, body: bytes) -> list[tuple[str, str | None]]:
    """The message's leaf parts: a label each, and the text of text parts.

    Text parts are decoded (transfer encoding, then charset with
    ``errors='replace'``) up to :data:`BODY_TEXT_MAX` characters in all;
    other parts are only named.  A message the ``email`` package cannot
    make sense of is shown as its raw body.
    """
    parts: list[tuple[str, str | None]] = []
    budget = BODY_TEXT_MAX
    try:
        parsed = email.message_from_bytes(message, policy=email.policy.compat32)
        for part in parsed.walk():
            if part.is_multipart():
                continue
            ctype = part.get_content_type()
            filename = part.get_filename()
            label = ctype + (f" ({filename})" if filename else "")
            if part.get_content_maintype() != "text":
                parts.append((label + ": not shown", None))
                continue
            payload = part.get_payload(decode=True)
            data = payload if isinstance(payload, bytes) else b""
            text = _decode(data, part.get_content_charset() or "utf-8")
            if budget <= 0:
                parts.append((label + ": not shown (length limit)", None))
                continue
            if len(text) > budget:
                text = text[:budget] + "\n[… truncated]"
            budget -= len(text)
            parts.append((label, text))
    except Exception:  # Hostile input: any parser failure falls back to raw.
        raw = body[:BODY_TEXT_MAX].decode("utf-8", "replace")
        return [("raw body", raw)]
    return parts


def _decode(data: bytes, charset: str) -> str:
    try:
        return data.decode(charset, "replace")
    except (LookupError, ValueError):  # An unknown or non-text codec name.
        return data.decode("utf-8", "replace")
