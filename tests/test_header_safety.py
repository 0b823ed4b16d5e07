"""The From and the header section, exactly as the rules say.

Two ways past the sender rule were found by fuzzing: a From field that is
more than one mailbox (``<app@example.com> <ceo@victim.example>``) and a
header section whose first line starts with white space (it folded into
the header the relay wrote above it).  These tests prove the fix as a
property over header sections built from RFC 5322's grammar, judged by an
independent strict parser (Python's ``email`` package with
``email.policy.strict``), and over a real session for the two cases found.
"""

from __future__ import annotations

import re
from email import policy
from email.errors import InvalidHeaderDefect
from email.headerregistry import AddressHeader
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from tests.rules_support import MAIL_FROM, RECEIVED, Case, fields, name_of, rules
from tests.support import RelayUnderTest, fetch_bytes, in_thread

RCPTS = ("rcpt@example.org", "other@example.org")
VICTIM = b"ceo@victim.example"
REMOVED = {b"cc", b"bcc", b"x-mxm-flags", b"x-mxm-tag", b"return-path"}
OWNED = REMOVED | {b"from", b"to"}

PROPERTY = settings(max_examples=400, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def strict(headers: bytes) -> EmailMessage:
    message = BytesParser(policy=policy.strict).parsebytes(headers + b"\r\nbody\r\n")
    assert isinstance(message, EmailMessage)
    return message


def only_address(header: Any) -> str:
    """The one address of a parsed address header; fails on any other shape."""
    assert isinstance(header, AddressHeader), header
    # (Defects of encoded words in a display name say nothing of addresses.)
    defects: list[Exception] = getattr(header, "defects", [])
    invalid = [d for d in defects
               if isinstance(d, InvalidHeaderDefect) and "encoded-word" not in str(d)]
    assert not invalid, (str(header), invalid)
    addresses = header.addresses
    assert len(addresses) == 1, (str(header), addresses)
    return str(addresses[0].addr_spec)


# -- header sections from the grammar -------------------------------------

_atom = st.from_regex(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]{1,8}", fullmatch=True)
_qtext = st.from_regex(r'([ !#-\[\]-~]|\\["\\ a-z])*', fullmatch=True)
_quoted = _qtext.map(lambda t: '"' + t + '"')
_encoded = st.sampled_from(["=?utf-8?q?J=C3=B6rg?=", "=?UTF-8?B?T3hmb3Jk?=",
                            "=?utf-8?q?a=2C_<b@c>?=", "=?bad?x?y?="])
_word = st.one_of(_atom, _quoted, _encoded)
_comment = st.recursive(
    st.from_regex(r"[ -'*-\[\]-~]{0,6}", fullmatch=True).map(lambda t: "(" + t + ")"),
    lambda inner: st.lists(inner, max_size=2).map(lambda xs: "(" + " ".join(xs) + ")"),
    max_leaves=3,
)
_cfws = st.one_of(st.just(""), st.just(" "), _comment.map(lambda c: " " + c + " "))
_phrase = st.lists(st.one_of(_word, _word.map(lambda w: w + "."), _comment),
                   min_size=1, max_size=4).map(" ".join)
_addr = st.sampled_from([MAIL_FROM, *RCPTS, VICTIM.decode(), "RCPT@Example.ORG",
                         '"quoted local"@example.org', "x@[192.0.2.1]", "a(c)@b.example",
                         "bad address", "@nolocal.example", "", "a@b@c"])
_angle = st.tuples(st.one_of(st.just(""), st.just("@route.example:")), _addr).map(
    lambda r: "<" + r[0] + r[1] + ">")
_mailbox = st.one_of(
    st.tuples(st.one_of(st.just(""), _phrase), _cfws, _angle, _cfws).map("".join),
    st.tuples(_cfws, _addr, _cfws).map("".join),
)
_group = st.tuples(_phrase, st.lists(_mailbox, max_size=2)).map(
    lambda g: g[0] + ": " + ", ".join(g[1]) + ";")
_garbage = st.sampled_from(["", " <ceo@victim.example>", " ceo@victim.example", ",", ", ,",
                            " >", ' "unterminated', " (unterminated", " \\", ";", ":"])
_address_list = st.tuples(
    st.lists(st.one_of(_mailbox, _group), min_size=0, max_size=3).map(", ".join), _garbage
).map("".join)


def _fold(value: str, where: list[int]) -> str:
    """Fold at some of the spaces (CRLF before the space: RFC 5322 folding)."""
    spaces = [i for i, c in enumerate(value) if c == " "]
    for i in sorted({spaces[w % len(spaces)] for w in where} if spaces else (), reverse=True):
        value = value[:i] + "\r\n" + value[i:]
    return value


_folds = st.lists(st.integers(0, 100), max_size=3)
_address_name = st.sampled_from(["From", "FROM", "from", "From ", "To", "to", "Cc", "Bcc",
                                 "Return-Path", "Reply-To", "Sender", "X-From", "To-Do"])
_other_name = st.sampled_from(["Subject", "X-Custom", "Message-ID", "Received", "X-Mxm-Tag"])
_other_value = st.one_of(_phrase, st.sampled_from(["", " ", "1", "a, b", " order,tag"]))
_flags: st.SearchStrategy[tuple[str, str, str, list[int]]] = st.tuples(
    st.just("X-Mxm-Flags"), st.just(":"), st.sampled_from([" 1", "3", " 0 "]), st.just([]))
_field = st.one_of(
    st.tuples(_address_name, st.sampled_from([":", ": "]), _address_list, _folds),
    st.tuples(_other_name, st.sampled_from([":", ": "]), _other_value, _folds),
    _flags,
).map(lambda f: (f[0] + f[1] + _fold(f[2], f[3]) + "\r\n").encode())
#: A To the rules accept, so that most sections get past them.
_good_to = st.tuples(st.sampled_from(["To: ", "to:", "TO : "]),
                     st.one_of(st.just(""), _phrase.map(lambda p: p + " ")),
                     st.sampled_from(RCPTS), _cfws, _garbage, _folds).map(
    lambda t: (t[0] + _fold(t[1] + "<" + t[2] + ">" + t[3] + t[4], t[5]) + "\r\n").encode())
_leading = st.sampled_from([b""] * 6 + [b"\tBcc: hidden@example.net\r\n",
                                        b" " + VICTIM + b"\r\n"])
_sections = st.tuples(_leading, st.lists(_field, max_size=8), st.integers(0, 8), _good_to).map(
    lambda s: s[0] + b"".join(s[1][:s[2]]) + s[3] + b"".join(s[1][s[2]:]))


class HeaderProperty(Case):
    @PROPERTY
    @given(_sections, st.lists(st.sampled_from(RCPTS), min_size=1, max_size=2))
    def test_stored_header_is_safe(self, headers: bytes, rcpts: list[str]) -> None:
        """Whatever the client wrote: one From (MAIL FROM), at most one To
        (an RCPT), nothing the rules remove, everything else as sent."""
        result = rules(headers, rcpt=tuple(rcpts))
        if not hasattr(result, "headers"):
            return  # refused: a Violation (the rules' tests check its shape)
        out = result.headers
        message = strict(out)
        self.assertEqual(len(message.get_all("From") or []), 1, out)
        self.assertEqual(only_address(message["From"]), MAIL_FROM)
        tos = message.get_all("To") or []
        self.assertLessEqual(len(tos), 1, out)
        for to in tos:
            self.assertIn(only_address(to).lower(), {r.lower() for r in rcpts}, out)
        for name in ("Cc", "Bcc", "X-Mxm-Flags", "X-Mxm-Tag"):
            self.assertIsNone(message[name], out)
        # The strict parser sees exactly the fields we wrote: nothing folded
        # into another field, nothing taken for the start of the body.
        ours = [name_of(f) for f in fields(out)]
        self.assertEqual([k.lower().encode() for k in message.keys()], ours, out)
        # Every other field, byte for byte and in order.
        before = [f for f in fields(headers) if name_of(f) not in OWNED]
        after = [f for f in fields(out[len(RECEIVED):]) if name_of(f) not in OWNED]
        self.assertEqual(after, before)


class FoundCases(Case):
    def test_second_angle_address_is_not_kept(self) -> None:
        for value in (b"<mailfrom@example.com> <ceo@victim.example>",
                      b"<x@y.example> ceo@victim.example",
                      b'"Shop" <x@y.example> <ceo@victim.example>',
                      b"x@y.example <ceo@victim.example>",
                      b"Shop <x@y.example>, ceo@victim.example",
                      b"Staff: ceo@victim.example;",
                      b'"Shop <x@y.example>'):
            send = self.send(b"From: " + value + b"\r\nTo: rcpt@example.org\r\n")
            self.assertNotIn(VICTIM, send.headers, value)
            self.assertEqual(only_address(strict(send.headers)["From"]), MAIL_FROM, value)

    def test_clean_display_name_kept_when_the_field_is_not_one_mailbox(self) -> None:
        send = self.send(b'From: "Shop" <x@y.example> <ceo@victim.example>\r\n'
                         b"To: rcpt@example.org\r\n")
        self.assertIn(b'From: "Shop" <mailfrom@example.com>\r\n', send.headers)
        send = self.send(b"From: Shop (ceo@victim.example) <x@y> <z@w>\r\n"
                         b"To: rcpt@example.org\r\n")
        self.assertIn(b"From: <mailfrom@example.com>\r\n", send.headers)

    def test_display_name_ending_in_a_dot_is_not_kept(self) -> None:
        # Obsolete syntax that a strict parser trips on (found by the property).
        send = self.send(b"To: <rcpt@example.org>\r\nFrom:0.<x@y.example>\r\n")
        self.assertIn(b"From: <mailfrom@example.com>\r\n", send.headers)
        self.assertEqual(only_address(strict(send.headers)["From"]), MAIL_FROM)

    def test_to_with_a_second_address_is_rewritten(self) -> None:
        send = self.send(b"From: <a@b>\r\nTo: <rcpt@example.org> <ceo@victim.example>\r\n")
        self.assertIn(b"To: <rcpt@example.org>\r\n", send.headers)

    def test_leading_white_space_is_refused(self) -> None:
        for first in (b"\tBcc: hidden@example.net", b" x", b" "):
            violation = self.violation(first + b"\r\nTo: rcpt@example.org\r\n")
            self.assertIn("first line starts with white space", violation.text)

    def test_line_that_is_no_field_is_refused(self) -> None:
        violation = self.violation(b"To: rcpt@example.org\r\nnot a field\r\nX: y\r\n")
        self.assertEqual(violation.text, "Malformed header section: line 2 is not a header "
                                         "field: 'not a field'")
        violation = self.violation(b"To: rcpt@example.org\r\n: empty name\r\n")
        self.assertIn("line 2", violation.text)


class OverASession(unittest.TestCase):
    """The two cases the fuzzing found, as a client really sent them."""

    async def exchange(self, relay: RelayUnderTest, data: bytes) -> tuple[int, str, bytes | None]:
        def talk() -> tuple[int, str]:
            c = relay.smtp()
            try:
                c.mail("app@example.com")
                c.rcpt("rcpt@example.org")
                code, text = c.data(data)
                return code, text.decode()
            finally:
                c.quit()

        code, text = await in_thread(talk)
        if code != 250:
            return code, text, None
        assert relay.api is not None
        raw = await fetch_bytes(f"{relay.api.url}/{text.split()[-1]}/message")
        return code, text, raw

    async def test_forged_second_address(self) -> None:
        relay = RelayUnderTest(self)
        code, text, raw = await self.exchange(
            relay, b"From: <app@example.com> <ceo@victim.example>\r\n"
                   b"To: rcpt@example.org\r\nSubject: s\r\n\r\nbody\r\n")
        self.assertEqual(code, 250, text)
        assert raw is not None
        self.assertNotIn(VICTIM, raw)
        head = raw.partition(b"\r\n\r\n")[0]
        self.assertEqual(re.findall(rb"(?m)^From:.*$", head), [b"From: <app@example.com>\r"])

    async def test_leading_continuation_line(self) -> None:
        relay = RelayUnderTest(self)
        for data in (b"\tBcc: hidden@example.net\r\nTo: rcpt@example.org\r\n\r\nbody\r\n",
                     b"\tBcc: hidden@example.net\r\nFrom: <app@example.com>\r\n"
                     b"To: rcpt@example.org\r\n\r\nbody\r\n"):
            code, text, raw = await self.exchange(relay, data)
            self.assertEqual((code, text[:5]), (550, "5.6.0"), text)
            self.assertIsNone(raw)
