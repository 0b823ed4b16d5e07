"""RFC 5321 limits on both sides of the wire: what the relay says (reply
lines of printable US-ASCII, at most 512 octets) and how it treats what it
is sent (command lines that never end, arguments where none belong, known
parameters with values they do not allow).  Real sockets, real TLS."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from mxmrelay.reply import Reply
from tests.support import RawClient, RelayUnderTest, in_thread

#: RFC 5321 4.5.3.1.5: octets in a reply line, with its CRLF.
REPLY_LINE_LIMIT = 512


def _check_line(testcase: unittest.SynchronousTestCase, line: bytes, context: object) -> None:
    """One reply line, without its CRLF, as RFC 5321 allows it."""
    where = (str(context)[:80], line[:80])
    testcase.assertLessEqual(len(line) + 2, REPLY_LINE_LIMIT, where)
    testcase.assertTrue(all(0x20 <= b <= 0x7E for b in line), where)


def _replies(c: RawClient, count: int) -> list[bytes]:
    """The next ``count`` replies, as the raw lines of each."""
    out = []
    for _ in range(count):
        while True:
            line = c.line()
            out.append(line)
            if line[3:4] != b"-":
                break
    return out


class ReplyInvariant(unittest.SynchronousTestCase):
    @settings(max_examples=500, deadline=None)
    @given(st.integers(), st.text(max_size=40), st.text(max_size=2000))
    def test_any_reply_is_one_short_ascii_line(self, code: int, enhanced: str,
                                               text: str) -> None:
        data = Reply(code, enhanced, text).encode()
        self.assertTrue(data.endswith(b"\r\n"))
        self.assertLessEqual(len(data), REPLY_LINE_LIMIT)
        _check_line(self, data[:-2], (code, enhanced, text))
        self.assertEqual(data.count(b"\r\n"), 1)

    @given(st.sampled_from([250, 451, 550]), st.sampled_from(["2.0.0", "4.3.0", "5.6.0"]),
           st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=400))
    def test_ordinary_replies_unchanged(self, code: int, enhanced: str, text: str) -> None:
        self.assertEqual(Reply(code, enhanced, text).encode(),
                         f"{code} {enhanced} {text}\r\n".encode())

    def test_examples(self) -> None:
        self.assertEqual(Reply(555, "5.5.4", "Unsupported option: BODY=\xe9").encode(),
                         b"555 5.5.4 Unsupported option: BODY=\\xe9\r\n")
        self.assertEqual(Reply(554, "5.6.0", "line\r\nbreak\0x").encode(),
                         b"554 5.6.0 line break x\r\n")
        long = Reply(554, "5.6.0", "x" * 1000).encode()
        self.assertEqual(len(long), 512)
        self.assertTrue(long.endswith(b"x...\r\n"))

    def test_quote(self) -> None:
        from mxmrelay.reply import quote

        self.assertEqual(quote("FOO"), "FOO")
        self.assertEqual(quote("j\xf6rg\u2028\U0001f600"), "j\\xf6rg\\u2028\\U0001f600")
        self.assertEqual(quote("x" * 100), "x" * 61 + "...")
        self.assertEqual(len(quote("\xe9" * 100)), 64)
        self.assertEqual(quote("abcdef", 4), "a...")


class RepliesOnTheWire(unittest.TestCase):
    async def test_client_input_is_quoted_short_and_ascii(self) -> None:
        relay = RelayUnderTest(self)
        long_key = "X" + "Y" * 1000
        cases: list[list[str | bytes]] = [
            [f"MAIL FROM:<app@example.com> {long_key}"],
            [f"MAIL FROM:<app@example.com> {long_key}=1"],
            ["MAIL FROM:<app@example.com> BODY=\xe9"],
            ["MAIL FROM:<app@example.com> BODY=" + "\xe9\u2028" * 150],
            ["MAIL FROM:<app@example.com> FOO=\xe9 " + "Z" * 700],
            ["MAIL FROM:<app@example.com>", "RCPT TO:<a@example.org> " + "Z" * 480],
            ["MAIL FROM:<app@example.com>", "RCPT TO:<a@example.org> NOTIFY=\xe9"],
            ["MAIL FROM:<j\xf6rg@example.com> SMTPUTF8", "RCPT TO:<\xe9@example.org> X=\xe9"],
            ["MAIL FROM:<>"],
            ["XYZZY " + "\xe9" * 200],
            ["EHLO \xe9" * 3],
            ["VRFY \xe9"],
            ["NOOP \xe9\x01"],
            [b"MAIL FROM:<a\xff@example.com>"],
        ]

        def talk(steps: list[str | bytes]) -> list[bytes]:
            c = relay.raw().ready()
            for s in steps:
                c.send((s.encode() if isinstance(s, str) else s) + b"\r\n")
            lines = _replies(c, len(steps))
            c.close()
            return lines

        for steps in cases:
            lines = await in_thread(talk, steps)
            for line in lines:
                _check_line(self, line, steps)
        [line] = await in_thread(talk, cases[0])
        self.assertEqual(line, b"555 5.5.4 Unsupported option: X" + b"Y" * 60 + b"...")


class DataLines(unittest.TestCase):
    async def test_text_line_limit_after_unstuffing(self) -> None:
        """998 characters pass, 999 are refused at the end of DATA; a
        stuffed dot does not count."""
        from tests.support import message

        relay = RelayUnderTest(self)
        bodies = {b"a" * 998: "250 ", b"a" * 999: "500 5.5.2 Line too long",
                  b".." + b"a" * 997: "250 ", b".." + b"a" * 998: "500 5.5.2 Line too long"}

        def send(body: bytes) -> tuple[str, str]:
            c = relay.raw().ready()
            c.cmd("MAIL FROM:<app@example.com>")
            c.cmd("RCPT TO:<a@example.org>")
            c.cmd("DATA")
            answer = c.cmd(message(to="a@example.org") + body + b"\r\n.")
            after = c.cmd("NOOP")
            c.close()
            return answer, after

        for body, expected in bodies.items():
            answer, after = await in_thread(send, body)
            self.assertTrue(answer.split("\n")[-1].startswith(expected), (len(body), answer))
            self.assertEqual(after, "250 2.0.0 Ok")


class CommandLines(unittest.TestCase):
    async def test_long_line_answered_before_its_end(self) -> None:
        """The 500 comes as soon as the limit is passed, once per line."""
        relay = RelayUnderTest(self)

        def talk() -> tuple[str, str, str]:
            c = relay.raw().ready(login=False)
            c.send(b"NOOP " + b"x" * 1000)   # no CRLF yet
            c.sock.settimeout(5)
            early = c.reply()
            c.send(b"y" * 50_000)
            c.send(b"z" * 8_000 + b"\r\n")
            after = c.cmd("NOOP")            # no second reply for that line
            c.send(b"AUTH PLAIN\r\n")
            c.reply()
            c.send(b"A" * 13_000)           # an AUTH response, no CRLF yet
            auth = c.reply()
            c.send(b"A\r\n")
            after += "|" + c.cmd("NOOP")
            c.close()
            return early, after, auth

        early, after, auth = await in_thread(talk)
        self.assertEqual(early, "500 5.5.2 Line too long")
        self.assertEqual(after, "250 2.0.0 Ok|250 2.0.0 Ok")
        self.assertEqual(auth, "500 5.5.6 Authentication exchange line is too long")
        for connection in [c for f in relay.relay.factories for c in f.connections]:
            self.assertLess(len(connection._buffer), 20_000)

    async def test_line_far_too_long_closes(self) -> None:
        relay = RelayUnderTest(self)

        def talk() -> tuple[str, str, bool]:
            c = relay.raw().ready(login=False)
            c.sock.settimeout(5)
            c.send(b"MAIL FROM:<" + b"x" * 2_000)
            first = c.reply()
            # Past 64 KiB in all: the relay gives up on this client.
            sent = 2_000
            while sent < 80_000:
                try:
                    c.send(b"x" * 8_000)
                except OSError:
                    break
                sent += 8_000
            second = c.reply()
            return first, second, c.closed()

        self.assertEqual(await in_thread(talk), (
            "500 5.5.2 Line too long", "421 4.7.0 Line too long, closing connection", True))

    async def test_arguments_where_none_belong(self) -> None:
        relay = RelayUnderTest(self)
        cases = [
            ("RSET x", "501 5.5.4 Syntax: RSET"),
            ("QUIT now", "501 5.5.4 Syntax: QUIT"),
            ("NOOP anything at all", "250 2.0.0 Ok"),
            ("RSET ", "250 2.0.0 Ok"),
            ("MAIL FROM:<app@example.com> BODY=FOO", "501 5.5.4 Bad BODY parameter"),
            ("MAIL FROM:<app@example.com> BODY", "501 5.5.4 Bad BODY parameter"),
            ("MAIL FROM:<app@example.com> BODY=\xe9", "501 5.5.4 Bad BODY parameter"),
            ("MAIL FROM:<app@example.com> SIZE=abc", "501 5.5.4 Bad message size syntax"),
            ("MAIL FROM:<app@example.com> SIZE", "501 5.5.4 Bad message size syntax"),
            ("MAIL FROM:<app@example.com> SMTPUTF8=yes", "501 5.5.4 Bad SMTPUTF8 parameter"),
            ("MAIL FROM:<app@example.com> FOO", "555 5.5.4 Unsupported option: FOO"),
            ("MAIL FROM:<app@example.com> BODY=8bitmime", "250 2.1.0 Ok"),
        ]

        def talk(command: str) -> tuple[str, str]:
            c = relay.raw().ready()
            answer = c.cmd(command)
            after = c.cmd("RSET")
            c.close()
            return answer, after

        for command, expected in cases:
            self.assertEqual(await in_thread(talk, command), (expected, "250 2.0.0 Ok"))

        def data_and_starttls() -> tuple[str, str]:
            c = relay.raw()
            c.cmd("EHLO client.test")
            starttls = c.cmd("STARTTLS x")
            c.ready()
            c.cmd("MAIL FROM:<app@example.com>")
            c.cmd("RCPT TO:<a@example.org>")
            data = c.cmd("DATA x")
            c.close()
            return starttls, data

        self.assertEqual(await in_thread(data_and_starttls),
                         ("501 5.5.4 Syntax: STARTTLS", "501 5.5.4 Syntax: DATA"))
