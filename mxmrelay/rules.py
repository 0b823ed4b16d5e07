"""The Maxemail rules: how a submitted message becomes one transactional send.

Pure functions over the header section's raw bytes (no I/O, no clock, no
Twisted), so that every odd header a client can write has a tested answer and
so that a header the rules do not own leaves exactly as it came in: fields are
located by byte offset and copied, never parsed and re-serialised.  The body
never comes here at all.

Decisions the service description leaves open, and why:

* **Violations are checked in a fixed order**: X-Mxm-Flags, then X-Mxm-Tag
  (header by header, each tag's length as it is met, the tag count last), then
  To.  A client fixing its message one reply at a time then always sees the
  same first complaint.

* **Addresses compare case-insensitively in the local part too**, not only in
  the domain.  RFC 5321 lets a receiver treat local parts as case-sensitive,
  but virtually every mailbox provider folds case, and customers' templates
  write ``To: John.Smith@...`` with ``RCPT TO:<john.smith@...>`` often enough
  that refusing them would refuse real mail.  Quoted and unquoted spellings of
  the same local part are equal (``"john"@x`` is ``john@x``), local parts are
  NFC-normalised, and domains compare as Unicode: an A-label (``xn--...``)
  equals its U-label, as does any mix of case or IDN full stops.

* **From**: the From the relay writes is always exactly one mailbox whose
  address is MAIL FROM.  A single From field that is exactly one well-formed
  mailbox (a display name of words, quoted strings and comments before
  ``<...>``, or a bare addr-spec with comments around it) keeps its bytes and
  has only its address replaced, so the alias, its quoting, RFC 2047 encoded
  words, comments and folding all survive.  The old comment form
  ``From: a@b (Oxford Stones)`` therefore becomes
  ``From: mailfrom (Oxford Stones)``: the comment *is* the alias in that form
  (RFC 822 era software and PHP's ``mail()`` examples still write it).
  Anything else (several From fields, an address list, a group, trailing
  bytes after the ``>`` such as a second ``<address>``, an unterminated
  quote) becomes one ``From: NAME <mailfrom>`` where the first From was,
  NAME being the first display name among them that is only words (atoms,
  quoted strings, obsolete dots) and folding white space, or no name at all:
  nothing else of such a field is kept, since a reader may take any of it
  for an address.  A missing From is added right after the trace field, at
  the top, where it cannot be glued onto a malformed last line.  A field
  name written with white space before its colon (obsolete syntax, which
  some parsers take for an mbox ``From`` line) is written without it.

* **The header section is fields**: a section whose first line starts with
  white space (it would fold into the trace field the relay writes above
  it), or that holds a line with no ``name:``, is refused with
  ``550 5.6.0`` (RFC 5322 2.2: a header section is header fields, each
  starting with its name).  A parser that meets such a line takes it for the
  start of the body, so carrying it would deliver a message whose From and
  To are not where the relay put them.

* **To**: the first address of the first To field is the recipient.  When
  that field already holds exactly that one well-formed mailbox (as for
  From) it is left byte-for-byte; otherwise it is rewritten to the mailbox's
  own bytes (display name, comments and all) when that mailbox is
  well-formed on its own, else to ``NAME <address>`` with a clean display
  name or none.  Mailboxes inside a group count; an empty group has none.  The
  first element counts even when it is no address, so ``To: Smith, John
  <j@x>`` (an unquoted comma) is refused with a reply that says why, rather
  than guessed at.

* **X-Mxm-Tag** values are text, so RFC 2047 encoded words in them are
  decoded: Python's email package and .NET's ``MailMessage`` encode any
  non-ASCII custom header that way, and a tag reading ``=?utf-8?q?caf=C3=A9?=``
  is never what the customer meant.

* **Message-ID**: the first Message-ID field's value, unfolded and stripped,
  is the idempotency key; bytes that are not UTF-8 are kept as backslash
  escapes so that distinct ids stay distinct.

* **Violation texts** are printable ASCII (RFC 5321's reply text is), so
  anything else from the message is shown escaped, and shortened.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import datetime
import functools
import ipaddress
import re
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from email.utils import format_datetime
from typing import NamedTuple

import attrs

from mxmrelay.directory import MAX_FLAGS, CustomerSpace

MAX_TAGS = 100
#: Mailboxes of an address field that the rules look at.
MAX_MAILBOXES = 100
MAX_TAG_LENGTH = 255

#: Bits of X-Mxm-Flags that turn tracking on; a BCC copy never has them.
TRACKING_FLAGS = 1 | 2

#: How much of a client's bad value a reply quotes back.
_SHOW_LIMIT = 80

_FLAGS_HEADER = b"x-mxm-flags"
_TAG_HEADER = b"x-mxm-tag"
_REMOVED = frozenset({b"return-path", b"cc", b"bcc", _FLAGS_HEADER, _TAG_HEADER})


@attrs.frozen
class Envelope:
    """The SMTP envelope, as validated by :mod:`mxmrelay.envelope`.

    That validation is what makes the addresses safe to write into a header
    (no CR, LF or other controls); the rules do not check it again.
    """

    mail_from: str
    recipients: tuple[str, ...]


@attrs.frozen
class Send:
    """What the rules make of an accepted message: one call to the delivery API."""

    headers: bytes
    to: str
    bcc: str | None
    flags: int
    bcc_flags: int | None
    tags: tuple[str, ...]
    return_path: str
    message_id: str | None


@attrs.frozen
class Violation:
    """A rule refused the message; the protocol side turns this into a reply."""

    code: int
    enhanced: str
    text: str


def _violation(text: str) -> Violation:
    return Violation(550, "5.6.0", text)


# --------------------------------------------------------------------------
# Header fields


def split_message(message_start: bytes) -> int | None:
    """Where the header section ends, so that the body need never be parsed."""
    if message_start.startswith(b"\r\n"):
        return 0
    i = message_start.find(b"\r\n\r\n")
    return None if i < 0 else i + 2


class _Field(NamedTuple):
    start: int
    end: int  # just after the field, its CRLF included when it has one
    #: Lower-cased field name; None when the first line has no usable name.
    name: bytes | None
    #: Where the value starts (just after the colon).
    value_start: int
    #: Where the value ends (before the final CRLF).
    value_end: int


_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+")


def _fields(section: bytes) -> list[_Field]:
    """Cut the section into fields at CRLFs not followed by WSP.

    Only CRLF ends a line: a bare CR or LF stays inside its line, so that
    whatever the client sent is carried, not reinterpreted.
    """
    fields: list[_Field] = []
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


def _field(section: bytes, start: int, end: int) -> _Field:
    value_end = end - 2 if end - 2 >= start and section.startswith(b"\r\n", end - 2) else end
    eol = section.find(b"\r\n", start, end)
    first_end = value_end if eol < 0 else eol
    colon = section.find(b":", start, first_end)
    if colon < 0:
        return _Field(start, end, None, value_end, value_end)
    name = section[start:colon].rstrip(b" \t")
    if not _NAME.fullmatch(name):
        return _Field(start, end, None, value_end, value_end)
    return _Field(start, end, name.lower(), colon + 1, value_end)


def _unfold(section: bytes, field: _Field) -> bytes:
    return section[field.value_start : field.value_end].replace(b"\r\n", b"")


# --------------------------------------------------------------------------
# RFC 5322 address lists, as byte spans


_SPACE, _ATOM, _QUOTED, _COMMENT, _LITERAL, _SPECIAL = range(6)
_WORDS = (_ATOM, _QUOTED)


class _Token(NamedTuple):
    kind: int
    start: int
    end: int


_SPACE_RE = re.compile(rb"[ \t\r\n]+")
_ATOM_RE = re.compile(rb'[^ \t\r\n()<>\[\]:;@\\,."]+')
_QUOTED_RE = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_LITERAL_RE = re.compile(rb"\[[^\]\\]*(?:\\.[^\]\\]*)*\]?", re.DOTALL)
_PAREN_RE = re.compile(rb"[()\\]")


def _tokenize(buf: bytes, pos: int, end: int) -> Iterator[_Token]:
    """Lex ``buf[pos:end]`` leniently: anything unterminated runs to the end.

    A generator, so that a reader that has seen enough stops the work."""
    while pos < end:
        c = buf[pos]
        if c in b" \t\r\n":
            kind, stop = _SPACE, _match_end(_SPACE_RE, buf, pos, end)
        elif c == 0x22:  # "
            kind, stop = _QUOTED, _match_end(_QUOTED_RE, buf, pos, end)
        elif c == 0x5B:  # [
            kind, stop = _LITERAL, _match_end(_LITERAL_RE, buf, pos, end)
        elif c == 0x28:  # (
            kind, stop = _COMMENT, _comment_end(buf, pos, end)
        elif c in b'()<>[]:;@\\,."':
            kind, stop = _SPECIAL, pos + 1
        else:
            kind, stop = _ATOM, _match_end(_ATOM_RE, buf, pos, end)
        yield _Token(kind, pos, stop)
        pos = stop


def _match_end(pattern: re.Pattern[bytes], buf: bytes, pos: int, end: int) -> int:
    m = pattern.match(buf, pos, end)
    return m.end() if m is not None and m.end() > pos else pos + 1


def _comment_end(buf: bytes, pos: int, end: int) -> int:
    depth = 0
    while True:
        m = _PAREN_RE.search(buf, pos, end)
        if m is None:
            return end
        c = buf[m.start()]
        if c == 0x5C:  # backslash: skip the quoted character
            pos = min(m.start() + 2, end)
            continue
        depth += 1 if c == 0x28 else -1
        pos = m.end()
        if depth == 0:
            return pos


class _Mailbox(NamedTuple):
    #: The whole mailbox, first to last non-space byte.
    span: tuple[int, int]
    #: The display name, when there is a phrase before the angle address.
    name: tuple[int, int] | None
    #: Comments standing for an alias where there is no display name.
    comments: tuple[tuple[int, int], ...]
    #: Inside ``<...>``; None for a bare addr-spec or an unterminated ``<``.
    angle: tuple[int, int] | None
    #: The addr-spec's tokens, without spaces, comments or source route.
    addr: tuple[_Token, ...]
    #: No ``<`` at all: a bare addr-spec (or something failing to be one).
    bare: bool


class _AddressList(NamedTuple):
    boxes: list[_Mailbox]
    #: Exactly one mailbox and no group syntax: nothing to rewrite but it.
    alone: bool


def _special(buf: bytes, token: _Token, char: bytes) -> bool:
    return token.kind == _SPECIAL and buf[token.start] == char[0]


def _mailboxes(buf: bytes, start: int, end: int) -> _AddressList:
    """Split an address-list into mailboxes, keeping byte spans, never failing.

    Group names are dropped and group members count as mailboxes.
    """
    boxes: list[_Mailbox] = []
    segment: list[_Token] = []
    in_angle = grouped = False
    for t in _tokenize(buf, start, end):
        if t.kind == _SPECIAL:
            c = buf[t.start]
            if c == 0x3C and not in_angle:  # <
                in_angle = True
            elif c == 0x3E and in_angle:  # >
                in_angle = False
            elif not in_angle and c in b",;:":
                if c == 0x3A:  # ':' opens a group; its name is no mailbox
                    grouped = True
                else:
                    _add_mailbox(buf, segment, boxes)
                    if len(boxes) >= MAX_MAILBOXES:
                        # Only the first mailboxes matter (the first, and
                        # whether it is alone; a display name among the
                        # first From ones): a megabyte of addresses is not
                        # read to the end.
                        segment = []
                        break
                segment = []
                continue
        segment.append(t)
    _add_mailbox(buf, segment, boxes)
    return _AddressList(boxes, len(boxes) == 1 and not grouped)


def _add_mailbox(buf: bytes, segment: list[_Token], out: list[_Mailbox]) -> None:
    solid = [t for t in segment if t.kind != _SPACE]
    if all(t.kind == _COMMENT for t in solid):
        return
    span = (solid[0].start, solid[-1].end)
    lt = next((i for i, t in enumerate(solid) if _special(buf, t, b"<")), None)
    if lt is None:
        comments = tuple((t.start, t.end) for t in solid if t.kind == _COMMENT)
        addr = tuple(t for t in solid if t.kind != _COMMENT)
        out.append(_Mailbox(span, None, comments, None, addr, True))
        return
    phrase = solid[:lt]
    gt = next((i for i in range(lt + 1, len(solid)) if _special(buf, solid[i], b">")), None)
    inner = [t for t in solid[lt + 1 : gt] if t.kind != _COMMENT]
    colons = [i for i, t in enumerate(inner) if _special(buf, t, b":")]
    if colons:  # obsolete source route: <@a,@b:user@host>
        inner = inner[colons[-1] + 1 :]
    name: tuple[int, int] | None = None
    comments = ()
    if any(t.kind in _WORDS for t in phrase):
        name = (phrase[0].start, phrase[-1].end)
    else:
        after = solid[gt + 1 :] if gt is not None else []
        comments = tuple((t.start, t.end) for t in phrase + after if t.kind == _COMMENT)
    angle = (solid[lt].end, solid[gt].start) if gt is not None else None
    out.append(_Mailbox(span, name, comments, angle, tuple(inner), False))


class _Address(NamedTuple):
    #: The addr-spec as written, without CFWS.
    text: bytes
    local: tuple[_Token, ...]
    domain: tuple[_Token, ...]


def _address(buf: bytes, tokens: Sequence[_Token]) -> _Address | None:
    """The addr-spec in ``tokens``, or None when they do not make one."""
    ats = [i for i, t in enumerate(tokens) if _special(buf, t, b"@")]
    if not ats:
        return None
    local, domain = tokens[: ats[-1]], tokens[ats[-1] + 1 :]
    if not local or not domain:
        return None
    previous_word = False
    for part, kinds in ((local, _WORDS), (domain, (_ATOM, _LITERAL))):
        for t in part:
            word = t.kind in kinds
            if not word and not _special(buf, t, b"."):
                return None
            if word and previous_word:  # two words with only CFWS between
                return None
            previous_word = word
        previous_word = False
    text = b"".join(buf[t.start : t.end] for t in tokens)
    return _Address(text, tuple(local), tuple(domain))


_QUOTED_PAIR = re.compile(rb"\\(.)", re.DOTALL)
_IDN_DOTS = re.compile("[.\u3002\uff0e\uff61]")


def _address_key(buf: bytes, address: _Address) -> tuple[str, str]:
    """What two addresses must share to be the same mailbox (see module doc)."""
    parts = []
    for t in address.local:
        raw = buf[t.start : t.end]
        if t.kind == _QUOTED:
            raw = raw[1:-1] if len(raw) > 1 and raw.endswith(b'"') else raw[1:]
            raw = _QUOTED_PAIR.sub(rb"\1", raw.replace(b"\r\n", b""))
        parts.append(raw)
    local = b"".join(parts).decode("utf-8", "replace")
    local = unicodedata.normalize("NFC", local).lower()
    domain = b"".join(buf[t.start : t.end] for t in address.domain).decode("utf-8", "replace")
    return local, _domain_key(domain)


def _domain_key(domain: str) -> str:
    labels = []
    for label in _IDN_DOTS.split(unicodedata.normalize("NFKC", domain).lower()):
        if label.startswith("xn--") and len(label) <= 63:
            try:
                label = label[4:].encode("ascii").decode("punycode")
            except (UnicodeError, ValueError):
                pass
            else:
                label = unicodedata.normalize("NFKC", label).lower()
        labels.append(label)
    if len(labels) > 1 and labels[-1] == "":  # a root dot
        labels.pop()
    return ".".join(labels)


@functools.lru_cache(maxsize=8)
def _date(when: datetime.datetime, offset: datetime.timedelta | None) -> str:
    # Cached: every send in the same second shares its date text.  (The
    # offset is in the key: equal instants in two zones are equal datetimes.)
    return format_datetime(when)


@functools.lru_cache(maxsize=4096)
def _envelope_key(address: str) -> tuple[str, str]:
    # Cached: a relay sees the same few senders and recipients again and
    # again, and tokenizing them is a third of the rules' cost.
    raw = address.encode("utf-8", "surrogatepass")
    tokens = [t for t in _tokenize(raw, 0, len(raw)) if t.kind not in (_SPACE, _COMMENT)]
    parsed = _address(raw, tokens)
    if parsed is None:
        return unicodedata.normalize("NFC", address).lower(), ""
    return _address_key(raw, parsed)


# --------------------------------------------------------------------------
# The rules


def apply_rules(
    envelope: Envelope,
    header_section: bytes,
    space: CustomerSpace,
    *,
    send_id: str,
    bounce_template: str,
    received: bytes,
    max_tags: int = MAX_TAGS,
    max_tag_length: int = MAX_TAG_LENGTH,
) -> Send | Violation:
    """Rewrite the header section by the service's rules, or say why not.

    Never raises on any ``header_section`` bytes.  ``bounce_template`` is
    configuration, checked at start-up: a template ``str.format`` rejects
    raises here rather than bouncing to a wrong address.
    """
    section = header_section
    fields = _fields(section)
    malformed = _malformed(section, fields)
    if malformed is not None:
        return malformed
    by_name: dict[bytes, list[_Field]] = {}
    for f in fields:
        if f.name is not None:
            by_name.setdefault(f.name, []).append(f)

    flags = _flags(section, by_name.get(_FLAGS_HEADER, []), envelope.mail_from, space)
    if isinstance(flags, Violation):
        return flags
    tags = _tags(section, by_name.get(_TAG_HEADER, []), max_tags, max_tag_length)
    if isinstance(tags, Violation):
        return tags
    to = _recipient(section, by_name.get(b"to", []), envelope.recipients)
    if isinstance(to, Violation):
        return to
    to_field, to_text, to_key, to_mailbox = to

    bcc = next((r for r in envelope.recipients if _envelope_key(r) != to_key), None)

    mail_from = envelope.mail_from.encode("utf-8", "surrogatepass")
    from_fields = by_name.get(b"from", [])
    replaced: dict[int, bytes] = {}
    if from_fields:
        replaced[from_fields[0].start] = _from_field(section, from_fields, mail_from)
    if to_mailbox is not None:
        replaced[to_field.start] = _to_field(section, to_field, to_mailbox)
    dropped = {f.start for f in from_fields[1:]}
    dropped.update(f.start for f in by_name.get(b"to", [])[1:])

    out = [received if received.endswith(b"\r\n") else received + b"\r\n"]
    if not from_fields:
        out.append(b"From: <" + mail_from + b">\r\n")
    for f in fields:
        if f.name in _REMOVED or f.start in dropped:
            continue
        new = replaced.get(f.start)
        if new is None:
            out.append(section[f.start : f.end])
        else:
            out.append(new + section[f.value_end : f.end])

    message_ids = by_name.get(b"message-id")
    message_id = None
    if message_ids:
        value = _unfold(section, message_ids[0]).strip(b" \t")
        message_id = value.decode("utf-8", "backslashreplace") or None

    return Send(
        headers=b"".join(out),
        to=to_text,
        bcc=bcc,
        flags=flags,
        bcc_flags=None if bcc is None else flags & ~TRACKING_FLAGS,
        tags=tags,
        return_path=bounce_template.format(id=send_id),
        message_id=message_id,
    )


def _malformed(section: bytes, fields: list[_Field]) -> Violation | None:
    """A line that is no header field (see the module docstring)."""
    for f in fields:
        if f.name is not None:
            continue
        if f.start == 0 and section[:1] in (b" ", b"\t"):
            return _violation(
                "Malformed header section: its first line starts with white space"
                " (a header section starts with a field name)"
            )
        line = section.count(b"\r\n", 0, f.start) + 1
        eol = section.find(b"\r\n", f.start, f.end)
        text = section[f.start : f.end if eol < 0 else eol].decode("utf-8", "replace")
        return _violation(
            f"Malformed header section: line {line} is not a header field: {_show(text)}"
        )
    return None


def _flags(
    section: bytes, fields: list[_Field], mail_from: str, space: CustomerSpace
) -> int | Violation:
    """The first X-Mxm-Flags field, else the defaults; later fields are ignored."""
    if not fields:
        return space.flags_for(mail_from)
    value = _unfold(section, fields[0]).strip(b" \t")
    digits = value.lstrip(b"0") or b"0"
    # bytes.isdigit() is ASCII-only; the length test keeps int() cheap.
    if value.isdigit() and len(digits) <= 2 and int(digits) <= MAX_FLAGS:
        return int(digits)
    shown = _show(value.decode("utf-8", "replace")) if value else "empty value"
    return _violation(
        f"Invalid X-Mxm-Flags header: {shown} (expected a number from 0 to {MAX_FLAGS})"
    )


_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")


def _tags(
    section: bytes, fields: list[_Field], max_tags: int, max_tag_length: int
) -> tuple[str, ...] | Violation:
    tags: dict[str, None] = {}  # insertion-ordered set
    for field in fields:
        try:
            text = _unfold(section, field).decode("utf-8")
        except UnicodeDecodeError:
            return _violation("Invalid X-Mxm-Tag header: not valid UTF-8")
        if (bad := _control(text)) is not None:
            return bad
        decoded = _decode_words(text)
        if decoded is None:
            return _violation("Invalid X-Mxm-Tag header: undecodable RFC 2047 encoded word")
        if (bad := _control(decoded)) is not None:
            return bad
        for part in decoded.split(","):
            tag = part.strip()
            if len(tag) > max_tag_length:
                return _violation(
                    f"Invalid X-Mxm-Tag header: tag {_show(tag)} is {len(tag)} characters"
                    f" long (limit {max_tag_length})"
                )
            if tag:
                tags[tag] = None
    if len(tags) > max_tags:
        return _violation(f"Too many X-Mxm-Tag tags: {len(tags)} (limit {max_tags})")
    return tuple(tags)


def _control(text: str) -> Violation | None:
    m = _CONTROL.search(text)
    if m is None:
        return None
    return _violation(f"Invalid X-Mxm-Tag header: control character U+{ord(m.group()):04X}")


_ENCODED_WORD = re.compile(r"=\?([^?*\s]+)(?:\*[^?\s]*)?\?([bBqQ])\?([^?\s]*)\?=")
_BETWEEN_WORDS = re.compile(r"(?<=\?=)[ \t]+(?==\?)")
#: Codecs that are no charset, or are slow on hostile input.
_NOT_CHARSETS = frozenset({"idna", "punycode", "unicode_escape", "raw_unicode_escape"})


def _decode_words(text: str) -> str | None:
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


def _recipient(
    section: bytes, fields: list[_Field], recipients: Sequence[str]
) -> tuple[_Field, str, tuple[str, str], _Mailbox | None] | Violation:
    """The To recipient: the first To field's first mailbox, if RCPT has it.

    Returns the field, the address as written, its comparison key, and the
    mailbox when the field needs rewriting to hold just it (else None).
    """
    if not fields:
        return _violation("No To header: the message needs one To recipient")
    field = fields[0]
    parsed = _mailboxes(section, field.value_start, field.value_end)
    boxes = parsed.boxes
    if not boxes:
        return _violation("The To header has no address: the message needs one To recipient")
    box = boxes[0]
    address = _address(section, box.addr)
    if address is None:
        written = section[box.span[0] : box.span[1]].decode("utf-8", "replace")
        hint = ""
        if len(boxes) > 1 and "@" not in written:
            hint = " (a display name with a comma must be quoted)"
        return _violation(f"The To header's address {_show(written)} is not a valid address{hint}")
    text = address.text.replace(b"\r\n", b"").decode("utf-8", "replace")
    key = _address_key(section, address)
    if not any(_envelope_key(r) == key for r in recipients):
        return _violation(f"To address {_show(text)} is not one of the RCPT TO recipients")
    kept = (_lone_mailbox(section, field.value_start, field.value_end) is not None
            and section[field.value_start - 2] != 0x20 and section[field.value_start - 2] != 0x09)
    return field, text, key, None if kept else box


def _name_bytes(section: bytes, field: _Field) -> bytes:
    """The field name as the client wrote it, colon included, without the
    obsolete white space before the colon (see the module docstring)."""
    return section[field.start : field.value_start - 1].rstrip(b" \t") + b":"


def _to_field(section: bytes, field: _Field, box: _Mailbox) -> bytes:
    """The To field holding just ``box``: its own bytes when it is one
    well-formed mailbox, else rebuilt from its address."""
    name = _name_bytes(section, field)
    if _lone_mailbox(section, *box.span) is not None:
        return name + b" " + section[box.span[0] : box.span[1]]
    address = _address(section, box.addr)
    assert address is not None  # _recipient checked it
    return _with_display(name, _display_name(section, box), address.text)


def _from_field(section: bytes, fields: list[_Field], mail_from: bytes) -> bytes:
    """The one From field: exactly one mailbox, whose address is MAIL FROM."""
    first = fields[0]
    name = _name_bytes(section, first)
    if len(fields) == 1:
        where = _lone_mailbox(section, first.value_start, first.value_end)
        if where is not None:
            return (name + section[first.value_start : where[0]] + mail_from
                    + section[where[1] : first.value_end])
    for f in fields:
        for box in _mailboxes(section, f.value_start, f.value_end).boxes:
            display = _display_name(section, box)
            if display is not None:
                return _with_display(name, display, mail_from)
    return name + b" <" + mail_from + b">"


def _with_display(name: bytes, display: bytes | None, address: bytes) -> bytes:
    """``name: [display] <address>``, folded before the address rather than
    make the last line longer than 78 characters."""
    if display is None:
        return name + b" <" + address + b">"
    nl = display.rfind(b"\n")
    last_line = len(name) + 1 + len(display) if nl < 0 else len(display) - nl - 1
    space = b"\r\n " if last_line + len(address) + 3 > 78 else b" "
    return name + b" " + display + space + b"<" + address + b">"


def _display_name(section: bytes, box: _Mailbox) -> bytes | None:
    """The mailbox's display name when it is only words (atoms, closed
    quoted strings, obsolete dots between them) and folding white space:
    the one part of an unreadable field that is safe to keep."""
    if box.name is None:
        return None
    tokens = [t for t in _tokenize(section, *box.name) if t.kind != _SPACE]
    if _clean_phrase(section, tokens):
        return section[box.name[0] : box.name[1]]
    return None


def _clean_phrase(buf: bytes, tokens: Sequence[_Token]) -> bool:
    """Words, or dots after a word; every quoted string closed."""
    if not tokens or tokens[0].kind not in _WORDS:
        return False
    return all(
        (t.kind in _WORDS and _closed(buf, t)) or _special(buf, t, b".") for t in tokens
    )


_CLOSED_QUOTED = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)


def _closed(buf: bytes, token: _Token) -> bool:
    """Does ``token`` end where its syntax says (the lexer is lenient)?"""
    text = buf[token.start : token.end]
    if token.kind == _QUOTED:
        return _CLOSED_QUOTED.fullmatch(text) is not None
    if token.kind == _LITERAL:
        return len(text) > 1 and text.endswith(b"]")
    if token.kind == _COMMENT:
        return _comment_end(buf, token.start, token.end) == token.end and text.endswith(b")")
    return True


def _lone_mailbox(buf: bytes, start: int, end: int) -> tuple[int, int] | None:
    """Where the address is when ``buf[start:end]`` is exactly one
    well-formed mailbox, else None.

    Well-formed: ``[phrase] <...>`` with only comments after the ``>``, or
    a bare addr-spec with only comments and white space in and around it.
    For the angle form the span is the inside of the brackets (replaced
    whole, a source route included).
    """
    solid = [t for t in _tokenize(buf, start, end) if t.kind != _SPACE]
    if not all(_closed(buf, t) for t in solid):
        return None
    words = [t for t in solid if t.kind != _COMMENT]
    if not words:
        return None
    angles = [i for i, t in enumerate(words) if _special(buf, t, b"<")]
    if not angles:
        if _address(buf, words) is None:
            return None
        return words[0].start, words[-1].end
    lt = angles[0]
    closing = [i for i, t in enumerate(words) if _special(buf, t, b">")]
    if len(angles) != 1 or closing != [len(words) - 1] or lt > closing[0]:
        return None
    phrase = words[:lt]
    if phrase and not _clean_phrase(buf, phrase):
        return None
    return words[lt].end, words[-1].start


def _join(section: bytes, spans: Iterable[tuple[int, int]]) -> bytes:
    return b" ".join(section[a:b] for a, b in spans)


def _show(text: str) -> str:
    """Quote a client's value in a reply: printable ASCII, one line, short."""
    if len(text) > _SHOW_LIMIT:
        return ascii(text[:_SHOW_LIMIT]) + "..."
    return ascii(text)


# --------------------------------------------------------------------------
# The trace field


_HOST_UNSAFE = re.compile(r'[^\x21-\x7e]|[()\\";]')


def _host(text: str, default: str) -> str:
    """A HELO name or the like, made safe to put in a trace field."""
    text = _HOST_UNSAFE.sub("?", text.strip())[:255]
    return text or default


def _tcp_info(client_address: str) -> str:
    try:
        ip = ipaddress.ip_address(client_address.strip().strip("[]").split("%")[0])
    except ValueError:
        return _host(client_address, "unknown")
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return f"[{ip.ipv4_mapped}]"
        return f"[IPv6:{ip.compressed}]"
    return f"[{ip}]"


def received_header(
    *,
    helo: str,
    client_address: str,
    by_host: str,
    protocol: str,
    send_id: str,
    recipient: str | None,
    when: datetime.datetime,
) -> bytes:
    """An RFC 5321 trace field, so that the message's path stays traceable.

    ``when`` should be timezone-aware; a naive one is written as ``-0000``
    (zone unknown).  The recipient appears only when it cannot break the
    field (no controls, spaces or angle brackets).
    """
    lines = [
        ["Received: from", _host(helo, "unknown"), f"({_tcp_info(client_address)})"],
        [
            f"by {_host(by_host, 'localhost')}",
            f"with {_host(protocol, 'ESMTP')}",
            f"id {_host(send_id, 'unknown')}",
        ],
    ]
    date = _date(when.replace(microsecond=0), when.utcoffset())
    if recipient and not re.search(r"[\s<>]", recipient) and recipient.isprintable():
        lines.append([f"for <{recipient}>;", date])
    else:
        lines.append([f"; {date}"])
    out: list[bytes] = []
    for i, words in enumerate(lines):
        line = b"" if i == 0 else b"\t"
        for j, word in enumerate(words):
            w = word.encode("utf-8", "surrogatepass")
            if j == 0:
                line += w
            elif len(line) + 1 + len(w) < 78:
                line += b" " + w
            else:
                out.append(line + b"\r\n")
                line = b"\t" + w
        out.append(line + b"\r\n")
    return b"".join(out)
