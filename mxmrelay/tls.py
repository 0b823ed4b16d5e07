"""TLS for the listeners: one server context, and the implicit-TLS front.

Only TLS 1.2 and 1.3, with forward-secret AEAD ciphers.  The certificate
chain and key are loaded and checked against each other at start, so a bad
file stops the relay with its name instead of failing every handshake.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import (
    IOpenSSLServerConnectionCreator,
    IReactorTime,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from mxmrelay import metrics
from mxmrelay.resumption import SessionKeys, resumable

#: Mozilla's "intermediate" list for TLS 1.2 (TLS 1.3 suites are fixed).
CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)

#: The first byte of a TLS record carrying a handshake (a ClientHello).
TLS_HANDSHAKE = 0x16


class TLSConfigError(Exception):
    """The certificate or key cannot be used; the message names the file.

    ``key`` says which of the two (``certificate`` or ``private_key``), so
    that the caller can name the configuration key that pointed to it.
    """

    def __init__(self, message: str, key: str = "certificate") -> None:
        super().__init__(message)
        self.key = key


def server_context(certificate: Path, private_key: Path) -> ssl.CertificateOptions:
    """Build the server's TLS options from a PEM chain and a PEM key."""
    try:
        chain_pem = certificate.read_bytes()
    except OSError as e:
        raise TLSConfigError(f"{certificate}: cannot read certificate: {e.strerror}") from e
    try:
        key_pem = private_key.read_bytes()
    except OSError as e:
        raise TLSConfigError(f"{private_key}: cannot read private key: {e.strerror}",
                             "private_key") from e
    chain = []
    marker = b"-----BEGIN CERTIFICATE-----"
    for block in chain_pem.split(marker)[1:]:
        try:
            chain.append(crypto.load_certificate(crypto.FILETYPE_PEM, marker + block))
        except crypto.Error as e:
            raise TLSConfigError(f"{certificate}: not a valid PEM certificate: {e}") from e
    if not chain:
        raise TLSConfigError(f"{certificate}: no PEM certificate in the file")
    try:
        key = crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem)
    except crypto.Error as e:
        raise TLSConfigError(f"{private_key}: not a valid PEM private key: {e}",
                             "private_key") from e
    try:
        return certificate_options(key, chain[0], chain[1:])
    except SSL.Error as e:
        raise TLSConfigError(
            f"{private_key}: the key does not match the certificate in {certificate}: {e}",
            "private_key") from e


def certificate_options(key: crypto.PKey, certificate: crypto.X509,
                        chain: Sequence[crypto.X509]) -> ssl.CertificateOptions:
    """The options for one certificate, their context made (a key that does
    not match raises :class:`SSL.Error`) and set up for session resumption
    (:mod:`mxmrelay.resumption`)."""
    options = ssl.CertificateOptions(
        privateKey=key,
        certificate=certificate,
        extraCertChain=list(chain),
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
        acceptableCiphers=ssl.AcceptableCiphers.fromOpenSSLCipherString(CIPHERS),
        enableSessions=True,
        enableSessionTickets=True,
    )
    resumable(options.getContext())
    return options


def same_certificate(options: ssl.CertificateOptions) -> ssl.CertificateOptions:
    """New options (a new context, so new ticket keys) for the certificate
    ``options`` hold."""
    assert options.privateKey is not None and options.certificate is not None
    return certificate_options(options.privateKey, options.certificate, options.extraCertChain)


@implementer(IOpenSSLServerConnectionCreator)
class ReloadableTLS:
    """The listeners' TLS options, replaceable while they listen.

    Every new handshake (port 465, and each STARTTLS) takes its connection
    from the options held here at that moment, so a certificate reload
    (:mod:`mxmrelay.reload`) swaps :attr:`options` and only new handshakes
    see it; a session already established keeps the context it began with.
    """

    def __init__(self, options: ssl.CertificateOptions,
                 sessions: SessionKeys | None = None) -> None:
        self.options = options
        #: Connections resume across reloads (see :mod:`mxmrelay.resumption`).
        self.sessions = sessions or SessionKeys(same_certificate)

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return self.sessions.connection(self.options)


def describe(transport: ITransport) -> tuple[str | None, str | None]:
    """The TLS version and cipher of a connection, or Nones when plain."""
    get_handle = getattr(transport, "getHandle", None)
    handle: Any = get_handle() if get_handle is not None else None
    if isinstance(handle, SSL.Connection):
        return handle.get_protocol_version_name(), handle.get_cipher_name()
    return None, None


PLAINTEXT_ON_TLS_PORT = (
    b"554 5.7.0 This port needs TLS from the first byte (SMTPS); "
    b"connect with TLS, or use port 587 and STARTTLS\r\n"
)


class ImplicitTLSFront(Protocol, TimeoutMixin):
    """The 465 role's front: hand TLS to the TLS layer, answer plain text.

    A client that speaks plain SMTP to the implicit-TLS port waits for a
    banner that a TLS server never sends; every provider's most common
    support case.  This front looks at the first byte: a TLS handshake
    goes on to TLS, anything else (or silence past ``hint_after``, the
    plain client waiting for its banner) gets a plain 554 that says what
    to do, and the connection closes.
    """

    log = Logger()
    transport: Any

    def __init__(self, tls_factory: TLSMemoryBIOFactory, clock: IReactorTime,
                 hint_after: float) -> None:
        self._tls_factory = tls_factory
        self._clock = clock
        self._hint_after = hint_after
        self._inner: Protocol | None = None

    def connectionMade(self) -> None:
        no_delay(self.transport)
        self.setTimeout(self._hint_after)

    def callLater(self, period: Any, func: Any) -> Any:
        return self._clock.callLater(period, func)

    def timeoutConnection(self) -> None:
        self._refuse("silent")

    def dataReceived(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.dataReceived(data)
            return
        self.setTimeout(None)
        if data[0] != TLS_HANDSHAKE:
            self._refuse("plaintext")
            return
        inner = self._tls_factory.buildProtocol(self.transport.getPeer())
        assert inner is not None
        self._inner = inner
        inner.makeConnection(self.transport)
        inner.dataReceived(data)

    def _refuse(self, why: str) -> None:
        peer = self.transport.getPeer()
        self.log.info("plaintext on implicit TLS port ({why}): client={client}",
                      why=why, client=getattr(peer, "host", peer))
        metrics.tls_failed("smtps")
        self.transport.write(PLAINTEXT_ON_TLS_PORT)
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.setTimeout(None)
        if self._inner is not None:
            self._inner.connectionLost(reason)


class ImplicitTLSFactory(Factory):
    def __init__(self, tls_factory: TLSMemoryBIOFactory, clock: IReactorTime,
                 hint_after: float) -> None:
        self.tls_factory = tls_factory
        self.clock = clock
        self.hint_after = hint_after

    def buildProtocol(self, addr: Any) -> ImplicitTLSFront:
        return ImplicitTLSFront(self.tls_factory, self.clock, self.hint_after)

    def doStart(self) -> None:
        self.tls_factory.doStart()
        super().doStart()

    def doStop(self) -> None:
        self.tls_factory.doStop()
        super().doStop()


def no_delay(transport: Any) -> None:
    """Replies are written once per reactor turn already; Nagle would only
    hold the last of them back for a delayed ACK (40 ms on Linux)."""
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        try:
            set_no_delay(True)
        except OSError:
            pass

