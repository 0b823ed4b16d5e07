"""Wiring: from a :class:`~mxmrelay.config.Config` to running services.

Everything that can be wrong in the configuration (files, certificate,
directory) is checked here, before any port is bound, so that start-up
fails with one clear message instead of a relay that fails per message.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService, Service
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IProtocolFactory, IReactorTime
from twisted.protocols.tls import TLSMemoryBIOFactory

from mxmrelay import health, proxy
from mxmrelay import limiter as limits
from mxmrelay.auth import CredentialCache, DirectoryChecker
from mxmrelay.config import Config, DeliveryAPIConfig
from mxmrelay.delivery import Outbound, Realm
from mxmrelay.directory import IDirectory, TomlDirectory
from mxmrelay.endpoints import with_backlog
from mxmrelay.forwarder import Forwarder
from mxmrelay.platform_directory import PlatformDirectory
from mxmrelay.refusals import RefusalPoster, RefusalQueue, refusals_url
from mxmrelay.reload import ReloadableDirectory, Reloader, hooks
from mxmrelay.smtp import Settings, SMTPFactory
from mxmrelay.tls import ImplicitTLSFactory, ReloadableTLS, server_context

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


class StartFailed(Exception):
    """A service could not start; the message names it and says why."""


class InOrder(MultiService):
    """A MultiService that stops its children one after the other, last
    first (MultiService stops them all at once): listeners, then goodbyes
    and the sends in flight, then the forwarder.

    When one child fails to start, what the others started and would keep
    the process alive is released at once (see :meth:`abandon`), and
    :class:`StartFailed` names the child by its label (``listener[1]
    tcp:2587``), so that start-up can end with one line and a plain exit.
    """

    def __init__(self) -> None:
        super().__init__()
        #: What to call a child in a start-up error (its key and endpoint).
        self.labels: dict[object, str] = {}

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)
        self._each("privilegedStartService")

    def startService(self) -> None:
        Service.startService(self)
        self._each("startService")

    def _each(self, step: str) -> None:
        for service in self:
            try:
                getattr(service, step)()
            except StartFailed:
                self.abandon()
                raise
            except Exception as e:
                self.abandon()
                name = self.labels.get(service) or service.name or type(service).__name__
                raise StartFailed(f"{name}: {_reason(e)}") from e

    def abandon(self) -> None:
        """After a failed start: release, without the reactor (which is not
        running), whatever a child started that outlives a failed start."""
        for service in reversed(list(self)):
            abandon = getattr(service, "abandon", None)
            if abandon is not None:
                abandon()

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop_all())

    async def _stop_all(self) -> None:
        for service in reversed(list(self)):
            await maybeDeferred(service.stopService)


class _Goodbye(Service):
    """Tells connected clients ``421 4.3.2`` as the relay stops, and waits
    (at most ``grace`` seconds) for sends in flight to get their answer."""

    def __init__(self, factories: list[SMTPFactory], clock: IReactorTime, grace: float) -> None:
        self._factories = factories
        self._clock = clock
        self._grace = grace

    def stopService(self) -> Deferred[None]:
        super().stopService()
        for factory in self._factories:
            factory.shutdown()
        done: Deferred[None] = Deferred()

        def finish() -> None:
            if not done.called:
                done.callback(None)

        # Past the grace, stop anyway (whatever is left is cut off).
        timer = self._clock.callLater(self._grace, finish)
        drained = gatherResults([f.drained() for f in self._factories])
        drained.addCallback(lambda _: timer.cancel() if timer.active() else None)
        drained.addCallback(lambda _: finish())
        return done


def _reason(e: Exception) -> str:
    """Why a service could not start, in a few words (``address already in
    use`` rather than CannotListenError's sentence about it)."""
    if isinstance(e, CannotListenError) and isinstance(e.socketError, OSError):
        text = e.socketError.strerror or str(e.socketError)
        return text[:1].lower() + text[1:]
    return str(e) or type(e).__name__


def make_service(config: Config, reactor: Any, directory: IDirectory | None = None) -> MultiService:
    """Build the relay: its forwarder, factories and listeners."""
    top = InOrder()
    relay = relay_service(config, reactor, top, directory)
    for hook in hooks(reactor, relay.reloader, config.reload_poll):
        hook.setServiceParent(top)
    for listener in config.listeners:
        factory = relay.factory(listener.role, listener.endpoint.startswith("haproxy:"))
        proxy.service(with_backlog(listener.endpoint), factory,
                         reactor=reactor).setServiceParent(top)
    added = list(top)[-len(config.listeners):]
    for i, (listener, service) in enumerate(zip(config.listeners, added, strict=True)):
        top.labels[service] = f"listener[{i}] {listener.endpoint}"
    health.add_serving(top)
    if config.metrics is not None:
        health.add_listener(config, reactor, top)
    return top


def relay_service(config: Config, reactor: Any, parent: MultiService,
                  directory: IDirectory | None = None) -> Relay:
    """The relay's forwarder and factories, stopped cleanly with ``parent``
    (``parent`` should be an :class:`InOrder`, so that the listeners added
    after this stop first and the forwarder closes last)."""
    assert config.delivery_api is not None
    api_cfg = config.delivery_api
    forwarder = Forwarder(reactor, api_cfg.url, api_cfg.token, api_cfg.timeout, api_cfg.ca_file)
    _Cleanup(forwarder.close).setServiceParent(parent)
    if directory is None and config.platform_directory is not None:
        platform = PlatformDirectory.open(config.platform_directory, reactor)
        _Cleanup(platform.close).setServiceParent(parent)
        directory = platform
    queue = refusal_queue(api_cfg, reactor, parent)
    relay = Relay.build(config, reactor, forwarder, directory, refusals=queue)
    limits.share(relay.settings, parent)
    _Goodbye(relay.factories, reactor, api_cfg.timeout + 5).setServiceParent(parent)
    return relay


def refusal_queue(api: DeliveryAPIConfig, reactor: Any,
                  parent: MultiService) -> RefusalQueue | None:
    """The queue of refusal reports (mxmrelay/refusals.py), stopped with
    ``parent``; None when ``refusals_url`` says none."""
    url = refusals_url(api.url) if api.refusals_url is None else api.refusals_url
    if not url:
        return None
    poster = RefusalPoster(reactor, url, api.token, api.timeout, api.ca_file)
    queue = RefusalQueue(reactor, poster)
    _Cleanup(poster.close).setServiceParent(parent)
    _Cleanup(queue.stop).setServiceParent(parent)
    return queue


class Relay:
    """The relay's protocol factories, one per role, sharing one portal,
    one TLS context and one set of AUTH failure counters."""

    def __init__(self, config: Config, reactor: Any, settings: Settings,
                 tls: ReloadableTLS, reloader: Reloader | None = None) -> None:
        self.config = config
        self.reactor = reactor
        self.settings = settings
        self.tls = tls
        self.factories: list[SMTPFactory] = []
        #: Re-reads the directory file and the certificate (SIGHUP).
        self.reloader = reloader or Reloader(config, tls, None, None)

    @classmethod
    def build(cls, config: Config, reactor: Any, forwarder: Forwarder,
              directory: IDirectory | None = None,
              refusals: RefusalQueue | None = None) -> Relay:
        tls = ReloadableTLS(server_context(config.tls.certificate, config.tls.private_key))
        reloadable = None
        if directory is None and config.directory is not None:
            reloadable = ReloadableDirectory(config.directory,
                                             TomlDirectory.from_file(config.directory))
            directory = IDirectory(reloadable)
        if directory is None:
            raise ValueError("no directory: neither a file nor one passed in")
        limiter = limits.build(config, reactor)
        outbound = Outbound(forwarder, config.hostname, config.bounce_template,
                            config.spool_memory, limiter, refusals)
        cache = CredentialCache(reactor, config.auth.cache_ttl)
        portal = Portal(Realm(outbound), [DirectoryChecker(directory, cache=cache)])
        return cls(config, reactor, settings_for(config, portal, tls, reactor), tls,
                   Reloader(config, tls, reloadable, cache))

    def factory(self, role: str, proxied: bool = False) -> IProtocolFactory:
        """The factory to listen with for ``role``: the SMTP factory, behind
        the implicit-TLS front for ``smtps``.  ``proxied``: the endpoint
        reads a PROXY-protocol header first."""
        smtp = SMTPFactory(self.settings, role, self.reactor, proxied)
        self.factories.append(smtp)
        if role != "smtps":
            return smtp
        return ImplicitTLSFactory(TLSMemoryBIOFactory(self.tls, False, smtp), self.reactor,
                                  PLAINTEXT_HINT_AFTER)


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
        max_connections_per_address=config.max_connections_per_address,
        address_limiter=limits.SharedFailureLimiter(clock, a.max_failures_per_address, a.window),
        user_limiter=limits.SharedFailureLimiter(clock, a.max_failures_per_user, a.window),
    )

