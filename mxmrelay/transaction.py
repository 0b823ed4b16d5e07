"""One mail transaction, from MAIL FROM to the end of DATA: its envelope,
and the one message the avatar makes for it (however many recipients:
one transaction is one send)."""

from __future__ import annotations

from collections.abc import Callable

import attrs
from twisted.internet.defer import Deferred, maybeDeferred

from mxmrelay.datareader import DataReader, IBulkMessage
from mxmrelay.reply import Reply


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

    def add_recipient(self, address: str, new_message: Callable[[], IBulkMessage]) -> None:
        self.recipients.append(address)
        if self.new_message is None:
            self.new_message = new_message

    def start_data(self, max_size: int) -> None:
        assert self.new_message is not None
        message = self.message = self.new_message()
        self.reader = DataReader(message.write, message.connectionLost, max_size)

    @property
    def error(self) -> Reply | None:
        """Why the message was refused while it came (size, a long line,
        the spool), if it was."""
        return None if self.reader is None else self.reader.error

    @property
    def size(self) -> int:
        return 0 if self.reader is None else self.reader.size

    def end(self) -> Deferred[str]:
        """The message is complete: fires with the send id, or fails with
        the :class:`~mxmrelay.reply.Reply` refusing it."""
        assert self.message is not None
        message, self.message = self.message, None
        return maybeDeferred(message.eomReceived)

    def discard(self) -> None:
        """The connection is gone mid-message."""
        if self.message is not None:
            self.message.connectionLost()
            self.message = None
