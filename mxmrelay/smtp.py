"""The SMTP server protocol: the transport side of a connection.

Why not ``twisted.mail.smtp.ESMTP``?  Its quirks are each a requirement
here: it runs commands pipelined after STARTTLS once TLS is up (command
injection), answers before asynchronous validation is done when pipelined
(Twisted #8126), hard-codes reply texts without enhanced status codes,
advertises neither SIZE nor PIPELINING, drops the connection on a bare
``AUTH``, creates one ``IMessage`` per recipient and calls it once per
line of DATA.  Overriding all of that means overriding nearly every
private method, so the relay has a protocol of its own that keeps
Twisted's contracts at the edges instead: authentication goes through a
``twisted.cred`` portal, the avatar is a ``twisted.mail.smtp``
``IMessageDelivery``, and the message it hands out is an ``IMessage``
(with a bulk ``write`` added, see :class:`~mxmrelay.datareader.IBulkMessage`).

It comes in two parts.  :class:`~mxmrelay.session.SMTPSession` is the
dialogue, without I/O.  :class:`SMTPServer`, here, drives it: it cuts the
input into lines (or hands DATA over in chunks), holds pipelined input
while an answer is awaited, pauses reading when the client sends faster
than it reads, batches replies into one write, runs the idle timer, starts
TLS, and counts connections per client address.
"""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IHandshakeListener, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from mxmrelay import metrics
from mxmrelay.actions import Close, Step, Wait
from mxmrelay.connection import ConnectionInfo, Settings
from mxmrelay.reply import Reply
from mxmrelay.session import Phase, SMTPSession
from mxmrelay.tls import TLS_HANDSHAKE, describe, no_delay

__all__ = ["SMTPFactory", "SMTPServer", "Settings"]

#: A line this long is no client's mistake: past it, ``421`` and close
#: (the rest of a shorter over-long line is read and dropped).
LINE_ABANDON = 64 * 1024
#: While a command is being answered, buffer at most this much pipelined
#: input before pausing the socket.
PAUSE_AT = 64 * 1024

log = Logger(namespace="mxmrelay.smtp")


class _Pipeline(Protocol):
    """The input side under the session: pipelined input cut into lines
    and held while an answer is awaited, replies batched into one write,
    and reading paused while the client does not read its replies."""

    transport: Any  # set by makeConnection: TCP, TLS or a wrapper of either

    def __init__(self) -> None:
        #: Pipelined input not yet answered: ``_buffer[_pos:]``.  An offset,
        #: so that a batch of N commands is not N copies of the rest.
        self._buffer = b""
        self._pos = 0
        #: Dropping the rest of an over-long line (already answered), and
        #: how much of it so far.
        self._skipping = False
        self._skipped = 0
        self._out: list[bytes] = []
        #: An answer is awaited: input waits.
        self._busy = False
        self._closed = False
        #: The transport's write buffer is full (the client does not read
        #: its replies): answer nothing more until it drains.
        self._write_blocked = False
        self._reading_paused = False

    # What the protocol above decides.
    def _run(self) -> None:
        raise NotImplementedError

    def _line_limit(self, start: bytes) -> int:
        raise NotImplementedError

    def _line_too_long(self) -> None:
        raise NotImplementedError

    def _line_abandoned(self) -> None:
        raise NotImplementedError

    def _flush(self) -> None:
        """One write per batch of replies: pipelined answers share a packet
        (and, under TLS, a record)."""
        if self._out and not self._closed:
            self.transport.write(b"".join(self._out))
        self._out.clear()

    def _check_reading(self) -> None:
        """Stop reading while input waits (for an answer, or for the client
        to read its replies) and more than PAUSE_AT of it is queued."""
        waiting = self._busy or self._write_blocked
        full = waiting and len(self._buffer) - self._pos > PAUSE_AT
        if full and not self._reading_paused:
            self._reading_paused = True
            self.transport.pauseProducing()
        elif not full and self._reading_paused and not self._closed:
            self._reading_paused = False
            self.transport.resumeProducing()

    # IPushProducer, registered with the transport for its write buffer
    def pauseProducing(self) -> None:
        self._write_blocked = True

    def resumeProducing(self) -> None:
        self._write_blocked = False
        if not self._closed:
            self._run()
            self._flush()

    def stopProducing(self) -> None:
        pass

    def _unconsumed(self) -> bytes:
        """Take all of the pipelined input not yet answered."""
        data = self._buffer[self._pos:]
        self._buffer, self._pos = b"", 0
        return data

    def _next_line(self) -> bytes | None:
        """The next whole line, or None.  A line that passes its limit is
        answered at once (the client may never send the CRLF), and the
        rest of it dropped as it comes: memory stays bounded."""
        while True:
            buf, pos = self._buffer, self._pos
            i = buf.find(b"\n", pos)
            if self._skipping:
                self._skipped += (len(buf) if i < 0 else i) - pos
                if self._skipped > LINE_ABANDON:
                    self._buffer, self._pos = b"", 0
                    self._line_abandoned()
                    return None
                if i < 0:
                    self._buffer, self._pos = b"", 0
                    return None
                self._skipping, self._pos = False, i + 1
                continue
            if i < 0:
                pending = self._buffer = buf[pos:]
                self._pos = 0
                # (a CR at the end may be the first half of the CRLF)
                if len(pending) - pending.endswith(b"\r") + 2 > self._line_limit(pending):
                    self._line_too_long()
                    self._skipping, self._skipped = True, 0
                return None
            line, self._pos = buf[pos:i], i + 1
            return line[:-1] if line.endswith(b"\r") else line


@implementer(IHandshakeListener)
class SMTPServer(_Pipeline, TimeoutMixin):
    """One SMTP connection's transport side.  See the module docstring."""

    info: ConnectionInfo
    session: SMTPSession

    def __init__(self, settings: Settings, role: str, clock: IReactorTime,
                 factory: SMTPFactory, proxied: bool = False) -> None:
        super().__init__()
        self.settings = settings
        self.role = role
        #: Behind a PROXY-protocol endpoint: the client's address is known
        #: only once the proxy's header has been read.
        self._proxied = proxied
        self._counted = False
        self._clock = clock
        self.factory = factory
        self._first_bytes = True

    # -- connection ---------------------------------------------------------

    def callLater(self, period: Any, func: Any) -> Any:
        """TimeoutMixin's timer, on the injected clock."""
        return self._clock.callLater(period, func)

    def connectionMade(self) -> None:
        no_delay(self.transport)
        # Replies wait in the transport while the client does not read
        # them: past its buffer, the transport pauses us, and we stop
        # answering (no reply amplification into memory).
        self.transport.registerProducer(self, True)
        peer = self.transport.getPeer()
        self.info = ConnectionInfo(client=str(getattr(peer, "host", peer)), listener=self.role)
        self.session = SMTPSession(self.settings, self.info, tls=self.role == "smtps",
                                   learn_tls=self.handshakeCompleted)
        self.factory.connections.add(self)
        metrics.connection_opened(self.role)
        self.setTimeout(self.settings.idle_timeout)
        log.info("connect client={client} listener={listener}",
                 client=self.info.client, listener=self.role)
        if not self._proxied:
            self._count_client()
            if self._closed:
                return
        self._apply(self.session.greeting())
        self._flush()

    def _count_client(self) -> None:
        self._counted = True
        if not self.settings.admit(self.info.network):
            log.warn("too many connections client={client}", client=self.info.client)
            self._out.append(Reply(421, "4.7.0", "Too many connections from your address")
                             .encode())
            self._close()

    def _check_peer(self) -> bool:
        """Behind a PROXY-protocol endpoint the real client is known only
        once the proxy's header has been read, which is when the client's
        first bytes reach us: take it (and count it) then.  False if that
        client is refused."""
        if not self._proxied:
            return True
        peer = self.transport.getPeer()
        client = str(getattr(peer, "host", peer))
        if client != self.info.client:
            log.info("proxied client={client} via={proxy}", client=client,
                     proxy=self.info.client)
            self.info.move(client)
        self._count_client()
        return not self._closed

    def handshakeCompleted(self) -> None:
        """Called by Twisted's TLS layer (``IHandshakeListener``); a wrapper
        between it and us (the PROXY protocol's) does not pass it on, so
        the session asks too, at the first EHLO under TLS."""
        version, cipher = describe(self.transport)
        self.info.tls_version, self.info.tls_cipher = version, cipher
        metrics.tls_established(self.role, version)
        log.info("tls client={client} version={version} cipher={cipher}",
                 client=self.info.client, version=version, cipher=cipher)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closed = True
        self.setTimeout(None)
        self.factory.gone(self)
        metrics.connection_closed(self.role)
        if self.session.tls and self.info.tls_version is None and reason.check(SSL.Error):
            metrics.tls_failed(self.role)
        if self._counted:
            self._counted = False
            self.settings.release(self.info.network)
        self.session.connection_lost()
        log.info("disconnect client={client}", client=self.info.client)

    def timeoutConnection(self) -> None:
        self._apply(self.session.timeout())

    def shutdown(self) -> None:
        """Say goodbye as the service stops; a send in flight finishes first."""
        self._apply(self.session.shutdown(answering=self._busy))

    def _close(self) -> None:
        self._flush()
        self._closed = True
        # A registered producer would hold the connection open.
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    # -- the session's steps ------------------------------------------------------

    def _apply(self, step: Step) -> None:
        self._out += step.replies
        action = step.action
        if action is None:
            return
        if isinstance(action, Wait):
            self._wait(action.result)
        elif isinstance(action, Close):
            self._close()
        else:  # StartTLS
            self._flush()
            self._unconsumed()
            self.transport.startTLS(self.settings.tls)

    def _wait(self, d: Deferred[Step]) -> None:
        """Hold the pipeline until the session's answer is known (if it is
        already known, nothing waits)."""
        self._busy = True
        waiting = False

        def resume(step: Step) -> None:
            self._busy = False
            self._apply(step)
            if not waiting or self._closed:
                # Answered at once: the caller's loop goes on with the
                # next command (no recursion per pipelined command).
                return
            self.setTimeout(self.settings.idle_timeout)
            self._run()
            self._flush()

        d.addCallback(resume)
        waiting = True
        if self._busy:
            # The client waits for us now, not we for it: no idle timeout
            # (the delivery API call has its own deadline).
            self.setTimeout(None)

    # -- input ----------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closed:
            return
        self.resetTimeout()
        if self._first_bytes:
            self._first_bytes = False
            if not self._check_peer():
                return
            if not self.session.tls and data[:1] == bytes([TLS_HANDSHAKE]):
                # A TLS client on a STARTTLS port: it cannot read any reply.
                log.info("tls on plain port client={client}", client=self.info.client)
                self._closed = True
                self.transport.unregisterProducer()
                self.transport.loseConnection()
                return
        if self.session.phase is Phase.DATA and not self._busy and not self._write_blocked:
            self._data(data)
        else:
            self._buffer += data
        self._run()
        self._flush()

    def _run(self) -> None:
        """Answer buffered commands in order, stopping at the first that
        must wait for an answer (AUTH, MAIL, RCPT, end of DATA)."""
        session = self.session
        while not self._busy and not self._closed and not self._write_blocked:
            if session.phase is Phase.DATA:
                data = self._unconsumed()
                if data:
                    self._data(data)
                    continue
                return
            line = self._next_line()
            if line is None:
                break
            self._apply(session.line(line))
        self._check_reading()

    def _line_limit(self, start: bytes) -> int:
        return self.session.line_limit(start)

    def _line_too_long(self) -> None:
        self._apply(self.session.line_too_long())

    def _line_abandoned(self) -> None:
        self._apply(self.session.line_abandoned())

    def _data(self, data: bytes) -> None:
        ended = self.session.data(data)
        if ended is not None:
            step, rest = ended
            self._buffer, self._pos = rest + self._unconsumed(), 0
            self._apply(step)

class SMTPFactory(Factory):
    """Builds the protocol for one listener role."""

    def __init__(self, settings: Settings, role: str, clock: IReactorTime,
                 proxied: bool = False) -> None:
        self.settings = settings
        self.role = role
        self.clock = clock
        self.proxied = proxied
        self.connections: set[SMTPServer] = set()
        self._drained: list[Deferred[None]] = []

    def buildProtocol(self, addr: Any) -> SMTPServer:
        return SMTPServer(self.settings, self.role, self.clock, self, self.proxied)

    def gone(self, connection: SMTPServer) -> None:
        self.connections.discard(connection)
        if not self.connections:
            waiting, self._drained = self._drained, []
            for d in waiting:
                d.callback(None)

    def drained(self) -> Deferred[None]:
        """Fires when no connection is left (at once if there is none)."""
        if not self.connections:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._drained.append(d)
        return d

    def shutdown(self) -> None:
        for connection in list(self.connections):
            connection.shutdown()
