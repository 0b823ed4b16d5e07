"""TLS session resumption, against the relay on real loopback sockets.

A client that keeps the session of its last connection and offers it on
the next (Python's ``ssl`` with ``session=``) skips the full handshake on
STARTTLS (587) and implicit TLS (465), with TLS 1.3 tickets, TLS 1.2
tickets and TLS 1.2 session ids, and still after a certificate reload.
The ticket keys are replaced every day: a rotation ends resumption.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread as in_thread
from twisted.trial import unittest

from mxmrelay.resumption import SessionKeys
from mxmrelay.tls import same_certificate, server_context
from tests.support import RelayUnderTest, make_certificate


def _reply(sock: socket.socket | ssl.SSLSocket) -> bytes:
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
        last = data.rstrip(b"\r\n").rsplit(b"\r\n", 1)[-1]
        if data.endswith(b"\r\n") and last[3:4] != b"-":
            return data


def visit(port: int, context: ssl.SSLContext, *, implicit: bool,
          session: ssl.SSLSession | None = None) -> tuple[bool, ssl.SSLSession | None, bytes]:
    """Connect, TLS, EHLO, QUIT: whether the session was resumed, the
    session to offer next time, and the certificate the relay showed."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        if implicit:
            sock = context.wrap_socket(raw, server_hostname="localhost", session=session)
        else:
            _reply(raw)
            raw.sendall(b"EHLO client.test\r\n")
            _reply(raw)
            raw.sendall(b"STARTTLS\r\n")
            assert _reply(raw).startswith(b"220")
            sock = context.wrap_socket(raw, server_hostname="localhost", session=session)
        if implicit:
            _reply(sock)
        # The reply carries the TLS 1.3 tickets the server sent after the
        # handshake, so the session is worth keeping after it.
        sock.sendall(b"EHLO client.test\r\n")
        assert _reply(sock).startswith(b"250")
        sock.sendall(b"QUIT\r\n")
        _reply(sock)
        cert = sock.getpeercert(binary_form=True) or b""
        return bool(sock.session_reused), sock.session, cert
    finally:
        raw.close()


class Resumption(unittest.TestCase):
    def setUp(self) -> None:
        self.relay = RelayUnderTest(self)

    def context(self, *, tls12: bool = False, tickets: bool = True) -> ssl.SSLContext:
        """A client context trusting the relay's current certificate."""
        ctx = ssl.create_default_context(cafile=str(self.relay.ca_file))
        if tls12:
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        if not tickets:
            ctx.options |= ssl.OP_NO_TICKET
        return ctx

    @inlineCallbacks
    def twice(self, role: str, ctx: ssl.SSLContext):  # type: ignore[no-untyped-def]
        port, implicit = self.relay.ports[role], role == "smtps"
        first, session, _ = yield in_thread(visit, port, ctx, implicit=implicit)
        self.assertFalse(first)
        again, _, _ = yield in_thread(visit, port, ctx, implicit=implicit, session=session)
        return again

    @inlineCallbacks
    def test_starttls_tls13_ticket(self):  # type: ignore[no-untyped-def]
        self.assertTrue((yield self.twice("submission", self.context())))

    @inlineCallbacks
    def test_implicit_tls13_ticket(self):  # type: ignore[no-untyped-def]
        self.assertTrue((yield self.twice("smtps", self.context())))

    @inlineCallbacks
    def test_starttls_tls12_ticket(self):  # type: ignore[no-untyped-def]
        self.assertTrue((yield self.twice("submission", self.context(tls12=True))))

    @inlineCallbacks
    def test_implicit_tls12_session_id(self):  # type: ignore[no-untyped-def]
        ctx = self.context(tls12=True, tickets=False)
        self.assertTrue((yield self.twice("smtps", ctx)))

    @inlineCallbacks
    def test_starttls_tls12_session_id(self):  # type: ignore[no-untyped-def]
        ctx = self.context(tls12=True, tickets=False)
        self.assertTrue((yield self.twice("submission", ctx)))

    @inlineCallbacks
    def test_across_a_certificate_reload(self):  # type: ignore[no-untyped-def]
        """A session made under the old certificate resumes after the
        reload; a new client meets the new certificate."""
        port, tls = self.relay.ports["submission"], self.relay.config.tls
        for n, tls12 in enumerate((False, True)):
            ctx = self.context(tls12=tls12)
            _, session, before = yield in_thread(visit, port, ctx, implicit=False)
            new_cert, new_key = make_certificate(Path(self.mktemp()) / str(n))
            tls.certificate.write_bytes(new_cert.read_bytes())
            tls.private_key.write_bytes(new_key.read_bytes())
            self.assertTrue(self.relay.relay.reloader.reload_tls())
            again, _, shown = yield in_thread(visit, port, ctx, implicit=False,
                                              session=session)
            self.assertTrue(again)
            self.assertEqual(shown, before)  # a resumed session is shown no new certificate
            fresh, _, shown = yield in_thread(visit, port, self.context(tls12=tls12),
                                              implicit=False)
            self.assertFalse(fresh)
            self.assertEqual(shown, ssl.PEM_cert_to_DER_cert(new_cert.read_text()))

    @inlineCallbacks
    def test_rotation_ends_resumption(self):  # type: ignore[no-untyped-def]
        now = [0.0]
        self.relay.relay.tls.sessions = SessionKeys(same_certificate, rotate_every=3600,
                                                    now=lambda: now[0])
        port, ctx = self.relay.ports["submission"], self.context()
        _, session, _ = yield in_thread(visit, port, ctx, implicit=False)
        now[0] = 3599.0
        again, session, _ = yield in_thread(visit, port, ctx, implicit=False, session=session)
        self.assertTrue(again)
        now[0] = 3600.0
        again, session, _ = yield in_thread(visit, port, ctx, implicit=False, session=session)
        self.assertFalse(again)
        again, _, _ = yield in_thread(visit, port, ctx, implicit=False, session=session)
        self.assertTrue(again)


class Units(unittest.TestCase):
    def test_check_builds_resumable_options(self) -> None:
        cert, key = make_certificate(Path(self.mktemp()))
        options = server_context(cert, key)
        from OpenSSL import SSL

        context = options.getContext()
        self.assertEqual(context.get_session_cache_mode(), SSL.SESS_CACHE_SERVER)
        fresh = same_certificate(options)
        self.assertIsNot(fresh.getContext(), context)
        self.assertEqual(fresh.certificate, options.certificate)
