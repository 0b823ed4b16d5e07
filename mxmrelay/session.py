"""The SMTP session as a state machine, without I/O.

:class:`SMTPSession` is fed what the client sent, a command line at a time
(or, in DATA, chunks of bytes), and returns a :class:`~mxmrelay.actions.Step`:
the replies, then at most one thing for its driver to do (start TLS, close,
or wait for a Deferred before reading on).  It owns the dialogue's rules:
the command sequence, TLS before AUTH, AUTH before MAIL, the limits a
command can break.  Buffering, back-pressure, timers and the socket belong
to the driver, :class:`mxmrelay.smtp.SMTPServer`; that split is what lets a
decision be tested in a few lines without one.

The state is :class:`Phase` plus two facts that run across it: ``tls``
(on since the start for implicit TLS, or since STARTTLS) and
``authenticated`` (from a successful AUTH to the end of the connection).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from mxmrelay import login
from mxmrelay.actions import CLOSE, START_TLS, Step, Wait, answer, say, say_raw
from mxmrelay.connection import ConnectionInfo, Settings
from mxmrelay.login import Login
from mxmrelay.reply import Reply
from mxmrelay.transaction import Transaction, refused, sender

#: RFC 5321 4.5.3.1.4: 512 octets with CRLF; MAIL may carry SIZE (+26)
#: and AUTH= (+500, RFC 4954).
COMMAND_LIMIT = 512
MAIL_LIMIT = 512 + 26 + 500
#: Unrecognised commands in a row before the connection is dropped.
MAX_UNKNOWN = 5

log = Logger(namespace="mxmrelay.smtp")


class Phase(enum.Enum):
    """Where the dialogue is."""

    #: No HELO/EHLO yet (or none since STARTTLS).
    CONNECTED = "connected"
    #: HELO/EHLO said; no transaction open.
    GREETED = "greeted"
    #: In an AUTH exchange: the next line is a SASL response.
    AUTH = "auth"
    #: MAIL FROM accepted: a transaction is open.
    MAIL = "mail"
    #: One recipient accepted or more: DATA may come.
    RCPT = "rcpt"
    #: After the 354: bytes of the message, not commands.
    DATA = "data"
    #: Closing or closed: nothing more is answered.
    CLOSED = "closed"


_TRANSACTION = (Phase.MAIL, Phase.RCPT)
#: The commonest replies, encoded once (they quote nothing).
_OK = Reply(250, "2.0.0", "Ok").encode()
_SENDER_OK = Reply(250, "2.1.0", "Ok").encode()
_RECIPIENT_OK = Reply(250, "2.1.5", "Ok").encode()


class SMTPSession:
    """One connection's dialogue.  See the module docstring."""

    def __init__(self, settings: Settings, info: ConnectionInfo, *, tls: bool,
                 learn_tls: Callable[[], None] = lambda: None) -> None:
        self.settings = settings
        self.info = info
        #: Asks the transport for the TLS version and cipher, when a
        #: wrapper kept the handshake's news from the driver.
        self._learn_tls = learn_tls
        self.phase = Phase.CONNECTED
        self.tls = tls
        #: The greeting was EHLO (ESMTP parameters allowed), not HELO.
        self.esmtp = False
        self.login = Login(settings, info)
        self.transaction: Transaction | None = None
        self._unknown = 0
        #: The service is stopping: goodbye once the awaited answer is given.
        self._stopping = False

    @property
    def authenticated(self) -> bool:
        return self.login.avatar is not None

    # -- events from the driver -------------------------------------------------

    def greeting(self) -> Step:
        return say_raw(f"220 {self.settings.hostname} ESMTP ready\r\n".encode())

    def line_limit(self, line: bytes) -> int:
        """Octets allowed in ``line`` (or its start) with its CRLF."""
        if self.phase is Phase.AUTH:
            return login.AUTH_LINE_LIMIT + 2
        return MAIL_LIMIT if line[:4].upper() == b"MAIL" else COMMAND_LIMIT

    def line(self, line: bytes) -> Step:
        """One line the client sent, without its line ending."""
        if self.phase is Phase.AUTH:
            self.phase = Phase.GREETED
            step = self.login.respond(line)
            if self.login.expecting is not None:
                self.phase = Phase.AUTH
        else:
            step = self._command(line)
        return self._check(step)

    def line_too_long(self) -> Step:
        """The line arriving is past its limit already: answered now (the
        client may never send its end), and the rest of it is dropped."""
        if self.phase is Phase.AUTH:
            self.login.cancel()
            self.phase = Phase.GREETED
            return say(login.line_too_long())
        return say(Reply(500, "5.5.2", "Line too long"))

    def line_abandoned(self) -> Step:
        """A line this long is no client's mistake."""
        return self._check(say(Reply(421, "4.7.0", "Line too long, closing connection"), CLOSE))

    def data(self, chunk: bytes) -> tuple[Step, bytes] | None:
        """Bytes of the message; at its end, the step and what followed."""
        transaction = self.transaction
        assert transaction is not None and transaction.reader is not None
        rest = transaction.reader.feed(chunk)
        if rest is None:
            return None
        # The transaction ends here whatever the answer: the next command
        # is read only once it is given.
        self._reset(Phase.GREETED)
        return self._check(transaction.end(self.info)), rest

    def timeout(self) -> Step:
        log.info("timeout client={client}", client=self.info.client)
        return self._check(say(Reply(421, "4.4.2", f"{self.settings.hostname} Timeout "
                                                   "exceeded"), CLOSE))

    def shutdown(self, *, answering: bool) -> Step:
        """The service stops.  A command whose answer is awaited (a send in
        flight) gets it first; then, or now, goodbye."""
        if answering:
            self._stopping = True
            return Step()
        return self._check(_goodbye())

    def connection_lost(self) -> None:
        self.phase = Phase.CLOSED
        if self.transaction is not None:
            self.transaction.discard()
            self.transaction = None
        self.login.logout()

    # -- the dialogue -----------------------------------------------------------

    def _check(self, step: Step) -> Step:
        """Follow the step's action: a closing step closes the session; an
        awaited answer says goodbye after it if the service stopped meanwhile."""
        if step.action is not None:
            if step.closes:
                self.phase = Phase.CLOSED
            elif isinstance(step.action, Wait):
                step.action.result.addCallback(self._answered)
        return step

    def _answered(self, step: Step) -> Step:
        if self._stopping and not step.closes:
            step = step.then(_goodbye())
        return self._check(step)

    def _command(self, line: bytes) -> Step:
        # The length first, as for a line still arriving (the answer must
        # not depend on how the line was split into packets).
        if len(line) + 2 > self.line_limit(line):
            return say(Reply(500, "5.5.2", "Line too long"))
        verb, _, rest = line.partition(b" ")
        handler = _COMMANDS.get(verb.upper().decode("ascii", "replace"))
        if handler is None:
            self._unknown += 1
            if self._unknown >= MAX_UNKNOWN:
                return say(Reply(421, "4.7.0", "Too many unrecognized commands"), CLOSE)
            return say(Reply(500, "5.5.2", "Command not recognized"))
        self._unknown = 0
        try:
            arg = rest.decode("utf-8")
        except UnicodeDecodeError:
            return say(Reply(501, "5.5.2", "Invalid UTF-8 in command"))
        try:
            return handler(self, arg)
        except Reply as reply:
            return say(reply)

    def _need_tls_and_helo(self) -> None:
        if not self.tls:
            raise Reply(530, "5.7.0", "Must issue a STARTTLS command first")
        if self.phase is Phase.CONNECTED:
            raise Reply(503, "5.5.1", "Error: send HELO/EHLO first")

    def _reset(self, phase: Phase) -> None:
        """End the transaction, if any (its message is not started)."""
        if self.transaction is not None:
            self.transaction.abandon()
        self.transaction = None
        self.phase = phase

    def _wait(self, d: Any, done: Callable[[Any], Step]) -> Step:
        """The answer, once ``d`` has it; a refusal from it is the reply."""
        return answer(d, done, lambda f: refused(f, self.info.client))

    # -- commands -------------------------------------------------------------

    def do_EHLO(self, arg: str) -> Step:
        return self._hello(arg, esmtp=True)

    def do_HELO(self, arg: str) -> Step:
        return self._hello(arg, esmtp=False)

    def _hello(self, arg: str, esmtp: bool) -> Step:
        name = arg.strip()
        if not name:
            raise Reply(501, "5.5.4", f"Syntax: {'EHLO' if esmtp else 'HELO'} hostname")
        if len(name) > 255 or not all("!" <= c <= "~" for c in name):
            raise Reply(501, "5.5.4", "Invalid hostname")
        if self.tls and self.info.tls_version is None:
            self._learn_tls()
        self.info.helo = name
        self.esmtp = esmtp
        self._reset(Phase.GREETED)
        if not esmtp:
            return say_raw(f"250 {self.settings.hostname}\r\n".encode())
        return say_raw(_extensions(self.settings, self.tls))

    def do_STARTTLS(self, arg: str) -> Step:
        if self.tls:
            raise Reply(503, "5.5.1", "TLS already active")
        _no_argument("STARTTLS", arg)
        if self.settings.tls is None:
            raise Reply(454, "4.7.0", "TLS not available due to temporary reason")
        # RFC 3207 4.2: the session starts over, and the driver drops what
        # the client sent after STARTTLS in plain text.
        self.tls = True
        self.info.helo = None
        self.esmtp = False
        self._reset(Phase.CONNECTED)
        return say(Reply(220, "2.0.0", "Ready to start TLS"), START_TLS)

    def do_AUTH(self, arg: str) -> Step:
        self._need_tls_and_helo()
        # (A MAIL transaction needs AUTH first, so "already authenticated"
        # also answers AUTH inside a transaction.)
        if self.authenticated:
            raise Reply(503, "5.5.1", "Already authenticated")
        step = self.login.start(arg)
        if self.login.expecting is not None:
            self.phase = Phase.AUTH
        return step

    def do_MAIL(self, arg: str) -> Step:
        self._need_tls_and_helo()
        if not self.authenticated:
            raise Reply(530, "5.7.0", "Authentication required")
        if self.phase in _TRANSACTION:
            raise Reply(503, "5.5.1", "Error: nested MAIL command")
        address, smtputf8 = sender(arg, esmtp=self.esmtp, settings=self.settings,
                                   user=self.info.user)
        d = maybeDeferred(self.login.avatar.validateFrom, (self.info.helo, self.info.client),
                          address)
        report = self._reporter(address)

        def done(_: object) -> Step:
            take = getattr(self.login.avatar, "take_reservation", None)
            transaction = Transaction(address, smtputf8,
                                      reservation=take() if take is not None else None,
                                      report=lambda reply, head: report(reply, transaction, head))
            if self.phase is Phase.CLOSED:  # gone while the limits were asked
                transaction.abandon()
                return Step()
            self.transaction = transaction
            self.phase = Phase.MAIL
            return say_raw(_SENDER_OK)

        def failed(f: Failure) -> Step:
            if isinstance(f.value, Reply):
                report(f.value, None, None)
            return refused(f, self.info.client)

        return answer(d, done, failed)

    def _reporter(self, mail_from: str) -> Callable[[Reply, Transaction | None, bytes | None],
                                                    None]:
        """What tells the avatar of a refused transaction (its customer's
        refusal reports, mxmrelay/refusals.py); at the end of DATA
        (``head`` read or not) every refusal, before it only the
        envelope's."""
        avatar_report = getattr(self.login.avatar, "report_refusal", None)
        rcpt_reported: list[bool] = []

        def report(reply: Reply, transaction: Transaction | None, head: bytes | None) -> None:
            if transaction is not None and transaction.reader is None:
                if rcpt_reported:  # one record for a transaction's refused RCPTs
                    return
                rcpt_reported.append(True)
            if avatar_report is not None:
                recipients = transaction.recipients if transaction is not None else []
                data = transaction is not None and transaction.reader is not None
                avatar_report(reply, mail_from, tuple(recipients), head, data=data)

        return report

    def do_RCPT(self, arg: str) -> Step:
        self._need_tls_and_helo()
        transaction = self.transaction
        if transaction is None or self.phase not in _TRANSACTION:
            raise Reply(503, "5.5.1", "Error: need MAIL command")
        try:
            address = transaction.recipient(arg, esmtp=self.esmtp,
                                            max_recipients=self.settings.max_recipients)
        except Reply as reply:
            if transaction.report is not None:
                transaction.report(reply, None)
            raise
        d = maybeDeferred(self.login.avatar.validateTo, address)

        def done(new_message: Any) -> Step:
            transaction.add_recipient(address, new_message)
            self.phase = Phase.RCPT
            return say_raw(_RECIPIENT_OK)

        return self._wait(d, done)

    def do_DATA(self, arg: str) -> Step:
        self._need_tls_and_helo()
        if self.transaction is None or self.phase not in _TRANSACTION:
            raise Reply(503, "5.5.1", "Error: need MAIL command")
        if self.phase is not Phase.RCPT:
            raise Reply(503, "5.5.1", "Error: need RCPT command")
        _no_argument("DATA", arg)
        self.transaction.start_data(self.settings.max_message_size)
        self.phase = Phase.DATA
        return say_raw(b"354 End data with <CR><LF>.<CR><LF>\r\n")

    def do_RSET(self, arg: str) -> Step:
        _no_argument("RSET", arg)
        if self.phase in _TRANSACTION:
            self._reset(Phase.GREETED)
        return say_raw(_OK)

    def do_NOOP(self, arg: str) -> Step:
        # RFC 5321 4.1.1.9: NOOP may carry a string, which is ignored.
        return say_raw(_OK)

    def do_QUIT(self, arg: str) -> Step:
        _no_argument("QUIT", arg)
        return say(Reply(221, "2.0.0", "Bye"), CLOSE)

    def do_VRFY(self, arg: str) -> Step:
        if not arg.strip():
            raise Reply(501, "5.5.4", "Syntax: VRFY address")
        return say(Reply(252, "2.5.0", "Cannot VRFY user"))

    def do_EXPN(self, arg: str) -> Step:
        return say(Reply(502, "5.5.1", "EXPN not available"))

    def do_HELP(self, arg: str) -> Step:
        return say(Reply(214, "2.0.0", "Commands: EHLO HELO STARTTLS AUTH MAIL RCPT DATA "
                                       "RSET NOOP VRFY QUIT"))


def _extensions(settings: Settings, tls: bool) -> bytes:
    """The EHLO reply: what this listener offers, as things stand."""
    lines = [settings.hostname, "PIPELINING", f"SIZE {settings.max_message_size}", "8BITMIME",
             "SMTPUTF8", "ENHANCEDSTATUSCODES"]
    if not tls:
        if settings.tls is not None:
            lines.append("STARTTLS")
    else:
        # "AUTH=" is the pre-RFC spelling old Outlook and .NET look for.
        lines += ["AUTH PLAIN LOGIN", "AUTH=PLAIN LOGIN"]
    body = "".join(f"250-{x}\r\n" for x in lines[:-1]) + f"250 {lines[-1]}\r\n"
    return body.encode()


def _goodbye() -> Step:
    return say(Reply(421, "4.3.2", "Service shutting down"), CLOSE)


def _no_argument(command: str, arg: str) -> None:
    """RFC 5321 4.1.1: RSET, QUIT, DATA and STARTTLS take no argument."""
    if arg.strip():
        raise Reply(501, "5.5.4", f"Syntax: {command}")


_COMMANDS: dict[str, Callable[[SMTPSession, str], Step]] = {
    name[3:]: getattr(SMTPSession, name) for name in dir(SMTPSession) if name.startswith("do_")
}
