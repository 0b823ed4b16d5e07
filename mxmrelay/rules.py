"""The Maxemail rules: how a submitted message becomes one transactional send.

Pure functions over the header section's raw bytes (no I/O, no clock, no
Twisted), so that every odd header a client can write has a tested answer and
so that a header the rules do not own leaves exactly as it came in: fields are
located by byte offset and copied, never parsed and re-serialised.  The body
never comes here at all.

Decisions the service description leaves open, and why:

* **Refusals are checked in a fixed order**: X-Mxm-Flags, then X-Mxm-Tag
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

* **Refusal texts** are printable ASCII (RFC 5321's reply text is), so
  anything else from the message is shown escaped, and shortened.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import attrs

from mxmrelay.addresses import Mailbox, address_key, envelope_key, parse_address
from mxmrelay.directory import MAX_FLAGS, CustomerSpace
from mxmrelay.fastpath import display_name, lone_mailbox, mailboxes
from mxmrelay.headers import Field, decode_words, split_fields, unfold
from mxmrelay.reply import Reply

MAX_TAGS = 100
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
    #: What the rules decided beyond the send itself, for the reply that
    #: explains it (:mod:`mxmrelay.explain`): RCPT TO addresses neither
    #: the To nor the BCC, the header fields removed (``Cc``, ``Bcc``),
    #: and the From field's display name as kept (unfolded), if any.
    dropped_recipients: int = 0
    removed_fields: tuple[str, ...] = ()
    from_name: str | None = None


def _refused(text: str) -> Reply:
    """A rule refused the message: the reply the client gets.  A value
    here, returned, never raised: the rules stay free of control flow the
    caller must know about."""
    return Reply(550, "5.6.0", text)


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
) -> Send | Reply:
    """Rewrite the header section by the service's rules, or say why not.

    Never raises on any ``header_section`` bytes.  ``bounce_template`` is
    configuration, checked at start-up: a template ``str.format`` rejects
    raises here rather than bouncing to a wrong address.
    """
    section = header_section
    fields = split_fields(section)
    malformed = _malformed(section, fields)
    if malformed is not None:
        return malformed
    by_name: dict[bytes, list[Field]] = {}
    for f in fields:
        if f.name is not None:
            by_name.setdefault(f.name, []).append(f)

    flags = _flags(section, by_name.get(_FLAGS_HEADER, []), envelope.mail_from, space)
    if isinstance(flags, Reply):
        return flags
    tags = _tags(section, by_name.get(_TAG_HEADER, []), max_tags, max_tag_length)
    if isinstance(tags, Reply):
        return tags
    to = _recipient(section, by_name.get(b"to", []), envelope.recipients)
    if isinstance(to, Reply):
        return to
    to_field, to_text, to_key, to_mailbox = to

    bcc = next((r for r in envelope.recipients if envelope_key(r) != to_key), None)

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
        value = unfold(section, message_ids[0]).strip(b" \t")
        message_id = value.decode("utf-8", "backslashreplace") or None

    removed = tuple(name for name, key in (("Cc", b"cc"), ("Bcc", b"bcc")) if by_name.get(key))
    kept_keys = {to_key} | ({envelope_key(bcc)} if bcc is not None else set())
    return Send(
        dropped_recipients=sum(envelope_key(r) not in kept_keys for r in envelope.recipients),
        removed_fields=removed,
        from_name=_kept_name(replaced.get(from_fields[0].start) if from_fields else None),
        headers=b"".join(out),
        to=to_text,
        bcc=bcc,
        flags=flags,
        bcc_flags=None if bcc is None else flags & ~TRACKING_FLAGS,
        tags=tags,
        return_path=bounce_template.format(id=send_id),
        message_id=message_id,
    )


def _malformed(section: bytes, fields: list[Field]) -> Reply | None:
    """A line that is no header field (see the module docstring)."""
    for f in fields:
        if f.name is not None:
            continue
        if f.start == 0 and section[:1] in (b" ", b"\t"):
            return _refused(
                "Malformed header section: its first line starts with white space"
                " (a header section starts with a field name)"
            )
        line = section.count(b"\r\n", 0, f.start) + 1
        eol = section.find(b"\r\n", f.start, f.end)
        text = section[f.start : f.end if eol < 0 else eol].decode("utf-8", "replace")
        return _refused(
            f"Malformed header section: line {line} is not a header field: {_show(text)}"
        )
    return None


def _flags(
    section: bytes, fields: list[Field], mail_from: str, space: CustomerSpace
) -> int | Reply:
    """The first X-Mxm-Flags field, else the defaults; later fields are ignored."""
    if not fields:
        return space.flags_for(mail_from)
    value = unfold(section, fields[0]).strip(b" \t")
    digits = value.lstrip(b"0") or b"0"
    # bytes.isdigit() is ASCII-only; the length test keeps int() cheap.
    if value.isdigit() and len(digits) <= 2 and int(digits) <= MAX_FLAGS:
        return int(digits)
    shown = _show(value.decode("utf-8", "replace")) if value else "empty value"
    return _refused(
        f"Invalid X-Mxm-Flags header: {shown} (expected a number from 0 to {MAX_FLAGS})"
    )


_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")


def _tags(
    section: bytes, fields: list[Field], max_tags: int, max_tag_length: int
) -> tuple[str, ...] | Reply:
    tags: dict[str, None] = {}  # insertion-ordered set
    for field in fields:
        try:
            text = unfold(section, field).decode("utf-8")
        except UnicodeDecodeError:
            return _refused("Invalid X-Mxm-Tag header: not valid UTF-8")
        if (bad := _control(text)) is not None:
            return bad
        decoded = decode_words(text)
        if decoded is None:
            return _refused("Invalid X-Mxm-Tag header: undecodable RFC 2047 encoded word")
        if (bad := _control(decoded)) is not None:
            return bad
        for part in decoded.split(","):
            tag = part.strip()
            if len(tag) > max_tag_length:
                return _refused(
                    f"Invalid X-Mxm-Tag header: tag {_show(tag)} is {len(tag)} characters"
                    f" long (limit {max_tag_length})"
                )
            if tag:
                tags[tag] = None
    if len(tags) > max_tags:
        return _refused(f"Too many X-Mxm-Tag tags: {len(tags)} (limit {max_tags})")
    return tuple(tags)


def _control(text: str) -> Reply | None:
    m = _CONTROL.search(text)
    if m is None:
        return None
    return _refused(f"Invalid X-Mxm-Tag header: control character U+{ord(m.group()):04X}")


def _recipient(
    section: bytes, fields: list[Field], recipients: Sequence[str]
) -> tuple[Field, str, tuple[str, str], Mailbox | None] | Reply:
    """The To recipient: the first To field's first mailbox, if RCPT has it.

    Returns the field, the address as written, its comparison key, and the
    mailbox when the field needs rewriting to hold just it (else None).
    """
    if not fields:
        return _refused("No To header: the message needs one To recipient")
    field = fields[0]
    parsed = mailboxes(section, field.value_start, field.value_end)
    boxes = parsed.boxes
    if not boxes:
        return _refused("The To header has no address: the message needs one To recipient")
    box = boxes[0]
    address = parse_address(section, box.addr)
    if address is None:
        written = section[box.span[0] : box.span[1]].decode("utf-8", "replace")
        hint = ""
        if len(boxes) > 1 and "@" not in written:
            hint = " (a display name with a comma must be quoted)"
        return _refused(f"The To header's address {_show(written)} is not a valid address{hint}")
    text = address.text.replace(b"\r\n", b"").decode("utf-8", "replace")
    key = address_key(section, address)
    if not any(envelope_key(r) == key for r in recipients):
        return _refused(f"To address {_show(text)} is not one of the RCPT TO recipients")
    kept = (lone_mailbox(section, field.value_start, field.value_end) is not None
            and section[field.value_start - 2] != 0x20 and section[field.value_start - 2] != 0x09)
    return field, text, key, None if kept else box


def _name_bytes(section: bytes, field: Field) -> bytes:
    """The field name as the client wrote it, colon included, without the
    obsolete white space before the colon (see the module docstring)."""
    return section[field.start : field.value_start - 1].rstrip(b" \t") + b":"


def _to_field(section: bytes, field: Field, box: Mailbox) -> bytes:
    """The To field holding just ``box``: its own bytes when it is one
    well-formed mailbox, else rebuilt from its address."""
    name = _name_bytes(section, field)
    if lone_mailbox(section, *box.span) is not None:
        return name + b" " + section[box.span[0] : box.span[1]]
    address = parse_address(section, box.addr)
    assert address is not None  # _recipient checked it
    return _with_display(name, display_name(section, box), address.text)


def _from_field(section: bytes, fields: list[Field], mail_from: bytes) -> bytes:
    """The one From field: exactly one mailbox, whose address is MAIL FROM."""
    first = fields[0]
    name = _name_bytes(section, first)
    if len(fields) == 1:
        where = lone_mailbox(section, first.value_start, first.value_end)
        if where is not None:
            return (name + section[first.value_start : where[0]] + mail_from
                    + section[where[1] : first.value_end])
    for f in fields:
        for box in mailboxes(section, f.value_start, f.value_end).boxes:
            display = display_name(section, box)
            if display is not None:
                return _with_display(name, display, mail_from)
    return name + b" <" + mail_from + b">"


def _kept_name(field: bytes | None) -> str | None:
    """The display name of the From field as written out, unfolded."""
    if field is None:
        return None
    start = field.index(b":") + 1
    boxes = mailboxes(field, start, len(field)).boxes
    name = display_name(field, boxes[0]) if boxes else None
    if name is None:
        return None
    return name.replace(b"\r\n", b"").decode("utf-8", "replace").strip(" \t") or None


def _with_display(name: bytes, display: bytes | None, address: bytes) -> bytes:
    """``name: [display] <address>``, folded before the address rather than
    make the last line longer than 78 characters."""
    if display is None:
        return name + b" <" + address + b">"
    nl = display.rfind(b"\n")
    last_line = len(name) + 1 + len(display) if nl < 0 else len(display) - nl - 1
    space = b"\r\n " if last_line + len(address) + 3 > 78 else b" "
    return name + b" " + display + space + b"<" + address + b">"




def _show(text: str) -> str:
    """Quote a client's value in a reply: printable ASCII, one line, short."""
    if len(text) > _SHOW_LIMIT:
        return ascii(text[:_SHOW_LIMIT]) + "..."
    return ascii(text)

