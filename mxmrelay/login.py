"""The AUTH command's exchange (RFC 4954): PLAIN and LOGIN, the login
through the ``twisted.cred`` portal, and the failure limits.

Part of the session (:mod:`mxmrelay.session` asks it once its sequence
checks pass), kept apart because it is the one part with secrets and
limits of its own: the per-connection failure count, the shared
per-address and per-user limiters, and the log line fail2ban reads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.logger import Logger
from twisted.mail.smtp import IMessageDelivery
from twisted.python.failure import Failure

from mxmrelay import auth, metrics
from mxmrelay.actions import CLOSE, Step, answer, say, say_raw
from mxmrelay.connection import ConnectionInfo, Settings
from mxmrelay.directory import DirectoryError
from mxmrelay.reply import Reply

#: RFC 4954 4: an AUTH response line may be 12,288 octets.
AUTH_LINE_LIMIT = 12288

_USERNAME = b"334 VXNlcm5hbWU6\r\n"  # "Username:"
_PASSWORD = b"334 UGFzc3dvcmQ6\r\n"  # "Password:"

log = Logger(namespace="mxmrelay.smtp")

#: What the client's next line answers, in an exchange.
Expecting = Literal["plain", "username", "password"]


class Login:
    """One connection's authentication: the exchange in progress, then
    the avatar it won."""

    def __init__(self, settings: Settings, info: ConnectionInfo) -> None:
        self.settings = settings
        self.info = info
        #: The ``IMessageDelivery`` avatar, once logged in.
        self.avatar: Any = None
        self._logout: Callable[[], None] | None = None
        #: In an exchange: what the next line is.
        self.expecting: Expecting | None = None
        self._username = ""
        self._failures = 0

    def start(self, arg: str) -> Step:
        """``AUTH mechanism [initial-response]``, the session's checks passed.

        Raises the :class:`~mxmrelay.reply.Reply` of a refusal."""
        mechanism, _, initial = arg.strip().partition(" ")
        mechanism = mechanism.upper()
        if not mechanism:
            raise Reply(501, "5.5.4", "Syntax: AUTH mechanism")
        if mechanism not in ("PLAIN", "LOGIN"):
            raise Reply(504, "5.5.4", "Unrecognized authentication type")
        if self.settings.address_limiter.blocked(self.info.network):
            log.warn("auth rate limited rhost={client}", client=self.info.client)
            metrics.auth_blocked("address")
            raise Reply(454, "4.7.0", "Temporary authentication failure")
        initial = initial.strip()
        if mechanism == "PLAIN":
            if initial:
                return self._login(*auth.parse_plain(auth.decode_response(initial.encode())))
            self.expecting = "plain"
            return say_raw(b"334 \r\n")
        if initial:
            self._username = auth.decode_text(auth.decode_response(initial.encode()), name=True)
            self.expecting = "password"
            return say_raw(_PASSWORD)
        self.expecting = "username"
        return say_raw(_USERNAME)

    def respond(self, line: bytes) -> Step:
        """The client's answer to a 334."""
        expecting, self.expecting = self.expecting, None
        if len(line) > AUTH_LINE_LIMIT:
            return say(line_too_long())
        try:
            response = auth.decode_response(line)
            if expecting == "plain":
                return self._login(*auth.parse_plain(response))
            if expecting == "username":
                self._username = auth.decode_text(response, name=True)
                self.expecting = "password"
                return say_raw(_PASSWORD)
            return self._login(self._username, auth.decode_text(response))
        except Reply as reply:
            return say(reply)

    def cancel(self) -> None:
        """The exchange ends unanswered (its line was too long)."""
        self.expecting = None

    def logout(self) -> None:
        if self._logout is not None:
            self._logout()
            self._logout = None

    def _login(self, username: str, password: str) -> Step:
        client = self.info.client
        if self.settings.user_limiter.blocked(username.lower()):
            log.warn("auth rate limited rhost={client} user={user}", client=client,
                     user=printable(username))
            metrics.auth_blocked("user")
            raise Reply(454, "4.7.0", "Temporary authentication failure")
        creds = UsernamePassword(username.encode("utf-8"), password.encode("utf-8"))
        d = self.settings.portal.login(creds, self.info, IMessageDelivery)

        def done(result: tuple[Any, Any, Callable[[], None]]) -> Step:
            _, self.avatar, self._logout = result
            self.info.user = username
            metrics.auth_attempt("success")
            log.info("auth ok client={client} user={user}", client=client,
                     user=printable(username))
            return say(Reply(235, "2.7.0", "Authentication successful"))

        def failed(f: Failure) -> Step:
            if f.check(UnauthorizedLogin):
                metrics.auth_attempt("failure")
                self._failures += 1
                self.settings.address_limiter.record(self.info.network)
                self.settings.user_limiter.record(username.lower())
                # fail2ban: failregex = auth failure rhost=<HOST>
                log.warn("auth failure rhost={client} user={user}", client=client,
                         user=printable(username))
                if self._failures >= self.settings.max_auth_failures:
                    return say(Reply(421, "4.7.0", "Too many authentication failures"), CLOSE)
                return say(Reply(535, "5.7.8", "Authentication credentials invalid"))
            if isinstance(f.value, Reply):
                # A sending limit refused the login after its password
                # passed (logged there): 535 from outside allowed_networks,
                # 421 past the user's sessions (then goodbye).
                return say(f.value, CLOSE if f.value.code == 421 else None)
            metrics.auth_attempt("error")
            if not f.check(DirectoryError):
                log.failure("auth error client={client}", f, client=client)
            return say(Reply(454, "4.7.0", "Temporary authentication failure"))

        return answer(d, done, failed)


def line_too_long() -> Reply:
    return Reply(500, "5.5.6", "Authentication exchange line is too long")


def printable(text: str) -> str:
    """A client-chosen string made safe for one log line (a user name
    with a newline must not forge a second, fail2ban-matching line)."""
    return text if text.isprintable() else ascii(text)[1:-1]
