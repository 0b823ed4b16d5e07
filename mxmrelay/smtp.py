"""The SMTP server protocol: commands, STARTTLS, AUTH, and DATA in bulk.

Why not ``twisted.mail.smtp.ESMTP``?  Its quirks are each a requirement
here: it runs commands pipelined after STARTTLS once TLS is up (command
injection), answers before asynchronous validation is done when pipelined
(Twisted #8126), hard-codes reply texts without enhanced status codes,
advertises neither SIZE nor PIPELINING, drops the connection on a bare
``AUTH``, creates one ``IMessage`` per recipient and calls it once per
line of DATA.  Overriding all of that means overriding nearly every
private method, so this module is a small protocol of its own that keeps
Twisted's contracts at the edges instead: authentication goes through a
``twisted.cred`` portal, the avatar is a ``twisted.mail.smtp``
``IMessageDelivery``, and the message it hands out is an ``IMessage``
(with a bulk ``write`` added, see :class:`IBulkMessage`).

DATA is handled in chunks, not lines: the terminator is found with one
``bytes.find`` per chunk, dot-unstuffing is one ``replace``, and checks for
bare line endings and long lines are counts and strided searches, so a
100 KB message costs a handful of C calls instead of ~1,300 Python ones.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable
from typing import Any

import attrs
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet import ssl
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IHandshakeListener, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.mail.smtp import IMessage, IMessageDelivery
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from mxmrelay import auth
from mxmrelay.auth import FailureLimiter, SASLError
from mxmrelay.directory import DirectoryError
from mxmrelay.envelope import need_smtputf8, parse_path_command
from mxmrelay.reply import Reply, quote
from mxmrelay.tls import TLS_HANDSHAKE, describe, no_delay

#: RFC 5321 4.5.3.1.4: 512 octets with CRLF; MAIL may carry SIZE (+26)
#: and AUTH= (+500, RFC 4954).
COMMAND_LIMIT = 512
MAIL_LIMIT = 512 + 26 + 500
#: RFC 4954 4: an AUTH response line may be 12,288 octets.
AUTH_LINE_LIMIT = 12288
#: A line this long is no client's mistake: past it, ``421`` and close
#: (the rest of a shorter over-long line is read and dropped).
LINE_ABANDON = 64 * 1024
#: RFC 5321 4.5.3.1.6: 998 characters and CRLF, counted after the
#: dot-unstuffing (a line sent as "." + 998 characters is within it).
TEXT_LINE_LIMIT = 998
#: Unrecognised commands in a row before the connection is dropped.
MAX_UNKNOWN = 5
#: While a command is being answered, buffer at most this much pipelined
#: input before pausing the socket.
PAUSE_AT = 64 * 1024

_TERMINATOR = b"\r\n.\r\n"
_LINE_ENDING = re.compile(rb"\r\n|\r|\n")


class IBulkMessage(IMessage):
    """An ``IMessage`` that also takes DATA in chunks of whole lines.

    Chunks are already dot-unstuffed, with CRLF line endings; the
    protocol never calls ``lineReceived``.  ``write`` may raise a
    :class:`~mxmrelay.reply.Reply` to refuse the rest of the message (the
    protocol then reads to the end of DATA and gives that reply).
    ``eomReceived`` fires with the send id for the 250 reply, or fails
    with a ``Reply``.
    """

    def write(data: bytes) -> None:
        """Take the next chunk of the message."""


@attrs.define
class Session:
    """What the relay knows of one connection; the cred ``mind``.

    The avatar keeps it, so that a send's metadata (client address, TLS
    version, listener) is read from the one place the protocol updates.
    """

    client: str
    listener: str
    helo: str | None = None
    #: What per-address limits count: the address, or for IPv6 its /64
    #: (one customer line gets a whole /64; counting single addresses
    #: there would limit nothing).
    network: str = attrs.field(init=False)
    tls_version: str | None = None
    tls_cipher: str | None = None
    user: str | None = None


    def __attrs_post_init__(self) -> None:
        self.network = network_of(self.client)

    def move(self, client: str) -> None:
        """The real client, as a PROXY-protocol header told it."""
        self.client = client
        self.network = network_of(client)


def network_of(address: str) -> str:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return address


@attrs.frozen
class Settings:
    hostname: str
    portal: Portal
    tls: ssl.CertificateOptions | None
    max_message_size: int
    max_recipients: int
    idle_timeout: float
    max_auth_failures: int
    max_connections_per_address: int
    address_limiter: FailureLimiter
    user_limiter: FailureLimiter
    #: Open connections per client address, across this process's listeners.
    open_per_address: Counter[str] = attrs.field(factory=Counter)


log = Logger(namespace="mxmrelay.smtp")


@implementer(IHandshakeListener)
class SMTPServer(Protocol, TimeoutMixin):
    """One SMTP connection.  See the module docstring for why it is ours."""

    transport: Any  # set by makeConnection: TCP, TLS or a wrapper of either

    def __init__(self, settings: Settings, role: str, clock: IReactorTime,
                 factory: SMTPFactory, proxied: bool = False) -> None:
        self.settings = settings
        self.role = role
        #: Behind a PROXY-protocol endpoint: the client's address is known
        #: only once the proxy's header has been read.
        self._proxied = proxied
        self._counted = False
        self._clock = clock
        self.factory = factory
        self._tls = role == "smtps"
        #: Pipelined input not yet answered: ``_buffer[_pos:]``.  An offset,
        #: so that a batch of N commands is not N copies of the rest.
        self._buffer = b""
        self._pos = 0
        #: Dropping the rest of an over-long line (already answered), and
        #: how much of it so far.
        self._skipping = False
        self._skipped = 0
        self._out: list[bytes] = []
        self._busy = False
        self._closed = False
        self._first_bytes = True
        self._unknown = 0
        self._shutting_down = False
        #: The transport's write buffer is full (the client does not read
        #: its replies): answer nothing more until it drains.
        self._write_blocked = False
        self._reading_paused = False
        # the authenticated state
        self._avatar: Any = None
        self._logout: Callable[[], None] | None = None
        self._auth_failures = 0
        self._auth_step: str | None = None
        self._auth_user = ""
        # the greeting/transaction state
        self._esmtp = False
        self._mail_from: str | None = None
        self._smtputf8 = False
        self._rcpts: list[str] = []
        self._factory: Callable[[], IBulkMessage] | None = None
        # the DATA state
        self._message: IBulkMessage | None = None
        self._reader: DataReader | None = None

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
        self.session = Session(client=str(getattr(peer, "host", peer)), listener=self.role)
        self.factory.connections.add(self)
        self.setTimeout(self.settings.idle_timeout)
        log.info("connect client={client} listener={listener}",
                 client=self.session.client, listener=self.role)
        if not self._proxied:
            self._count_client()
            if self._closed:
                return
        self._write(f"220 {self.settings.hostname} ESMTP ready\r\n".encode())
        self._flush()

    def _count_client(self) -> None:
        self._counted = True
        open_now = self.settings.open_per_address
        open_now[self.session.network] += 1
        if open_now[self.session.network] > self.settings.max_connections_per_address:
            log.warn("too many connections client={client}", client=self.session.client)
            self._close(Reply(421, "4.7.0", "Too many connections from your address"))

    def _uncount_client(self) -> None:
        if not self._counted:
            return
        self._counted = False
        open_now = self.settings.open_per_address
        open_now[self.session.network] -= 1
        if open_now[self.session.network] <= 0:
            del open_now[self.session.network]

    def _check_peer(self) -> bool:
        """Behind a PROXY-protocol endpoint the real client is known only
        once the proxy's header has been read, which is when the client's
        first bytes reach us: take it (and count it) then.  False if that
        client is refused."""
        if not self._proxied:
            return True
        peer = self.transport.getPeer()
        client = str(getattr(peer, "host", peer))
        if client != self.session.client:
            log.info("proxied client={client} via={proxy}", client=client,
                     proxy=self.session.client)
            self.session.move(client)
        self._count_client()
        return not self._closed

    def handshakeCompleted(self) -> None:
        """Called by Twisted's TLS layer (``IHandshakeListener``); a wrapper
        between it and us (the PROXY protocol's) does not pass it on, so
        the first EHLO under TLS asks too (see ``_hello``)."""
        version, cipher = describe(self.transport)
        self.session.tls_version, self.session.tls_cipher = version, cipher
        log.info("tls client={client} version={version} cipher={cipher}",
                 client=self.session.client, version=version, cipher=cipher)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closed = True
        self.setTimeout(None)
        self.factory.gone(self)
        self._uncount_client()
        if self._message is not None:
            self._message.connectionLost()
            self._message = None
        if self._logout is not None:
            self._logout()
            self._logout = None
        log.info("disconnect client={client}", client=self.session.client)

    def timeoutConnection(self) -> None:
        log.info("timeout client={client}", client=self.session.client)
        self._close(Reply(421, "4.4.2", f"{self.settings.hostname} Timeout exceeded"))

    def shutdown(self) -> None:
        """Say goodbye as the service stops; a send in flight finishes first."""
        self._shutting_down = True
        if not self._busy:
            self._close(Reply(421, "4.3.2", "Service shutting down"))

    def _close(self, reply: Reply) -> None:
        self._reply(reply)
        self._flush()
        self._closed = True
        # A registered producer would hold the connection open.
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    # -- output ---------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        self._out.append(data)

    def _reply(self, reply: Reply) -> None:
        self._out.append(reply.encode())

    def _ok(self, code: int, enhanced: str, text: str) -> None:
        # Through Reply, like every other answer: its text (a send id from
        # the delivery API) then cannot break the line protocol either.
        self._reply(Reply(code, enhanced, text))

    def _flush(self) -> None:
        """One write per batch of replies: pipelined answers share a packet
        (and, under TLS, a record)."""
        if self._out and not self._closed:
            self.transport.write(b"".join(self._out))
        self._out.clear()

    # -- input ----------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closed:
            return
        self.resetTimeout()
        if self._first_bytes:
            self._first_bytes = False
            if not self._check_peer():
                return
            if not self._tls and data[:1] == bytes([TLS_HANDSHAKE]):
                # A TLS client on a STARTTLS port: it cannot read any reply.
                log.info("tls on plain port client={client}", client=self.session.client)
                self._closed = True
                self.transport.unregisterProducer()
                self.transport.loseConnection()
                return
        if self._message is not None and not self._busy and not self._write_blocked:
            self._data(data)
        else:
            self._buffer += data
        self._run()
        self._flush()

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

    def _run(self) -> None:
        """Answer buffered commands in order, stopping at the first that
        must wait for an answer (AUTH, MAIL, RCPT, end of DATA)."""
        while not self._busy and not self._closed and not self._write_blocked:
            if self._message is not None:
                data = self._unconsumed()
                if data:
                    self._data(data)
                    continue
                return
            line = self._next_line()
            if line is None:
                break
            if self._auth_step is not None:
                self._auth_line(line)
            else:
                self._command(line)
        self._check_reading()

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
                    self._close(Reply(421, "4.7.0", "Line too long, closing connection"))
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
                    self._too_long()
                    self._skipping, self._skipped = True, 0
                return None
            line, self._pos = buf[pos:i], i + 1
            return line[:-1] if line.endswith(b"\r") else line

    def _line_limit(self, line: bytes) -> int:
        """Octets allowed in ``line`` with its CRLF."""
        if self._auth_step is not None:
            return AUTH_LINE_LIMIT + 2
        return MAIL_LIMIT if line[:4].upper() == b"MAIL" else COMMAND_LIMIT

    def _too_long(self) -> None:
        if self._auth_step is not None:
            self._auth_step = None
            self._reply(Reply(500, "5.5.6", "Authentication exchange line is too long"))
        else:
            self._reply(Reply(500, "5.5.2", "Line too long"))

    def _command(self, line: bytes) -> None:
        # The length first, as for a line still arriving (the answer must
        # not depend on how the line was split into packets).
        if len(line) + 2 > self._line_limit(line):
            self._reply(Reply(500, "5.5.2", "Line too long"))
            return
        verb, _, rest = line.partition(b" ")
        name = verb.upper().decode("ascii", "replace")
        handler = _COMMANDS.get(name)
        if handler is None:
            self._unknown += 1
            if self._unknown >= MAX_UNKNOWN:
                self._close(Reply(421, "4.7.0", "Too many unrecognized commands"))
            else:
                self._reply(Reply(500, "5.5.2", "Command not recognized"))
            return
        self._unknown = 0
        try:
            arg = rest.decode("utf-8")
        except UnicodeDecodeError:
            self._reply(Reply(501, "5.5.2", "Invalid UTF-8 in command"))
            return
        try:
            handler(self, arg)
        except Reply as reply:
            self._reply(reply)

    def _wait(self, d: Deferred[Any], done: Callable[[Any], None],
              failed: Callable[[Failure], None]) -> None:
        """Run ``done``/``failed`` on the result; hold the pipeline while
        it is not known (if it is already known, nothing waits)."""
        self._busy = True
        waiting = False

        def finish(result: Any) -> None:
            self._busy = False
            if isinstance(result, Failure):
                failed(result)
            else:
                done(result)
            if not waiting or self._closed:
                # Answered at once: the caller's loop goes on with the
                # next command (no recursion per pipelined command).
                return
            self.setTimeout(self.settings.idle_timeout)
            if self._shutting_down and self._message is None:
                self._close(Reply(421, "4.3.2", "Service shutting down"))
                return
            self._run()
            self._flush()

        d.addBoth(finish)
        waiting = True
        if self._busy:
            # The client waits for us now, not we for it: no idle timeout
            # (the delivery API call has its own deadline).
            self.setTimeout(None)

    # -- commands -------------------------------------------------------------

    def _need_tls(self) -> None:
        if not self._tls:
            raise Reply(530, "5.7.0", "Must issue a STARTTLS command first")

    def _need_helo(self) -> None:
        if self.session.helo is None:
            raise Reply(503, "5.5.1", "Error: send HELO/EHLO first")

    def _reset(self) -> None:
        self._mail_from = None
        self._smtputf8 = False
        self._rcpts = []
        self._factory = None

    def do_EHLO(self, arg: str) -> None:
        self._hello(arg, esmtp=True)

    def do_HELO(self, arg: str) -> None:
        self._hello(arg, esmtp=False)

    def _hello(self, arg: str, esmtp: bool) -> None:
        name = arg.strip()
        if not name:
            raise Reply(501, "5.5.4", f"Syntax: {'EHLO' if esmtp else 'HELO'} hostname")
        if len(name) > 255 or not all("!" <= c <= "~" for c in name):
            raise Reply(501, "5.5.4", "Invalid hostname")
        if self._tls and self.session.tls_version is None:
            self.handshakeCompleted()
        self.session.helo = name
        self._esmtp = esmtp
        self._reset()
        host = self.settings.hostname
        if not esmtp:
            self._write(f"250 {host}\r\n".encode())
            return
        lines = [host, "PIPELINING", f"SIZE {self.settings.max_message_size}", "8BITMIME",
                 "SMTPUTF8", "ENHANCEDSTATUSCODES"]
        if not self._tls:
            if self.settings.tls is not None:
                lines.append("STARTTLS")
        else:
            # "AUTH=" is the pre-RFC spelling old Outlook and .NET look for.
            lines += ["AUTH PLAIN LOGIN", "AUTH=PLAIN LOGIN"]
        body = "".join(f"250-{x}\r\n" for x in lines[:-1]) + f"250 {lines[-1]}\r\n"
        self._write(body.encode())

    def do_STARTTLS(self, arg: str) -> None:
        if self._tls:
            raise Reply(503, "5.5.1", "TLS already active")
        _no_argument("STARTTLS", arg)
        if self.settings.tls is None:
            raise Reply(454, "4.7.0", "TLS not available due to temporary reason")
        self._ok(220, "2.0.0", "Ready to start TLS")
        self._flush()
        # RFC 3207 4.2: whatever the client sent after STARTTLS in plain
        # text is dropped, never run under TLS; the session starts over.
        self._unconsumed()
        self._tls = True
        self.session.helo = None
        self._esmtp = False
        self._reset()
        self.transport.startTLS(self.settings.tls)

    def do_AUTH(self, arg: str) -> None:
        self._need_tls()
        self._need_helo()
        # (A MAIL transaction needs AUTH first, so "already authenticated"
        # also answers AUTH inside a transaction.)
        if self._avatar is not None:
            raise Reply(503, "5.5.1", "Already authenticated")
        mechanism, _, initial = arg.strip().partition(" ")
        mechanism = mechanism.upper()
        if not mechanism:
            raise Reply(501, "5.5.4", "Syntax: AUTH mechanism")
        if mechanism not in ("PLAIN", "LOGIN"):
            raise Reply(504, "5.5.4", "Unrecognized authentication type")
        if self.settings.address_limiter.blocked(self.session.network):
            log.warn("auth rate limited rhost={client}", client=self.session.client)
            raise Reply(454, "4.7.0", "Temporary authentication failure")
        initial = initial.strip()
        try:
            if mechanism == "PLAIN":
                if initial:
                    self._login(*auth.parse_plain(auth.decode_response(initial.encode())))
                else:
                    self._auth_step = "plain"
                    self._write(b"334 \r\n")
            elif initial:
                self._auth_user = auth.decode_text(auth.decode_response(initial.encode()),
                                                  name=True)
                self._auth_step = "password"
                self._write(b"334 UGFzc3dvcmQ6\r\n")
            else:
                self._auth_step = "username"
                self._write(b"334 VXNlcm5hbWU6\r\n")
        except SASLError as e:
            raise Reply(e.code, e.enhanced, e.text) from None

    def _auth_line(self, line: bytes) -> None:
        step, self._auth_step = self._auth_step, None
        if len(line) > AUTH_LINE_LIMIT:
            self._reply(Reply(500, "5.5.6", "Authentication exchange line is too long"))
            return
        try:
            response = auth.decode_response(line)
            if step == "plain":
                self._login(*auth.parse_plain(response))
            elif step == "username":
                self._auth_user = auth.decode_text(response, name=True)
                self._auth_step = "password"
                self._write(b"334 UGFzc3dvcmQ6\r\n")
            else:
                self._login(self._auth_user, auth.decode_text(response))
        except SASLError as e:
            self._reply(Reply(e.code, e.enhanced, e.text))

    def _login(self, username: str, password: str) -> None:
        client = self.session.client
        if self.settings.user_limiter.blocked(username.lower()):
            log.warn("auth rate limited rhost={client} user={user}", client=client,
                     user=_printable(username))
            raise SASLError(454, "4.7.0", "Temporary authentication failure")
        creds = UsernamePassword(username.encode("utf-8"), password.encode("utf-8"))
        d = self.settings.portal.login(creds, self.session, IMessageDelivery)

        def done(result: tuple[Any, Any, Callable[[], None]]) -> None:
            _, self._avatar, self._logout = result
            self.session.user = username
            log.info("auth ok client={client} user={user}", client=client,
                     user=_printable(username))
            self._ok(235, "2.7.0", "Authentication successful")

        def failed(f: Failure) -> None:
            if f.check(UnauthorizedLogin):
                self._auth_failures += 1
                self.settings.address_limiter.record(self.session.network)
                self.settings.user_limiter.record(username.lower())
                # fail2ban: failregex = auth failure rhost=<HOST>
                log.warn("auth failure rhost={client} user={user}", client=client,
                         user=_printable(username))
                if self._auth_failures >= self.settings.max_auth_failures:
                    self._close(Reply(421, "4.7.0", "Too many authentication failures"))
                else:
                    self._reply(Reply(535, "5.7.8", "Authentication credentials invalid"))
                return
            if not f.check(DirectoryError):
                log.failure("auth error client={client}", f, client=client)
            self._reply(Reply(454, "4.7.0", "Temporary authentication failure"))

        self._wait(d, done, failed)

    def do_MAIL(self, arg: str) -> None:
        self._need_tls()
        self._need_helo()
        if self._avatar is None:
            raise Reply(530, "5.7.0", "Authentication required")
        if self._mail_from is not None:
            raise Reply(503, "5.5.1", "Error: nested MAIL command")
        path = parse_path_command(arg, which="FROM", esmtp=self._esmtp)
        smtputf8 = False
        for key, value in path.params.items():
            if key == "SIZE":
                if value is None or not value.isdigit() or not value.isascii():
                    raise Reply(501, "5.5.4", "Bad message size syntax")
                if int(value) > self.settings.max_message_size:
                    raise Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
            elif key == "BODY":
                # A known parameter with a value it does not allow is a
                # syntax error (501), not an unknown option (555).
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    raise Reply(501, "5.5.4", "Bad BODY parameter")
            elif key == "SMTPUTF8":
                if value is not None:
                    raise Reply(501, "5.5.4", "Bad SMTPUTF8 parameter")
                smtputf8 = True
            elif key != "AUTH":  # RFC 4954 5: AUTH=<> may be sent; ignored
                raise Reply(555, "5.5.4", f"Unsupported option: {quote(key)}")
        if not path.address.isascii() and not smtputf8:
            raise need_smtputf8()
        if not path.address:
            raise Reply(553, "5.7.1", f"<>: Sender address rejected: not owned by user "
                                      f"{quote(self.session.user or '', 256)}")
        d = maybeDeferred(self._avatar.validateFrom, (self.session.helo, self.session.client),
                          path.address)

        def done(_: object) -> None:
            self._mail_from = path.address
            self._smtputf8 = smtputf8
            self._ok(250, "2.1.0", "Ok")

        self._wait(d, done, self._refused)

    def _refused(self, f: Failure) -> None:
        if isinstance(f.value, Reply):
            self._reply(f.value)
        else:
            log.failure("error client={client}", f, client=self.session.client)
            self._reply(Reply(451, "4.3.0", "Temporary failure, try again later"))

    def do_RCPT(self, arg: str) -> None:
        self._need_tls()
        self._need_helo()
        if self._mail_from is None:
            raise Reply(503, "5.5.1", "Error: need MAIL command")
        path = parse_path_command(arg, which="TO", esmtp=self._esmtp)
        if not path.address:
            raise Reply(501, "5.1.3", "Bad recipient address syntax")
        for key in path.params:
            raise Reply(555, "5.5.4", f"Unsupported option: {quote(key)}")
        if not path.address.isascii() and not self._smtputf8:
            raise need_smtputf8()
        if len(self._rcpts) >= self.settings.max_recipients:
            raise Reply(452, "4.5.3", "Too many recipients")
        d = maybeDeferred(self._avatar.validateTo, path.address)

        def done(factory: Callable[[], IBulkMessage]) -> None:
            self._rcpts.append(path.address)
            if self._factory is None:
                self._factory = factory
            self._ok(250, "2.1.5", "Ok")

        self._wait(d, done, self._refused)

    def do_DATA(self, arg: str) -> None:
        self._need_tls()
        self._need_helo()
        if self._mail_from is None:
            raise Reply(503, "5.5.1", "Error: need MAIL command")
        if self._factory is None:
            raise Reply(503, "5.5.1", "Error: need RCPT command")
        _no_argument("DATA", arg)
        # One transaction, one message, however many recipients.
        message = self._message = self._factory()
        self._reader = DataReader(message.write, message.connectionLost,
                                  self.settings.max_message_size)
        self._write(b"354 End data with <CR><LF>.<CR><LF>\r\n")

    def do_RSET(self, arg: str) -> None:
        _no_argument("RSET", arg)
        self._reset()
        self._ok(250, "2.0.0", "Ok")

    def do_NOOP(self, arg: str) -> None:
        # RFC 5321 4.1.1.9: NOOP may carry a string, which is ignored.
        self._ok(250, "2.0.0", "Ok")

    def do_QUIT(self, arg: str) -> None:
        _no_argument("QUIT", arg)
        self._close(Reply(221, "2.0.0", "Bye"))

    def do_VRFY(self, arg: str) -> None:
        if not arg.strip():
            raise Reply(501, "5.5.4", "Syntax: VRFY address")
        self._ok(252, "2.5.0", "Cannot VRFY user")

    def do_EXPN(self, arg: str) -> None:
        self._ok(502, "5.5.1", "EXPN not available")

    def do_HELP(self, arg: str) -> None:
        self._ok(214, "2.0.0", "Commands: EHLO HELO STARTTLS AUTH MAIL RCPT DATA RSET NOOP "
                                "VRFY QUIT")

    # -- DATA -----------------------------------------------------------------

    def _data(self, data: bytes) -> None:
        assert self._reader is not None
        rest = self._reader.feed(data)
        if rest is not None:
            self._end_of_data(rest)

    def _end_of_data(self, rest: bytes) -> None:
        message, self._message = self._message, None
        reader, self._reader = self._reader, None
        self._buffer, self._pos = rest + self._unconsumed(), 0
        assert message is not None and reader is not None
        if reader.error is not None:
            self._reply(reader.error)
            self._reset()
            return
        # One log line per transaction, written once its answer is known.
        facts = {"client": self.session.client, "user": self.session.user,
                 "sender": self._mail_from, "rcpts": len(self._rcpts), "size": reader.size}

        def done(send_id: str) -> None:
            self._reset()
            self._ok(250, "2.0.0", f"Ok: queued as {send_id}")
            log.info("sent id={id} client={client} user={user} from={sender} rcpts={rcpts} "
                     "size={size}", id=send_id, **facts)

        def failed(f: Failure) -> None:
            self._reset()
            self._refused(f)
            log.info("refused reply={reply} client={client} user={user} from={sender} "
                     "rcpts={rcpts} size={size}", reply=str(f.value), **facts)

        self._wait(maybeDeferred(message.eomReceived), done, failed)


class DataReader:
    """DATA framing, as a pure state machine over chunks of bytes.

    The stream is handled as if it began with CRLF (``_carry`` starts so),
    so that every line start is a CRLF: the terminator is always
    ``CRLF.CRLF``, never a bare-LF or bare-CR form (SMTP smuggling), and
    dot-unstuffing is one ``replace``.  Complete lines go to ``sink`` in
    chunks; a partial line waits in ``_carry``.  After an error (size, long
    line, or a ``Reply`` raised by ``sink``) nothing more is stored, but
    the reader goes on to the terminator, so the session stays in step.
    """

    def __init__(self, sink: Callable[[bytes], None], discard: Callable[[], None],
                 max_size: int) -> None:
        self._sink = sink
        self._discard = discard
        self._max_size = max_size
        self._carry = b"\r\n"
        self._first = True
        self.size = 0
        self.error: Reply | None = None

    def feed(self, data: bytes) -> bytes | None:
        """Take bytes; at the terminator, return what followed it."""
        buf = self._carry + data
        end = buf.find(_TERMINATOR)
        if end >= 0:
            self._carry = b""
            if self.error is None:
                self._emit(buf[:end + 2])
            return buf[end + 5:]
        if self.error is not None:
            self._carry = buf[-4:]
            return None
        # Cut before the last line ending (a CRLF kept whole, or a bare LF
        # or CR: bare endings are lines too), so that the carry is one
        # partial line.  A CR at the very end may be the first half of the
        # next CRLF: it is no ending yet.
        cut = buf.rfind(b"\n")
        if cut > 0 and buf[cut - 1] == 0x0D:
            cut -= 1
        bare_cr = buf.rfind(b"\r", 0, len(buf) - 1)
        if bare_cr > cut:
            cut = bare_cr
        ending = 2 if buf.startswith(b"\r\n", cut) else 1
        start = cut + ending
        partial = len(buf) - start - (1 if buf.endswith(b"\r") else 0)
        if buf.startswith(b".", start):
            partial -= 1  # the stuffed dot is not part of the line
        if partial > TEXT_LINE_LIMIT:
            # The line in progress is already too long: stop keeping it.
            self._fail(Reply(500, "5.5.2", "Line too long"))
            self._carry = buf[-4:]
            return None
        self._carry = buf[cut:]
        if cut > 0:
            self._emit(buf[:cut])
        return None

    def _emit(self, region: bytes) -> None:
        """Pass on complete lines (each preceded by its CRLF)."""
        crlf = region.count(b"\r\n")
        if crlf != region.count(b"\n") or crlf != region.count(b"\r"):
            # Bare CR or LF: normalised to CRLF (documented policy).  They
            # never end DATA, so they cannot smuggle a second message.
            region = _LINE_ENDING.sub(b"\r\n", region)
        # Dot-unstuffing; ``replace`` hands back the same object when there
        # is nothing to replace, so no separate search first.
        region = region.replace(b"\r\n.", b"\r\n")
        # Measured after unstuffing: the limit is on the line's text.
        if _has_long_line(region, TEXT_LINE_LIMIT):
            self._fail(Reply(500, "5.5.2", "Line too long"))
            return
        if self._first:
            self._first = False
            region = region[2:]
        self.size += len(region)
        if self.size > self._max_size:
            self._fail(Reply(552, "5.3.4", "Message size exceeds fixed maximum message size"))
            return
        try:
            self._sink(region)
        except Reply as reply:
            self._fail(reply)
        except OSError as e:  # the spool's disk is full, or out of descriptors
            log.error("spool write failed: {error}", error=e)
            self._fail(Reply(452, "4.3.1", "Insufficient system storage"))

    def _fail(self, reply: Reply) -> None:
        if self.error is None:
            self.error = reply
            self._discard()


def _no_argument(command: str, arg: str) -> None:
    """RFC 5321 4.1.1: RSET, QUIT, DATA and STARTTLS take no argument."""
    if arg.strip():
        raise Reply(501, "5.5.4", f"Syntax: {command}")


def _printable(text: str) -> str:
    """A client-chosen string made safe for one log line (a user name
    with a newline must not forge a second, fail2ban-matching line)."""
    return text if text.isprintable() else ascii(text)[1:-1]


def _has_long_line(region: bytes, limit: int) -> bool:
    """Does ``region`` hold a line longer than ``limit`` characters?

    A run of more than ``limit`` characters without LF covers at least one
    whole window of ``(limit + 1) // 2`` characters at a multiple of that
    size, so only those windows are searched, each with one C call; a
    window without LF is then measured exactly.
    """
    n = len(region)
    if n <= limit:
        return False
    step = (limit + 1) // 2
    find = region.find
    for start in range(0, n - step + 1, step):
        if find(b"\n", start, start + step) < 0:
            line_start = region.rfind(b"\n", 0, start) + 1
            line_end = find(b"\n", start)
            if line_end < 0:
                line_end = n
            elif region[line_end - 1:line_end] == b"\r":
                line_end -= 1
            if line_end - line_start > limit:
                return True
    return False


_COMMANDS: dict[str, Callable[[SMTPServer, str], None]] = {
    name[3:]: getattr(SMTPServer, name) for name in dir(SMTPServer) if name.startswith("do_")
}


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

