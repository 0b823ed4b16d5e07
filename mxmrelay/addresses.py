"""RFC 5322 address lists, read as byte spans.

The rules rewrite From and To without re-serialising them, so this reader
never builds strings from a field: it lexes leniently (anything
unterminated runs to the end), cuts an address-list into mailboxes with
their byte offsets, and says when a span is exactly one well-formed
mailbox.  It never fails on any input; what it cannot read is reported as
not an address, for the rules to refuse or rewrite.  Pure functions.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Iterator, Sequence
from typing import NamedTuple

#: Mailboxes of an address field that the rules look at.
MAX_MAILBOXES = 100

_SPACE, _ATOM, _QUOTED, _COMMENT, _LITERAL, _SPECIAL = range(6)
_WORDS = (_ATOM, _QUOTED)


class Token(NamedTuple):
    kind: int
    start: int
    end: int


_SPACE_RE = re.compile(rb"[ \t\r\n]+")
_ATOM_RE = re.compile(rb'[^ \t\r\n()<>\[\]:;@\\,."]+')
_QUOTED_RE = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_LITERAL_RE = re.compile(rb"\[[^\]\\]*(?:\\.[^\]\\]*)*\]?", re.DOTALL)
_PAREN_RE = re.compile(rb"[()\\]")


def _tokenize(buf: bytes, pos: int, end: int) -> Iterator[Token]:
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
        yield Token(kind, pos, stop)
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


class Mailbox(NamedTuple):
    #: The whole mailbox, first to last non-space byte.
    span: tuple[int, int]
    #: The display name, when there is a phrase before the angle address.
    name: tuple[int, int] | None
    #: Comments standing for an alias where there is no display name.
    comments: tuple[tuple[int, int], ...]
    #: Inside ``<...>``; None for a bare addr-spec or an unterminated ``<``.
    angle: tuple[int, int] | None
    #: The addr-spec's tokens, without spaces, comments or source route.
    addr: tuple[Token, ...]
    #: No ``<`` at all: a bare addr-spec (or something failing to be one).
    bare: bool


class AddressList(NamedTuple):
    boxes: list[Mailbox]
    #: Exactly one mailbox and no group syntax: nothing to rewrite but it.
    alone: bool


def _special(buf: bytes, token: Token, char: bytes) -> bool:
    return token.kind == _SPECIAL and buf[token.start] == char[0]


def mailboxes(buf: bytes, start: int, end: int) -> AddressList:
    """Split an address-list into mailboxes, keeping byte spans, never failing.

    Group names are dropped and group members count as mailboxes.
    """
    boxes: list[Mailbox] = []
    segment: list[Token] = []
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
    return AddressList(boxes, len(boxes) == 1 and not grouped)


def _add_mailbox(buf: bytes, segment: list[Token], out: list[Mailbox]) -> None:
    solid = [t for t in segment if t.kind != _SPACE]
    if all(t.kind == _COMMENT for t in solid):
        return
    span = (solid[0].start, solid[-1].end)
    lt = next((i for i, t in enumerate(solid) if _special(buf, t, b"<")), None)
    if lt is None:
        comments = tuple((t.start, t.end) for t in solid if t.kind == _COMMENT)
        addr = tuple(t for t in solid if t.kind != _COMMENT)
        out.append(Mailbox(span, None, comments, None, addr, True))
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
    out.append(Mailbox(span, name, comments, angle, tuple(inner), False))


class Address(NamedTuple):
    #: The addr-spec as written, without CFWS.
    text: bytes
    local: tuple[Token, ...]
    domain: tuple[Token, ...]


def parse_address(buf: bytes, tokens: Sequence[Token]) -> Address | None:
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
    return Address(text, tuple(local), tuple(domain))


_QUOTED_PAIR = re.compile(rb"\\(.)", re.DOTALL)
_IDN_DOTS = re.compile("[.\u3002\uff0e\uff61]")


def address_key(buf: bytes, address: Address) -> tuple[str, str]:
    """What two addresses must share to be the same mailbox (the docstring
    of :mod:`mxmrelay.rules` says why)."""
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


@functools.lru_cache(maxsize=4096)
def envelope_key(address: str) -> tuple[str, str]:
    # Cached: a relay sees the same few senders and recipients again and
    # again, and tokenizing them is a third of the rules' cost.
    raw = address.encode("utf-8", "surrogatepass")
    tokens = [t for t in _tokenize(raw, 0, len(raw)) if t.kind not in (_SPACE, _COMMENT)]
    parsed = parse_address(raw, tokens)
    if parsed is None:
        return unicodedata.normalize("NFC", address).lower(), ""
    return address_key(raw, parsed)


def display_name(section: bytes, box: Mailbox) -> bytes | None:
    """The mailbox's display name when it is only words (atoms, closed
    quoted strings, obsolete dots between them) and folding white space:
    the one part of an unreadable field that is safe to keep."""
    if box.name is None:
        return None
    tokens = [t for t in _tokenize(section, *box.name) if t.kind != _SPACE]
    if _clean_phrase(section, tokens):
        return section[box.name[0] : box.name[1]]
    return None


def _clean_phrase(buf: bytes, tokens: Sequence[Token]) -> bool:
    """Words, or dots between words (obsolete syntax); every quoted
    string closed.  Not a dot last: a phrase ending ``.`` right before the
    ``<`` trips parsers (Python's email package raises on ``0.<a@b>``)."""
    if not tokens or tokens[0].kind not in _WORDS or tokens[-1].kind not in _WORDS:
        return False
    return all(
        (t.kind in _WORDS and _closed(buf, t)) or _special(buf, t, b".") for t in tokens
    )


_CLOSED_QUOTED = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)


def _closed(buf: bytes, token: Token) -> bool:
    """Does ``token`` end where its syntax says (the lexer is lenient)?"""
    text = buf[token.start : token.end]
    if token.kind == _QUOTED:
        return _CLOSED_QUOTED.fullmatch(text) is not None
    if token.kind == _LITERAL:
        return len(text) > 1 and text.endswith(b"]")
    if token.kind == _COMMENT:
        return _comment_end(buf, token.start, token.end) == token.end and text.endswith(b")")
    return True


def lone_mailbox(buf: bytes, start: int, end: int) -> tuple[int, int] | None:
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
        if parse_address(buf, words) is None:
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

