"""What a connection knows of its client, and what a listener's
connections share.

:class:`ConnectionInfo` is written by two hands, the transport side (the
client's address, behind a PROXY header too, and the TLS details) and the
session (the HELO name, the user), and read by a third, the customer's
delivery, which keeps it as the ``twisted.cred`` mind.  It lives apart from
both, so that none of them needs the others to read it.
"""

from __future__ import annotations

import ipaddress
from collections import Counter

import attrs
from twisted.cred.portal import Portal
from twisted.internet import ssl

from mxmrelay.auth import FailureLimiter
from mxmrelay.tls import ReloadableTLS


@attrs.define
class ConnectionInfo:
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
    """The SMTP service's configuration, shared by every connection of a
    process (its limiters and counts are shared state, on purpose)."""

    hostname: str
    portal: Portal
    #: New handshakes take their context from it (swapped by a reload).
    tls: ssl.CertificateOptions | ReloadableTLS | None
    max_message_size: int
    max_recipients: int
    idle_timeout: float
    max_auth_failures: int
    max_connections_per_address: int
    address_limiter: FailureLimiter
    user_limiter: FailureLimiter
    #: Open connections per client address, across this process's listeners.
    open_per_address: Counter[str] = attrs.field(factory=Counter)

    def admit(self, network: str) -> bool:
        """Count a connection from ``network``; False if it is one too many
        (it is counted all the same: :meth:`release` it as any other)."""
        self.open_per_address[network] += 1
        return self.open_per_address[network] <= self.max_connections_per_address

    def release(self, network: str) -> None:
        self.open_per_address[network] -= 1
        if self.open_per_address[network] <= 0:
            del self.open_per_address[network]
