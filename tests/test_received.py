"""The relay's Received: header (mxmrelay.trace)."""

from __future__ import annotations

import datetime

from twisted.trial.unittest import SynchronousTestCase

from mxmrelay.trace import received_header


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
