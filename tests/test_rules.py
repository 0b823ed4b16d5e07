"""Tests for mxmrelay.rules: one table per rule, properties, and a corpus.

The expected outputs are spelled out byte for byte: the point of the rules
module is that nothing it does not own changes, so the tests compare bytes,
not parsed headers.
"""

from __future__ import annotations

import datetime
import os
import re
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mxmrelay.directory import CustomerSpace
from mxmrelay.headers import split_message
from mxmrelay.reply import Reply
from mxmrelay.rules import (
    MAX_TAG_LENGTH,
    MAX_TAGS,
    Envelope,
    Send,
    apply_rules,
)
from mxmrelay.trace import received_header

CORPUS = Path(__file__).parent / "corpus"

SPACE = CustomerSpace(
    id="oxford",
    name="Oxford Stones",
    domains=frozenset({"example.com", "oxford-stones.example"}),
    default_flags=4,
    from_flags={"special@example.com": 9},
)
MAIL_FROM = "mailfrom@example.com"
RCPT = "rcpt@example.org"
TO = b"To: rcpt@example.org"
RECEIVED = (
    b"Received: from client.example ([192.0.2.1])\r\n"
    b"\tby relay.example.net with ESMTPSA id S1\r\n"
    b"\t; Tue, 02 Jan 2024 03:04:05 +0000\r\n"
)
TOUCHED = {b"from", b"to", b"cc", b"bcc", b"return-path", b"x-mxm-flags", b"x-mxm-tag"}

#: Modest by default to keep the file fast; MXMRELAY_RULES_EXAMPLES=5000 for a deep run.
FAST = settings(
    max_examples=int(os.environ.get("MXMRELAY_RULES_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def section(*lines: bytes | str) -> bytes:
    """A header section: each line (str as UTF-8) ended with CRLF."""
    return b"".join((s.encode() if isinstance(s, str) else s) + b"\r\n" for s in lines)


def rules(
    headers: bytes,
    *,
    mail_from: str = MAIL_FROM,
    rcpt: tuple[str, ...] = (RCPT,),
    max_tags: int = MAX_TAGS,
    max_tag_length: int = MAX_TAG_LENGTH,
) -> Send | Reply:
    return apply_rules(
        Envelope(mail_from, rcpt),
        headers,
        SPACE,
        send_id="S1",
        bounce_template="bounce+{id}@bounces.example.net",
        received=RECEIVED,
        max_tags=max_tags,
        max_tag_length=max_tag_length,
    )


def fields(headers: bytes) -> list[bytes]:
    """Fields (each with its CRLF), split independently of the module."""
    return [f for f in re.split(rb"(?<=\r\n)(?![ \t])", headers) if f]


def name_of(field: bytes) -> bytes:
    return field.split(b":", 1)[0].rstrip(b" \t").lower() if b":" in field else b""


class Case(SynchronousTestCase):
    def send(self, headers: bytes, **kw: object) -> Send:
        result = rules(headers, **kw)  # type: ignore[arg-type]
        if not isinstance(result, Send):
            self.fail(f"expected a Send for {headers!r}, got {result!r}")
        self.assertTrue(result.headers.startswith(RECEIVED))
        return result

    def violation(self, headers: bytes, **kw: object) -> Reply:
        result = rules(headers, **kw)  # type: ignore[arg-type]
        if not isinstance(result, Reply):
            self.fail(f"expected a Reply for {headers!r}, got {result!r}")
        self.assertEqual((result.code, result.enhanced), (550, "5.6.0"))
        self.assertTrue(result.text.isascii() and result.text.isprintable(), result.text)
        return result

    def named(self, send: Send, name: bytes) -> list[bytes]:
        """The output's fields called ``name``, without their CRLF."""
        return [f[:-2] for f in fields(send.headers) if name_of(f) == name]


class SplitMessageTests(SynchronousTestCase):
    def test_table(self) -> None:
        table: list[tuple[bytes, int | None]] = [
            (b"", None),
            (b"\r\n", 0),
            (b"\r\nbody", 0),
            (b"\r\n\r\n", 0),
            (b"A: b\r\n\r\n", 6),
            (b"A: b\r\n\r\nbody\r\n\r\nmore", 6),
            (b"A: b\r\n c\r\nD: e\r\n\r\n", 16),
            (b"A: b\r\n", None),
            (b"A: b\r\n\r", None),
            (b"A: b\n\nbody", None),
            (b"A: b\r\n \r\n\r\n", 9),
        ]
        for data, expected in table:
            self.assertEqual(split_message(data), expected, data)
            if expected is not None:
                self.assertTrue(data[:expected] == b"" or data[:expected].endswith(b"\r\n"))
                self.assertTrue(data[expected:].startswith(b"\r\n"))

    @FAST
    @given(st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"a", b":", b" "]), max_size=30))
    def test_agrees_with_naive(self, parts: list[bytes]) -> None:
        data = b"".join(parts)

        def naive(data: bytes) -> int | None:
            for i in range(len(data) + 1):
                at_line_start = i == 0 or data[i - 2 : i] == b"\r\n"
                if at_line_start and data[i : i + 2] == b"\r\n":
                    return i
            return None

        self.assertEqual(split_message(data), naive(data))


class FromTests(Case):
    #: (what, the input's From field(s), the one From field expected)
    TABLE: list[tuple[str, list[bytes], bytes]] = [
        (
            "quoted alias",
            [b'From: "Oxford Stones" <x@y.example>'],
            b'From: "Oxford Stones" <mailfrom@example.com>',
        ),
        (
            "atom alias",
            [b"From: Oxford Stones <x@y.example>"],
            b"From: Oxford Stones <mailfrom@example.com>",
        ),
        (
            "encoded word",
            [b"From: =?UTF-8?Q?J=C3=B6rg?= <a@b.example>"],
            b"From: =?UTF-8?Q?J=C3=B6rg?= <mailfrom@example.com>",
        ),
        (
            "two encoded words",
            [b"From: =?utf-8?B?T3hmb3Jk?= =?utf-8?Q?_Stones?= <a@b>"],
            b"From: =?utf-8?B?T3hmb3Jk?= =?utf-8?Q?_Stones?= <mailfrom@example.com>",
        ),
        (
            "comma in quotes",
            [b'From: "Stones, Oxford" <a@b.example>'],
            b'From: "Stones, Oxford" <mailfrom@example.com>',
        ),
        (
            "escaped quotes",
            [b'From: "Oxford \\"The Rock\\" Stones" <a@b.example>'],
            b'From: "Oxford \\"The Rock\\" Stones" <mailfrom@example.com>',
        ),
        (
            "escaped backslash",
            [b'From: "a\\\\" <a@b.example>'],
            b'From: "a\\\\" <mailfrom@example.com>',
        ),
        (
            "angle in quotes",
            [b'From: "x <y@z>" <a@b.example>'],
            b'From: "x <y@z>" <mailfrom@example.com>',
        ),
        (
            "8-bit alias",
            ["From: Jörg Müller <a@b.example>".encode()],
            "From: Jörg Müller <mailfrom@example.com>".encode(),
        ),
        (
            "UTF-8 address",
            ['From: "Jörg, M." <jörg@bücher.example>'.encode()],
            'From: "Jörg, M." <mailfrom@example.com>'.encode(),
        ),
        ("bare address", [b"From: x@y.example"], b"From: mailfrom@example.com"),
        ("angle only", [b"From: <x@y.example>"], b"From: <mailfrom@example.com>"),
        ("spaces in angle", [b"From: < x@y.example >"], b"From: <mailfrom@example.com>"),
        (
            "comment alias after",
            [b"From: x@y.example (Oxford Stones)"],
            b"From: mailfrom@example.com (Oxford Stones)",
        ),
        (
            "comment alias before",
            [b"From: (Oxford Stones) x@y.example"],
            b"From: (Oxford Stones) mailfrom@example.com",
        ),
        (
            "nested comment",
            [b"From: x@y.example (Oxford (the) Stones)"],
            b"From: mailfrom@example.com (Oxford (the) Stones)",
        ),
        (
            "alias and comment",
            [b'From: "Name" (Comment) <x@y.example>'],
            b'From: "Name" (Comment) <mailfrom@example.com>',
        ),
        (
            "trailing comment",
            [b"From: Name <x@y.example> (Comment)"],
            b"From: Name <mailfrom@example.com> (Comment)",
        ),
        (
            "upper-case name",
            [b"FROM: Oxford <x@y.example>"],
            b"FROM: Oxford <mailfrom@example.com>",
        ),
        ("no spaces", [b"from:Oxford<x@y.example>"], b"from:Oxford<mailfrom@example.com>"),
        (
            "obs space before colon",
            [b"From : Oxford <x@y.example>"],
            # (a parser may read "From " as an mbox separator line)
            b"From: Oxford <mailfrom@example.com>",
        ),
        (
            "folded before address",
            [b'From: "Oxford Stones Limited, Reservations and Enquiries"\r\n <res@os.example>'],
            b'From: "Oxford Stones Limited, Reservations and Enquiries"\r\n <mailfrom@example.com>',
        ),
        (
            "folded in alias",
            [b"From: Oxford\r\n\tStones <x@y.example>"],
            b"From: Oxford\r\n\tStones <mailfrom@example.com>",
        ),
        ("source route", [b"From: <@relay.example:x@y.example>"], b"From: <mailfrom@example.com>"),
        ("quoted local part", [b'From: "john doe"@y.example'], b"From: mailfrom@example.com"),
        ("domain literal", [b"From: x@[192.0.2.1]"], b"From: mailfrom@example.com"),
        (
            "NUL in alias",
            [b'From: "A\x00B" <x@y.example>'],
            b'From: "A\x00B" <mailfrom@example.com>',
        ),
        (
            "trailing comma",
            [b'From: "Name" <x@y.example>,'],
            b'From: "Name" <mailfrom@example.com>',
        ),
        ("empty", [b"From:"], b"From: <mailfrom@example.com>"),
        ("blank", [b"From:   "], b"From: <mailfrom@example.com>"),
        ("null address", [b"From: <>"], b"From: <mailfrom@example.com>"),
        ("no address", [b"From: garbage"], b"From: <mailfrom@example.com>"),
        ("comment only", [b"From: (Oxford Stones)"], b"From: <mailfrom@example.com>"),
        (
            "unterminated angle",
            [b"From: Oxford <x@y.example"],
            b"From: Oxford <mailfrom@example.com>",
        ),
        ("group", [b"From: Sales: a@b.example;"], b"From: <mailfrom@example.com>"),
        (
            "group with alias",
            [b'From: Sales: "Ann" <a@b.example>;'],
            b'From: "Ann" <mailfrom@example.com>',
        ),
        (
            "two mailboxes",
            [b'From: "First" <a@b.example>, "Second" <c@d.example>'],
            b'From: "First" <mailfrom@example.com>',
        ),
        (
            "second has the alias",
            [b'From: a@b.example, "Second" <c@d.example>'],
            b'From: "Second" <mailfrom@example.com>',
        ),
        (
            "alias beats comment",
            [b'From: a@b.example (Cmt), "Named" <c@d.example>'],
            b'From: "Named" <mailfrom@example.com>',
        ),
        (
            "comment alias of many is dropped",
            [b"From: a@b.example (Cmt), c@d.example"],
            b"From: <mailfrom@example.com>",
        ),
        ("no alias in many", [b"From: a@b.example, c@d.example"], b"From: <mailfrom@example.com>"),
        (
            "comma in alias of many",
            [b'From: "Smith, J" <a@b.example>, c@d.example'],
            b'From: "Smith, J" <mailfrom@example.com>',
        ),
        (
            "two fields",
            [b"From: a@b.example", b'From: "Second" <c@d.example>'],
            b'From: "Second" <mailfrom@example.com>',
        ),
        (
            "two fields, first alias wins",
            [b'FROM: "First" <a@b.example>', b'From: "Second" <c@d.example>'],
            b'FROM: "First" <mailfrom@example.com>',
        ),
        (
            "long alias folded when rebuilt",
            [b'From: "' + b"x" * 70 + b'" <a@b.example>, c@d.example'],
            b'From: "' + b"x" * 70 + b'"\r\n <mailfrom@example.com>',
        ),
    ]

    def test_table(self) -> None:
        for what, from_fields, expected in self.TABLE:
            headers = section(b"Subject: s", *from_fields, TO, b"X-Other: o")
            send = self.send(headers)
            self.assertEqual(
                send.headers,
                RECEIVED + section(b"Subject: s", expected, TO, b"X-Other: o"),
                what,
            )

    def test_several_fields_one_result_where_the_first_was(self) -> None:
        headers = section(b"Subject: s", b"From: a@b.example", TO, b"From: <c@d.example>", b"X: y")
        send = self.send(headers)
        self.assertEqual(
            send.headers,
            RECEIVED + section(b"Subject: s", b"From: <mailfrom@example.com>", TO, b"X: y"),
        )

    def test_missing_from_is_added_after_the_trace_field(self) -> None:
        send = self.send(section(b"Subject: s", TO))
        self.assertEqual(
            send.headers,
            RECEIVED + section(b"From: <mailfrom@example.com>", b"Subject: s", TO),
        )

    def test_utf8_mail_from(self) -> None:
        send = self.send(section(b"From: Name <x@y>", TO), mail_from="jörg@bücher.example")
        self.assertEqual(self.named(send, b"from"), ["From: Name <jörg@bücher.example>".encode()])

    def test_from_in_last_line_without_crlf(self) -> None:
        send = self.send(TO + b"\r\nFrom: Name <x@y>")
        self.assertEqual(send.headers, RECEIVED + TO + b"\r\nFrom: Name <mailfrom@example.com>")


class ToTests(Case):
    #: (what, To field(s), RCPT TO, expected To field (None: unchanged), Send.to)
    TABLE: list[tuple[str, list[bytes], tuple[str, ...], bytes | None, str]] = [
        ("plain", [b"To: rcpt@example.org"], (RCPT,), None, RCPT),
        ("alias with comma", [b'To: "Smith, John" <rcpt@example.org>'], (RCPT,), None, RCPT),
        (
            "first of two",
            [b'To: "Smith, John" <rcpt@example.org>, "Other" <other@example.org>'],
            (RCPT, "other@example.org"),
            b'To: "Smith, John" <rcpt@example.org>',
            RCPT,
        ),
        (
            "first of two, bare",
            [b'To: rcpt@example.org, "Other" <o@example.org>'],
            (RCPT,),
            b"To: rcpt@example.org",
            RCPT,
        ),
        (
            "duplicated",
            [b"To: rcpt@example.org, rcpt@example.org"],
            (RCPT,),
            b"To: rcpt@example.org",
            RCPT,
        ),
        ("lower-case name", [b"to: rcpt@example.org"], (RCPT,), None, RCPT),
        (
            "upper-case name",
            [b"TO: rcpt@example.org, b@example.org"],
            (RCPT,),
            b"TO: rcpt@example.org",
            RCPT,
        ),
        ("upper-case address", [b"To: RCPT@Example.ORG"], (RCPT,), None, "RCPT@Example.ORG"),
        ("upper-case RCPT", [b"To: rcpt@example.org"], ("Rcpt@EXAMPLE.org",), None, RCPT),
        (
            "U-label vs A-label",
            ["To: user@bücher.example".encode()],
            ("user@xn--bcher-kva.example",),
            None,
            "user@bücher.example",
        ),
        (
            "A-label vs U-label",
            [b"To: user@XN--BCHER-KVA.example"],
            ("user@bücher.example",),
            None,
            "user@XN--BCHER-KVA.example",
        ),
        (
            "upper-case U-label",
            ["To: user@BÜCHER.example".encode()],
            ("user@bücher.example",),
            None,
            "user@BÜCHER.example",
        ),
        (
            "ideographic full stop",
            ["To: user@bücher\u3002example".encode()],
            ("user@xn--bcher-kva.example",),
            None,
            "user@bücher\u3002example",
        ),
        (
            "UTF-8 local part",
            ["To: jörg@example.org".encode()],
            ("JÖRG@example.org",),
            None,
            "jörg@example.org",
        ),
        (
            "NFD local part",
            ["To: jo\u0308rg@example.org".encode()],
            ("jörg@example.org",),
            None,
            "jo\u0308rg@example.org",
        ),
        (
            "quoted local part",
            [b'To: "john doe"@example.org'],
            ('"John Doe"@example.org',),
            None,
            '"john doe"@example.org',
        ),
        (
            "quoted vs atom",
            [b'To: "john"@example.org'],
            ("john@example.org",),
            None,
            '"john"@example.org',
        ),
        (
            "escaped in quotes",
            [b'To: "a\\"b"@example.org'],
            ('"a\\"b"@example.org',),
            None,
            '"a\\"b"@example.org',
        ),
        (
            "group",
            [b"To: Friends: rcpt@example.org, b@example.org;"],
            (RCPT,),
            b"To: rcpt@example.org",
            RCPT,
        ),
        (
            "single in group",
            [b"To: Friends: rcpt@example.org;"],
            (RCPT,),
            b"To: rcpt@example.org",
            RCPT,
        ),
        (
            "empty group first",
            [b"To: undisclosed-recipients:;, rcpt@example.org"],
            (RCPT,),
            b"To: rcpt@example.org",
            RCPT,
        ),
        ("comment", [b"To: rcpt@example.org (Ann)"], (RCPT,), None, RCPT),
        (
            "comment kept when rewritten",
            [b"To: rcpt@example.org (Ann), b@example.org"],
            (RCPT,),
            b"To: rcpt@example.org (Ann)",
            RCPT,
        ),
        ("comment inside address", [b"To: rcpt(x)@example.org"], (RCPT,), None, RCPT),
        (
            "folded",
            [b'To: "Smith, John"\r\n <rcpt@example.org>,\r\n other@example.org'],
            (RCPT,),
            b'To: "Smith, John"\r\n <rcpt@example.org>',
            RCPT,
        ),
        ("source route", [b"To: <@relay.example:rcpt@example.org>"], (RCPT,), None, RCPT),
        ("root dot", [b"To: rcpt@example.org."], (RCPT,), None, "rcpt@example.org."),
        (
            "encoded-word alias",
            [b"To: =?UTF-8?Q?Ren=C3=A9e?= <rcpt@example.org>, x@example.org"],
            (RCPT,),
            b"To: =?UTF-8?Q?Ren=C3=A9e?= <rcpt@example.org>",
            RCPT,
        ),
        (
            "8-bit alias",
            ["To: Renée <rcpt@example.org>, x@example.org".encode()],
            (RCPT,),
            "To: Renée <rcpt@example.org>".encode(),
            RCPT,
        ),
        ("RCPT not first", [b"To: rcpt@example.org"], ("b@example.org", RCPT), None, RCPT),
        (
            "domain literal",
            [b"To: rcpt@[192.0.2.7]"],
            ("rcpt@[192.0.2.7]",),
            None,
            "rcpt@[192.0.2.7]",
        ),
    ]

    def test_table(self) -> None:
        for what, to_fields, rcpt, expected, to in self.TABLE:
            send = self.send(section(b"From: <f@example.com>", *to_fields, b"X: y"), rcpt=rcpt)
            out_to = to_fields[0] if expected is None else expected
            self.assertEqual(
                send.headers,
                RECEIVED + section(b"From: <mailfrom@example.com>", out_to, b"X: y"),
                what,
            )
            self.assertEqual(send.to, to, what)

    def test_later_to_fields_are_removed(self) -> None:
        send = self.send(section(b"To: rcpt@example.org", b"X: y", b"To: other@example.org"))
        self.assertEqual(self.named(send, b"to"), [b"To: rcpt@example.org"])
        self.assertEqual(send.to, RCPT)

    #: (what, header section, RCPT TO, words the reply must contain)
    VIOLATIONS: list[tuple[str, bytes, tuple[str, ...], list[str]]] = [
        ("no To", section(b"Subject: s"), (RCPT,), ["No To header"]),
        ("only Cc", section(b"Cc: rcpt@example.org"), (RCPT,), ["No To header"]),
        ("empty", section(b"To:"), (RCPT,), ["no address"]),
        ("blank folded", section(b"To: \r\n "), (RCPT,), ["no address"]),
        ("empty group", section(b"To: undisclosed-recipients:;"), (RCPT,), ["no address"]),
        ("comment only", section(b"To: (nobody)"), (RCPT,), ["no address"]),
        ("not an address", section(b"To: rcpt"), (RCPT,), ["'rcpt'", "not a valid address"]),
        (
            "phrase without angle",
            section(b"To: Ann rcpt@example.org"),
            (RCPT,),
            ["not a valid address"],
        ),
        (
            "unquoted comma in the alias",
            section(b"To: Smith, John <rcpt@example.org>"),
            (RCPT,),
            ["'Smith' is not a valid address (a display name with a comma must be quoted)"],
        ),
        ("quoted only", section(b'To: "rcpt@example.org"'), (RCPT,), ["not a valid address"]),
        ("two ats", section(b"To: a@b@example.org"), ("a@b@example.org",), ["not a valid address"]),
        (
            "not in RCPT",
            section(b"To: someone@example.org"),
            (RCPT,),
            ["To address 'someone@example.org' is not one of the RCPT TO recipients"],
        ),
        ("similar domain", section(b"To: rcpt@example.org.uk"), (RCPT,), ["rcpt@example.org.uk"]),
        (
            "umlaut is not its base letter",
            section("To: user@bücher.example"),
            ("user@bucher.example",),
            ["user@b\\xfccher.example"],
        ),
        (
            "first address counts",
            section(b"To: other@example.org, rcpt@example.org"),
            (RCPT,),
            ["other@example.org"],
        ),
        (
            "first field counts",
            section(b"To: other@example.org", b"To: rcpt@example.org"),
            (RCPT,),
            ["other@example.org"],
        ),
        (
            "first field has no address",
            section(b"To: undisclosed-recipients:;", b"To: rcpt@example.org"),
            (RCPT,),
            ["no address"],
        ),
        ("control characters shown escaped", section(b'To: "a\rb"@example.org'), (RCPT,), ["\\r"]),
        (
            "long address shortened",
            section(b"To: " + b"a" * 300 + b"@example.org"),
            (RCPT,),
            ["..."],
        ),
    ]

    def test_violations(self) -> None:
        for what, headers, rcpt, words in self.VIOLATIONS:
            v = self.violation(headers, rcpt=rcpt)
            for word in words:
                self.assertIn(word, v.text, what)
            self.assertLess(len(v.text), 200, what)

    def test_cc_and_bcc_removed(self) -> None:
        headers = section(
            b"Cc: a@example.org",
            TO,
            b"CC: b@example.org,\r\n c@example.org",
            b"bcc: d@example.org",
            b"Bcc:",
            b"Resent-Cc: kept@example.org",
            b"X-Cc: kept",
        )
        send = self.send(headers, rcpt=(RCPT, "a@example.org"))
        self.assertEqual(
            send.headers,
            RECEIVED
            + section(
                b"From: <mailfrom@example.com>", TO, b"Resent-Cc: kept@example.org", b"X-Cc: kept"
            ),
        )


class BccTests(Case):
    #: (what, RCPT TO, expected bcc)
    TABLE: list[tuple[str, tuple[str, ...], str | None]] = [
        ("only the To", (RCPT,), None),
        ("one more", (RCPT, "b@example.org"), "b@example.org"),
        ("before the To", ("b@example.org", RCPT), "b@example.org"),
        ("first of several", (RCPT, "b@example.org", "c@example.org"), "b@example.org"),
        ("To repeated", (RCPT, RCPT), None),
        ("To in other case", (RCPT, "RCPT@EXAMPLE.ORG", "b@example.org"), "b@example.org"),
        ("To quoted", (RCPT, '"rcpt"@example.org', "b@example.org"), "b@example.org"),
        ("To as A-label", ("rcpt@EXAMPLE.org.", RCPT, "c@x.example"), "c@x.example"),
        ("kept as given", (RCPT, "B@Example.org", "b@example.org"), "B@Example.org"),
        ("UTF-8", (RCPT, "zoë@bücher.example"), "zoë@bücher.example"),
    ]

    def test_table(self) -> None:
        for what, rcpt, bcc in self.TABLE:
            send = self.send(section(TO), rcpt=rcpt)
            self.assertEqual(send.bcc, bcc, what)

    def test_idn_to(self) -> None:
        send = self.send(
            section("To: user@bücher.example"), rcpt=("user@xn--bcher-kva.example", "z@x.example")
        )
        self.assertEqual(send.bcc, "z@x.example")

    def test_bcc_flags_clear_tracking(self) -> None:
        for value, flags, bcc_flags in [(b"15", 15, 12), (b"3", 3, 0), (b"6", 6, 4), (b"0", 0, 0)]:
            send = self.send(section(TO, b"X-Mxm-Flags: " + value), rcpt=(RCPT, "b@example.org"))
            self.assertEqual((send.flags, send.bcc_flags), (flags, bcc_flags), value)

    def test_no_bcc_no_bcc_flags(self) -> None:
        send = self.send(section(TO, b"X-Mxm-Flags: 15"))
        self.assertEqual((send.bcc, send.bcc_flags), (None, None))


class FlagsTests(Case):
    #: (what, fields, expected flags)
    TABLE: list[tuple[str, list[bytes], int]] = [
        ("absent: space default", [], 4),
        ("three", [b"X-Mxm-Flags: 3"], 3),
        ("zero overrides the default", [b"X-Mxm-Flags: 0"], 0),
        ("fifteen", [b"X-Mxm-Flags: 15"], 15),
        ("lower-case name", [b"x-mxm-flags: 8"], 8),
        ("upper-case name", [b"X-MXM-FLAGS:  7 "], 7),
        ("tabs", [b"X-Mxm-Flags:\t1\t"], 1),
        ("no space", [b"X-Mxm-Flags:2"], 2),
        ("folded", [b"X-Mxm-Flags:\r\n 3"], 3),
        ("folded after", [b"X-Mxm-Flags: 3\r\n "], 3),
        ("leading zeros", [b"X-Mxm-Flags: 003"], 3),
        ("zeros", [b"X-Mxm-Flags: 00"], 0),
        ("many leading zeros", [b"X-Mxm-Flags: " + b"0" * 5000 + b"1"], 1),
        ("first wins", [b"X-Mxm-Flags: 1", b"X-Mxm-Flags: 2"], 1),
        ("later junk ignored", [b"X-Mxm-Flags: 1", b"X-Mxm-Flags: junk", b"X-Mxm-Flags:"], 1),
    ]

    def test_table(self) -> None:
        for what, flag_fields, flags in self.TABLE:
            send = self.send(section(TO, *flag_fields, b"X: y"))
            self.assertEqual(send.flags, flags, what)
            self.assertEqual(
                send.headers, RECEIVED + section(b"From: <mailfrom@example.com>", TO, b"X: y")
            )

    def test_per_address_default(self) -> None:
        for mail_from in ["special@example.com", "Special@EXAMPLE.com"]:
            self.assertEqual(self.send(section(TO), mail_from=mail_from).flags, 9)
        self.assertEqual(
            self.send(section(TO, b"X-Mxm-Flags: 2"), mail_from="special@example.com").flags, 2
        )

    INVALID: list[tuple[bytes, str]] = [
        (b"", "empty value"),
        (b"   ", "empty value"),
        (b"0x3", "'0x3'"),
        (b"-1", "'-1'"),
        (b"+3", "'+3'"),
        (b"16", "'16'"),
        (b"99", "'99'"),
        (b"3.0", "'3.0'"),
        (b"3 4", "'3 4'"),
        (b"1,2", "'1,2'"),
        (b"three", "'three'"),
        ("\u0661".encode(), "'\\u0661'"),
        ("\uff13".encode(), "'\\uff13'"),
        (b"9" * 5000, "..."),
        (b"3\x00", "'3\\x00'"),
        (b"3\r4", "'3\\r4'"),
        (b"\xff", "'\\ufffd'"),
    ]

    def test_invalid(self) -> None:
        for value, shown in self.INVALID:
            v = self.violation(section(TO, b"X-Mxm-Flags: " + value))
            self.assertTrue(v.text.startswith("Invalid X-Mxm-Flags header: "), v.text)
            self.assertIn(shown, v.text, value)
            self.assertIn("0 to 15", v.text)

    def test_first_invalid_counts(self) -> None:
        self.violation(section(TO, b"X-Mxm-Flags: x", b"X-Mxm-Flags: 3"))


class TagTests(Case):
    #: (what, fields, expected tags)
    TABLE: list[tuple[str, list[bytes], tuple[str, ...]]] = [
        ("absent", [], ()),
        (
            "one header",
            [b"X-Mxm-Tag: order,confirmation,guest"],
            ("order", "confirmation", "guest"),
        ),
        (
            "several headers",
            [b"X-Mxm-Tag: order", b"X-Mxm-Tag: confirmation", b"X-Mxm-Tag: guest"],
            ("order", "confirmation", "guest"),
        ),
        (
            "whitespace stripped",
            [b"X-Mxm-Tag:  order ,\tconfirmation , guest "],
            ("order", "confirmation", "guest"),
        ),
        ("inner space kept", [b"X-Mxm-Tag: order confirmation"], ("order confirmation",)),
        (
            "empty tags dropped",
            [b"X-Mxm-Tag: a,, b, ,", b"X-Mxm-Tag:", b"X-Mxm-Tag: ,"],
            ("a", "b"),
        ),
        ("duplicates", [b"X-Mxm-Tag: a,b,a", b"X-Mxm-Tag: b, c"], ("a", "b", "c")),
        ("case matters", [b"X-Mxm-Tag: Order,order"], ("Order", "order")),
        ("name case", [b"x-mxm-tag: a", b"X-MXM-TAG: b"], ("a", "b")),
        ("folded", [b"X-Mxm-Tag: order,\r\n confirmation"], ("order", "confirmation")),
        ("folded inside a tag", [b"X-Mxm-Tag: first\r\n second"], ("first second",)),
        ("UTF-8", ["X-Mxm-Tag: café, Zürich".encode()], ("café", "Zürich")),
        ("unicode whitespace", ["X-Mxm-Tag: \u00a0café\u3000".encode()], ("café",)),
        ("q encoded word", [b"X-Mxm-Tag: =?utf-8?q?caf=C3=A9?="], ("café",)),
        ("b encoded word", [b"X-Mxm-Tag: =?UTF-8?B?Y2Fmw6k=?="], ("café",)),
        ("latin-1 encoded word", [b"X-Mxm-Tag: =?iso-8859-1?Q?caf=E9?="], ("café",)),
        ("adjacent encoded words", [b"X-Mxm-Tag: =?utf-8?q?ca?= =?utf-8?q?f=C3=A9?="], ("café",)),
        (
            "encoded word among text",
            [b"X-Mxm-Tag: security, =?utf-8?q?caf=C3=A9?="],
            ("security", "café"),
        ),
        ("comma in encoded word", [b"X-Mxm-Tag: =?utf-8?q?a,b?="], ("a", "b")),
        ("not an encoded word", [b"X-Mxm-Tag: =?x, ?="], ("=?x", "?=")),
    ]

    def test_table(self) -> None:
        for what, tag_fields, tags in self.TABLE:
            send = self.send(section(*tag_fields, TO))
            self.assertEqual(send.tags, tags, what)
            self.assertEqual(self.named(send, b"x-mxm-tag"), [], what)

    INVALID: list[tuple[str, bytes, str]] = [
        ("not UTF-8", b"X-Mxm-Tag: caf\xe9", "not valid UTF-8"),
        ("NUL", b"X-Mxm-Tag: a\x00b", "U+0000"),
        ("escape", b"X-Mxm-Tag: a\x1bb", "U+001B"),
        ("bare LF", b"X-Mxm-Tag: a\nb", "U+000A"),
        ("bare CR", b"X-Mxm-Tag: a\rb", "U+000D"),
        ("DEL", b"X-Mxm-Tag: a\x7fb", "U+007F"),
        ("C1 control", "X-Mxm-Tag: a\x85b".encode(), "U+0085"),
        ("line separator", "X-Mxm-Tag: a\u2028b".encode(), "U+2028"),
        ("encoded control", b"X-Mxm-Tag: =?utf-8?q?a=0Ab?=", "U+000A"),
        ("bad base64", b"X-Mxm-Tag: =?utf-8?b?####?=", "encoded word"),
        ("bad UTF-8 in encoded word", b"X-Mxm-Tag: =?utf-8?q?=FF?=", "encoded word"),
        ("unknown charset", b"X-Mxm-Tag: =?x-nonesuch?q?a?=", "encoded word"),
        ("not a charset", b"X-Mxm-Tag: =?punycode?q?a?=", "encoded word"),
    ]

    def test_invalid(self) -> None:
        for what, field, words in self.INVALID:
            v = self.violation(section(TO, b"X-Mxm-Tag: ok", field))
            self.assertTrue(v.text.startswith("Invalid X-Mxm-Tag header: "), what)
            self.assertIn(words, v.text, what)

    def test_count_limit(self) -> None:
        many = ",".join(f"t{i}" for i in range(MAX_TAGS)).encode()
        self.assertEqual(len(self.send(section(TO, b"X-Mxm-Tag: " + many)).tags), MAX_TAGS)
        # duplicates do not count
        again = self.send(section(TO, b"X-Mxm-Tag: " + many, b"X-Mxm-Tag: t0, t1"))
        self.assertEqual(len(again.tags), MAX_TAGS)
        v = self.violation(section(TO, b"X-Mxm-Tag: " + many, b"X-Mxm-Tag: one-more"))
        self.assertEqual(v.text, "Too many X-Mxm-Tag tags: 101 (limit 100)")

    def test_count_limit_parameter(self) -> None:
        self.send(section(TO, b"X-Mxm-Tag: a, b"), max_tags=2)
        v = self.violation(section(TO, b"X-Mxm-Tag: a, b", b"X-Mxm-Tag: c"), max_tags=2)
        self.assertIn("limit 2", v.text)

    def test_length_limit(self) -> None:
        ok = "é" * MAX_TAG_LENGTH  # characters, not bytes
        self.assertEqual(self.send(section(TO, "X-Mxm-Tag: " + ok)).tags, (ok,))
        v = self.violation(section(TO, b"X-Mxm-Tag: a, " + b"x" * (MAX_TAG_LENGTH + 1)))
        self.assertIn("is 256 characters long (limit 255)", v.text)
        self.assertLess(len(v.text), 200)
        v = self.violation(section(TO, b"X-Mxm-Tag: abcd"), max_tag_length=3)
        self.assertIn("'abcd' is 4 characters long (limit 3)", v.text)


class OrderTests(Case):
    """Violations come in a fixed order: flags, then tags, then To."""

    def test_order(self) -> None:
        bad_flags, bad_tag = b"X-Mxm-Flags: x", b"X-Mxm-Tag: \xff"
        self.assertIn("X-Mxm-Flags", self.violation(section(bad_tag, bad_flags)).text)
        self.assertIn("X-Mxm-Tag", self.violation(section(b"To: x@y", bad_tag)).text)
        self.assertIn("To", self.violation(section(b"To: x@y", b"X-Mxm-Tag: a")).text)

    def test_tag_length_before_count(self) -> None:
        v = self.violation(
            section(TO, b"X-Mxm-Tag: a, b, c", b"X-Mxm-Tag: " + b"x" * 9),
            max_tags=2,
            max_tag_length=5,
        )
        self.assertIn("characters long", v.text)


class OtherRuleTests(Case):
    def test_return_path(self) -> None:
        send = self.send(
            section(b"Return-Path: <a@b>", TO, b"return-path: <>", b"RETURN-PATH:\r\n <c@d>")
        )
        self.assertEqual(send.return_path, "bounce+S1@bounces.example.net")
        self.assertEqual(send.headers, RECEIVED + section(b"From: <mailfrom@example.com>", TO))

    def test_received_first_before_existing_trace_fields(self) -> None:
        old = b"Received: from a by b; Tue, 02 Jan 2024 03:00:00 +0000"
        send = self.send(section(old, b"From: <x@y>", TO))
        self.assertEqual(send.headers, RECEIVED + section(old, b"From: <mailfrom@example.com>", TO))

    def test_received_without_crlf_gets_one(self) -> None:
        result = apply_rules(
            Envelope(MAIL_FROM, (RCPT,)),
            section(b"From: <x@y>", TO),
            SPACE,
            send_id="S1",
            bounce_template="{id}@b.example",
            received=b"Received: from x by y; date",
        )
        assert isinstance(result, Send)
        self.assertTrue(result.headers.startswith(b"Received: from x by y; date\r\nFrom: "))

    def test_mxm_headers_removed(self) -> None:
        send = self.send(section(b"X-Mxm-Flags: 1", TO, b"X-Mxm-Tag: a", b"X-Mxm-Other: kept"))
        self.assertEqual(
            send.headers,
            RECEIVED + section(b"From: <mailfrom@example.com>", TO, b"X-Mxm-Other: kept"),
        )

    MESSAGE_IDS: list[tuple[list[bytes], str | None]] = [
        ([], None),
        ([b"Message-ID: <abc@example.com>"], "<abc@example.com>"),
        ([b"message-id:\r\n <abc@example.com> "], "<abc@example.com>"),
        ([b"Message-Id: <a@x>", b"Message-ID: <b@x>"], "<a@x>"),
        ([b"Message-ID:"], None),
        ([b"Message-ID: <\xff@x>"], "<\\xff@x>"),
        ([b"Message-ID: <abc@example.com> (comment)"], "<abc@example.com> (comment)"),
    ]

    def test_message_id(self) -> None:
        for message_ids, expected in self.MESSAGE_IDS:
            send = self.send(section(*message_ids, TO))
            self.assertEqual(send.message_id, expected, message_ids)
            self.assertEqual(self.named(send, b"message-id"), [m for m in message_ids])


class UntouchedTests(Case):
    def test_odd_headers_keep_their_bytes_and_order(self) -> None:
        odd = [
            b"Subject: =?UTF-8?B?SGVsbG8=?=\r\n =?UTF-8?Q?_W=C3=B6rld?=",
            b"X-No-Space:value",
            b"X-Odd-Spacing  :   value   ",
            b"X-Empty:",
            b"X-Blank: ",
            b"X-After-Blank-Continuation: x",
            b"X-Nul: a\x00b",
            "X-8bit: Grüße, Köln".encode(),
            b"X-Bad-UTF8: \xff\xfe",
            b"X-Bare-LF: a\nb",
            b"X-Bare-CR: a\rb",
            b"X-Obs-Fold: a\r\n   \r\n b",
            b"X-Long: " + b"x" * 2000,
            b"Received: from older by relay",
            b"Sender: someone@example.net",
            b'Reply-To: "Support" <s@example.com>',
            b"Resent-From: r@example.net",
            b"Message-ID: <id@example.com>",
            b"FROM-ADDRESS: not a From field",
            b"X-Mxm-Flagsy: 99",
            b"To-Do: also not a To",
        ]
        headers = section(*odd[:5], b"From: Name <x@y>", *odd[5:15], TO, *odd[15:])
        send = self.send(headers)
        expected = section(
            *odd[:5], b"From: Name <mailfrom@example.com>", *odd[5:15], TO, *odd[15:]
        )
        self.assertEqual(send.headers, RECEIVED + expected)

    def test_round_trip_with_body(self) -> None:
        body = b"\r\nFrom: not a header\r\nTo: nor this\r\n\r\n.\r\n"
        message = section(b"Subject: s", b"From: <x@y>", TO, b"X-Mxm-Tag: t") + body
        i = split_message(message)
        assert i is not None
        send = self.send(message[:i])
        self.assertEqual(
            send.headers + message[i:],
            RECEIVED + section(b"Subject: s", b"From: <mailfrom@example.com>", TO) + body,
        )

    def test_large_inputs_are_linear(self) -> None:
        """Tens of thousands of lines, mailboxes or nested parentheses take no time."""
        inputs = [
            section(*[b"X-H%d: v" % i for i in range(20000)], TO),
            section(b"To: rcpt@example.org" + b", a@example.org" * 20000),
            section(TO, b"X-F: a" + b"\r\n b" * 20000),
            section(b"From: " + b"(" * 50000 + b"x" + b")" * 50000 + b" <a@b>", TO),
            section(b'From: "' + b"\\x" * 100000 + b'" <a@b>', TO),
            section(TO, b"X-Mxm-Tag: " + b"a," * 50000),
            section(TO, b"X-Mxm-Tag: " + b"=?utf-8?q?a?= " * 20000),
            section(b"To: " + b"<" * 50000),
        ]
        for headers in inputs:
            start = time.perf_counter()
            rules(headers)
            self.assertLess(time.perf_counter() - start, 2.0, headers[:40])


class ReceivedHeaderTests(SynchronousTestCase):
    WHEN = datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)

    def received(self, **kw: object) -> bytes:
        args: dict[str, object] = dict(
            helo="client.example",
            client_address="192.0.2.1",
            by_host="relay.example.net",
            protocol="ESMTPSA",
            send_id="S1",
            recipient="rcpt@example.org",
            when=self.WHEN,
        )
        args.update(kw)
        return received_header(**args)  # type: ignore[arg-type]

    def test_shape(self) -> None:
        self.assertEqual(
            self.received(),
            b"Received: from client.example ([192.0.2.1])\r\n"
            b"\tby relay.example.net with ESMTPSA id S1\r\n"
            b"\tfor <rcpt@example.org>; Tue, 02 Jan 2024 03:04:05 +0000\r\n",
        )

    def test_without_recipient(self) -> None:
        self.assertEqual(
            self.received(recipient=None).splitlines()[-1],
            b"\t; Tue, 02 Jan 2024 03:04:05 +0000",
        )

    def test_unsafe_recipient_left_out(self) -> None:
        for recipient in ["a b@example.org", "a>@example.org", "a\r\n@x", "\ud800@x", ""]:
            self.assertNotIn(b"for", self.received(recipient=recipient), recipient)

    def test_utf8_recipient(self) -> None:
        self.assertIn(
            "for <zoë@bücher.example>;".encode(), self.received(recipient="zoë@bücher.example")
        )

    def test_addresses(self) -> None:
        for address, literal in [
            ("192.0.2.1", b"([192.0.2.1])"),
            ("2001:db8::1", b"([IPv6:2001:db8::1])"),
            ("2001:0db8:0:0:0:0:0:1", b"([IPv6:2001:db8::1])"),
            ("::ffff:192.0.2.1", b"([192.0.2.1])"),
            ("fe80::1%eth0", b"([IPv6:fe80::1])"),
            ("[192.0.2.1]", b"([192.0.2.1])"),
            ("not an address", b"(not?an?address)"),
            ("", b"(unknown)"),
        ]:
            self.assertIn(literal, self.received(client_address=address).splitlines()[0])

    def test_helo_sanitised(self) -> None:
        for helo, shown in [
            ("[192.0.2.1]", b"[192.0.2.1]"),
            ("my laptop", b"my?laptop"),
            ("h\u00e9lo", b"h?lo"),
            ('a;b(c)"d\\', b"a?b?c??d?"),
            ("a\r\nX-Injected: 1", b"a??X-Injected:?1"),
            ("", b"unknown"),
            ("   ", b"unknown"),
        ]:
            first = self.received(helo=helo).split(b"\r\n")[0]
            self.assertEqual(first, b"Received: from " + shown + b" ([192.0.2.1])", helo)
        self.assertIn(b"by relay?example ", self.received(by_host="relay example"))

    def test_folding(self) -> None:
        long = "h" * 60 + ".example"
        out = self.received(helo=long, by_host="r" * 50 + ".example", send_id="X" * 20)
        lines = out.split(b"\r\n")
        self.assertEqual(lines[-1], b"")
        for line in lines[:-1]:
            self.assertLess(len(line), 78, line)
        self.assertEqual(lines[:3], [b"Received: from", b"\t" + long.encode(), b"\t([192.0.2.1])"])
        # a HELO that fits stays on the first line
        short = self.received(helo="h" * 52 + ".example").split(b"\r\n")
        self.assertEqual(short[0], b"Received: from " + b"h" * 52 + b".example")
        self.assertEqual(short[1], b"\t([192.0.2.1])")
        # a name too long to fold stays whole rather than being cut
        huge = self.received(helo="h" * 300)
        self.assertIn(b"h" * 255 + b"\r\n", huge)
        self.assertNotIn(b"h" * 256, huge)

    def test_times(self) -> None:
        tz = datetime.timezone(datetime.timedelta(hours=1))
        self.assertIn(
            b"Tue, 02 Jan 2024 04:04:05 +0100", self.received(when=self.WHEN.astimezone(tz))
        )
        naive = datetime.datetime(2024, 1, 2, 3, 4, 5)
        self.assertIn(b"Tue, 02 Jan 2024 03:04:05 -0000", self.received(when=naive))

    def test_every_line_ends_in_crlf(self) -> None:
        out = self.received(helo="a\rb\nc", by_host="x\x00y", protocol="ESMTP SA", send_id="i d")
        self.assertTrue(out.endswith(b"\r\n"))
        self.assertNotIn(b"\r", out.replace(b"\r\n", b""))
        self.assertNotIn(b"\n", out.replace(b"\r\n", b""))
        self.assertTrue(out.isascii())


# ----------------------------------------------------------------------------
# Properties

_names = st.from_regex(rb"[A-Za-z0-9-]{1,20}", fullmatch=True).filter(
    lambda n: n.lower() not in TOUCHED
)
# Values: any bytes except LF (so no CRLF appears by chance), folded at random.
_value_lines = st.lists(
    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), min_size=1, max_size=3
)
_untouched = st.tuples(_names, _value_lines).map(
    lambda nv: nv[0] + b":" + b"\r\n ".join(nv[1]) + b"\r\n"
)
_header_bytes = st.one_of(
    st.binary(max_size=300),
    st.lists(
        st.tuples(
            st.sampled_from(
                [
                    b"From",
                    b"to",
                    b"CC",
                    b"Bcc",
                    b"X-Mxm-Flags",
                    b"X-Mxm-Tag",
                    b"Return-Path",
                    b"Message-ID",
                    b"Subject",
                    b"x",
                ]
            ),
            st.binary(max_size=60),
        ).map(lambda nv: nv[0] + b":" + nv[1] + b"\r\n"),
        max_size=8,
    ).map(b"".join),
    st.lists(
        st.sampled_from(
            [
                b"From:",
                b"To:",
                b" ",
                b"\t",
                b"\r\n",
                b"<",
                b">",
                b'"',
                b"\\",
                b"(",
                b")",
                b",",
                b";",
                b":",
                b"@",
                b"[",
                b"]",
                b"a",
                b"\xc3",
                b"=?utf-8?q?",
                b"?=",
                b"X-Mxm-Tag:",
                b"X-Mxm-Flags:",
            ]
        ),
        max_size=60,
    ).map(b"".join),
)


class PropertyTests(Case):
    @FAST
    @given(
        _header_bytes,
        st.lists(st.text(max_size=20), max_size=3),
        # MAIL FROM comes validated (mxmrelay.envelope): never a control character
        st.text(st.characters(blacklist_categories=["Cc"]), max_size=20),
    )
    def test_never_raises(self, headers: bytes, rcpt: list[str], mail_from: str) -> None:
        """Whatever the bytes: a Send or a Reply, and a Send keeps the invariants."""
        for data in [headers, headers + section(TO), section(TO) + headers]:
            for recipients in [tuple(rcpt), (RCPT, *rcpt)]:
                result = rules(data, rcpt=recipients, mail_from=mail_from)
                if isinstance(result, Reply):
                    self.assertTrue(result.text.isascii() and result.text.isprintable())
                    continue
                self.assertIsInstance(result, Send)
                self.assertTrue(result.headers.startswith(RECEIVED))
                names = [name_of(f) for f in fields(result.headers[len(RECEIVED) :])]
                self.assertEqual(names.count(b"from"), 1, result.headers)
                self.assertEqual(names.count(b"to"), 1, result.headers)
                self.assertFalse(TOUCHED.intersection(names) - {b"from", b"to"})
                self.assertTrue(result.to.isprintable(), result.to)
                self.assertIn(result.bcc, (None, *recipients))

    @FAST
    @given(st.text(max_size=300), st.text(max_size=50), st.text(max_size=50))
    def test_received_header_never_breaks(self, helo: str, address: str, rcpt: str) -> None:
        out = received_header(
            helo=helo,
            client_address=address,
            by_host=helo,
            protocol=address,
            send_id=rcpt,
            recipient=rcpt,
            when=datetime.datetime(2024, 1, 2, tzinfo=datetime.UTC),
        )
        self.assertTrue(out.startswith(b"Received: from"))
        self.assertTrue(out.endswith(b"\r\n"))
        self.assertNotIn(b"\r", out.replace(b"\r\n", b""))
        self.assertNotIn(b"\n", out.replace(b"\r\n", b""))
        for line in out.split(b"\r\n")[1:-1]:
            self.assertIn(line[:1], (b"\t", b" "))

    @FAST
    @given(st.lists(_untouched, max_size=8), st.integers(0, 8), st.integers(0, 8))
    def test_untouched_fields_survive(self, others: list[bytes], i: int, j: int) -> None:
        from_in = b'From: "N" <x@y.example>\r\n'
        from_out = b'From: "N" <mailfrom@example.com>\r\n'
        to = TO + b"\r\n"
        before = list(others)
        before.insert(min(i, len(before)), from_in)
        before.insert(min(j, len(before)), to)
        send = self.send(b"".join(before))
        after = [from_out if f == from_in else f for f in before]
        self.assertEqual(send.headers, RECEIVED + b"".join(after))

    @FAST
    @given(
        st.from_regex(r"[a-z0-9][a-z0-9._+-]{0,15}", fullmatch=True),
        st.from_regex(r"[a-z0-9]{1,10}\.[a-z]{2,6}", fullmatch=True),
        st.randoms(use_true_random=False),
    )
    def test_case_insensitive_match(self, local: str, domain: str, rnd: object) -> None:
        import random

        assert isinstance(rnd, random.Random)
        address = f"{local}@{domain}"
        shuffled = "".join(c.upper() if rnd.random() < 0.5 else c for c in address)
        send = self.send(
            section(b"To: <" + shuffled.encode() + b">"), rcpt=(address, "b@z.example")
        )
        self.assertEqual((send.to, send.bcc), (shuffled, "b@z.example"))

    @FAST
    @given(
        st.lists(
            st.lists(
                st.text(
                    st.characters(
                        blacklist_categories=["Cc", "Cs", "Zl", "Zp"], blacklist_characters=",="
                    ),
                    max_size=10,
                ),
                max_size=5,
            ),
            max_size=4,
        )
    )
    def test_tags_appended_in_order(self, headers: list[list[str]]) -> None:
        fields_ = ["X-Mxm-Tag: " + ",".join(tags) for tags in headers]
        send = self.send(section(TO, *fields_))
        expected: list[str] = []
        for tags in headers:
            for tag in tags:
                if tag.strip() and tag.strip() not in expected:
                    expected.append(tag.strip())
        self.assertEqual(send.tags, tuple(expected))


# ----------------------------------------------------------------------------
# The corpus: messages as real client libraries write them

#: file -> (MAIL FROM, RCPT TO, expected From, expected To (None: unchanged),
#:          to, bcc, flags, tags, message_id)
CORPUS_EXPECTED: dict[
    str,
    tuple[str, tuple[str, ...], bytes, bytes | None, str, str | None, int, tuple[str, ...], str],
] = {
    "multipart_alternative.eml": (
        "noreply@oxford-stones.example",
        ("jane.smith@example.org", "archive@oxford-stones.example"),
        b"From: Oxford Stones <noreply@oxford-stones.example>",
        None,
        "jane.smith@example.org",
        "archive@oxford-stones.example",
        3,
        ("order", "shipping", "guest"),
        "<65940a62b1c2_3f1a2c@web-01.mail>",
    ),
    "utf8_8bit.eml": (
        "versand@bücher.example",
        ("zoë@xn--bcher-kva.example",),
        "From: Jörg Müller <versand@bücher.example>".encode(),
        None,
        "zoë@bücher.example",
        None,
        4,
        ("Bestellbestätigung", "Köln"),
        "<20240103080000.1234@bücher.example>",
    ),
    "long_folded.eml": (
        "bookings@oxford-stones.example",
        ("jane@example.org", "john@example.org", "accounts@example.org"),
        b'From: "Oxford Stones Limited, Reservations and Enquiries Department"\r\n'
        b" <bookings@oxford-stones.example>",
        b'To: "Jane Smith" <jane@example.org>',
        "jane@example.org",
        "john@example.org",
        1,
        (),
        "<CAF=abc123.def456@mail.oxford-stones.example>",
    ),
    "pdf_attachment.eml": (
        "invoices@oxford-stones.example",
        ("Accounts@Customer.example",),
        b"From: invoices@oxford-stones.example (Acme Tools Billing)",
        None,
        "accounts@customer.example",
        None,
        4,
        ("invoice",),
        "<inv-2024-0042.1704387600@billing.acme-tools.example>",
    ),
    "phpmailer.eml": (
        "bookings@oxford-stones.example",
        ("jane.smith@example.org", "manager@oxford-stones.example"),
        b"From: Oxford Stones <bookings@oxford-stones.example>",
        None,
        "jane.smith@example.org",
        "manager@oxford-stones.example",
        7,
        ("booking", "confirmation"),
        "<Zyx5Qb6TfRa0CnJ8Zv4kqbRt2nIkNJvY3nfbH8bWc@www.oxford-stones.example>",
    ),
    "dotnet_smtpclient.eml": (
        "orders@oxford-stones.example",
        ("jane@example.org", "john@example.org"),
        b'From: "Oxford Stones" <orders@oxford-stones.example>',
        b"To: jane@example.org",
        "jane@example.org",
        "john@example.org",
        4,
        ("order", "confirmation", "café"),
        "",
    ),
    "python_email.eml": (
        "security@oxford-stones.example",
        ("jane@example.org",),
        b"From: Oxford Stones Security <security@oxford-stones.example>",
        None,
        "jane@example.org",
        None,
        1,
        ("security", "café"),
        "<170419053012.4242.1234567890@app-01.oxford-stones.example>",
    ),
}


class CorpusTests(Case):
    def load(self, name: str) -> bytes:
        data = (CORPUS / name).read_bytes()
        if b"\r\n" not in data:  # checked out with LF line endings after all
            data = data.replace(b"\n", b"\r\n")
        return data

    def test_every_file_has_an_expectation(self) -> None:
        self.assertEqual(sorted(p.name for p in CORPUS.glob("*.eml")), sorted(CORPUS_EXPECTED))

    def test_corpus(self) -> None:
        for name, expectation in CORPUS_EXPECTED.items():
            mail_from, rcpt, from_, to_field, to, bcc, flags, tags, mid = expectation
            message = self.load(name)
            i = split_message(message)
            assert i is not None, name
            header_section, rest = message[:i], message[i:]
            send = self.send(header_section, mail_from=mail_from, rcpt=rcpt)

            expected = [RECEIVED]
            first_to = True
            for field in fields(header_section):
                kind = name_of(field)
                if kind in TOUCHED - {b"from", b"to"}:
                    continue
                if kind == b"from":
                    field = from_ + b"\r\n"
                elif kind == b"to":
                    if not first_to:
                        continue
                    first_to = False
                    if to_field is not None:
                        field = to_field + b"\r\n"
                expected.append(field)
            self.assertEqual(send.headers + rest, b"".join(expected) + rest, name)
            self.assertEqual(
                (send.to, send.bcc, send.flags, send.tags, send.message_id or ""),
                (to, bcc, flags, tags, mid),
                name,
            )
            self.assertEqual(send.bcc_flags, None if bcc is None else flags & ~3, name)
            self.assertEqual(send.return_path, "bounce+S1@bounces.example.net")
