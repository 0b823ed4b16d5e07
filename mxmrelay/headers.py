"""A header section as fields, by byte offset, and the text RFC 2047
encodes in them.

The rules copy every field they do not own exactly as it came in, so a
field is located (where it starts, where its value is, where it ends),
never parsed and re-serialised.  Pure functions.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import re
from typing import NamedTuple


def split_message(message_start: bytes) -> int | None:
    """Where the header section ends, so that the body need never be parsed."""
    if message_start.startswith(b"\r\n"):
        return 0
    i = message_start.find(b"\r\n\r\n")
    return None if i < 0 else i + 2


class Field(NamedTuple):
    start: int
    end: int  # just after the field, its CRLF included when it has one
    #: Lower-cased field name; None when the first line has no usable name.
    name: bytes | None
    #: Where the value starts (just after the colon).
    value_start: int
    #: Where the value ends (before the final CRLF).
    value_end: int


_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+")


def split_fields(section: bytes) -> list[Field]:
    """Cut the section into fields at CRLFs not followed by WSP.

    Only CRLF ends a line: a bare CR or LF stays inside its line, so that
    whatever the client sent is carried, not reinterpreted.
    """
    fields: list[Field] = []
    n = len(section)
    start = pos = 0
    while pos < n:
        if pos > start and section[pos] not in b" \t":
            fields.append(_field(section, start, pos))
            start = pos
        eol = section.find(b"\r\n", pos)
        pos = n if eol < 0 else eol + 2
    if start < n:
        fields.append(_field(section, start, n))
    return fields


def _field(section: bytes, start: int, end: int) -> Field:
    value_end = end - 2 if end - 2 >= start and section.startswith(b"\r\n", end - 2) else end
    eol = section.find(b"\r\n", start, end)
    first_end = value_end if eol < 0 else eol
    colon = section.find(b":", start, first_end)
    if colon < 0:
        return Field(start, end, None, value_end, value_end)
    name = section[start:colon].rstrip(b" \t")
    if not _NAME.fullmatch(name):
        return Field(start, end, None, value_end, value_end)
    return Field(start, end, name.lower(), colon + 1, value_end)


def unfold(section: bytes, field: Field) -> bytes:
    return section[field.value_start : field.value_end].replace(b"\r\n", b"")


_ENCODED_WORD = re.compile(r"=\?([^?*\s]+)(?:\*[^?\s]*)?\?([bBqQ])\?([^?\s]*)\?=")
_BETWEEN_WORDS = re.compile(r"(?<=\?=)[ \t]+(?==\?)")
#: Codecs that are no charset, or are slow on hostile input.
_NOT_CHARSETS = frozenset({"idna", "punycode", "unicode_escape", "raw_unicode_escape"})


def decode_words(text: str) -> str | None:
    """Decode RFC 2047 encoded words; None when one does not decode."""
    if "=?" not in text:
        return text
    text = _BETWEEN_WORDS.sub("", text)
    failed = False

    def decode(m: re.Match[str]) -> str:
        nonlocal failed
        charset, encoding, payload = m.groups()
        try:
            codec = codecs.lookup(charset)
            if codec.name in _NOT_CHARSETS:
                raise LookupError(charset)
            data = payload.encode("ascii")
            if encoding in "bB":
                raw = base64.b64decode(data + b"=" * (-len(data) % 4), validate=True)
            else:
                raw = binascii.a2b_qp(data, header=True)
            return raw.decode(codec.name)
        except (LookupError, ValueError):  # binascii.Error and UnicodeError included
            failed = True
            return ""

    result = _ENCODED_WORD.sub(decode, text)
    return None if failed else result
