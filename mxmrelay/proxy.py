"""``haproxy:`` listeners: the PROXY protocol header first, then SMTP.

Twisted's own wrapper (``twisted.protocols.haproxy``) starts the wrapped
protocol as soon as the TCP connection is made, so the relay would greet a
client that connected straight to a ``haproxy:`` port, with the address
the header has not yet given, and read the header only when the client
spoke.  Here the SMTP side starts only once a valid header (v1 or v2) has
been read, so the greeting and every decision use the real client's
address; a connection whose first bytes are not a PROXY header, or that
sends none within :data:`HEADER_TIMEOUT`, is closed without a word.  A
client must not be able to choose the address the relay believes by
talking to it directly.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IProtocolFactory, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.haproxy import _v1parser, _v2parser
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper, HAProxyWrappingFactory
from twisted.python.failure import Failure

log = Logger(namespace="mxmrelay.proxy")

#: Seconds a connection may take to send its PROXY header (a proxy sends
#: it at once, before any byte of the client's).
HEADER_TIMEOUT = 10.0
_V2 = _v2parser.V2Parser.PREFIX
_V1 = b"PROXY "


class HeaderFirst(HAProxyProtocolWrapper):
    """The PROXY header, then the wrapped protocol's connection."""

    factory: HeaderFirstFactory
    _head = b""
    _timer: Any = None
    _started = False

    def makeConnection(self, transport: Any) -> None:
        # ProtocolWrapper's, less the wrapped protocol's start.
        from zope.interface import directlyProvides, providedBy

        directlyProvides(self, providedBy(transport))
        self.transport = transport
        self.connected = 1
        self.factory.registerProtocol(self)
        self._timer = self.factory.clock.callLater(HEADER_TIMEOUT, self._refuse,
                                                   "no PROXY header in time")

    def dataReceived(self, data: bytes) -> None:
        if self._started:
            self.wrappedProtocol.dataReceived(data)
            return
        if self._parser is None:
            head = self._head + data
            if len(head) < 16 and (_V2.startswith(head[:12]) or _V1.startswith(head[:6])):
                self._head = head  # a header's start: wait for the rest
                return
            self._head = b""
            if head[:12] == _V2 and head[12] & 0xF0 == 0x20:
                self._parser = _v2parser.V2Parser()
            elif head.startswith(_V1):
                self._parser = _v1parser.V1Parser()
            else:
                self._refuse("no PROXY header")
                return
            data = head
        try:
            info, remaining = self._parser.feed(data)
        except InvalidProxyHeader:
            self._refuse("invalid PROXY header")
            return
        if info is None:
            return
        self._proxyInfo = info
        self._started = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self.wrappedProtocol.makeConnection(self)  # type: ignore[arg-type]
        if remaining:
            self.wrappedProtocol.dataReceived(remaining)

    def _refuse(self, why: str) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        transport: Any = self.transport
        peer = transport.getPeer()
        log.warn("proxy refused peer={peer} reason={reason}", peer=getattr(peer, "host", peer),
                 reason=why)
        transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self._started:
            super().connectionLost(reason)
        else:
            self.factory.unregisterProtocol(self)


class HeaderFirstFactory(HAProxyWrappingFactory):
    protocol = HeaderFirst  # type: ignore[assignment]

    def __init__(self, wrapped: IProtocolFactory, clock: IReactorTime) -> None:
        super().__init__(wrapped)
        self.clock = clock


class HeaderFirstEndpoint:
    """``haproxy:`` in front of another server endpoint."""

    def __init__(self, inner: Any, clock: IReactorTime) -> None:
        self.inner = inner
        self.clock = clock

    def listen(self, factory: IProtocolFactory) -> Any:
        return self.inner.listen(HeaderFirstFactory(factory, self.clock))


def server_endpoint(reactor: Any, description: str) -> Any:
    """The endpoint ``description`` names, its ``haproxy:`` prefix (if
    any) read here rather than by Twisted's parser."""
    from twisted.internet.endpoints import serverFromString

    from mxmrelay.endpoints import without_proxy

    inner, proxied = without_proxy(description)
    endpoint = serverFromString(reactor, inner)
    return HeaderFirstEndpoint(endpoint, reactor) if proxied else endpoint


def service(description: str, factory: IProtocolFactory, reactor: Any) -> Any:
    """``strports.service``, with ``haproxy:`` read as above."""
    from twisted.application.internet import StreamServerEndpointService

    svc = StreamServerEndpointService(server_endpoint(reactor, description), factory)
    svc._raiseSynchronously = True
    return svc
