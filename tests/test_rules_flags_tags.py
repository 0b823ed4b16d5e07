"""The rules for the control headers: X-Mxm-Flags and X-Mxm-Tag, the order
in which the rules are applied, and the other rules."""

from __future__ import annotations

from mxmrelay.rules import MAX_TAG_LENGTH, MAX_TAGS, Envelope, Send, apply_rules
from tests.rules_support import MAIL_FROM, RCPT, RECEIVED, SPACE, TO, Case, section


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
