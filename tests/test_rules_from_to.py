"""The rules for the addresses: From (rewritten to the envelope sender
where the space does not own it), To (checked against the envelope), Bcc."""

from __future__ import annotations

from tests.rules_support import RCPT, RECEIVED, TO, Case, section


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
