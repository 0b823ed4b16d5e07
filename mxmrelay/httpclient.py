"""The relay's HTTP client to the platform: one treq client per API, with a
persistent connection pool and the TLS policy its ``ca_file`` asks for.

Both the forwarder (``[delivery_api]``) and the platform directory
(``[directory] url``) build their client here, so that a private PKI and
the per-host endpoints are set up one way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
from treq.client import HTTPClient
from twisted.internet import ssl
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.web.client import URI, Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

__all__ = ["Endpoints", "make_agent", "make_client", "tls_policy"]


def tls_policy(ca_file: Path | None) -> BrowserLikePolicyForHTTPS:
    """Verify the API's certificate against ``ca_file`` (a PEM file of CA
    certificates, for a private PKI), or the system store without one."""
    if ca_file is None:
        return BrowserLikePolicyForHTTPS()
    roots = ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(ca_file.read_bytes())])
    return BrowserLikePolicyForHTTPS(trustRoot=roots)


def make_client(reactor: Any, ca_file: Path | None, *, per_host: int = 64,
                persistent: bool = True) -> tuple[HTTPClient, HTTPConnectionPool]:
    """A treq client and its pool (close the pool's cached connections at stop)."""
    agent, pool = make_agent(reactor, ca_file, per_host=per_host, persistent=persistent)
    return HTTPClient(agent), pool


def make_agent(reactor: Any, ca_file: Path | None, *, per_host: int = 64,
               persistent: bool = True) -> tuple[Agent, HTTPConnectionPool]:
    """The Agent a treq client wraps, and its pool: for a request made many
    times a second to one URL, which needs none of what treq adds per
    request (the URL re-encoded and its host IDNA-checked, a cookie jar,
    redirects, gzip), the Agent itself."""
    pool = HTTPConnectionPool(reactor, persistent=persistent)
    pool.maxPersistentPerHost = per_host
    endpoints = Endpoints(reactor, tls_policy(ca_file))
    return Agent.usingEndpointFactory(reactor, endpoints, pool=pool), pool


@implementer(IAgentEndpointFactory)
@attrs.define
class Endpoints:
    """One endpoint per API host, made once: Agent's default factory makes
    a new one (IDNA-encoding the host) for every request, even when the
    pool then reuses a connection."""

    reactor: Any
    policy: BrowserLikePolicyForHTTPS
    _made: dict[tuple[bytes, bytes, int], Any] = attrs.field(factory=dict)

    def endpointForURI(self, uri: URI) -> Any:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._made.get(key)
        if endpoint is None:
            endpoint = HostnameEndpoint(self.reactor, uri.host, uri.port)
            if uri.scheme == b"https":
                creator = self.policy.creatorForNetloc(uri.host, uri.port)
                endpoint = wrapClientTLS(creator, endpoint)
            self._made[key] = endpoint
        return endpoint
