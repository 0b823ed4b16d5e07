"""What the SMTP session asks of the protocol that drives it.

The session (:mod:`mxmrelay.session`) never touches a socket: each input
it is given returns a :class:`Step`, the replies to send and at most one
action for the driver (:mod:`mxmrelay.smtp`) to take after sending them.
Keeping these as values is what lets a test read a session's decision
without a transport.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import attrs
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from mxmrelay.reply import Reply


@attrs.frozen
class StartTLS:
    """Send the replies, drop whatever input is not answered yet (RFC 3207
    4.2: nothing sent in plain text runs under TLS), then start TLS."""


@attrs.frozen
class Close:
    """Send the replies, then close the connection."""


@attrs.frozen
class Wait:
    """Answer nothing more until ``result`` fires with the next step: the
    answer to this command is not known yet, and pipelined replies must
    come in order."""

    result: Deferred[Step]


T = TypeVar("T")

START_TLS = StartTLS()
CLOSE = Close()
Action = StartTLS | Close | Wait


@attrs.define
class Step:
    """The replies to send, in order, then what to do."""

    replies: list[bytes] = attrs.Factory(list)
    action: Action | None = None

    @property
    def output(self) -> bytes:
        """The replies as the client reads them."""
        return b"".join(self.replies)

    @property
    def closes(self) -> bool:
        return isinstance(self.action, Close)

    def then(self, later: Step) -> Step:
        """This step's replies and then ``later``'s, with ``later``'s action
        (this one has none, or it would be lost)."""
        assert self.action is None
        return Step(self.replies + later.replies, later.action)


def say(reply: Reply, action: Action | None = None) -> Step:
    """One reply, then ``action``."""
    return Step([reply.encode()], action)


def say_raw(text: bytes, action: Action | None = None) -> Step:
    """A reply that is no :class:`~mxmrelay.reply.Reply`: the greeting, a
    multi-line EHLO, a 334 challenge, the 354."""
    return Step([text], action)


def answer(d: Deferred[T], done: Callable[[T], Step],
           failed: Callable[[Failure], Step]) -> Step:
    """The step ``done`` or ``failed`` makes of ``d``'s result: at once
    when ``d`` has it already (most validations do: then nothing waits, and
    no Deferred more is made), else a :class:`Wait` for it."""
    now: list[Step] = []
    later: list[Deferred[Step]] = []

    def settle(result: T | Failure) -> None:
        step = failed(result) if isinstance(result, Failure) else done(result)
        if later:
            later[0].callback(step)
        else:
            now.append(step)

    d.addBoth(settle)
    if now:
        return now[0]
    later.append(Deferred())
    return Step([], Wait(later[0]))
