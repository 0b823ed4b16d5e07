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
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import attrs
import treq
from hyperlink import EncodedURL
from OpenSSL import SSL
from treq.client import HTTPClient
from twisted.internet import task
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.interfaces import IConsumer, IReactorTime
from twisted.internet.task import CooperativeTask
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    HTTPConnectionPool,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer
from zope.interface import implementer

from mxmrelay import metrics
from mxmrelay.httpclient import make_agent
from mxmrelay.reply import Reply

log = Logger(namespace="mxmrelay.forwarder")

TEMPORARY = "Temporary failure, try again later"
#: The spooled body is read and written this much at a time, one chunk a
#: turn of the reactor; a body no larger goes out with the rest of the
#: request from ``startProducing`` itself, without waiting for a turn.
SMALL_BODY = 64 * 1024

#: A part of a request body: bytes, or a file read from where it stands.
Part = bytes | IO[bytes]


@implementer(IBodyProducer)
class PartsProducer:
    """A request body written part by part: bytes as they are, a file from
    its current position to its end, ``chunk`` bytes a turn.

    The consumer may pause, resume or stop it at any point: before the
    first write, from inside a write (a TCP transport pauses its producer
    there as soon as its buffer is full, so a large header section pauses
    the body before the file part has begun), between turns, or after the
    last write.  Those calls only set this producer's own flags, which
    every write looks at first, so they mean the same whatever part is
    current; a cooperative task merely paces the file reads.  Writing never
    happens inside one of those calls either: a resume schedules the next
    turn, so a consumer that resumes from within a write is not re-entered.
    """

    def __init__(self, parts: Iterable[Part], *, chunk: int = SMALL_BODY,
                 cooperate: Callable[[Iterator[None]], CooperativeTask[Any]] = task.cooperate
                 ) -> None:
        sized = [(part, len(part) if isinstance(part, bytes) else _remaining(part))
                 for part in parts]
        self.length = sum(size for _, size in sized)
        self._pieces = _pieces(sized, chunk)
        self._cooperate = cooperate
        self._consumer: IConsumer | None = None
        self._done: Deferred[None] = Deferred(lambda _: self.stopProducing())
        self._paused = False
        self._stopped = False
        self._finished = False
        self._written = 0
        #: A cooperative task is scheduled or running.
        self._turning = False

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        """Write what can go now; the Deferred fires once everything is
        written, or fails if reading or writing does, and never fires once
        stopped (:class:`IBodyProducer`); cancelling it stops production."""
        self._consumer = consumer
        if self._write():
            self._turn()
        return self._done

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._turn()

    def stopProducing(self) -> None:
        self._stopped = True

    def _idle(self) -> bool:
        return self._paused or self._stopped or self._finished

    def _turn(self) -> None:
        """Go on writing on a later turn, unless a task already will."""
        if self._consumer is None or self._turning or self._idle():
            return
        self._turning = True
        self._cooperate(self._turns()).whenDone().addBoth(self._turned)

    def _turns(self) -> Iterator[None]:
        while self._write():
            yield None

    def _turned(self, result: object) -> None:
        # Whether the task ran out or its cooperator was stopped.
        self._turning = False

    def _write(self) -> bool:
        """Write pieces until paused, stopped or done (False), or until the
        next file read is due on a later turn (True).

        Done means every byte written, even if the last write paused this
        producer: the request need not wait for the transport to drain.
        """
        consumer = self._consumer
        assert consumer is not None
        if self._idle():
            return False
        try:
            for piece in self._pieces:
                if piece is None:
                    return True
                self._written += len(piece)
                consumer.write(piece)
                if self._stopped:
                    return False
                if self._written == self.length:
                    break
                if self._paused:
                    return False
        except Exception:
            self._finished = True
            if not self._stopped:
                self._done.errback()
            return False
        self._finished = True
        self._done.callback(None)
        return False


def _remaining(file: IO[bytes]) -> int:
    """How many bytes ``file`` holds past its current position."""
    here = file.tell()
    end = file.seek(0, os.SEEK_END)
    file.seek(here)
    return end - here


def _pieces(parts: list[tuple[Part, int]], chunk: int) -> Iterator[bytes | None]:
    """The bytes to write, in order, with ``None`` where a turn is due:
    before each file read but the first.  Files are read lazily, as their
    pieces are wanted, so a paused or stopped producer reads no further."""
    reads = 0
    for part, size in parts:
        if isinstance(part, bytes):
            if part:
                yield part
            continue
        left = size
        while left > 0:
            if reads:
                yield None
            reads += 1
            data = part.read(min(chunk, left))
            if not data:
                raise EOFError(f"body file ended {left} bytes short of its length")
            left -= len(data)
            yield data


class MultipartProducer(PartsProducer):
    """The request body: the ``metadata`` JSON part, then the message part:
    the rewritten header section from memory and the body from the spool."""

    def __init__(self, metadata: bytes, head: bytes, body: IO[bytes], *,
                 cooperate: Callable[[Iterator[None]], CooperativeTask[Any]] = task.cooperate,
                 submitted_headers: bytes | None = None) -> None:
        self.boundary = os.urandom(16).hex()
        b = self.boundary.encode()
        pre = (
            b"--" + b + b'\r\nContent-Disposition: form-data; name="metadata"\r\n'
            b"Content-Type: application/json\r\n\r\n" + metadata + b"\r\n--" + b +
            b'\r\nContent-Disposition: form-data; name="message"\r\n'
            b"Content-Type: message/rfc822\r\n\r\n"
        )
        # A sandbox send carries a third part: the header section as the
        # client submitted it, for the reports to show beside the result.
        extra = b"" if submitted_headers is None else (
            b"\r\n--" + b + b'\r\nContent-Disposition: form-data; name="submitted_headers"\r\n'
            b"Content-Type: text/rfc822-headers\r\n\r\n" + submitted_headers)
        super().__init__([pre, head, body, extra, b"\r\n--" + b + b"--\r\n"],
                         cooperate=cooperate)

    @property
    def content_type(self) -> bytes:
        return b"multipart/form-data; boundary=" + self.boundary.encode()


@attrs.define
class Forwarder:
    """POSTs sends to the delivery API over one persistent connection pool."""

    reactor: IReactorTime
    url: str
    token: str
    timeout: float
    ca_file: Path | None = None
    pool: HTTPConnectionPool = attrs.field(init=False)
    _agent: IAgent = attrs.field(init=False)
    _client: HTTPClient = attrs.field(init=False)
    _parsed_url: EncodedURL = attrs.field(init=False)
    _uri: bytes = attrs.field(init=False)
    _headers: Headers = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._agent, self.pool = make_agent(self.reactor, self.ca_file)
        self._client = HTTPClient(self._agent)
        # Parsed and encoded once: treq parses a URL and encodes it anew
        # (its host IDNA-checked) on every request.
        self._parsed_url = EncodedURL.from_text(self.url)
        self._uri = self._parsed_url.to_uri().to_text().encode("ascii")
        self._headers = Headers({b"Authorization": [b"Bearer " + self.token.encode()],
                                 b"Accept": [b"application/json"]})

    def close(self) -> Deferred[None]:
        d: Deferred[None] = self.pool.closeCachedConnections()
        return d

    def forward(self, metadata: Mapping[str, Any], idempotency_key: str, head: bytes,
                body: IO[bytes], *, submitted_headers: bytes | None = None) -> Deferred[str]:
        """Send one message; fire with the id the API holds it under, or
        fail with the :class:`Reply` to give the client."""
        metrics.SENDS_IN_FLIGHT.inc()
        started = self.reactor.seconds()
        d = Deferred.fromCoroutine(self._post(metadata, idempotency_key, head, body,
                                              submitted_headers))
        # Called only when the deadline fired, whatever the cancellation
        # failed with: once a request is sent, Agent reports a cancel as
        # ResponseNeverReceived, not CancelledError.
        d.addTimeout(self.timeout, self.reactor, onTimeoutCancel=self._timed_out)
        d.addErrback(self._network_failure)
        d.addBoth(self._answered, started)
        return d

    def _answered(self, result: Any, started: float) -> Any:
        metrics.SENDS_IN_FLIGHT.dec()
        metrics.API_DURATION.observe(self.reactor.seconds() - started)
        return result

    def probe(self) -> Deferred[str | None]:
        """Is the API there, and does it take our token?  ``HEAD`` on its
        URL: None if it answers below 500 and not 401/403, else why not
        (see mxmrelay/health.py)."""
        d = self._client.head(self._parsed_url, headers=self._headers, allow_redirects=False)
        d.addTimeout(self.timeout, self.reactor)

        def answered(response: Any) -> str | None:
            code = response.code
            if code in (401, 403):
                return f"delivery API rejects the relay's token ({code})"
            return f"delivery API answered {code}" if code >= 500 else None

        def failed(f: Failure) -> str:
            if f.check(TimeoutError, CancelledError):
                return f"delivery API did not answer within {self.timeout:g} s"
            return f"delivery API unreachable: {f.getErrorMessage()}"

        return d.addCallbacks(answered, failed)

    @staticmethod
    def _timed_out(result: Any, timeout: float) -> Any:
        log.warn("delivery API timed out after {timeout}s", timeout=timeout)
        metrics.api_failed("timeout")
        raise Reply(451, "4.4.2", "Delivery API timed out, try again later")

    async def _post(self, metadata: Mapping[str, Any], key: str, head: bytes,
                    body: IO[bytes], submitted_headers: bytes | None = None) -> str:
        producer = MultipartProducer(json.dumps(metadata).encode(), head, body,
                                     submitted_headers=submitted_headers)
        headers = self._headers.copy()
        headers.setRawHeaders(b"Idempotency-Key", [key.encode()])
        headers.setRawHeaders(b"Content-Type", [producer.content_type])
        # The Agent treq wraps, straight: the send needs nothing treq adds
        # per request (see mxmrelay.httpclient.make_agent); a redirect is
        # never followed either way (see _outcome).
        response = await self._agent.request(b"POST", self._uri, headers, producer)
        content = await treq.content(response)
        return self._outcome(response.code, content, metadata)

    def _outcome(self, code: int, content: bytes, metadata: Mapping[str, Any]) -> str:
        metrics.api_answered(code)
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
            metrics.api_failed("timeout")
            raise Reply(451, "4.4.2", "Delivery API timed out, try again later")
        if failure.check(ConnectError, DNSLookupError):
            log.warn("delivery API unreachable: {error}", error=failure.getErrorMessage())
            metrics.api_failed("unreachable")
            raise Reply(451, "4.4.1", "Delivery API unreachable, try again later")
        if failure.check(ResponseFailed, ResponseNeverReceived):
            reasons = failure.value.reasons
            tls = any(r.check(SSL.Error) for r in reasons)
            metrics.api_failed("tls_error" if tls else "connection_failed")
            if tls:
                # The API's certificate did not verify: the operator's to fix.
                log.error("TLS to the delivery API failed: {error}",
                          error="; ".join(r.getErrorMessage() for r in reasons))
                raise Reply(451, "4.7.5", "TLS to delivery API failed, try again later")
            log.warn("delivery API connection failed: {error}",
                     error="; ".join(r.getErrorMessage() for r in reasons))
            raise Reply(451, "4.4.2", "Connection to delivery API failed, try again later")
        log.failure("delivery API call failed", failure)
        metrics.api_failed("connection_failed")
        raise Reply(451, "4.4.2", "Connection to delivery API failed, try again later")


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
