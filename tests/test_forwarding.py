"""The hop to the delivery API, end to end over real loopback HTTP: what
arrives, how a failure reaches the client, and the client's retry.

A real relay (real TLS, real SMTP clients on threads) forwards to the real
reference API, directly or through the fault injector
(:mod:`tests.forwarding_support`).  Which SMTP reply each API answer
becomes is proved once per answer without a relay, in
:mod:`tests.test_forwarder_replies`; here, that the real path gives it
and the session goes on.
"""

from __future__ import annotations

import base64
import os
import ssl
from pathlib import Path

from twisted.internet import reactor
from twisted.trial import unittest

from mxmrelay_refapi.api import ReferenceAPI
from tests.forwarding_support import (
    NOT_AUTHORISED,
    OK,
    SHORT,
    TEMPORARY,
    TIMED_OUT,
    TOO_BIG,
    UNREACHABLE,
    Canned,
    Ledger,
    Server,
    error,
    injected,
    reference_api,
    relay_to,
    send_once,
    session,
    transact,
)
from tests.helpers import QUEUED, closed_port, queued_id, until
from tests.support import TOKEN, RelayUnderTest, fetch_bytes, fetch_json, in_thread, message

# --------------------------------------------------------------------------
# 1. What arrives


def rich_message(attachment: bytes) -> bytes:
    """8-bit headers and text, dot-stuffing bait, and a big base64 part."""
    encoded = base64.b64encode(attachment)
    lines = b"\r\n".join(encoded[i:i + 76] for i in range(0, len(encoded), 76))
    head = (
        b'From: "Sh\xc3\xb6p" <shop@example.com>\r\n'
        b"To: Someone <someone@example.org>\r\n"
        b"Bcc: hidden@example.net\r\n"
        b"Subject: Gr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln\r\n"
        b"Message-ID: <rich.1@client.test>\r\n"
        b"X-Mxm-Flags: 3\r\n"
        b"X-Mxm-Tag: welcome, caf\xc3\xa9\r\n"
        b"MIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="=_b1"\r\n'
    )
    body = (
        b"This is a multi-part message in MIME format.\r\n"
        b"\r\n"
        b"--=_b1\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n"
        b"\r\n"
        b"Gr\xc3\xbc\xc3\x9fe, caf\xc3\xa9, \xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e, "
        b"\xf0\x9f\x93\xa8\r\n"
        b".a line that starts with a dot\r\n"
        b".\r\n"
        b"..two dots\r\n"
        b"trailing blanks \t \r\n"
        b"\tindented\r\n"
        b"From the start of a line\r\n"
        b"--not-a-boundary--\r\n"
        b"\r\n"
        b"\r\n"
        b"--=_b1\r\n"
        b"Content-Type: application/octet-stream\r\n"
        b'Content-Disposition: attachment; filename="blob.bin"\r\n'
        b"Content-Transfer-Encoding: base64\r\n"
        b"\r\n" + lines + b"\r\n"
        b"--=_b1--\r\n"
    )
    return head + b"\r\n" + body


def split(message: bytes) -> tuple[bytes, bytes]:
    head, _, body = message.partition(b"\r\n\r\n")
    return head + b"\r\n", body


class WhatArrives(unittest.TestCase):
    async def test_metadata_and_exact_message(self) -> None:
        _, api = reference_api(self)
        relay = RelayUnderTest(self, api_url=api.url)
        ledger = Ledger(self, api)
        sent = rich_message(os.urandom(2_250_000))  # 3 MB of base64
        self.assertGreater(len(sent), 3_000_000)

        def send() -> tuple[int, bytes, str | None]:
            c = relay.smtp()
            try:
                assert isinstance(c.sock, ssl.SSLSocket)
                version = c.sock.version()
                c.mail("app@example.com", ["BODY=8BITMIME"])
                c.rcpt("someone@example.org")
                c.rcpt("hidden@example.net")
                code, text = c.data(sent)
                return code, text, version
            finally:
                c.quit()

        code, text, tls_version = await in_thread(send)
        self.assertEqual(code, 250, text)
        reply = ledger.reply(f"{code} {text.decode()}")
        send_id = queued_id(reply, alone=True)

        stored = await fetch_json(f"{api.url}/{send_id}")
        self.assertEqual(stored["id"], send_id)
        expected = {
            "customer": "demo",
            "user": "demo@example.com",
            "mail_from": "app@example.com",
            "return_path": f"bounce+{send_id}@bounces.test",
            "to": "someone@example.org",
            "bcc": "hidden@example.net",
            "flags": 3,
            "bcc_flags": 0,  # no tracking on the BCC copy
            "tags": ["welcome", "caf\u00e9"],
            "client": {"address": "127.0.0.1", "listener": "submission",
                       "tls_version": tls_version},
            "message_id": "<rich.1@client.test>",
        }
        self.assertEqual({k: stored[k] for k in expected}, expected)
        self.assertRegex(stored["idempotency_key"], r"^[0-9a-f]{64}$")
        self.assertEqual(tls_version, "TLSv1.3")

        final = await fetch_bytes(f"{api.url}/{send_id}/message")
        self.assertEqual(stored["size"], len(final))
        head, body = split(final)
        sent_body = split(sent)[1]
        # The body is the client's, byte for byte (and no assertEqual diff
        # of 3 MB if not).
        self.assertTrue(body == sent_body, f"body differs: {len(body)} vs {len(sent_body)} "
                        "bytes")
        # The header section is rewritten by the rules; what they leave
        # alone arrives byte for byte, what they remove is gone.
        self.assertTrue(head.startswith(b"Received: from client.test "), head[:200])
        self.assertIn(f"id {send_id}".encode(), head)
        for kept in (b"Subject: Gr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln\r\n",
                     b"To: Someone <someone@example.org>\r\n",
                     b"Message-ID: <rich.1@client.test>\r\n",
                     b'Content-Type: multipart/mixed; boundary="=_b1"\r\n'):
            self.assertIn(kept, head)
        for removed in (b"\nBcc:", b"\nX-Mxm-Flags:", b"\nX-Mxm-Tag:"):
            self.assertNotIn(removed, head)
        self.assertIn(b"<app@example.com>", head)
        await ledger.check()

    async def test_listener_and_defaults(self) -> None:
        """Over implicit TLS, without flags or tags: the space's defaults."""
        _, api = reference_api(self)
        relay = RelayUnderTest(self, api_url=api.url)
        ledger = Ledger(self, api)

        def send() -> str:
            c = session(relay, "smtps")
            try:
                return transact(c, message("Plain"))
            finally:
                c.close()

        send_id = queued_id(ledger.reply(await in_thread(send)), alone=True)
        stored = await fetch_json(f"{api.url}/{send_id}")
        self.assertEqual(stored["client"]["listener"], "smtps")
        self.assertEqual((stored["flags"], stored["bcc"], stored["bcc_flags"], stored["tags"]),
                         (1, None, None, []))
        final = await fetch_bytes(f"{api.url}/{send_id}/message")
        self.assertEqual(split(final)[1], b"Hi there.\r\n")
        await ledger.check()


# --------------------------------------------------------------------------
# 2. Failure mapping


class FailureMapping(unittest.TestCase):
    """An API outcome becomes one SMTP reply line, and the session goes on.

    One case of each kind over the real path; every answer's reply is in
    :mod:`tests.test_forwarder_replies`."""

    async def mapping(self, mode: Canned | str, expected: str, timeout: float = 5.0) -> None:
        injector, front, api = injected(self)
        relay = relay_to(self, front.url, timeout)
        ledger = Ledger(self, api)
        injector.mode = mode
        c = await in_thread(session, relay)
        try:
            first = ledger.reply(await in_thread(transact, c, message("Mapped")))
            self.assertEqual(first, expected)
            # One POST: the relay leaves retrying to the client.
            self.assertEqual(injector.posts, 1)
            after = await in_thread(lambda: (c.cmd("RSET"), c.cmd("NOOP")))
            self.assertEqual(after, (OK, OK))
            injector.mode = "pass"
            second = ledger.reply(await in_thread(transact, c, message("Next")))
            self.assertTrue(second.startswith(QUEUED), second)
            self.assertEqual(await in_thread(c.cmd, "QUIT"), "221 2.0.0 Bye")
        finally:
            await in_thread(c.close)
        self.assertEqual(len(await ledger.check()), 1)

    async def test_503(self) -> None:
        await self.mapping(error(503), f"{TEMPORARY} (delivery API answered 503)")

    async def test_400_reason_sanitised(self) -> None:
        await self.mapping(error(400, "bad\r\nthing <x>"),
                           "554 5.6.0 Rejected by delivery API: bad thing <x>")

    async def test_timeout(self) -> None:
        await self.mapping("hang", TIMED_OUT, timeout=SHORT)

    async def test_hang_connection_dropped(self) -> None:
        """After its deadline the relay drops the request it gave up on."""
        injector, front, _ = injected(self)
        relay = relay_to(self, front.url, SHORT)
        injector.mode = "hang"
        self.assertEqual(await in_thread(send_once, relay, message("Hung")), TIMED_OUT)
        await until(lambda: not injector.held, "the relay to drop the hung request")
        self.assertEqual(len(front.protocols), 0)

    async def test_api_down(self) -> None:
        url = f"http://127.0.0.1:{await closed_port()}/v1/sends"
        relay = relay_to(self, url)

        def talk() -> list[str]:
            c = session(relay)
            try:
                return [transact(c, message("Down")), c.cmd("RSET"), c.cmd("NOOP"),
                        transact(c, message("Still down"))]
            finally:
                c.close()

        self.assertEqual(await in_thread(talk), [UNREACHABLE, OK, OK, UNREACHABLE])

    async def test_wrong_token_real_api(self) -> None:
        """The reference API's own 401."""
        _, api = reference_api(self)
        relay = relay_to(self, api.url, token="not-the-token")
        ledger = Ledger(self, api)
        self.assertEqual(ledger.reply(await in_thread(send_once, relay, message("Token"))),
                         NOT_AUTHORISED)
        await ledger.check()

    async def test_too_big_real_api(self) -> None:
        """The reference API's own 413, for a body over its maximum."""
        _, api = reference_api(self, max_body=64 * 1024)
        relay = relay_to(self, api.url)
        ledger = Ledger(self, api)
        big = message("Big", body=(b"0123456789abcdef" * 4 + b"\r\n") * 1200)
        small = message("Small")

        def talk() -> tuple[str, str]:
            c = session(relay)
            try:
                return transact(c, big), transact(c, small)
            finally:
                c.close()

        first, second = await in_thread(talk)
        self.assertEqual(ledger.reply(first), TOO_BIG)
        self.assertTrue(ledger.reply(second).startswith(QUEUED), second)
        await ledger.check()


# --------------------------------------------------------------------------
# 3. Ambiguous failures and the client's retry


class Retries(unittest.TestCase):
    async def ambiguous(self, mode: str, expected: str, timeout: float) -> None:
        injector, front, api = injected(self)
        relay = relay_to(self, front.url, timeout)
        ledger = Ledger(self, api)
        data = message("Ambiguous", extra=b"Date: Mon, 1 Jan 2024 10:00:00 +0000\r\n")
        injector.mode = mode
        self.assertEqual(ledger.reply(await in_thread(send_once, relay, data)), expected)
        # The API stored it all the same.
        code, answer = await injector.answers.get()
        self.assertEqual(code, 201)
        first_id = answer["id"]
        await until(lambda: not injector.held, "the relay to give up its request")

        # The client retries the identical message, on a new connection.
        injector.mode = "pass"
        retry = ledger.reply(await in_thread(send_once, relay, data))
        self.assertEqual(retry, QUEUED + first_id)
        self.assertEqual(await injector.answers.get(), (200, {"id": first_id, "duplicate": True}))
        # A retry that regenerated its Date header is still the same send.
        again = message("Ambiguous", extra=b"Date: Mon, 1 Jan 2024 10:05:00 +0000\r\n")
        self.assertEqual(ledger.reply(await in_thread(send_once, relay, again)),
                         QUEUED + first_id)
        sends = await ledger.check()
        self.assertEqual([s["id"] for s in sends], [first_id])

    async def test_stored_then_too_late(self) -> None:
        await self.ambiguous("store-then-hang", TIMED_OUT, SHORT)

    async def test_stored_then_503(self) -> None:
        await self.ambiguous("store-then-503", f"{TEMPORARY} (delivery API answered 503)", 5.0)

    async def test_down_then_back(self) -> None:
        number = await closed_port()
        folder = Path(self.mktemp()).resolve()
        folder.mkdir(parents=True)
        api = ReferenceAPI.open(folder / "api.sqlite3", TOKEN, reactor=reactor)
        self.addCleanup(api.close)
        relay = relay_to(self, f"http://127.0.0.1:{number}/v1/sends")
        data = message("Down and up")
        c = await in_thread(session, relay)
        try:
            self.assertEqual(await in_thread(transact, c, data), UNREACHABLE)
            server = Server(self, api.site(), port=number)  # the API comes back
            ledger = Ledger(self, server)
            await ledger.check()  # nothing stored while it was down
            first = ledger.reply(await in_thread(transact, c, data))
            self.assertTrue(first.startswith(QUEUED), first)
            # The client did not see the 250 (say) and sends it once more.
            self.assertEqual(ledger.reply(await in_thread(transact, c, data)), first)
            other = ledger.reply(await in_thread(transact, c, message("Another")))
            self.assertNotEqual(other, first)
        finally:
            await in_thread(c.close)
        self.assertEqual(len(await ledger.check()), 2)
