"""The hop to the delivery API, end to end over real loopback HTTP.

A real relay (real TLS, real SMTP clients on threads) forwards to the real
reference API, either directly or through :class:`FaultInjector`, a small
``twisted.web`` resource that answers what a test asks for (an error code,
a redirect, silence) or passes the request on to the reference API over
HTTP, optionally storing it there and then never answering (the ambiguous
failure).  Nothing in the path is a mock: treq, the connection pool, the
multipart body and the SQLite store are the ones the relay runs with.

The bookkeeping every test ends with (:meth:`Ledger.check`): each id a
client got a 250 for is stored exactly once, and nothing else is stored.
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import attrs
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredQueue, gatherResults
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.protocols.policies import WrappingFactory
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from mxmrelay_refapi.api import ReferenceAPI
from tests.support import TOKEN, RawClient, RelayUnderTest, fetch_bytes, fetch_json, in_thread

QUEUED = "250 2.0.0 Ok: queued as "
TEMPORARY = "451 4.3.0 Temporary failure, try again later"
TIMED_OUT = "451 4.4.2 Delivery API timed out, try again later"
UNREACHABLE = "451 4.4.1 Delivery API unreachable, try again later"
NOT_AUTHORISED = f"{TEMPORARY} (relay not authorised by delivery API)"
TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
OK = "250 2.0.0 Ok"

#: The relay's deadline for the cases that wait it out.
SHORT = 0.5


# --------------------------------------------------------------------------
# Servers


class Server(WrappingFactory):
    """A factory listening on loopback that counts the connections it
    accepts and, at clean-up, drops the ones still open and waits until
    they are gone (so the reactor is clean without relying on timing)."""

    def __init__(self, testcase: unittest.TestCase, factory: Factory, port: int = 0) -> None:
        super().__init__(factory)
        self.accepted = 0
        self._idle: list[Deferred[None]] = []
        self.port = reactor.listenTCP(port, self, interface="127.0.0.1")
        number = self.port.getHost().port
        self.base = f"http://127.0.0.1:{number}"
        self.url = f"{self.base}/v1/sends"
        testcase.addCleanup(lambda: Deferred.fromCoroutine(self.stop()))

    def buildProtocol(self, addr: Any) -> Protocol:
        self.accepted += 1
        return super().buildProtocol(addr)

    def unregisterProtocol(self, p: Any) -> None:
        super().unregisterProtocol(p)
        if not self.protocols:
            waiting, self._idle = self._idle, []
            for d in waiting:
                d.callback(None)

    async def drop(self) -> None:
        """Abort every open connection and wait for them to be gone."""
        for p in list(self.protocols):
            p.transport.abortConnection()
        while self.protocols:
            d: Deferred[None] = Deferred()
            self._idle.append(d)
            await d

    async def stop(self) -> None:
        await self.port.stopListening()
        await self.drop()


def reference_api(testcase: unittest.TestCase, **kwargs: Any) -> tuple[ReferenceAPI, Server]:
    """The reference API, served (the way ``mxmrelay_refapi.api`` says to) on loopback."""
    folder = Path(testcase.mktemp()).resolve()
    folder.mkdir(parents=True)
    api = ReferenceAPI.open(folder / "api.sqlite3", TOKEN, reactor=reactor, **kwargs)
    testcase.addCleanup(api.close)  # after the server's clean-up (LIFO)
    return api, Server(testcase, api.site())


async def closed_port() -> int:
    """A loopback port nobody listens on (the API is down)."""
    port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    number: int = port.getHost().port
    await port.stopListening()
    return number


@attrs.frozen
class Canned:
    """An answer the injector gives without asking the API."""

    code: int
    body: bytes = b""
    headers: tuple[tuple[bytes, bytes], ...] = ()


def error(code: int, text: str | None = None) -> Canned:
    body = json.dumps({"error": text or f"injected {code}"}).encode()
    return Canned(code, body, ((b"Content-Type", b"application/json"),))


class FaultInjector(Resource):
    """A delivery API that misbehaves on demand.

    ``mode`` is a :class:`Canned` answer, ``"hang"`` (never answer),
    ``"pass"`` (proxy to the reference API over HTTP and relay its answer),
    ``"store-then-hang"`` (proxy, then never answer: the API holds the send
    but the relay is not told) or ``"store-then-503"`` (proxy, then answer
    503 whatever the API said).  With ``gate`` set to N, proxied requests
    wait until N have arrived and then go to the API together.
    """

    isLeaf = True

    def __init__(self, testcase: unittest.TestCase, upstream: str | None = None) -> None:
        super().__init__()
        self.mode: Canned | str = "pass"
        self.upstream = upstream
        self.gate = 0
        self.posts = 0
        #: Requests being held unanswered (removed when the client goes).
        self.held: set[Request] = set()
        #: What the upstream API answered, as (code, JSON), one per proxied POST.
        self.answers: DeferredQueue[tuple[int, Any]] = DeferredQueue()
        self._gated: list[tuple[Request, str]] = []
        self._gone: set[Request] = set()
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        testcase.addCleanup(self.pool.closeCachedConnections)

    def render_POST(self, request: Request) -> bytes | int:
        self.posts += 1
        request.notifyFinish().addBoth(lambda _: self._finished(request))
        mode = self.mode
        if isinstance(mode, Canned):
            request.setResponseCode(mode.code)
            for name, value in mode.headers:
                request.setHeader(name, value)
            return mode.body
        if mode == "hang":
            self.held.add(request)
            return NOT_DONE_YET
        assert mode in ("pass", "store-then-hang", "store-then-503"), mode
        if self.gate:
            self._gated.append((request, mode))
            if len(self._gated) >= self.gate:
                gated, self._gated = self._gated, []
                for r, m in gated:
                    Deferred.fromCoroutine(self._proxy(r, m))
        else:
            Deferred.fromCoroutine(self._proxy(request, mode))
        return NOT_DONE_YET

    def _finished(self, request: Request) -> None:
        self._gone.add(request)
        self.held.discard(request)

    async def _proxy(self, request: Request, mode: str) -> None:
        assert self.upstream is not None and request.content is not None
        request.content.seek(0)
        headers = {name: [value] for name in (b"Authorization", b"Idempotency-Key",
                                                b"Content-Type", b"Accept")
                   if (value := request.getHeader(name)) is not None}
        response = await treq.post(self.upstream, data=request.content.read(), headers=headers,
                                   pool=self.pool)
        body = await treq.content(response)
        self.answers.put((response.code, json.loads(body)))
        if request in self._gone:
            return
        if mode == "store-then-hang":
            self.held.add(request)
            return
        code = 503 if mode == "store-then-503" else response.code
        if code == 503:
            body = b'{"error": "injected 503 after storing"}'
        request.setResponseCode(code)
        request.setHeader(b"Content-Type", b"application/json")
        request.write(body)
        request.finish()


def injected(testcase: unittest.TestCase) -> tuple[FaultInjector, Server, Server]:
    """The reference API, and the injector serving in front of it."""
    _, api = reference_api(testcase)
    injector = FaultInjector(testcase, api.url)
    front = Server(testcase, Site(injector))
    return injector, front, api


def relay_to(testcase: unittest.TestCase, url: str, timeout: float = 5.0,
             token: str = TOKEN) -> RelayUnderTest:
    return RelayUnderTest(testcase, api_url=url,
                          delivery_api={"url": url, "token": token, "timeout": timeout})


async def until(predicate: Callable[[], bool], what: str, deadline: float = 5.0) -> None:
    """Poll for a server-side event that nothing signals."""
    waited = 0.0
    while not predicate():
        if waited >= deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(reactor, 0.01, lambda: None)
        waited += 0.01


# --------------------------------------------------------------------------
# Clients (these run on threads)


def message(subject: str, body: bytes = b"Hi there.\r\n", extra: bytes = b"",
            to: str = "someone@example.org") -> bytes:
    mid = re.sub(r"\W", ".", subject)
    return (f"From: \"Shop\" <shop@example.com>\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{mid}@client.test>\r\n").encode() + extra + b"\r\n" + body


def stuffed(data: bytes) -> bytes:
    data = re.sub(rb"(?m)^\.", b"..", data)
    return data if data.endswith(b"\r\n") else data + b"\r\n"


def transact(c: RawClient, data: bytes, rcpts: Iterable[str] = ("someone@example.org",),
             sender: str = "app@example.com") -> str:
    """One MAIL/RCPT/DATA transaction; the reply to the end of data."""
    for line, want in ((f"MAIL FROM:<{sender}>", "250 "),
                       *((f"RCPT TO:<{r}>", "250 ") for r in rcpts), ("DATA", "354 ")):
        answer = c.cmd(line)
        assert answer.startswith(want), (line, answer)
    c.send(stuffed(data) + b".\r\n")
    return c.reply()


def session(relay: RelayUnderTest, role: str = "submission") -> RawClient:
    return relay.raw(role).ready()


def send_once(relay: RelayUnderTest, data: bytes) -> str:
    """A whole session for one message: connect, send, QUIT."""
    c = session(relay)
    try:
        return transact(c, data)
    finally:
        c.cmd("QUIT")
        c.close()


def queued_id(reply: str) -> str:
    assert reply.startswith(QUEUED), reply
    return reply[len(QUEUED):]


# --------------------------------------------------------------------------
# The ledger


class Ledger:
    """What clients got a 250 for, against what the API stored."""

    def __init__(self, testcase: unittest.TestCase, api: Server) -> None:
        self.testcase = testcase
        self.api = api
        self.accepted: list[str] = []

    def reply(self, reply: str) -> str:
        """Note a reply to the end of DATA; return it."""
        if reply.startswith("250"):
            self.accepted.append(queued_id(reply))
        return reply

    async def check(self) -> list[dict[str, Any]]:
        sends: list[dict[str, Any]] = (
            await fetch_json(f"{self.api.url}?limit=500"))["sends"]
        ids = [s["id"] for s in sends]
        keys = [s["idempotency_key"] for s in sends]
        t = self.testcase
        t.assertEqual(len(ids), len(set(ids)), f"an id stored twice: {ids}")
        t.assertEqual(len(keys), len(set(keys)), f"a key stored twice: {keys}")
        t.assertEqual(sorted(ids), sorted(set(self.accepted)),
                      "stored sends differ from the ids clients got a 250 for")
        return sends


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

        def send() -> tuple[int, bytes, str]:
            c = relay.smtp()
            try:
                version = c.sock.version()  # type: ignore[attr-defined]
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
        send_id = queued_id(reply)

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

        send_id = queued_id(ledger.reply(await in_thread(send)))
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
    """Each API outcome becomes one SMTP reply line, and the session goes on."""

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

    async def test_500(self) -> None:
        await self.mapping(error(500), f"{TEMPORARY} (delivery API answered 500)")

    async def test_502_html(self) -> None:
        """A proxy's HTML error page in front of the API."""
        page = Canned(502, b"<html><body>Bad Gateway</body></html>",
                      ((b"Content-Type", b"text/html"),))
        await self.mapping(page, f"{TEMPORARY} (delivery API answered 502)")

    async def test_503(self) -> None:
        await self.mapping(error(503), f"{TEMPORARY} (delivery API answered 503)")

    async def test_429(self) -> None:
        await self.mapping(error(429), f"{TEMPORARY} (delivery API answered 429)")

    async def test_408(self) -> None:
        await self.mapping(error(408), f"{TEMPORARY} (delivery API answered 408)")

    async def test_401(self) -> None:
        """Deliberately temporary: the relay's own misconfiguration must not
        bounce customer mail."""
        await self.mapping(error(401), NOT_AUTHORISED)

    async def test_403(self) -> None:
        await self.mapping(error(403), NOT_AUTHORISED)

    async def test_413(self) -> None:
        await self.mapping(error(413), TOO_BIG)

    async def test_400_reason_sanitised(self) -> None:
        await self.mapping(error(400, "bad\r\nthing <x>"),
                           "554 5.6.0 Rejected by delivery API: bad thing <x>")

    async def test_400_hostile_reason(self) -> None:
        """Controls, non-ASCII and length: still one short ASCII line."""
        reason = "\x00evil\u2028\x1b[31m\u00e9 " + "x" * 500
        await self.mapping(error(400, reason),
                           "554 5.6.0 Rejected by delivery API: evil [31m? "
                           + "x" * (200 - len("evil [31m? ")))

    async def test_400_not_json(self) -> None:
        await self.mapping(Canned(400, b"plain\r\ntext"),
                           "554 5.6.0 Rejected by delivery API: plain text")

    async def test_409(self) -> None:
        await self.mapping(error(409), "554 5.6.0 Rejected by delivery API: injected 409")

    async def test_2xx_without_id(self) -> None:
        """A 2xx the relay cannot report an id for is not a 250."""
        await self.mapping(Canned(201, b"{}"), TEMPORARY)

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


# --------------------------------------------------------------------------
# 4. Two relays, one API


class TwoRelays(unittest.TestCase):
    async def test_concurrent_distinct(self) -> None:
        _, api = reference_api(self)
        relays = [RelayUnderTest(self, api_url=api.url) for _ in range(2)]
        ledger = Ledger(self, api)

        def worker(relay: RelayUnderTest, n: int) -> list[str]:
            c = session(relay)
            try:
                return [transact(c, message(f"Relay {n} message {i}")) for i in range(3)]
            finally:
                c.close()

        results = await gatherResults(
            [in_thread(worker, relays[n % 2], n) for n in range(8)])
        replies = [ledger.reply(r) for rs in results for r in rs]
        self.assertEqual(len(replies), 24)
        for r in replies:
            self.assertTrue(r.startswith(QUEUED), r)
        self.assertEqual(len(set(ledger.accepted)), 24)
        self.assertEqual(len(await ledger.check()), 24)

    async def test_failover_same_message(self) -> None:
        """A client that fails over to the other relay sends one send."""
        _, api = reference_api(self)
        a, b = (RelayUnderTest(self, api_url=api.url) for _ in range(2))
        ledger = Ledger(self, api)
        data = message("Failover")
        first = ledger.reply(await in_thread(send_once, a, data))
        self.assertTrue(first.startswith(QUEUED), first)
        self.assertEqual(ledger.reply(await in_thread(send_once, b, data)), first)
        self.assertEqual(len(await ledger.check()), 1)

    async def test_same_message_racing(self) -> None:
        """Both relays' POSTs of one message reach the API together."""
        injector, front, api = injected(self)
        injector.gate = 2
        a, b = relay_to(self, front.url), relay_to(self, front.url)
        ledger = Ledger(self, api)
        data = message("Race")
        replies = await gatherResults([in_thread(send_once, r, data) for r in (a, b)])
        for r in replies:
            ledger.reply(r)
        self.assertEqual(replies[0], replies[1])
        self.assertTrue(replies[0].startswith(QUEUED), replies)
        codes = sorted([(await injector.answers.get())[0] for _ in range(2)])
        self.assertEqual(codes, [200, 201])
        self.assertEqual(len(await ledger.check()), 1)


# --------------------------------------------------------------------------
# 5. Redirects


class Redirects(unittest.TestCase):
    async def test_not_followed(self) -> None:
        """A redirect (even to the real API) is not followed: the POST is
        not replayed elsewhere.  A redirect means the relay's URL is wrong,
        an operator's problem: ``451 4.3.0``, the client keeps the message."""
        injector, front, api = injected(self)
        relay = relay_to(self, front.url)
        ledger = Ledger(self, api)
        codes = (301, 302, 303, 307, 308)
        replies: list[str] = []
        c = await in_thread(session, relay)
        try:
            for code in codes:
                injector.mode = Canned(code, b"", ((b"Location", api.url.encode()),))
                replies.append(ledger.reply(await in_thread(transact, c,
                                                            message(f"Redirect {code}"))))
        finally:
            await in_thread(c.close)
        self.assertEqual(replies, [f"451 4.3.0 Temporary failure, try again later "
                                   f"(delivery API answered {code})" for code in codes])
        self.assertEqual(injector.posts, len(codes))
        self.assertEqual(api.accepted, 0, "the API was contacted")
        self.assertEqual(await ledger.check(), [])


# --------------------------------------------------------------------------
# 6. The connection pool


class Pool(unittest.TestCase):
    async def test_one_persistent_connection(self) -> None:
        injector, front, api = injected(self)
        relay = relay_to(self, front.url)
        ledger = Ledger(self, api)

        def talk(subjects: list[str]) -> list[str]:
            c = session(relay)
            try:
                return [transact(c, message(s)) for s in subjects]
            finally:
                c.close()

        replies = await in_thread(talk, ["Pool 1", "Pool 2"])
        replies += await in_thread(talk, ["Pool 3"])  # another SMTP session
        injector.mode = error(503)  # an error answer does not cost the connection
        replies += await in_thread(talk, ["Pool 4"])
        injector.mode = "pass"
        replies += await in_thread(talk, ["Pool 5"])
        self.assertEqual([r[:4] for r in map(ledger.reply, replies)],
                         ["250 ", "250 ", "250 ", "451 ", "250 "])
        self.assertEqual(front.accepted, 1)
        self.assertEqual(injector.posts, 5)

        # The API drops its idle connections: the next send opens a new one.
        await front.drop()
        reply = ledger.reply(await in_thread(send_once, relay, message("Pool 6")))
        self.assertTrue(reply.startswith(QUEUED), reply)
        self.assertEqual(front.accepted, 2)
        self.assertEqual(len(await ledger.check()), 5)


# --------------------------------------------------------------------------
# 7. HTTPS to the API: verification on, a private CA by configuration


class HTTPS(unittest.TestCase):
    async def test_verified_with_ca_file_refused_without(self) -> None:
        from mxmrelay.forwarder import Forwarder
        from mxmrelay.service import Relay
        from mxmrelay.tls import server_context
        from tests.support import TOKEN, directory, make_certificate

        folder = Path(self.mktemp()).resolve()
        folder.mkdir(parents=True)
        cert, key = make_certificate(folder / "api-tls", "localhost")
        api = ReferenceAPI.open(folder / "api.sqlite3", TOKEN, reactor=reactor)
        self.addCleanup(api.close)
        port = reactor.listenSSL(0, api.site(), server_context(cert, key),
                                 interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        url = f"https://localhost:{port.getHost().port}/v1/sends"

        async def send_via(ca_file: Path | None) -> tuple[int, bytes]:
            relay = RelayUnderTest(self, api_url=url)
            forwarder = Forwarder(reactor, url, TOKEN, 10, ca_file)
            self.addCleanup(forwarder.close)
            relay.relay = Relay.build(relay.config, reactor, forwarder, directory())
            listening = reactor.listenTCP(0, relay.relay.factory("smtps"),
                                          interface="127.0.0.1")
            self.addCleanup(listening.stopListening)
            relay.ports["smtps"] = listening.getHost().port

            def talk() -> tuple[int, bytes]:
                c = relay.smtp("smtps")
                c.mail("app@example.com")
                c.rcpt("someone@example.org")
                result = c.data(message("https " + str(ca_file)))
                c.quit()
                return result

            return await in_thread(talk)

        code, text = await send_via(cert)
        self.assertEqual(code, 250, text)
        code, text = await send_via(None)  # the system store does not know our CA
        self.assertEqual(code, 451, text)
        self.assertEqual(text, b"4.7.5 TLS to delivery API failed, try again later")
        # Read what was stored over a plain listener of the same API.
        plain = reactor.listenTCP(0, api.site(), interface="127.0.0.1")
        self.addCleanup(plain.stopListening)
        listed = await fetch_json(f"http://127.0.0.1:{plain.getHost().port}/v1/sends")
        self.assertEqual(len(listed["sends"]), 1)


# --------------------------------------------------------------------------
# 8. Shutdown while a send is in flight


class Shutdown(unittest.TestCase):
    async def test_send_in_flight_gets_its_answer_first(self) -> None:
        injector, front, _ = injected(self)
        injector.mode = "hang"
        relay = relay_to(self, front.url)

        def talk() -> list[str]:
            c = relay.raw().ready()
            c.send(b"MAIL FROM:<app@example.com>\r\nRCPT TO:<someone@example.org>\r\nDATA\r\n")
            answers = [c.reply() for _ in range(3)]
            c.send(stuffed(message("in flight at shutdown")) + b".\r\n")
            answers += [c.reply(), c.reply()]
            answers.append("closed" if c.closed() else "open")
            return answers

        talking = in_thread(talk)
        await until(lambda: bool(injector.held), "the POST to arrive")
        for factory in relay.relay.factories:
            factory.shutdown()  # what the service does as it stops
        [request] = injector.held
        request.setResponseCode(201)
        request.setHeader(b"Content-Type", b"application/json")
        request.write(b'{"id": "held-send-1"}')
        request.finish()
        answers = await talking
        self.assertEqual(answers[3:], ["250 2.0.0 Ok: queued as held-send-1",
                                       "421 4.3.2 Service shutting down", "closed"])
