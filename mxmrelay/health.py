"""The operator's listener: ``/metrics``, ``/healthz`` and ``/readyz``.

It is a listener of its own (``[metrics] endpoint``), never an SMTP port,
so that a scrape or a load balancer's check reaches it however busy or
firewalled the mail ports are.  With ``workers = N`` it lives in the
supervisor, which records nothing itself and reads the workers' values
from the shared multiprocess folder, so one scrape is the sum over every
worker, dead ones' counters included (see :mod:`mxmrelay.metrics`).

``/healthz`` says the process serves HTTP (200).  ``/readyz`` says whether
it should be sent mail: 200 when a relay process is listening with its
directory loaded and the delivery API answered within
``api_answered_within`` seconds, or answers a probe now; else 503 with the
reason, one line of plain text.  The probe is ``HEAD`` on the delivery
API's URL with the relay's token: any answer below 500 other than 401/403
counts (a 405 is fine: the API need only be there and accept the token).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import attrs
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from twisted.application import strports
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from mxmrelay import metrics
from mxmrelay.config import Config

log = Logger(namespace="mxmrelay.health")

#: Seconds a readiness probe of the delivery API may take, at most (a load
#: balancer's check gives up after a few seconds).
PROBE_TIMEOUT = 5.0


def registry_for(path: str | None) -> CollectorRegistry:
    """What a scrape shows: this process's registry, or the sum of every
    process's files in the multiprocess folder ``path``."""
    if path is None:
        return REGISTRY
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path)
    return registry


@attrs.define
class Readiness:
    """Decides ``/readyz``: None when ready, else the reason."""

    clock: IReactorTime
    #: A relay process listens with its directory loaded.
    serving: Callable[[], bool]
    #: When the delivery API last answered (Unix time), or None.
    last_answer: Callable[[], float | None]
    #: Ask the API now: fires with None (it answered) or the reason.
    probe: Callable[[], Deferred[str | None]]
    #: Seconds an answer counts as fresh.
    window: float
    _probe_ok: float | None = None
    _probing: list[Deferred[str | None]] | None = None
    #: Said after "ready" without making it 503: the limits' Redis is not
    #: answering (mail flows, each relay counting alone).
    note: Callable[[], str | None] = lambda: None

    def check(self) -> Deferred[str | None]:
        if not self.serving():
            return _now("no relay process is listening with its directory loaded")
        answered = max((t for t in (self.last_answer(), self._probe_ok) if t is not None),
                       default=None)
        if answered is not None and self.clock.seconds() - answered <= self.window:
            return _now(None)
        # One probe at a time, shared by every check that arrives meanwhile.
        d: Deferred[str | None] = Deferred()
        if self._probing is not None:
            self._probing.append(d)
            return d
        self._probing = [d]
        self.probe().addBoth(self._probed)
        return d

    def _probed(self, result: str | Failure | None) -> None:
        if isinstance(result, Failure):
            log.failure("readiness probe failed", result)
            result = "delivery API probe failed"
        if result is None:
            self._probe_ok = self.clock.seconds()
        waiting, self._probing = self._probing or [], None
        for d in waiting:
            d.callback(result)


def _now(value: str | None) -> Deferred[str | None]:
    d: Deferred[str | None] = Deferred()
    d.callback(value)
    return d


class _Text(Resource):
    isLeaf = True

    def __init__(self, text: bytes) -> None:
        super().__init__()
        self.text = text

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        return self.text


class MetricsPage(Resource):
    """The exposition, read when asked (from memory, or from the shared
    folder's few small files: no thread needed)."""

    isLeaf = True

    def __init__(self, registry: Callable[[], CollectorRegistry]) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode())
        body: bytes = generate_latest(self.registry())
        return body


class ReadyPage(Resource):
    isLeaf = True

    def __init__(self, readiness: Readiness) -> None:
        super().__init__()
        self.readiness = readiness

    def render_GET(self, request: Request) -> Any:
        def answer(reason: str | None) -> None:
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            request.setHeader(b"Cache-Control", b"no-store")
            if reason is not None:
                request.setResponseCode(503)
            note = self.readiness.note() if reason is None else None
            body = (f"ready: {note}\n" if note else "ready\n" if reason is None
                    else f"not ready: {reason}\n").encode()
            if not request.finished and not getattr(request, "_disconnected", False):
                if request.method != b"HEAD":
                    request.write(body)
                request.finish()

        self.readiness.check().addCallback(answer)
        return NOT_DONE_YET


class _QuietSite(Site):
    """No access log: a scrape every 15 s and a load balancer's check
    every few seconds would drown the relay's own lines."""

    def log(self, request: http.Request) -> None:
        pass


def site(registry: Callable[[], CollectorRegistry], readiness: Readiness) -> Site:
    root = _Text(b"mxmrelay: /metrics /healthz /readyz\n")
    root.isLeaf = False
    root.putChild(b"metrics", MetricsPage(registry))
    root.putChild(b"healthz", _Text(b"ok\n"))
    root.putChild(b"readyz", ReadyPage(readiness))
    made = _QuietSite(root)
    made.noisy = False
    made.displayTracebacks = False
    return made


class _Serving(Service):
    """Says, through :data:`metrics.SERVING`, that the listeners started
    before it are bound (and the directory they need is loaded)."""

    def startService(self) -> None:
        super().startService()
        metrics.SERVING.set(1)

    def stopService(self) -> None:
        metrics.SERVING.set(0)
        super().stopService()


def add_serving(parent: MultiService) -> None:
    """Mark this process as serving once the services before it started."""
    _Serving().setServiceParent(parent)


def add_listener(config: Config, reactor: Any, parent: Any) -> None:
    """The metrics listener, added to ``parent`` (an ``InOrder``, whose
    start-up errors then name ``metrics.endpoint``)."""
    assert config.metrics is not None and config.delivery_api is not None
    path = metrics.multiprocess_dir()
    api = config.delivery_api
    from mxmrelay.forwarder import Forwarder

    prober = Forwarder(reactor, api.url, api.token, min(api.timeout, PROBE_TIMEOUT),
                       api.ca_file)
    # A new connection each time: "can the relay reach the API now?", which
    # a kept-alive connection to a server that stopped listening hides.
    prober.pool.persistent = False

    def sample(name: str) -> float | None:
        value: float | None = registry_for(path).get_sample_value(name)
        return value

    readiness = Readiness(
        clock=reactor,
        serving=lambda: (sample("mxmrelay_processes_serving") or 0) >= 1,
        last_answer=lambda: sample("mxmrelay_delivery_api_last_answer_timestamp_seconds"),
        probe=prober.probe,
        window=config.metrics.api_answered_within,
        note=lambda: ("limits counted by each relay alone: redis unreachable"
                      if config.state.redis is not None
                      and sample("mxmrelay_state_shared") == 0 else None))
    service = strports.service(config.metrics.endpoint, site(lambda: registry_for(path),
                                                             readiness), reactor=reactor)
    service.setServiceParent(parent)
    parent.labels[service] = f"metrics.endpoint {config.metrics.endpoint}"
    # Closed as the service stops, so no connection outlives it.
    closer = Service()
    closer.stopService = prober.close  # type: ignore[method-assign]
    closer.setServiceParent(parent)


class _RemoveFolder(Service):
    def __init__(self, path: str) -> None:
        self.path = path

    def stopService(self) -> None:
        super().stopService()
        shutil.rmtree(self.path, ignore_errors=True)


def shared_folder(parent: MultiService) -> Callable[[int], None]:
    """``workers = N``: a new, empty multiprocess folder for this start
    (under ``TMPDIR``; removed as ``parent`` stops, after the workers), in
    this process's environment so the workers inherit it.  Returns what to
    call with a worker's pid when it ends: its live gauges (connections
    open, sends in flight) leave the sums; its counters stay."""
    from prometheus_client.multiprocess import mark_process_dead

    path = tempfile.mkdtemp(prefix="mxmrelay-metrics-")
    metrics.use_multiprocess(path)
    _RemoveFolder(path).setServiceParent(parent)
    return lambda pid: mark_process_dead(pid, path)
