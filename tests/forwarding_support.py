"""The hop to the delivery API, as the end-to-end tests drive it: the
reference API on loopback, :class:`FaultInjector` in front of it, relays
forwarding there, SMTP transactions on threads, and :class:`Ledger`.

:class:`FaultInjector` is a small ``twisted.web`` resource that answers
what a test asks for (an error code, a redirect, silence) or passes the
request on to the reference API over HTTP, optionally storing it there and
then never answering (the ambiguous failure).  Nothing in the path is a
mock: treq, the connection pool, the multipart body and the SQLite store
are the ones the relay runs with.

The bookkeeping every test ends with (:meth:`Ledger.check`): each id a
client got a 250 for is stored exactly once, and nothing else is stored.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.interfaces import IProtocolFactory
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.trial import unittest
from twisted.web.client import HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from mxmrelay_refapi.api import ReferenceAPI
from tests.helpers import listen, queued_id
from tests.support import TOKEN, RawClient, RelayUnderTest, fetch_json

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

    def __init__(self, testcase: unittest.TestCase, factory: IProtocolFactory,
                 port: int = 0) -> None:
        super().__init__(factory)
        self.accepted = 0
        self._idle: list[Deferred[None]] = []
        self.port, number = listen(self, port)
        self.base = f"http://127.0.0.1:{number}"
        self.url = f"{self.base}/v1/sends"
        testcase.addCleanup(lambda: Deferred.fromCoroutine(self.stop()))

    def buildProtocol(self, addr: Any) -> ProtocolWrapper:
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
        stopped = self.port.stopListening()
        if stopped is not None:
            await stopped
        await self.drop()


def reference_api(testcase: unittest.TestCase, **kwargs: Any) -> tuple[ReferenceAPI, Server]:
    """The reference API, served (the way ``mxmrelay_refapi.api`` says to) on loopback."""
    folder = Path(testcase.mktemp()).resolve()
    folder.mkdir(parents=True)
    api = ReferenceAPI.open(folder / "api.sqlite3", TOKEN, reactor=reactor, **kwargs)
    testcase.addCleanup(api.close)  # after the server's clean-up (LIFO)
    return api, Server(testcase, api.site())


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
        headers: dict[bytes | str, list[bytes | str]] = {
            name: [value] for name in (b"Authorization", b"Idempotency-Key", b"Content-Type",
                                       b"Accept")
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


# --------------------------------------------------------------------------
# Clients (these run on threads)


def stuffed(data: bytes) -> bytes:
    data = re.sub(rb"(?m)^\.", b"..", data)
    return data if data.endswith(b"\r\n") else data + b"\r\n"


def transact(c: RawClient, data: bytes, rcpts: Iterable[str] = ("someone@example.org",),
             sender: str = "app@example.com") -> str:
    """One MAIL/RCPT/DATA transaction; the reply to the end of data (its
    last line: the lines explaining the decision are tests/test_explain.py's)."""
    for line, want in ((f"MAIL FROM:<{sender}>", "250 "),
                       *((f"RCPT TO:<{r}>", "250 ") for r in rcpts), ("DATA", "354 ")):
        answer = c.cmd(line)
        assert answer.startswith(want), (line, answer)
    c.send(stuffed(data) + b".\r\n")
    return c.reply().split("\n")[-1]


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
            self.accepted.append(queued_id(reply, alone=True))
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
