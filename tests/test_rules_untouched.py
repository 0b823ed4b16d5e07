"""What the rules do not own stays byte for byte as the client sent it;
where the header section ends."""

from __future__ import annotations

import time

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mxmrelay.headers import split_message
from tests.rules_support import FAST, RECEIVED, TO, Case, rules, section


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
