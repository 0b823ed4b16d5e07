"""The session's decisions, without a socket.

:class:`~mxmrelay.session.SMTPSession` is fed lines and says what to do;
these tests read its steps directly, and drive the protocol over a
``StringTransport`` on a ``Clock`` where timing is the point.  (The same
behaviour over real sockets and TLS is in tests.test_smtp.)
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import IRealm, Portal
from twisted.internet import ssl
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from mxmrelay.actions import Close, StartTLS, Step, Wait
from mxmrelay.auth import FailureLimiter
from mxmrelay.connection import ConnectionInfo, Settings
from mxmrelay.reply import Reply
from mxmrelay.session import Phase, SMTPSession
from mxmrelay.smtp import SMTPFactory, SMTPServer

USER, PASSWORD = "u@example.com", "pw"


def b64(text: str) -> bytes:
    return base64.b64encode(text.encode())


PLAIN = f"AUTH PLAIN {b64(chr(0) + USER + chr(0) + PASSWORD).decode()}"


class Message:
    """An ``IBulkMessage`` that keeps what it is given; its end of DATA
    fires when the test says."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.sent: Deferred[str] = Deferred()
        self.lost = False

    def write(self, data: bytes) -> None:
        self.chunks.append(data)

    def lineReceived(self, line: bytes) -> None:
        self.chunks.append(line + b"\r\n")

    def eomReceived(self) -> Deferred[str]:
        return self.sent

    def connectionLost(self) -> None:
        self.lost = True


class Delivery:
    """The avatar: senders are accepted when ``senders`` fires (at once
    by default), every recipient is."""

    def __init__(self) -> None:
        self.senders: Callable[[], Deferred[str]] | None = None
        self.message = Message()

    def validateFrom(self, helo: Any, origin: str) -> Deferred[str]:
        if origin.endswith("@elsewhere.test"):
            raise Reply(553, "5.7.1", "not yours")
        return self.senders() if self.senders is not None else succeed(origin)

    def validateTo(self, user: str) -> Callable[[], Message]:
        return lambda: self.message


@implementer(IRealm)
class Realm:
    def __init__(self) -> None:
        self.delivery = Delivery()

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Any:
        return interfaces[0], self.delivery, lambda: None


def settings(clock: Clock, realm: Realm) -> Settings:
    checker = InMemoryUsernamePasswordDatabaseDontUse(**{USER: PASSWORD.encode()})
    return Settings(
        hostname="relay.test", portal=Portal(realm, [checker]), tls=ssl.CertificateOptions(),
        max_message_size=1000, max_recipients=2, idle_timeout=300, max_auth_failures=2,
        max_connections_per_address=10,
        address_limiter=FailureLimiter(clock, 100, 60), user_limiter=FailureLimiter(clock, 100, 60))


class Case(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.realm = Realm()
        self.settings = settings(self.clock, self.realm)

    def session(self, *, tls: bool = True, greeted: bool = True,
                logged_in: bool = False) -> SMTPSession:
        s = SMTPSession(self.settings, ConnectionInfo("192.0.2.1", "submission"), tls=tls)
        if greeted:
            self.assertTrue(self.say(s, "EHLO client.test").startswith(b"250-relay.test\r\n"))
        if logged_in:
            self.assertEqual(self.settled(s, PLAIN), b"235 2.7.0 Authentication successful\r\n")
        return s

    def say(self, s: SMTPSession, line: str) -> bytes:
        """The replies to a line that is answered at once."""
        step = s.line(line.encode())
        self.assertNotIsInstance(step.action, Wait)
        return step.output

    def settled(self, s: SMTPSession, line: str) -> bytes:
        """The replies to a line whose answer may have to be awaited (and
        is known by now)."""
        return self.answer(s.line(line.encode())).output

    def answer(self, step: Step) -> Step:
        """The step, or the one it waits for (an answer known at once
        comes at once)."""
        if not isinstance(step.action, Wait):
            return step
        self.assertEqual(step.replies, [])
        return self.successResultOf(step.action.result)


class Sequence(Case):
    def test_commands_in_their_order(self) -> None:
        s = self.session(greeted=False)
        self.assertEqual(s.phase, Phase.CONNECTED)
        self.assertEqual(self.say(s, "MAIL FROM:<a@example.com>"),
                         b"503 5.5.1 Error: send HELO/EHLO first\r\n")
        self.say(s, "EHLO client.test")
        self.assertEqual(s.phase, Phase.GREETED)
        self.assertEqual(self.say(s, "MAIL FROM:<a@example.com>"),
                         b"530 5.7.0 Authentication required\r\n")
        self.settled(s, PLAIN)
        self.assertTrue(s.authenticated)
        self.assertEqual(self.say(s, "RCPT TO:<r@example.org>"),
                         b"503 5.5.1 Error: need MAIL command\r\n")
        self.assertEqual(self.say(s, "DATA"), b"503 5.5.1 Error: need MAIL command\r\n")
        self.assertEqual(self.settled(s, "MAIL FROM:<a@example.com>"), b"250 2.1.0 Ok\r\n")
        self.assertEqual(s.phase, Phase.MAIL)
        self.assertEqual(self.say(s, "MAIL FROM:<a@example.com>"),
                         b"503 5.5.1 Error: nested MAIL command\r\n")
        self.assertEqual(self.say(s, "DATA"), b"503 5.5.1 Error: need RCPT command\r\n")
        self.assertEqual(self.say(s, "AUTH PLAIN"), b"503 5.5.1 Already authenticated\r\n")
        self.assertEqual(self.settled(s, "RCPT TO:<r@example.org>"), b"250 2.1.5 Ok\r\n")
        self.assertEqual(s.phase, Phase.RCPT)
        self.assertEqual(self.say(s, "RSET"), b"250 2.0.0 Ok\r\n")
        self.assertEqual((s.phase, s.transaction), (Phase.GREETED, None))

    def test_a_refused_sender_opens_no_transaction(self) -> None:
        s = self.session(logged_in=True)
        self.assertEqual(self.settled(s, "MAIL FROM:<a@elsewhere.test>"),
                         b"553 5.7.1 not yours\r\n")
        self.assertEqual(s.phase, Phase.GREETED)

    def test_a_transaction_end_to_end(self) -> None:
        s = self.session(logged_in=True)
        self.settled(s, "MAIL FROM:<a@example.com>")
        self.settled(s, "RCPT TO:<r@example.org>")
        self.assertEqual(self.say(s, "DATA"), b"354 End data with <CR><LF>.<CR><LF>\r\n")
        self.assertEqual(s.phase, Phase.DATA)
        self.assertIsNone(s.data(b"Subject: s\r\n\r\n..dot\r\n"))
        ended = s.data(b".\r\nNOOP\r\n")
        assert ended is not None
        step, rest = ended
        self.assertEqual(rest, b"NOOP\r\n")
        self.assertEqual(s.phase, Phase.GREETED)
        message = self.realm.delivery.message
        self.assertEqual(b"".join(message.chunks), b"Subject: s\r\n\r\n.dot\r\n")
        assert isinstance(step.action, Wait)
        self.assertNoResult(step.action.result)
        message.sent.callback("ID1")
        self.assertEqual(self.successResultOf(step.action.result).output,
                         b"250 2.0.0 Ok: queued as ID1\r\n")

    def test_too_many_unknown_commands(self) -> None:
        s = self.session()
        for _ in range(4):
            self.assertEqual(self.say(s, "GET / HTTP/1.1"),
                             b"500 5.5.2 Command not recognized\r\n")
        step = s.line(b"GET / HTTP/1.1")
        self.assertEqual(step.output, b"421 4.7.0 Too many unrecognized commands\r\n")
        self.assertIsInstance(step.action, Close)
        self.assertEqual(s.phase, Phase.CLOSED)

    def test_a_known_command_resets_the_count(self) -> None:
        s = self.session()
        for _ in range(4):
            self.say(s, "BOGUS")
        self.say(s, "NOOP")
        self.assertEqual(self.say(s, "BOGUS"), b"500 5.5.2 Command not recognized\r\n")

    def test_quit(self) -> None:
        step = self.session().line(b"QUIT")
        self.assertEqual((step.output, step.action), (b"221 2.0.0 Bye\r\n", Close()))


class TLS(Case):
    def test_required_before_auth_and_mail(self) -> None:
        s = self.session(tls=False)
        for line in ("AUTH PLAIN", "MAIL FROM:<a@example.com>", "RCPT TO:<r@example.org>",
                     "DATA"):
            self.assertEqual(self.say(s, line),
                             b"530 5.7.0 Must issue a STARTTLS command first\r\n")

    def test_offered_and_then_not(self) -> None:
        s = self.session(tls=False, greeted=False)
        ehlo = self.say(s, "EHLO client.test")
        self.assertTrue(ehlo.endswith(b"250 STARTTLS\r\n"))
        self.assertNotIn(b"AUTH", ehlo)
        step = s.line(b"STARTTLS")
        self.assertEqual(step.output, b"220 2.0.0 Ready to start TLS\r\n")
        self.assertIsInstance(step.action, StartTLS)
        # The session starts over: a greeting again, and then AUTH.
        self.assertEqual((s.tls, s.phase, s.info.helo), (True, Phase.CONNECTED, None))
        self.assertEqual(self.say(s, "STARTTLS"), b"503 5.5.1 TLS already active\r\n")
        ehlo = self.say(s, "EHLO client.test")
        self.assertNotIn(b"STARTTLS", ehlo)
        self.assertIn(b"250-AUTH PLAIN LOGIN\r\n", ehlo)

    def test_pipelined_input_after_starttls_is_dropped(self) -> None:
        transport = TLSStringTransport()
        proto = SMTPFactory(self.settings, "submission", self.clock).buildProtocol(None)
        proto.makeConnection(transport)
        proto.dataReceived(b"EHLO client.test\r\nSTARTTLS\r\nAUTH PLAIN AGFiAGM=\r\n")
        self.assertTrue(transport.value().endswith(b"220 2.0.0 Ready to start TLS\r\n"))
        self.assertTrue(transport.tls)
        self.assertEqual(proto._buffer[proto._pos:], b"")
        self.assertEqual((proto.session.tls, proto.session.phase), (True, Phase.CONNECTED))


class TLSStringTransport(StringTransport):
    tls = False

    def startTLS(self, options: Any) -> None:
        self.tls = True


class Auth(Case):
    def test_login_step_by_step(self) -> None:
        s = self.session()
        self.assertEqual(self.say(s, "AUTH LOGIN"), b"334 VXNlcm5hbWU6\r\n")
        self.assertEqual(s.phase, Phase.AUTH)
        # In the exchange, a line is an answer, not a command.
        self.assertEqual(self.say(s, b64(USER).decode()), b"334 UGFzc3dvcmQ6\r\n")
        self.assertEqual(s.phase, Phase.AUTH)
        self.assertEqual(self.settled(s, b64(PASSWORD).decode()),
                         b"235 2.7.0 Authentication successful\r\n")
        self.assertEqual(s.phase, Phase.GREETED)
        self.assertTrue(s.authenticated)
        self.assertEqual(s.info.user, USER)

    def test_bad_answers(self) -> None:
        s = self.session()
        self.say(s, "AUTH PLAIN")
        self.assertEqual(self.say(s, "*"), b"501 5.7.0 Authentication aborted\r\n")
        self.assertEqual(s.phase, Phase.GREETED)
        self.say(s, "AUTH PLAIN")
        self.assertEqual(self.say(s, "not base64!"), b"501 5.5.2 Cannot decode response\r\n")
        self.assertEqual(self.say(s, "AUTH CRAM-MD5"),
                         b"504 5.5.4 Unrecognized authentication type\r\n")
        self.assertEqual(self.say(s, "AUTH"), b"501 5.5.4 Syntax: AUTH mechanism\r\n")
        self.assertFalse(s.authenticated)

    def test_a_line_too_long_ends_the_exchange(self) -> None:
        s = self.session()
        self.say(s, "AUTH PLAIN")
        self.assertEqual(s.line_limit(b"A"), 12288 + 2)
        self.assertEqual(s.line_too_long().output,
                         b"500 5.5.6 Authentication exchange line is too long\r\n")
        self.assertEqual(s.phase, Phase.GREETED)
        self.assertEqual(s.line_limit(b"MAIL"), 512 + 26 + 500)

    def test_failures_then_421(self) -> None:
        s = self.session()
        wrong = f"AUTH PLAIN {b64(chr(0) + USER + chr(0) + 'nope').decode()}"
        self.assertEqual(self.settled(s, wrong),
                         b"535 5.7.8 Authentication credentials invalid\r\n")
        step = self.answer(s.line(wrong.encode()))
        self.assertEqual(step.output, b"421 4.7.0 Too many authentication failures\r\n")
        self.assertIsInstance(step.action, Close)
        self.assertEqual(s.phase, Phase.CLOSED)


class Shutdown(Case):
    def test_idle_session_says_goodbye_now(self) -> None:
        step = self.session().shutdown(answering=False)
        self.assertEqual(step.output, b"421 4.3.2 Service shutting down\r\n")
        self.assertIsInstance(step.action, Close)

    def test_an_awaited_answer_comes_first(self) -> None:
        s = self.session(logged_in=True)
        held: Deferred[str] = Deferred()
        self.realm.delivery.senders = lambda: held
        step = s.line(b"MAIL FROM:<a@example.com>")
        assert isinstance(step.action, Wait)
        self.assertEqual(s.shutdown(answering=True), Step())
        held.callback("a@example.com")
        answer = self.successResultOf(step.action.result)
        self.assertEqual(answer.output, b"250 2.1.0 Ok\r\n421 4.3.2 Service shutting down\r\n")
        self.assertIsInstance(answer.action, Close)


class Driving(Case):
    """The protocol around the session, on a Clock."""

    def connect(self) -> tuple[SMTPServer, StringTransport]:
        proto = SMTPFactory(self.settings, "smtps", self.clock).buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        self.assertEqual(transport.value(), b"220 relay.test ESMTP ready\r\n")
        transport.clear()
        return proto, transport

    def test_idle_timeout(self) -> None:
        proto, transport = self.connect()
        self.clock.advance(299)
        proto.dataReceived(b"NOOP\r\n")
        self.clock.advance(299)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(2)
        self.assertTrue(transport.value().endswith(b"421 4.4.2 relay.test Timeout exceeded\r\n"))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(proto.session.phase, Phase.CLOSED)

    def test_no_timeout_while_the_client_waits_for_us(self) -> None:
        proto, transport = self.connect()
        held: Deferred[str] = Deferred()
        self.realm.delivery.senders = lambda: held
        proto.dataReceived(b"EHLO c\r\n" + PLAIN.encode() + b"\r\n"
                           b"MAIL FROM:<a@example.com>\r\nNOOP\r\n")
        self.assertTrue(transport.value().endswith(b"235 2.7.0 Authentication successful\r\n"))
        self.clock.advance(1000)
        self.assertFalse(transport.disconnecting)
        # The answer releases the pipelined NOOP, and the idle timer again.
        held.callback("a@example.com")
        self.assertTrue(transport.value().endswith(b"250 2.1.0 Ok\r\n250 2.0.0 Ok\r\n"))
        self.clock.advance(301)
        self.assertTrue(transport.disconnecting)

    def test_shutdown_waits_for_a_send_in_flight(self) -> None:
        proto, transport = self.connect()
        held: Deferred[str] = Deferred()
        self.realm.delivery.senders = lambda: held
        proto.dataReceived(b"EHLO c\r\n" + PLAIN.encode() + b"\r\nMAIL FROM:<a@example.com>\r\n")
        proto.factory.shutdown()
        self.assertFalse(transport.disconnecting)
        held.callback("a@example.com")
        self.assertTrue(transport.value().endswith(
            b"250 2.1.0 Ok\r\n421 4.3.2 Service shutting down\r\n"))
        self.assertTrue(transport.disconnecting)
