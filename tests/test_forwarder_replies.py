"""Which SMTP reply each answer of the delivery API becomes, without a
relay or a socket.

The forwarder posts through treq's in-memory agent (the
``RequestTraversalAgent`` of ``treq.testing``, what ``StubTreq`` runs on;
``StubTreq`` itself takes bytes bodies only, and the forwarder streams
its body) to a resource that answers what the test says, on a ``Clock``;
the outcome is read at once with ``successResultOf``/``failureResultOf``.
The network's own failures (refused, no such host, a certificate that
does not verify) come from an agent that fails the way Twisted's does.  The end-to-end tests
(:mod:`tests.test_forwarding`) prove that the real path gives these
replies and that the session goes on after them.
"""

from __future__ import annotations

import io
import json

from OpenSSL import SSL
from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionLost, ConnectionRefusedError, DNSLookupError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from mxmrelay.forwarder import Forwarder
from mxmrelay.reply import Reply
from tests.forwarding_support import NOT_AUTHORISED, TEMPORARY, TIMED_OUT, TOO_BIG, UNREACHABLE

URL = "http://api.test/v1/sends"
TOKEN = "stub-token"
TIMEOUT = 5.0
METADATA = {"id": "S1", "customer": "demo"}
HEAD = b"From: app@example.com\r\nTo: someone@example.org\r\nSubject: Hi\r\n\r\n"
BODY = b"Hi there.\r\n"


class Answer(Resource):
    """The delivery API, answering every POST with ``code`` and ``body``
    (``None``: never answering), and keeping what it was sent."""

    isLeaf = True

    def __init__(self, code: int, body: bytes | None = b"",
                 content_type: bytes = b"application/json") -> None:
        super().__init__()
        self.code = code
        self.body: bytes | None = body
        self.content_type = content_type
        self.requests: list[tuple[dict[bytes, list[bytes]], bytes]] = []

    def render_POST(self, request: Request) -> bytes | int:
        assert request.content is not None
        headers = {name.lower(): list(values)
                   for name, values in request.requestHeaders.getAllRawHeaders()}
        self.requests.append((headers, request.content.read()))
        if self.body is None:
            return NOT_DONE_YET
        request.setResponseCode(self.code)
        request.setHeader(b"Content-Type", self.content_type)
        return self.body


def error(code: int, text: str | None = None) -> Answer:
    """An API refusal as the contract writes it: ``{"error": reason}``."""
    return Answer(code, json.dumps({"error": text or f"injected {code}"}).encode())


def forwarder(agent: IAgent, clock: Clock) -> Forwarder:
    """A forwarder whose requests go to ``agent`` instead of the network
    (its own client is treq's, over an agent of the network's)."""
    made = Forwarder(clock, URL, TOKEN, TIMEOUT)
    made._agent = agent
    made._client = HTTPClient(agent)
    return made


@implementer(IAgent)
class _Failing:
    """An agent whose requests fail with ``error``, as Twisted's do when
    the connection does."""

    def __init__(self, error: BaseException) -> None:
        self.error = error
        self.requests = 0

    def request(self, method: bytes, uri: bytes, headers: Headers | None = None,
                bodyProducer: IBodyProducer | None = None) -> Deferred[IResponse]:
        self.requests += 1
        return fail(self.error)


class ReplyMapping(SynchronousTestCase):
    """One POST per send, and the reply each answer becomes."""

    def forward(self, api: Answer) -> Deferred[str]:
        self.clock = Clock()
        agent = RequestTraversalAgent(api)
        d = forwarder(agent, self.clock).forward(METADATA, "k" * 64, HEAD, io.BytesIO(BODY))
        agent.flush()
        return d

    def assertReply(self, api: Answer, expected: str) -> None:
        d = self.forward(api)
        failure = self.failureResultOf(d, Reply)
        self.assertEqual(str(failure.value), expected)
        # One POST: the relay leaves retrying to the client.
        self.assertEqual(len(api.requests), 1)

    def test_2xx_gives_the_id(self) -> None:
        for code in (200, 201, 202):
            api = Answer(code, b'{"id": "01hx-send_1"}')
            self.assertEqual(self.successResultOf(self.forward(api)), "01hx-send_1")
            self.assertEqual(len(api.requests), 1)

    def test_the_request(self) -> None:
        """POST with the token, the idempotency key, and a multipart body:
        the metadata as JSON, then the message as sent."""
        api = Answer(201, b'{"id": "S1"}')
        self.successResultOf(self.forward(api))
        [(headers, body)] = api.requests
        self.assertEqual(headers[b"authorization"], [b"Bearer " + TOKEN.encode()])
        self.assertEqual(headers[b"idempotency-key"], [b"k" * 64])
        [content_type] = headers[b"content-type"]
        self.assertTrue(content_type.startswith(b"multipart/form-data; boundary="), content_type)
        metadata_at = body.index(json.dumps(METADATA).encode())
        self.assertLess(metadata_at, body.index(HEAD + BODY))

    def test_2xx_without_a_usable_id(self) -> None:
        """A 2xx the relay cannot report an id for is not a 250."""
        for body in (b"{}", b"not json", b'{"id": 7}', b'{"id": "a b"}', b'{"id": "\\u00e9"}',
                     b'["id"]'):
            self.assertReply(Answer(201, body), TEMPORARY)

    def test_5xx_408_429(self) -> None:
        for code in (500, 503, 408, 429):
            self.assertReply(error(code), f"{TEMPORARY} (delivery API answered {code})")

    def test_502_html(self) -> None:
        """A proxy's HTML error page in front of the API."""
        page = Answer(502, b"<html><body>Bad Gateway</body></html>", b"text/html")
        self.assertReply(page, f"{TEMPORARY} (delivery API answered 502)")

    def test_401_403(self) -> None:
        """Deliberately temporary: the relay's own misconfiguration must not
        bounce customer mail."""
        for code in (401, 403):
            self.assertReply(error(code), NOT_AUTHORISED)

    def test_3xx_not_followed(self) -> None:
        """A redirect means the relay's URL is wrong: the POST is not
        replayed elsewhere, the client keeps the message."""
        for code in (301, 302, 303, 307, 308):
            api = Answer(code, b"")
            d = self.forward(api)
            self.assertEqual(str(self.failureResultOf(d, Reply).value),
                             f"{TEMPORARY} (delivery API answered {code})")
            self.assertEqual(len(api.requests), 1)

    def test_413(self) -> None:
        self.assertReply(error(413), TOO_BIG)

    def test_4xx_reason(self) -> None:
        self.assertReply(error(409), "554 5.6.0 Rejected by delivery API: injected 409")
        self.assertReply(error(400, "bad\r\nthing <x>"),
                         "554 5.6.0 Rejected by delivery API: bad thing <x>")

    def test_4xx_hostile_reason(self) -> None:
        """Controls, non-ASCII and length: still one short ASCII line."""
        reason = "\x00evil\u2028\x1b[31m\u00e9 " + "x" * 500
        self.assertReply(error(400, reason), "554 5.6.0 Rejected by delivery API: evil [31m? "
                         + "x" * (200 - len("evil [31m? ")))

    def test_4xx_not_json(self) -> None:
        self.assertReply(Answer(400, b"plain\r\ntext", b"text/plain"),
                         "554 5.6.0 Rejected by delivery API: plain text")
        self.assertReply(Answer(422, b""), "554 5.6.0 Rejected by delivery API: 422")

    def test_timeout(self) -> None:
        api = Answer(201, None)
        d = self.forward(api)
        self.assertNoResult(d)
        self.clock.advance(TIMEOUT - 0.1)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.assertEqual(str(self.failureResultOf(d, Reply).value), TIMED_OUT)
        self.assertEqual(len(api.requests), 1)


class NetworkFailures(SynchronousTestCase):
    """What the connection's own failures become: all temporary."""

    def assertReply(self, error: BaseException, expected: str) -> None:
        agent = _Failing(error)
        d = forwarder(agent, Clock()).forward(METADATA, "k", HEAD, io.BytesIO(BODY))
        self.assertEqual(str(self.failureResultOf(d, Reply).value), expected)
        self.assertEqual(agent.requests, 1)

    def test_refused_and_no_such_host(self) -> None:
        self.assertReply(ConnectionRefusedError(), UNREACHABLE)
        self.assertReply(DNSLookupError("api.test"), UNREACHABLE)

    def test_certificate_not_verified(self) -> None:
        """The API's certificate does not verify: the operator's to fix."""
        refused = Failure(SSL.Error([("SSL routines", "", "certificate verify failed")]))
        self.assertReply(ResponseNeverReceived([refused]),
                         "451 4.7.5 TLS to delivery API failed, try again later")
        self.assertReply(ResponseFailed([refused]),
                         "451 4.7.5 TLS to delivery API failed, try again later")

    def test_connection_lost(self) -> None:
        for error in (ResponseNeverReceived([Failure(ConnectionLost())]),
                      ResponseFailed([Failure(ConnectionLost())])):
            self.assertReply(error, "451 4.4.2 Connection to delivery API failed, "
                                    "try again later")

    def test_anything_else(self) -> None:
        self.assertReply(RuntimeError("surprise"),
                         "451 4.4.2 Connection to delivery API failed, try again later")
        self.flushLoggedErrors(RuntimeError)
