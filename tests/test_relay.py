"""The rules and the data path, end to end: a client over real TLS, the
real reference delivery API over real HTTP, and what the API stored."""

from __future__ import annotations

from typing import Any

from twisted.trial import unittest

from tests.support import RelayUnderTest, fetch_bytes, fetch_json, in_thread, message


def head_and_body(raw: bytes) -> tuple[list[bytes], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    fields: list[bytes] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += b"\r\n" + line
        else:
            fields.append(line)
    return fields, body


def named(fields: list[bytes], name: bytes) -> list[bytes]:
    return [f for f in fields if f.lower().startswith(name.lower() + b":")]


class Rules(unittest.TestCase):
    async def send(self, relay: RelayUnderTest, sender: str, rcpts: list[str], data: bytes,
                   **kw: Any) -> tuple[int, str, dict[str, Any] | None, bytes | None]:
        def talk() -> tuple[int, str]:
            c = relay.smtp(**kw)
            try:
                c.mail(sender, ["SMTPUTF8"] if not sender.isascii() else [])
                for r in rcpts:
                    c.rcpt(r)
                code, text = c.data(data)
                return code, text.decode()
            finally:
                c.quit()

        code, text = await in_thread(talk)
        if code != 250:
            return code, text, None, None
        send_id = text.split()[-1]
        assert relay.api is not None
        meta = await fetch_json(f"{relay.api.url}/{send_id}")
        raw = await fetch_bytes(f"{relay.api.url}/{send_id}/message")
        return code, text, meta, raw

    async def test_every_rule_end_to_end(self) -> None:
        relay = RelayUnderTest(self)
        body = "Grüße aus Köln.\r\n.leading dot survives\r\n\r\nlast line\r\n".encode()
        data = (
            b"Return-Path: <spoof@evil.test>\r\n"
            b"From: \"Oxford Stones\" <someone@else.test>\r\n"
            b"To: \"Jane\" <jane@example.org>, bob@example.org\r\n"
            b"Cc: carol@example.org\r\n"
            b"Bcc: dave@example.org\r\n"
            b"Subject: =?UTF-8?Q?Bestellbest=C3=A4tigung?=\r\n"
            b"X-Mxm-Flags: 2\r\n"
            b"X-Mxm-Flags: 9\r\n"
            b"X-Mxm-Tag: order, confirmation\r\n"
            b"X-Mxm-Tag: guest,order\r\n"
            b"X-Custom:   kept   exactly\r\n"
            b"Message-ID: <rules@client.test>\r\n"
            b"\r\n" + body
        )
        code, text, meta, raw = await self.send(
            relay, "shop@example.com", ["bob@example.org", "Jane@EXAMPLE.org", "eve@example.org",
                                        "zed@example.org"], data)
        self.assertEqual(code, 250, text)
        # The decision lines first (tests/test_explain.py), the id last.
        self.assertRegex(text.split("\n")[-1], r"^2\.0\.0 Ok: queued as [0-9a-z]{26}$")
        assert meta is not None and raw is not None
        send_id = text.split()[-1]
        self.assertEqual(meta["id"], send_id)
        self.assertEqual(meta["customer"], "demo")
        self.assertEqual(meta["user"], "demo@example.com")
        self.assertEqual(meta["mail_from"], "shop@example.com")
        self.assertEqual(meta["return_path"], f"bounce+{send_id}@bounces.test")
        self.assertEqual(meta["to"], "jane@example.org")
        self.assertEqual(meta["bcc"], "bob@example.org")  # first other RCPT
        self.assertEqual(meta["flags"], 2)  # first X-Mxm-Flags wins over default 1
        self.assertEqual(meta["bcc_flags"], 0)  # tracking bits cleared
        self.assertEqual(meta["tags"], ["order", "confirmation", "guest"])
        self.assertEqual(meta["client"]["listener"], "submission")
        self.assertIn(meta["client"]["tls_version"], ("TLSv1.2", "TLSv1.3"))
        fields, got_body = head_and_body(raw)
        self.assertEqual(got_body, body)
        self.assertTrue(fields[0].startswith(b"Received: from client.test"), fields[0])
        self.assertIn(send_id.encode(), fields[0])
        self.assertEqual(named(fields, b"From"), [b'From: "Oxford Stones" <shop@example.com>'])
        self.assertEqual(named(fields, b"To"), [b'To: "Jane" <jane@example.org>'])
        for gone in (b"Return-Path", b"Cc", b"Bcc", b"X-Mxm-Flags", b"X-Mxm-Tag"):
            self.assertEqual(named(fields, gone), [], gone)
        self.assertEqual(named(fields, b"X-Custom"), [b"X-Custom:   kept   exactly"])
        self.assertEqual(named(fields, b"Subject"),
                         [b"Subject: =?UTF-8?Q?Bestellbest=C3=A4tigung?="])

    async def test_default_flags(self) -> None:
        relay = RelayUnderTest(self)
        _, _, meta, _ = await self.send(relay, "app@example.com", ["a@example.org"],
                                        message(to="a@example.org"))
        assert meta is not None
        self.assertEqual((meta["flags"], meta["bcc"], meta["bcc_flags"]), (1, None, None))
        _, _, meta, _ = await self.send(relay, "News@example.com", ["a@example.org"],
                                        message(to="a@example.org", subject="news"))
        assert meta is not None
        self.assertEqual(meta["flags"], 3)  # per-from-address default
        _, _, meta, _ = await self.send(relay, "ops@acme.test", ["a@example.org"],
                                        message(to="a@example.org", sender="ops@acme.test"),
                                        login=("ops@acme.test", "acme-password"))
        assert meta is not None
        self.assertEqual((meta["flags"], meta["customer"]), (0, "acme"))

    async def test_violations_are_5xx(self) -> None:
        relay = RelayUnderTest(self)
        cases = [
            (message(to="nobody@example.org"), "5.6.0"),
            (b"Subject: no to\r\n\r\nbody\r\n", "5.6.0"),
            (message(to="a@example.org", extra="X-Mxm-Flags: 0x3\r\n"), "5.6.0"),
            (message(to="a@example.org", extra="X-Mxm-Flags: 16\r\n"), "5.6.0"),
            (message(to="a@example.org",
                     extra="X-Mxm-Tag: " + ",".join(f"t{i}" for i in range(101)) + "\r\n"),
             "5.6.0"),
        ]
        for data, enhanced in cases:
            code, text, meta, _ = await self.send(relay, "app@example.com", ["a@example.org"],
                                                  data)
            self.assertGreaterEqual(code, 500, text)
            self.assertTrue(text.startswith(enhanced + " "), text)
            self.assertIsNone(meta)
        assert relay.api is not None
        self.assertEqual((await fetch_json(relay.api.url))["sends"], [])

    async def test_fifty_recipients_one_send(self) -> None:
        relay = RelayUnderTest(self)
        rcpts = [f"r{i}@example.org" for i in range(50)]
        code, text, meta, _ = await self.send(relay, "app@example.com", rcpts,
                                              message(to="r7@example.org"))
        self.assertEqual(code, 250, text)
        assert meta is not None and relay.api is not None
        self.assertEqual((meta["to"], meta["bcc"]), ("r7@example.org", "r0@example.org"))
        self.assertEqual(len((await fetch_json(relay.api.url))["sends"]), 1)

    async def test_smtputf8(self) -> None:
        relay = RelayUnderTest(self)
        data = "From: Jörg <x@example.com>\r\nTo: Zoë <zoë@exämple.org>\r\n\r\nhï\r\n".encode()
        code, text, meta, raw = await self.send(relay, "jörg@example.com", ["zoë@exämple.org"],
                                                data)
        self.assertEqual(code, 250, text)
        assert meta is not None and raw is not None
        self.assertEqual(meta["to"], "zoë@exämple.org")
        self.assertIn("From: Jörg <jörg@example.com>".encode(), raw)

    async def test_implicit_tls_and_port_25_roles(self) -> None:
        relay = RelayUnderTest(self)
        for role in ("smtps", "smtp"):
            _, text, meta, _ = await self.send(relay, "app@example.com", ["a@example.org"],
                                               message(to="a@example.org", subject=role),
                                               role=role)
            assert meta is not None, text
            self.assertEqual(meta["client"]["listener"], role)


class DataPath(unittest.TestCase):
    async def test_smuggling_is_one_send(self) -> None:
        relay = RelayUnderTest(self)
        smuggled = (b"MAIL FROM:<app@example.com>\r\nRCPT TO:<victim@example.org>\r\n"
                    b"DATA\r\nFrom: x@example.com\r\nTo: victim@example.org\r\n\r\nevil\r\n")
        variants = [b"\n.\n", b"\r.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r"]

        def talk(sep: bytes) -> list[str]:
            c = relay.raw().ready()
            c.cmd("MAIL FROM:<app@example.com>")
            c.cmd("RCPT TO:<a@example.org>")
            c.cmd("DATA")
            # (distinct subjects: the normalised bodies are all the same, and
            # an identical message would rightly be one idempotent send)
            c.send(message(to="a@example.org", subject=repr(sep)) + b"text" + sep + smuggled +
                   b".\r\n")
            answers = [c.reply()]
            answers.append(c.cmd("NOOP"))
            c.close()
            return answers

        for sep in variants:
            answers = await in_thread(talk, sep)
            last = answers[0].split("\n")[-1]
            self.assertTrue(last.startswith("250 2.0.0 Ok: queued as "), (sep, answers))
            self.assertEqual(answers[1], "250 2.0.0 Ok", sep)
        assert relay.api is not None
        sends = (await fetch_json(relay.api.url))["sends"]
        self.assertEqual(len(sends), len(variants))
        self.assertEqual({s["to"] for s in sends}, {"a@example.org"})

    async def test_size_limit(self) -> None:
        relay = RelayUnderTest(self, max_message_size=20_000)

        def talk() -> list[str]:
            c = relay.raw().ready()
            ehlo = c.cmd("EHLO client.test")
            out = [ehlo.split("\n")[2]]
            out.append(c.cmd("MAIL FROM:<app@example.com> SIZE=20001"))
            out.append(c.cmd("MAIL FROM:<app@example.com> SIZE=500"))
            c.cmd("RCPT TO:<a@example.org>")
            c.cmd("DATA")
            c.send(message(to="a@example.org", body="x" * 70 + "\r\n") * 1 +
                   (b"y" * 70 + b"\r\n") * 400 + b".\r\n")
            out.append(c.reply())
            out.append(c.cmd("MAIL FROM:<app@example.com>"))
            c.cmd("RCPT TO:<a@example.org>")
            c.cmd("DATA")
            out.append(c.cmd(message(to="a@example.org") + b"."))
            c.close()
            return out

        out = await in_thread(talk)
        self.assertEqual(out[0], "250-SIZE 20000")
        self.assertEqual(out[1], "552 5.3.4 Message size exceeds fixed maximum message size")
        self.assertEqual(out[2], "250 2.1.0 Ok")
        self.assertEqual(out[3], "552 5.3.4 Message size exceeds fixed maximum message size")
        self.assertEqual(out[4], "250 2.1.0 Ok")
        self.assertTrue(out[5].split("\n")[-1].startswith("250 2.0.0 Ok: queued as "), out[5])

    async def test_long_line_then_session_goes_on(self) -> None:
        relay = RelayUnderTest(self)

        def talk() -> list[str]:
            c = relay.raw().ready()
            c.cmd("MAIL FROM:<app@example.com>")
            c.cmd("RCPT TO:<a@example.org>")
            c.cmd("DATA")
            out = [c.cmd(message(to="a@example.org", body="z" * 5000 + "\r\n") + b".")]
            out.append(c.cmd("RSET"))
            c.close()
            return out

        self.assertEqual(await in_thread(talk), ["500 5.5.2 Line too long", "250 2.0.0 Ok"])

    async def test_pipelined_transaction(self) -> None:
        """A whole transaction in one packet after 354: replies in order,
        and commands after the final dot run after its answer."""
        relay = RelayUnderTest(self)

        def talk() -> list[str]:
            c = relay.raw().ready()
            c.send(b"MAIL FROM:<app@example.com>\r\nRCPT TO:<a@example.org>\r\n"
                   b"RCPT TO:<b@example.org>\r\nDATA\r\n")
            out = [c.reply() for _ in range(4)]
            c.send(message(to="b@example.org") + b".\r\nMAIL FROM:<app@example.com>\r\n"
                   b"RCPT TO:<c@example.org>\r\nDATA\r\n")
            out += [c.reply() for _ in range(4)]
            c.send(message(to="c@example.org", subject="second") + b".\r\nQUIT\r\n")
            out += [c.reply() for _ in range(2)]
            return out

        out = await in_thread(talk)
        self.assertEqual(out[:4], ["250 2.1.0 Ok", "250 2.1.5 Ok", "250 2.1.5 Ok",
                                   "354 End data with <CR><LF>.<CR><LF>"])
        self.assertTrue(out[4].split("\n")[-1].startswith("250 2.0.0 Ok: queued as "), out)
        self.assertEqual(out[5:8], ["250 2.1.0 Ok", "250 2.1.5 Ok",
                                    "354 End data with <CR><LF>.<CR><LF>"])
        self.assertTrue(out[8].split("\n")[-1].startswith("250 2.0.0 Ok: queued as "), out)
        self.assertEqual(out[9], "221 2.0.0 Bye")

    async def test_large_message_byte_exact(self) -> None:
        relay = RelayUnderTest(self)
        body = b"".join(b"%06d " % i + bytes(range(0x21, 0x7f)) + b"\r\n" for i in range(60_000))
        data = message(to="a@example.org", body="") + body

        def talk() -> tuple[int, bytes]:
            c = relay.smtp()
            c.mail("app@example.com")
            c.rcpt("a@example.org")
            result = c.data(data)
            c.quit()
            return result

        code, text = await in_thread(talk)
        self.assertEqual(code, 250, text)
        assert relay.api is not None
        raw = await fetch_bytes(f"{relay.api.url}/{text.split()[-1].decode()}/message")
        self.assertEqual(raw.partition(b"\r\n\r\n")[2], body)
