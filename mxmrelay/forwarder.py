"""The hop to the delivery API: one POST per send, over treq.

The relay is a before-queue proxy: the client's 250 waits for the API's
2xx, so a message is acknowledged only once the API holds it.  Every other
outcome becomes an SMTP reply the client can act on: 4xx (keep the message
and retry) when the failure may pass, 5xx when it will not.  The request
streams the spooled message (multipart/form-data: JSON metadata, then the
raw ``message/rfc822``), so a large message is never copied whole into
memory or inflated by base64.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import attrs
import treq
from hyperlink import EncodedURL
from OpenSSL import SSL
from treq.client import HTTPClient
from twisted.internet import ssl
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.interfaces import IConsumer, IReactorTime
from twisted.logger import Logger
from twisted.web.client import (
    URI,
    Agent,
    BrowserLikePolicyForHTTPS,
    FileBodyProducer,
    HTTPConnectionPool,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer
from zope.interface import implementer

from mxmrelay.reply import Reply

log = Logger(namespace="mxmrelay.forwarder")

TEMPORARY = "Temporary failure, try again later"
#: Bodies up to this size are written in one go (FileBodyProducer's chunk).
SMALL_BODY = 64 * 1024


@implementer(IBodyProducer)
class MultipartProducer:
    """``metadata`` JSON part, then the message: rewritten header section
    from memory, body streamed from the spool by ``FileBodyProducer``."""

    def __init__(self, metadata: bytes, head: bytes, body: IO[bytes]) -> None:
        self.boundary = os.urandom(16).hex()
        b = self.boundary.encode()
        self._pre = (
            b"--" + b + b'\r\nContent-Disposition: form-data; name="metadata"\r\n'
            b"Content-Type: application/json\r\n\r\n" + metadata + b"\r\n--" + b +
            b'\r\nContent-Disposition: form-data; name="message"\r\n'
            b"Content-Type: message/rfc822\r\n\r\n" + head
        )
        self._post = b"\r\n--" + b + b"--\r\n"
        self._file = body
        self._body = FileBodyProducer(body)
        self.length = len(self._pre) + self._body.length + len(self._post)

    @property
    def content_type(self) -> bytes:
        return b"multipart/form-data; boundary=" + self.boundary.encode()

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._pre)
        if self._body.length <= SMALL_BODY:
            # Most messages: one write now, rather than a cooperative task
            # that would start on the next reactor turn.
            consumer.write(self._file.read())
            consumer.write(self._post)
            return succeed(None)
        d: Deferred[None] = self._body.startProducing(consumer)
        d.addCallback(lambda _: consumer.write(self._post))
        return d

    def pauseProducing(self) -> None:
        self._body.pauseProducing()

    def resumeProducing(self) -> None:
        self._body.resumeProducing()

    def stopProducing(self) -> None:
        self._body.stopProducing()


@attrs.define
class Forwarder:
    """POSTs sends to the delivery API over one persistent connection pool."""

    reactor: IReactorTime
    url: str
    token: str
    timeout: float
    ca_file: Path | None = None
    pool: HTTPConnectionPool = attrs.field(init=False)
    _client: HTTPClient = attrs.field(init=False)
    _parsed_url: EncodedURL = attrs.field(init=False)
    _headers: Headers = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.pool = HTTPConnectionPool(self.reactor, persistent=True)
        self.pool.maxPersistentPerHost = 64
        if self.ca_file is not None:
            roots = ssl.trustRootFromCertificates(
                [ssl.Certificate.loadPEM(self.ca_file.read_bytes())])
            policy = BrowserLikePolicyForHTTPS(trustRoot=roots)
        else:
            policy = BrowserLikePolicyForHTTPS()
        # Parsed once: treq would parse a string URL on every request.
        self._parsed_url = EncodedURL.from_text(self.url)
        self._headers = Headers({b"Authorization": [b"Bearer " + self.token.encode()],
                                 b"Accept": [b"application/json"]})
        endpoints = _Endpoints(self.reactor, policy)
        self._client = HTTPClient(Agent.usingEndpointFactory(self.reactor, endpoints,
                                                             pool=self.pool))

    def close(self) -> Deferred[None]:
        d: Deferred[None] = self.pool.closeCachedConnections()
        return d

    def forward(self, metadata: Mapping[str, Any], idempotency_key: str, head: bytes,
                body: IO[bytes]) -> Deferred[str]:
        """Send one message; fire with the id the API holds it under, or
        fail with the :class:`Reply` to give the client."""
        d = Deferred.fromCoroutine(self._post(metadata, idempotency_key, head, body))
        # Called only when the deadline fired, whatever the cancellation
        # failed with: once a request is sent, Agent reports a cancel as
        # ResponseNeverReceived, not CancelledError.
        d.addTimeout(self.timeout, self.reactor, onTimeoutCancel=self._timed_out)
        d.addErrback(self._network_failure)
        return d

    @staticmethod
    def _timed_out(result: Any, timeout: float) -> Any:
        log.warn("delivery API timed out after {timeout}s", timeout=timeout)
        raise Reply(451, "4.4.2", "Delivery API timed out, try again later")

    async def _post(self, metadata: Mapping[str, Any], key: str, head: bytes,
                    body: IO[bytes]) -> str:
        producer = MultipartProducer(json.dumps(metadata).encode(), head, body)
        headers = self._headers.copy()
        headers.setRawHeaders(b"Idempotency-Key", [key.encode()])
        headers.setRawHeaders(b"Content-Type", [producer.content_type])
        response = await self._client.post(self._parsed_url, data=producer, headers=headers,
                                           allow_redirects=False)
        content = await treq.content(response)
        return self._outcome(response.code, content, metadata)

    def _outcome(self, code: int, content: bytes, metadata: Mapping[str, Any]) -> str:
        if 200 <= code < 300:
            try:
                send_id = json.loads(content)["id"]
            except (ValueError, KeyError, TypeError):
                send_id = None
            if not isinstance(send_id, str) or not send_id.isascii() or not (
                    send_id.replace("-", "").replace("_", "").isalnum()):
                log.error("delivery API answered {code} without a usable id", code=code)
                raise Reply(451, "4.3.0", TEMPORARY)
            return str(send_id)
        reason = _reason(content)
        log.warn("delivery API refused id={id}: {code} {reason}", id=metadata.get("id"),
                 code=code, reason=reason)
        if code in (401, 403):
            # The relay's own credentials are wrong: an operator's problem
            # that must not bounce the customer's mail.
            log.critical("delivery API rejects the relay's token ({code})", code=code)
            raise Reply(451, "4.3.0", f"{TEMPORARY} (relay not authorised by delivery API)")
        if 300 <= code < 400:
            # Never followed (a POST must not be replayed elsewhere); a
            # redirect means the configured URL is wrong: also the operator's.
            log.critical("delivery API redirects ({code}): check delivery_api.url", code=code)
            raise Reply(451, "4.3.0", f"{TEMPORARY} (delivery API answered {code})")
        if code in (408, 429) or code >= 500 or code < 200:
            raise Reply(451, "4.3.0", f"{TEMPORARY} (delivery API answered {code})")
        if code == 413:
            raise Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
        raise Reply(554, "5.6.0", f"Rejected by delivery API: {reason or code}")

    @staticmethod
    def _network_failure(failure: Any) -> Any:
        if failure.check(Reply):
            return failure
        if failure.check(TimeoutError, CancelledError):
            log.warn("delivery API timed out")
            raise Reply(451, "4.4.2", "Delivery API timed out, try again later")
        if failure.check(ConnectError, DNSLookupError):
            log.warn("delivery API unreachable: {error}", error=failure.getErrorMessage())
            raise Reply(451, "4.4.1", "Delivery API unreachable, try again later")
        if failure.check(ResponseFailed, ResponseNeverReceived):
            reasons = failure.value.reasons
            if any(r.check(SSL.Error) for r in reasons):
                # The API's certificate did not verify: the operator's to fix.
                log.error("TLS to the delivery API failed: {error}",
                          error="; ".join(r.getErrorMessage() for r in reasons))
                raise Reply(451, "4.7.5", "TLS to delivery API failed, try again later")
            log.warn("delivery API connection failed: {error}",
                     error="; ".join(r.getErrorMessage() for r in reasons))
            raise Reply(451, "4.4.2", "Connection to delivery API failed, try again later")
        log.failure("delivery API call failed", failure)
        raise Reply(451, "4.4.2", "Connection to delivery API failed, try again later")


@implementer(IAgentEndpointFactory)
@attrs.define
class _Endpoints:
    """One endpoint per API host, made once: Agent's default factory makes
    a new one (IDNA-encoding the host) for every request, even when the
    pool then reuses a connection."""

    reactor: Any
    policy: BrowserLikePolicyForHTTPS
    _made: dict[tuple[bytes, bytes, int], Any] = attrs.field(factory=dict)

    def endpointForURI(self, uri: URI) -> Any:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._made.get(key)
        if endpoint is None:
            endpoint = HostnameEndpoint(self.reactor, uri.host, uri.port)
            if uri.scheme == b"https":
                creator = self.policy.creatorForNetloc(uri.host, uri.port)
                endpoint = wrapClientTLS(creator, endpoint)
            self._made[key] = endpoint
        return endpoint


def _reason(content: bytes) -> str:
    """The API's reason, made safe for one SMTP reply line."""
    text: Any = None
    try:
        text = json.loads(content).get("error")
    except (ValueError, AttributeError):
        pass
    if not isinstance(text, str):
        text = content.decode("utf-8", "replace")
    clean = " ".join("".join(c if c.isprintable() else " " for c in str(text)).split())
    return clean.encode("ascii", "replace").decode()[:200]
