"""Wiring: from a :class:`~mxmrelay.config.Config` to running services.

Everything that can be wrong in the configuration (files, certificate,
directory) is checked here, before any port is bound, so that start-up
fails with one clear message instead of a relay that fails per message.
"""

from __future__ import annotations

from typing import Any

from twisted.application import strports
from twisted.application.service import MultiService, Service
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocolFactory, IReactorTime
from twisted.internet.ssl import CertificateOptions
from twisted.protocols.tls import TLSMemoryBIOFactory

from mxmrelay.auth import DirectoryChecker, FailureLimiter
from mxmrelay.config import Config
from mxmrelay.delivery import Outbound, Realm
from mxmrelay.directory import IDirectory, TomlDirectory
from mxmrelay.forwarder import Forwarder
from mxmrelay.smtp import Settings, SMTPFactory
from mxmrelay.tls import ImplicitTLSFactory, server_context

#: Seconds of silence on the implicit-TLS port before a client is taken
#: for a plain one waiting for its banner (TLS clients speak at once).
PLAINTEXT_HINT_AFTER = 5.0


class _Cleanup(Service):
    """Runs a function as the service stops (after the listeners)."""

    def __init__(self, stop: Any) -> None:
        self._stop = stop

    def stopService(self) -> Deferred[Any] | None:
        super().stopService()
        result: Deferred[Any] | None = self._stop()
        return result


class _Goodbye(Service):
    """Tells connected clients ``421 4.3.2`` as the relay stops."""

    def __init__(self, factories: list[SMTPFactory]) -> None:
        self._factories = factories

    def stopService(self) -> None:
        super().stopService()
        for factory in self._factories:
            factory.shutdown()


def make_service(config: Config, reactor: Any, directory: IDirectory | None = None) -> MultiService:
    """Build the relay (and the reference API, if configured)."""
    top = MultiService()
    if config.reference_api is not None:
        from mxmrelay.refapi import ReferenceAPI

        ref = config.reference_api
        ref.database.parent.mkdir(parents=True, exist_ok=True)
        api = ReferenceAPI.open(ref.database, ref.token)
        _Cleanup(api.close).setServiceParent(top)
        strports.service(ref.endpoint, api.site(), reactor=reactor).setServiceParent(top)
    if not config.listeners:
        return top
    assert config.delivery_api is not None
    api_cfg = config.delivery_api
    forwarder = Forwarder(reactor, api_cfg.url, api_cfg.token, api_cfg.timeout, api_cfg.ca_file)
    _Cleanup(forwarder.close).setServiceParent(top)
    relay = Relay.build(config, reactor, forwarder, directory)
    for listener in config.listeners:
        factory = relay.factory(listener.role)
        strports.service(listener.endpoint, factory, reactor=reactor).setServiceParent(top)
    _Goodbye(relay.factories).setServiceParent(top)
    return top


class Relay:
    """The relay's protocol factories, one per role, sharing one portal,
    one TLS context and one set of AUTH failure counters."""

    def __init__(self, config: Config, reactor: Any, settings: Settings,
                 tls: CertificateOptions) -> None:
        self.config = config
        self.reactor = reactor
        self.settings = settings
        self.tls = tls
        self.factories: list[SMTPFactory] = []

    @classmethod
    def build(cls, config: Config, reactor: Any, forwarder: Forwarder,
              directory: IDirectory | None = None) -> Relay:
        tls = server_context(config.tls.certificate, config.tls.private_key)
        if directory is None:
            directory = IDirectory(TomlDirectory.from_file(config.directory))
        outbound = Outbound(forwarder, config.hostname, config.bounce_template,
                            config.spool_memory)
        portal = Portal(Realm(outbound), [DirectoryChecker(directory)])
        return cls(config, reactor, settings_for(config, portal, tls, reactor), tls)

    def factory(self, role: str) -> IProtocolFactory:
        """The factory to listen with for ``role``: the SMTP factory, behind
        the implicit-TLS front for ``smtps``."""
        smtp = SMTPFactory(self.settings, role, self.reactor)
        self.factories.append(smtp)
        if role != "smtps":
            return smtp
        return ImplicitTLSFactory(TLSMemoryBIOFactory(self.tls, False, smtp), self.reactor,
                                  PLAINTEXT_HINT_AFTER, self.config.idle_timeout)


def settings_for(config: Config, portal: Portal, tls: Any, clock: IReactorTime) -> Settings:
    a = config.auth
    return Settings(
        hostname=config.hostname,
        portal=portal,
        tls=tls,
        max_message_size=config.max_message_size,
        max_recipients=config.max_recipients,
        idle_timeout=config.idle_timeout,
        max_auth_failures=a.max_failures_per_connection,
        address_limiter=FailureLimiter(clock, a.max_failures_per_address, a.window),
        user_limiter=FailureLimiter(clock, a.max_failures_per_user, a.window),
    )

