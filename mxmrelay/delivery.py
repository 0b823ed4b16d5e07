"""Where the SMTP session meets the customer: the cred realm, the avatar
(an ``IMessageDelivery`` bound to one customer space) and the message
that applies the rules and forwards the send.

Twisted's model is one ``IMessage`` per recipient; here the avatar
collects the whole envelope and hands out one message per transaction,
because one transaction is one send (the rules need every RCPT at once).
"""

from __future__ import annotations

import datetime
import hashlib
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.cred.portal import IRealm
from twisted.internet.defer import Deferred, fail
from twisted.mail.smtp import IMessageDelivery
from twisted.python.failure import Failure
from zope.interface import implementer

from mxmrelay import metrics, refusals, rules
from mxmrelay.connection import ConnectionInfo
from mxmrelay.datareader import IBulkMessage
from mxmrelay.directory import User
from mxmrelay.envelope import MAX_PATH
from mxmrelay.explain import Queued, decision_lines
from mxmrelay.forwarder import Forwarder
from mxmrelay.limiter import Limiter, Reservation
from mxmrelay.reply import Reply, quote
from mxmrelay.spool import Spool
from mxmrelay.trace import received_header

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford's base 32, lower case


def new_send_id(now: float | None = None, entropy: bytes | None = None) -> str:
    """A ULID-style id: 48 bits of milliseconds, then 80 random bits.

    URL-safe, sortable by time, and unique across restarts and across
    relays side by side without coordination (80 random bits a
    millisecond).
    """
    ms = int((time.time() if now is None else now) * 1000)
    value = (ms << 80) | int.from_bytes(entropy or os.urandom(10), "big")
    return "".join(_ALPHABET[(value >> shift) & 31] for shift in range(125, -5, -5))


def idempotency_key(space: str, envelope: rules.Envelope, header_section: bytes,
                    body_digest: bytes) -> str:
    """The same for a client's retry of one message, different for any two
    messages: the space, the envelope, the body's digest, and the header
    section (the Message-ID with it) without its Date and Received fields,
    which a client's retry may write anew."""
    h = hashlib.sha256(b"mxmrelay-idempotency-v2\0")
    for part in (space, envelope.mail_from.lower(), *(r.lower() for r in envelope.recipients)):
        h.update(part.encode("utf-8", "surrogatepass") + b"\0")
    h.update(hashlib.sha256(_stable_headers(header_section)).digest())
    h.update(body_digest)
    return h.hexdigest()


def _stable_headers(section: bytes) -> bytes:
    """The header section less its Date and Received fields (folded lines
    included)."""
    kept, skipping = [], False
    for line in section.split(b"\r\n"):
        if line[:1] not in (b" ", b"\t"):
            name = line.split(b":", 1)[0].strip().lower()
            skipping = name in (b"date", b"received")
        if not skipping:
            kept.append(line)
    return b"\r\n".join(kept)


@attrs.frozen
class Outbound:
    """What every send of this relay shares."""

    forwarder: Forwarder
    hostname: str
    bounce_template: str
    spool_memory: int
    #: The sending limits (None: none, as in tests that build no relay).
    limiter: Limiter | None = None
    #: Where refusals after AUTH are reported (None: nowhere but the logs).
    refusals: refusals.RefusalQueue | None = None


@implementer(IRealm)
@attrs.frozen
class Realm:
    """Turns an authenticated :class:`User` into its delivery avatar."""

    outbound: Outbound

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Any:
        # The checker's avatar id is the User, the mind the ConnectionInfo.
        assert isinstance(avatarId, User) and isinstance(mind, ConnectionInfo)
        if IMessageDelivery not in interfaces:
            raise NotImplementedError("mxmrelay only provides IMessageDelivery")
        delivery = CustomerDelivery(avatarId, mind, self.outbound)
        limiter = self.outbound.limiter
        if limiter is None:
            return IMessageDelivery, delivery, delivery.logout
        # After the password: the client's network, then a session slot
        # (a Reply refuses the login: 535 or 421).
        d = limiter.login(avatarId, mind.client)
        d.addCallback(delivery.hold_session)
        return d.addCallback(lambda _: (IMessageDelivery, delivery, delivery.logout))


@implementer(IMessageDelivery)
class CustomerDelivery:
    """One authenticated session's view of its customer space.

    Called with plain address strings, not ``twisted.mail.smtp.Address``
    objects (their parser mangles quoted and UTF-8 local parts).
    """

    def __init__(self, user: User, connection: ConnectionInfo, outbound: Outbound) -> None:
        self.user = user
        self.connection = connection
        self.outbound = outbound
        self._mail_from = ""
        self._recipients: list[str] = []
        #: The send MAIL FROM reserved, until the session's transaction takes it.
        self._reservation: Reservation | None = None
        self._free_session: Callable[[], None] | None = None

    def hold_session(self, free: Callable[[], None]) -> None:
        self._free_session = free

    def take_reservation(self) -> Reservation | None:
        """The send the last MAIL FROM reserved, now the transaction's to
        keep (a 250) or give back (anything else)."""
        reservation, self._reservation = self._reservation, None
        return reservation

    def logout(self) -> None:
        """The session is over: its slot is free, an unclaimed send given back."""
        reservation = self.take_reservation()
        if reservation is not None:
            reservation.give_back()
        free, self._free_session = self._free_session, None
        if free is not None:
            free()

    def report_refusal(self, reply: Reply, mail_from: str, recipients: Sequence[str],
                       header_section: bytes | None, *, data: bool) -> None:
        """A transaction of this session was refused: the customer's to see
        (see mxmrelay/refusals.py), if the reply is one they should."""
        queue = self.outbound.refusals
        if queue is None or not refusals.reportable(reply, data=data):
            return
        queue.add(refusals.record(
            when=time.time(), space=self.user.customer.id, user=self.user.email,
            sandbox=self.user.sandbox, connection=self.connection, mail_from=mail_from,
            recipients=recipients, reply=reply, header_section=header_section))

    def receivedHeader(self, helo: Any, origin: Any, recipients: Any) -> bytes:
        return received_header(
            helo=self.connection.helo or "unknown", client_address=self.connection.client,
            by_host=self.outbound.hostname, protocol=self._protocol(), send_id=str(origin),
            recipient=None, when=datetime.datetime.now(datetime.UTC))

    def _protocol(self) -> str:
        return "ESMTPSA" if self.connection.tls_version else "ESMTPA"

    def validateFrom(self, helo: Any, origin: str) -> str | Deferred[str]:
        """The seed's sender rule: MAIL FROM must be in the space's domains;
        then one send is reserved against the space's limits (a ``451
        4.7.1`` with ``retry-after`` when one is hit).  A new MAIL starts a
        new envelope."""
        if not self.user.customer.owns(origin):
            raise Reply(553, "5.7.1", f"<{quote(origin, MAX_PATH)}>: Sender address rejected: "
                                      f"not owned by user {self.user.email}")
        self._mail_from = origin
        self._recipients = []
        limiter = self.outbound.limiter
        if limiter is None:
            return origin

        def reserved(reservation: Reservation | None) -> str:
            self._reservation = reservation
            return origin

        return limiter.reserve(self.user, self.connection.client).addCallback(reserved)

    def validateTo(self, user: str) -> Callable[[], RelayMessage]:
        self._recipients.append(user)
        return self._message

    def _message(self) -> RelayMessage:
        envelope = rules.Envelope(self._mail_from, tuple(self._recipients))
        return RelayMessage(self, envelope, Spool(self.outbound.spool_memory))


@implementer(IBulkMessage)
class RelayMessage:
    """One transaction's message: spooled as it comes, ruled and forwarded
    at the end of DATA."""

    def __init__(self, delivery: CustomerDelivery, envelope: rules.Envelope,
                 spool: Spool) -> None:
        self.delivery = delivery
        self.envelope = envelope
        self.spool = spool

    def write(self, data: bytes) -> None:
        self.spool.write(data)

    def lineReceived(self, line: bytes) -> None:
        self.spool.write(line + b"\r\n")

    def connectionLost(self) -> None:
        self.spool.close()

    @property
    def header_section(self) -> bytes | None:
        """The header section, once the whole of it has come."""
        return self.spool.header_section if self.spool.body_offset is not None else None

    def eomReceived(self) -> Deferred[Queued]:
        """Rule the message, then forward it; fires with the API's id and
        the lines that explain the rules' decision (:mod:`mxmrelay.explain`)."""
        space = self.delivery.user.customer.id
        try:
            d = self._send()
        except Reply as reply:
            metrics.send_result(space, reply.code)
            self.spool.close()
            return fail()
        d.addBoth(self._closed)
        d.addBoth(self._counted, space)
        return d

    @staticmethod
    def _counted(result: Any, space: str) -> Any:
        code = 250 if not isinstance(result, Failure) else (
            result.value.code if isinstance(result.value, Reply) else 451)
        metrics.send_result(space, code)
        return result

    def _closed(self, result: Any) -> Any:
        self.spool.close()
        return result

    def _send(self) -> Deferred[Queued]:
        delivery, connection, spool = self.delivery, self.delivery.connection, self.spool
        space = delivery.user.customer
        send_id = new_send_id()
        head = spool.header_section
        outcome = rules.apply_rules(
            self.envelope, head, space, send_id=send_id,
            bounce_template=delivery.outbound.bounce_template,
            received=delivery.receivedHeader(None, send_id, None))
        if isinstance(outcome, Reply):
            raise outcome
        metadata = {
            "version": 1,
            "id": send_id,
            "customer": space.id,
            "user": delivery.user.email,
            "mail_from": self.envelope.mail_from,
            "return_path": outcome.return_path,
            "to": outcome.to,
            "bcc": outcome.bcc,
            "flags": outcome.flags,
            "bcc_flags": outcome.bcc_flags,
            "tags": list(outcome.tags),
            "client": {"address": connection.client, "tls_version": connection.tls_version,
                       "listener": connection.listener},
            "message_id": outcome.message_id,
        }
        submitted = None
        if delivery.user.sandbox:
            # Stored and shown, never delivered: the platform shows the
            # headers as the client wrote them beside the final message.
            metadata["sandbox"] = True
            submitted = head
        lines = decision_lines(outcome, self.envelope.mail_from, sandbox=delivery.user.sandbox)
        explained = tuple(lines) if space.explain else ()
        # A sandbox send never stands for a real one: its key differs.
        key = idempotency_key(space.id + ("\0sandbox" if submitted is not None else ""),
                              self.envelope, head, spool.body_digest())
        d = delivery.outbound.forwarder.forward(metadata, key, outcome.headers, spool.body(),
                                                submitted_headers=submitted)
        return d.addCallback(lambda send_id: Queued(send_id, explained))
