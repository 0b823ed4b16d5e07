"""The floor: a bare ``twisted.mail`` ESMTP server that accepts and discards.

What the framework costs with nothing of the relay's own on top: Twisted's
``ESMTP`` protocol with STARTTLS (the bench's certificate) and ``AUTH
PLAIN`` through a cred portal with an in-memory checker, an
``IMessageDelivery`` that accepts every sender and recipient, and an
``IMessage`` that drops each line.  No rules, no spool, no HTTP hop, no
password hash.  Every figure of the relay is also given as a ratio to this
server under the same load, so it holds on a noisy machine.

Twisted's ``ESMTP`` does not advertise PIPELINING (the load generator
pipelines only where the scenario forces it) and answers ``250 Delivery in
progress`` after the dot.

    python -m bench.floor --port 2588 --cert var/tls/localhost.pem \
        --key var/tls/localhost.key [--smtps-port 2466] [--log FILE]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer, endpoints, ssl
from twisted.logger import globalLogBeginner, textFileLogObserver
from twisted.mail import smtp
from twisted.mail.imap4 import PLAINCredentials
from zope.interface import implementer

USERS = {b"demo@example.com": b"demo-password"}


@implementer(smtp.IMessage)
class DiscardMessage:
    def lineReceived(self, line: bytes) -> None:
        pass

    def eomReceived(self) -> defer.Deferred[None]:
        return defer.succeed(None)

    def connectionLost(self) -> None:
        pass


@implementer(smtp.IMessageDelivery)
class AcceptAll:
    def receivedHeader(self, helo: Any, origin: Any, recipients: Any) -> None:
        return None

    def validateFrom(self, helo: Any, origin: Any) -> Any:
        return origin

    def validateTo(self, user: Any) -> Any:
        return DiscardMessage


@implementer(IRealm)
class Realm:
    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Any:
        if smtp.IMessageDelivery in interfaces:
            return smtp.IMessageDelivery, AcceptAll(), lambda: None
        raise NotImplementedError("IMessageDelivery only")


class FloorFactory(smtp.SMTPFactory):
    protocol = smtp.ESMTP
    domain = b"localhost"

    def __init__(self, portal: Portal, tls: ssl.CertificateOptions | None) -> None:
        super().__init__(portal)
        self.tls = tls

    def buildProtocol(self, addr: Any) -> smtp.ESMTP:
        p: smtp.ESMTP = super().buildProtocol(addr)
        p.ctx = self.tls
        p.challengers = {b"PLAIN": PLAINCredentials}
        return p


def tls_options(cert: Path, key: Path) -> ssl.CertificateOptions:
    pem = cert.read_bytes() + b"\n" + key.read_bytes()
    options: ssl.CertificateOptions = ssl.PrivateCertificate.loadPEM(pem).options()
    return options


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.floor")
    p.add_argument("--port", type=int, required=True, help="STARTTLS port")
    p.add_argument("--smtps-port", type=int, default=None, help="implicit-TLS port")
    p.add_argument("--cert", type=Path, required=True)
    p.add_argument("--key", type=Path, required=True)
    p.add_argument("--log", type=Path, default=None, help="log file (default: stdout)")
    a = p.parse_args(argv)

    from twisted.internet import reactor

    out = a.log.open("a") if a.log else sys.stdout
    globalLogBeginner.beginLoggingTo([textFileLogObserver(out)], redirectStandardIO=False)
    checker = InMemoryUsernamePasswordDatabaseDontUse()
    for user, password in USERS.items():
        checker.addUser(user, password)
    portal = Portal(Realm(), [checker])
    tls = tls_options(a.cert, a.key)
    plain = FloorFactory(portal, tls)
    endpoints.TCP4ServerEndpoint(reactor, a.port, interface="127.0.0.1").listen(plain)
    if a.smtps_port is not None:
        # TLS from the first byte; STARTTLS is then not offered.
        implicit = FloorFactory(portal, None)
        endpoints.SSL4ServerEndpoint(reactor, a.smtps_port, tls,
                                     interface="127.0.0.1").listen(implicit)
    reactor.run()


if __name__ == "__main__":
    main()
