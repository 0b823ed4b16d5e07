"""Refused mail the customer can see: every transaction refused after AUTH
is reported to the delivery API (``POST /v1/refusals``) as a record, so
that a customer's developer finds it in the reports next to the sends.

Best effort, and never in the way of the SMTP dialogue: a record goes into
a bounded in-memory queue and the reply is given at once; the queue is
flushed as a JSON array every ``interval`` seconds, or as soon as
``batch`` records wait.  A slow or failing API only makes the queue wait
(retries back off, doubling up to ``max_backoff``); a full queue drops its
oldest records and counts them.  One log line when reports start failing,
one when they recover (with how many were dropped meanwhile): an outage of
the API is the operator's news once, not once a second.

A record holds the time, the customer space, the user, the listener, the
envelope, the reply and, where the header section was read, its
Message-ID and Subject as written; never anything of the body.  Refusals
before AUTH (a bad password, the wrong port, a TLS failure) are no
customer's data: they stay in the logs.
"""

from __future__ import annotations

import collections
import datetime
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import treq
from hyperlink import EncodedURL
from prometheus_client import Counter
from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool
from twisted.web.http_headers import Headers

from mxmrelay.connection import ConnectionInfo
from mxmrelay.headers import split_fields, unfold
from mxmrelay.httpclient import make_client
from mxmrelay.reply import Reply

log = Logger(namespace="mxmrelay.refusals")

#: Records kept while the API does not take them; past it the oldest go.
CAPACITY = 10_000
#: Records a POST carries at most (and a flush starts at once past it).
BATCH = 100
INTERVAL = 1.0
MAX_BACKOFF = 60.0
#: The longest Message-ID or Subject a record carries, in characters.
FIELD_LIMIT = 998

REPORTS = Counter(
    "mxmrelay_refusal_reports", "Refusal records by outcome: sent (the delivery API took "
    "them), rejected (it refused a batch: 4xx), dropped (the queue was full, oldest first).",
    ["result"])


class Rejected(Exception):
    """The API refused a batch for good (a 4xx): retrying cannot help."""


def reportable(reply: Reply, *, data: bool) -> bool:
    """Is this refusal the customer's to see?  Refusals of the message or
    its envelope (5xx at the end of DATA; 550 and up at MAIL and RCPT, so
    not command syntax), recipient limits (4.5.3) and sending limits
    (4.7.1).  A temporary failure of the relay's own (the API down, 4.3.0,
    4.4.x) is not: the client retries, and the operator has the logs."""
    return reply.code >= (500 if data else 550) or reply.enhanced in ("4.5.3", "4.7.1")


def _field(section: bytes, name: bytes) -> str | None:
    for f in split_fields(section):
        if f.name == name:
            text = unfold(section, f).strip(b" \t").decode("utf-8", "backslashreplace")
            return text[:FIELD_LIMIT]
    return None


def record(*, when: float, space: str, user: str, sandbox: bool, connection: ConnectionInfo,
           mail_from: str, recipients: Sequence[str], reply: Reply,
           header_section: bytes | None) -> dict[str, Any]:
    """One refusal, as ``POST /v1/refusals`` carries it."""
    stamp = datetime.datetime.fromtimestamp(when, datetime.UTC)
    head = header_section or b""
    return {
        "time": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "customer": space,
        "user": user,
        "sandbox": sandbox,
        "client": {"address": connection.client, "tls_version": connection.tls_version,
                   "listener": connection.listener},
        "mail_from": mail_from,
        "recipients": list(recipients),
        "reply": {"code": reply.code, "enhanced": reply.enhanced, "text": reply.text},
        "message_id": _field(head, b"message-id") if header_section is not None else None,
        "subject": _field(head, b"subject") if header_section is not None else None,
    }


@attrs.define
class RefusalQueue:
    """The bounded queue and its flushing (see the module docstring).

    ``post`` sends one batch: it fires once the API took it, fails with
    :class:`Rejected` when it never will, and with anything else when it
    may later.
    """

    clock: IReactorTime
    post: Callable[[list[dict[str, Any]]], Deferred[None]]
    capacity: int = CAPACITY
    batch: int = BATCH
    interval: float = INTERVAL
    max_backoff: float = MAX_BACKOFF
    waiting: collections.deque[dict[str, Any]] = attrs.field(factory=collections.deque)
    #: Records dropped since the reports last got through.
    dropped: int = 0
    #: POSTs failed in a row (0: reports are getting through).
    failures: int = 0
    _timer: IDelayedCall | None = None
    _in_flight: Deferred[None] | None = None
    _stopped: bool = False

    def add(self, item: dict[str, Any]) -> None:
        """Queue one record; never waits, never fails."""
        if self._stopped:
            return
        if len(self.waiting) >= self.capacity:
            self.waiting.popleft()
            self._dropped(1)
        self.waiting.append(item)
        if len(self.waiting) >= self.batch and self.failures == 0:
            self._flush_now()
        else:
            self._schedule(self.interval)

    def _dropped(self, n: int) -> None:
        if self.dropped == 0:
            log.warn("refusal queue full ({capacity} records): dropping the oldest until the "
                     "delivery API takes reports again", capacity=self.capacity)
        self.dropped += n
        REPORTS.labels("dropped").inc(n)

    def _schedule(self, delay: float) -> None:
        if self._timer is None and self._in_flight is None and self.waiting:
            self._timer = self.clock.callLater(delay, self._flush_now)

    def _flush_now(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        if self._in_flight is not None or not self.waiting:
            return
        batch = [self.waiting.popleft() for _ in range(min(self.batch, len(self.waiting)))]
        d = self._in_flight = self.post(batch)
        d.addCallbacks(self._sent, self._failed, callbackArgs=(batch,), errbackArgs=(batch,))

    def _sent(self, _: object, batch: list[dict[str, Any]]) -> None:
        self._in_flight = None
        REPORTS.labels("sent").inc(len(batch))
        if self.failures or self.dropped:
            log.info("refusal reports delivered again after {failures} failed attempts; "
                     "{dropped} records dropped meanwhile", failures=self.failures,
                     dropped=self.dropped)
        self.failures = self.dropped = 0
        if len(self.waiting) >= self.batch:
            self._flush_now()
        else:
            self._schedule(self.interval)

    def _failed(self, f: Failure, batch: list[dict[str, Any]]) -> None:
        self._in_flight = None
        if f.check(Rejected):
            log.error("delivery API rejected {n} refusal records: {why}", n=len(batch),
                      why=f.getErrorMessage())
            REPORTS.labels("rejected").inc(len(batch))
            self._schedule(self.interval)
            return
        if self.failures == 0:
            log.warn("refusal reports to the delivery API failing: {why}; retrying with "
                     "backoff", why=f.getErrorMessage())
        self.failures += 1
        # Back in front, in order; past the capacity the oldest go.
        self.waiting.extendleft(reversed(batch))
        excess = len(self.waiting) - self.capacity
        if excess > 0:
            for _ in range(excess):
                self.waiting.popleft()
            self._dropped(excess)
        self._schedule(min(self.interval * 2 ** self.failures, self.max_backoff))

    def stop(self) -> None:
        """The service stops: no more timers (what waits is lost, as the
        contract allows)."""
        self._stopped = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


def refusals_url(sends_url: str) -> str | None:
    """Where refusals go by default: beside ``/sends``, or nowhere when
    the sends URL does not end so."""
    url = EncodedURL.from_text(sends_url)
    path = [p for p in url.path if p]
    if not path or path[-1] != "sends":
        return None
    return url.replace(path=(*path[:-1], "refusals")).to_text()


@attrs.define
class RefusalPoster:
    """POSTs batches to ``url`` with the delivery API's token."""

    reactor: IReactorTime
    url: str
    token: str
    timeout: float
    ca_file: Path | None = None
    pool: HTTPConnectionPool = attrs.field(init=False)
    _client: HTTPClient = attrs.field(init=False)
    _parsed: EncodedURL = attrs.field(init=False)
    _headers: Headers = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        # Not persistent: a batch a second at most, and nothing left open
        # when the relay stops.
        self._client, self.pool = make_client(self.reactor, self.ca_file, persistent=False)
        self._parsed = EncodedURL.from_text(self.url)
        self._headers = Headers({b"Authorization": [b"Bearer " + self.token.encode()],
                                 b"Content-Type": [b"application/json"],
                                 b"Accept": [b"application/json"]})

    def __call__(self, batch: list[dict[str, Any]]) -> Deferred[None]:
        d = Deferred.fromCoroutine(self._post(batch))
        d.addTimeout(self.timeout, self.reactor)
        return d

    async def _post(self, batch: list[dict[str, Any]]) -> None:
        response = await self._client.post(self._parsed, data=json.dumps(batch).encode(),
                                           headers=self._headers, allow_redirects=False)
        content = await treq.content(response)
        code = response.code
        if 200 <= code < 300:
            return
        reason = content[:200].decode("utf-8", "replace")
        if 400 <= code < 500 and code not in (401, 403, 408, 429):
            raise Rejected(f"{code} {reason}")
        raise RuntimeError(f"delivery API answered {code}")

    def close(self) -> Deferred[None]:
        d: Deferred[None] = self.pool.closeCachedConnections()
        return d
