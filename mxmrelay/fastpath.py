"""The address reader's fast path, for the shapes nearly every field has.

Almost every From and To a relay sees is one of ``a@b``, ``<a@b>``,
``Name <a@b>`` or ``"Name, Inc." <a@b>``, on one line.  For those, one
regular expression finds every span the full reader
(:mod:`mxmrelay.addresses`) would, without lexing the field token by token
in Python; anything else (comments, folding, groups, several mailboxes,
quoted pairs, obsolete syntax, literals) goes to the full reader.  The
functions here return exactly what their namesakes there return, which
``tests/test_rules_fastpath.py`` checks on generated fields.
"""

from __future__ import annotations

import re

from mxmrelay import addresses
from mxmrelay.addresses import AddressList, Mailbox, Token

#: Bytes the lexer reads as an atom (its ``_ATOM_RE``): so an atom here is
#: a token there.
_ATEXT = rb'[^ \t\r\n()<>\[\]:;@\\,."]+'
_DOT_ATOM = _ATEXT + rb"(?:\." + _ATEXT + rb")*"
_ADDR = _DOT_ATOM + rb"@" + _DOT_ATOM
#: A word: an atom, or a quoted string with no quoted pair and no line break.
_WORD = rb'(?:' + _ATEXT + rb'|"[^"\\\r\n]*")'
_PHRASE = _WORD + rb"(?:[ \t]+" + _WORD + rb")*"

_SHAPE = re.compile(
    rb"[ \t]*(?:(?P<bare>" + _ADDR + rb")|(?:(?P<name>" + _PHRASE + rb")[ \t]*)?"
    rb"<(?P<angle>" + _ADDR + rb")>)[ \t]*")
_CLEAN_PHRASE = re.compile(_PHRASE)
_ADDR_PIECE = re.compile(rb"(" + _ATEXT + rb")|[.@]")


def _shape(buf: bytes, start: int, end: int) -> re.Match[bytes] | None:
    return _SHAPE.fullmatch(buf, start, end)


def _addr_tokens(buf: bytes, start: int, end: int) -> tuple[Token, ...]:
    """The lexer's tokens of a dot-atom addr-spec: atoms, dots and the @."""
    atom, special = addresses._ATOM, addresses._SPECIAL
    return tuple(Token(atom if m.lastindex else special, *m.span())
                 for m in _ADDR_PIECE.finditer(buf, start, end))


def mailboxes(buf: bytes, start: int, end: int) -> AddressList:
    """:func:`mxmrelay.addresses.mailboxes`, fast for the common shapes."""
    m = _shape(buf, start, end)
    if m is None:
        return addresses.mailboxes(buf, start, end)
    if m.start("bare") >= 0:
        s, e = m.span("bare")
        return AddressList([Mailbox((s, e), None, (), None, _addr_tokens(buf, s, e), True)],
                           True)
    s, e = m.span("angle")
    name = m.span("name") if m.start("name") >= 0 else None
    first = name[0] if name is not None else s - 1
    return AddressList([Mailbox((first, e + 1), name, (), (s, e), _addr_tokens(buf, s, e),
                                False)], True)


def lone_mailbox(buf: bytes, start: int, end: int) -> tuple[int, int] | None:
    """:func:`mxmrelay.addresses.lone_mailbox`, fast for the common shapes."""
    m = _shape(buf, start, end)
    if m is None:
        return addresses.lone_mailbox(buf, start, end)
    return m.span("bare") if m.start("bare") >= 0 else m.span("angle")


def display_name(section: bytes, box: Mailbox) -> bytes | None:
    """:func:`mxmrelay.addresses.display_name`, fast for a plain phrase."""
    if box.name is not None and _CLEAN_PHRASE.fullmatch(section, *box.name):
        return section[box.name[0] : box.name[1]]
    return addresses.display_name(section, box)
