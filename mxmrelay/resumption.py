"""TLS session resumption: a client that comes back skips the full handshake.

Most customers connect once per message (PHPMailer, .NET's SmtpClient, cron
scripts), so the handshake is a large part of a message's cost; a client
that resumes skips the certificate, its signature and its verification.
Both kinds are offered: TLS 1.3 tickets and, for TLS 1.2, session ids (the
server's session cache) and tickets.

OpenSSL keeps the ticket keys and the session cache in the ``SSL_CTX``
a connection was *created* from (its "session context"), even when the
connection then takes its certificate from another context, which is how
SNI works.  A certificate reload builds a new context, with new random
ticket keys and an empty cache, which alone would make every client do a
full handshake after each reload.  So :class:`SessionKeys` creates every
connection from one long-lived context and then gives it the current
certificate's: sessions and tickets survive reloads.  That context is
replaced every :data:`ROTATE_EVERY` seconds with a fresh one (new random
ticket keys, empty cache), so a stolen ticket key opens a day's sessions at
most.

Limits, from what pyOpenSSL offers (no call sets or reads the ticket keys,
and none hooks the session cache): the keys are random per process, so
with ``workers = N`` a client resumes when its next connection lands on
the same worker (about one in N), and after a rotation the previous key is
not kept for decryption (a client does one full handshake then).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from OpenSSL import SSL
from twisted.internet import ssl

#: The same in every context of every relay process, so that a session
#: made under one certificate resumes under the next (OpenSSL refuses to
#: resume a session made under another session id context).
SESSION_ID_CONTEXT = b"mxmrelay-smtp"

#: How long a client may resume a session (seconds): the TLS 1.2 cache
#: entries' lifetime and the TLS 1.3 tickets' lifetime hint.
SESSION_LIFETIME = 2 * 3600

#: How often the ticket keys and the session cache are replaced (seconds).
ROTATE_EVERY = 24 * 3600


def resumable(context: SSL.Context) -> SSL.Context:
    """Set a server context up for resumption (its options must not have
    ``OP_NO_TICKET``: see :func:`mxmrelay.tls.certificate_options`)."""
    context.set_session_id(SESSION_ID_CONTEXT)
    context.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
    context.set_timeout(SESSION_LIFETIME)
    return context


class SessionKeys:
    """Creates the server's connections from one session context at a time.

    ``fresh`` makes a new set of options like the given ones (same
    certificate, new ``SSL_CTX``): the next session context at a rotation.
    """

    def __init__(self, fresh: Callable[[ssl.CertificateOptions], ssl.CertificateOptions],
                 *, rotate_every: float = ROTATE_EVERY,
                 now: Callable[[], float] = time.monotonic) -> None:
        self._fresh = fresh
        self.rotate_every = rotate_every
        self._now = now
        self._holder: SSL.Context | None = None
        self._since = 0.0

    def connection(self, options: ssl.CertificateOptions) -> SSL.Connection:
        """A server connection that resumes from the session context and
        presents ``options``' certificate."""
        current = options.getContext()
        now = self._now()
        if self._holder is None:
            self._holder, self._since = current, now
        elif now - self._since >= self.rotate_every:
            self._holder, self._since = self._fresh(options).getContext(), now
        connection = SSL.Connection(self._holder, None)
        if current is not self._holder:
            connection.set_context(current)
        return connection
