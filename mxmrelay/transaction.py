"""One mail transaction, from MAIL FROM to the end of DATA: its envelope,
and the one message the avatar makes for it (however many recipients:
one transaction is one send).

The session (:mod:`mxmrelay.session`) decides when a command may come;
this module what its argument may be, and what the end of DATA answers.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
from twisted.internet.defer import maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from mxmrelay import metrics
from mxmrelay.actions import Step, answer, say
from mxmrelay.connection import ConnectionInfo, Settings
from mxmrelay.datareader import DataReader, IBulkMessage
from mxmrelay.envelope import MAX_PATH, mail_parameters, need_smtputf8, parse_path_command
from mxmrelay.explain import Queued
from mxmrelay.limiter import Reservation
from mxmrelay.reply import Reply, quote

log = Logger(namespace="mxmrelay.smtp")


def sender(arg: str, *, esmtp: bool, settings: Settings, user: str | None) -> tuple[str, bool]:
    """MAIL FROM's argument: the address, and whether SMTPUTF8 was
    declared.  Raises the :class:`~mxmrelay.reply.Reply` refusing it."""
    path = parse_path_command(arg, which="FROM", esmtp=esmtp)
    smtputf8 = mail_parameters(path.params, settings.max_message_size)
    if not path.address.isascii() and not smtputf8:
        raise need_smtputf8()
    if not path.address:
        raise Reply(553, "5.7.1", f"<>: Sender address rejected: not owned by user "
                                  f"{quote(user or '', MAX_PATH)}")
    return path.address, smtputf8


def refused(f: Failure, client: str) -> Step:
    """An avatar's or a message's refusal as the reply; any other failure
    as a temporary one (and logged: it is a bug or an outage)."""
    if isinstance(f.value, Reply):
        return say(f.value)
    log.failure("error client={client}", f, client=client)
    return say(Reply(451, "4.3.0", "Temporary failure, try again later"))


@attrs.define
class Transaction:
    mail_from: str
    #: MAIL FROM declared SMTPUTF8: recipients may be UTF-8 too.
    smtputf8: bool
    recipients: list[str] = attrs.Factory(list)
    #: The avatar's message factory, as the first accepted RCPT gave it.
    new_message: Callable[[], IBulkMessage] | None = None
    message: IBulkMessage | None = None
    reader: DataReader | None = None
    #: The send MAIL FROM reserved against the space's limits: kept by a
    #: 250 at the end of DATA, given back by anything else (so a refused
    #: or failed send uses no quota).
    reservation: Reservation | None = None
    #: Told of a refusal at the end of DATA, with the header section if
    #: it was read (for the customer's refusal reports).
    report: Callable[[Reply, bytes | None], None] | None = None

    def _refused(self, reply: Reply, message: IBulkMessage) -> None:
        if self.report is not None:
            self.report(reply, getattr(message, "header_section", None))

    def _settle(self, kept: bool) -> None:
        if self.reservation is not None:
            if kept:
                self.reservation.keep()
            else:
                self.reservation.give_back()

    def abandon(self) -> None:
        """The transaction ends before DATA (RSET, EHLO, STARTTLS, QUIT):
        its send is given back.  (Once DATA has begun, the end of DATA or
        :meth:`discard` settles it.)"""
        if self.reader is None:
            self._settle(False)

    def recipient(self, arg: str, *, esmtp: bool, max_recipients: int) -> str:
        """RCPT TO's argument: the address.  Raises the
        :class:`~mxmrelay.reply.Reply` refusing it."""
        path = parse_path_command(arg, which="TO", esmtp=esmtp)
        if not path.address:
            raise Reply(501, "5.1.3", "Bad recipient address syntax")
        for key in path.params:
            raise Reply(555, "5.5.4", f"Unsupported option: {quote(key)}")
        if not path.address.isascii() and not self.smtputf8:
            raise need_smtputf8()
        if len(self.recipients) >= max_recipients:
            raise Reply(452, "4.5.3", "Too many recipients")
        return path.address

    def add_recipient(self, address: str, new_message: Callable[[], IBulkMessage]) -> None:
        self.recipients.append(address)
        if self.new_message is None:
            self.new_message = new_message

    def start_data(self, max_size: int) -> None:
        assert self.new_message is not None
        message = self.message = self.new_message()
        self.reader = DataReader(message.write, message.connectionLost, max_size)

    def end(self, info: ConnectionInfo) -> Step:
        """The message is complete: the reply once it is sent, or why not."""
        message, reader = self.message, self.reader
        assert message is not None and reader is not None
        self.message = None
        if reader.error is not None:
            metrics.transaction_ended(reader.error.code, reader.size)
            self._settle(False)
            self._refused(reader.error, message)
            return say(reader.error)
        # One log line per transaction, written once its answer is known.
        facts = {"client": info.client, "user": info.user, "sender": self.mail_from,
                 "rcpts": len(self.recipients), "size": reader.size}

        def done(result: str | Queued) -> Step:
            queued = result if isinstance(result, Queued) else Queued(result)
            send_id = queued.id
            log.info("sent id={id} client={client} user={user} from={sender} rcpts={rcpts} "
                     "size={size}", id=send_id, **facts)
            self._settle(True)
            metrics.transaction_ended(250, reader.size)
            # The last line stays "250 2.0.0 Ok: queued as <id>"; the lines
            # before it, if any, explain the rules' decision.
            return Step([queued.encode()])

        def failed(f: Failure) -> Step:
            self._settle(False)
            step = refused(f, info.client)
            if isinstance(f.value, Reply):
                self._refused(f.value, message)
            metrics.transaction_ended(f.value.code if isinstance(f.value, Reply) else 451,
                                      reader.size)
            log.info("refused reply={reply} client={client} user={user} from={sender} "
                     "rcpts={rcpts} size={size}", reply=str(f.value), **facts)
            return step

        return answer(maybeDeferred(message.eomReceived), done, failed)

    def discard(self) -> None:
        """The connection is gone: before DATA or mid-message, the send is
        given back (after it, the end of DATA's answer settles it)."""
        if self.reader is None or self.message is not None:
            self._settle(False)
        if self.message is not None:
            self.message.connectionLost()
            self.message = None
