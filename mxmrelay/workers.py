"""Several relay processes on one machine: ``workers = N``.

One Python process uses one core; an operator with eight cores runs eight
workers.  The supervisor (the twistd process) binds the listening sockets
once, or takes them from systemd socket activation, and starts N worker
processes that inherit them and accept from the same queues; it restarts
a worker that dies.  What must exist once stays in the supervisor: the
AUTH failure counts, which workers report over a socket pair and which
come back as blocks for every worker, so an attacker meets one limit
however connections are spread.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory, ProcessProtocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure

from mxmrelay import health
from mxmrelay.auth import FailureLimiter
from mxmrelay.config import Config, ConfigError, Listener
from mxmrelay.endpoints import LISTEN_BACKLOG, split_endpoint, without_proxy
from mxmrelay.supervised_state import ASK, SupervisorCounters

log = Logger(namespace="mxmrelay.workers")


@attrs.frozen
class Inherited:
    """A listening socket a worker takes over: its role, and whether a
    PROXY protocol header comes first."""

    role: str
    fd: int
    haproxy: bool


def bind(listener: Listener) -> tuple[socket.socket, bool]:
    """Open the listening socket for one listener (supervisor side).

    Supports ``tcp:PORT[:interface=ADDR][:backlog=N]`` and
    ``systemd:domain=INET|INET6:index=N``, each optionally behind
    ``haproxy:``: the endpoints whose socket can be handed to a child.
    """
    desc, haproxy = without_proxy(listener.endpoint)
    kind, args, kwargs = split_endpoint(desc)
    if kind == "tcp" and args:
        host = kwargs.get("interface", "")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, int(args[0])))
        sock.listen(int(kwargs.get("backlog", LISTEN_BACKLOG)))
    elif kind == "systemd":
        # Twisted's own parser knows the inherited descriptors (it takes
        # LISTEN_FDS/LISTEN_PID out of the environment when it is imported).
        from twisted.internet import reactor
        from twisted.internet.endpoints import AdoptedStreamServerEndpoint, serverFromString

        try:
            endpoint = serverFromString(reactor, desc)
        except (IndexError, KeyError, ValueError) as e:
            raise ConfigError(f"{listener.endpoint}: no such socket from systemd ({e})") from e
        assert isinstance(endpoint, AdoptedStreamServerEndpoint)
        sock = socket.socket(fileno=os.dup(endpoint.fileno))
    else:
        raise ConfigError(f"{listener.endpoint}: with workers > 1 a listener's endpoint must be "
                          "tcp:PORT, systemd:domain=...:index=N, or either behind haproxy:")
    sock.setblocking(False)
    return sock, haproxy


class SupervisorControl(LineOnlyReceiver):
    """The supervisor's end of one worker's control channel.

    A worker sends ``["fail", "address"|"user", KEY]``; the supervisor
    counts, and when a key crosses its limit sends ``["block", KIND, KEY,
    UNTIL]`` to every worker, and ``["reload"]`` on SIGHUP.  One JSON array
    a line: a key, which a client chose, can never add a line of its own.
    """

    delimiter = b"\n"

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def connectionMade(self) -> None:
        self.supervisor.channels.add(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.supervisor.channels.discard(self)
        self.supervisor.counters.forget(self)

    def lineReceived(self, line: bytes) -> None:
        if line.startswith(ASK):  # the limits' counters (without Redis)
            answer = self.supervisor.counters.answer(self, line)
            if answer is not None:
                self.sendLine(answer)
            return
        try:
            verb, kind, key = json.loads(line)
        except (ValueError, TypeError):
            return
        limiter = self.supervisor.limiters.get(kind)
        if verb != "fail" or limiter is None or not isinstance(key, str):
            return
        until = limiter.record(key)
        if until is not None:
            message = json.dumps(["block", kind, key, until]).encode()
            for channel in self.supervisor.channels:
                channel.sendLine(message)


class _Worker(ProcessProtocol):
    def __init__(self, supervisor: Supervisor, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.ended: Deferred[None] = Deferred()
        self.started = 0.0
        self.pid: int | None = None

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)
        self.supervisor.ended(self, reason)


class Supervisor(Service):
    """Starts, restarts and stops the worker processes."""

    def __init__(self, config_path: Path, config: Config, reactor: Any) -> None:
        self.config_path = config_path
        self.count = config.workers
        self.reactor = reactor
        clock: IReactorTime = reactor
        a = config.auth
        self.limiters = {
            "address": FailureLimiter(clock, a.max_failures_per_address, a.window),
            "user": FailureLimiter(clock, a.max_failures_per_user, a.window),
        }
        #: The sending limits' counters, for every worker (without Redis).
        self.counters = SupervisorCounters(clock)
        self.sockets = [(listener.role, *bind(listener)) for listener in config.listeners]
        self.channels: set[SupervisorControl] = set()
        self.workers: dict[int, _Worker] = {}
        self.transports: dict[int, Any] = {}
        self.backoff: dict[int, float] = {}
        self.grace = (config.delivery_api.timeout if config.delivery_api else 30) + 10
        #: Told each ended worker's pid (its live metrics leave the sums).
        self.worker_gone: Callable[[int], None] = lambda pid: None

    def startService(self) -> None:
        super().startService()
        for i in range(self.count):
            self.spawn(i)

    def spawn(self, index: int) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        child_fds: dict[int, Any] = {0: "w", 1: 1, 2: 2}
        argv = [sys.executable, "-m", "mxmrelay.worker", str(self.config_path),
                "--index", str(index)]
        for n, (role, sock, haproxy) in enumerate(self.sockets):
            child_fds[3 + n] = sock.fileno()
            argv += ["--listen", f"{role}:{3 + n}:{int(haproxy)}"]
        control_fd = 3 + len(self.sockets)
        child_fds[control_fd] = theirs.fileno()
        argv += ["--control", str(control_fd)]
        worker = _Worker(self, index)
        worker.started = self.reactor.seconds()
        self.transports[index] = self.reactor.spawnProcess(
            worker, sys.executable, argv, env=dict(os.environ), childFDs=child_fds)
        theirs.close()
        self.reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX,
                                           Factory.forProtocol(lambda: SupervisorControl(self)))
        ours.close()
        self.workers[index] = worker
        worker.pid = self.transports[index].pid
        log.info("worker {index} started pid={pid}", index=index,
                 pid=self.transports[index].pid)

    def ended(self, worker: _Worker, reason: Failure) -> None:
        if worker.pid is not None:
            self.worker_gone(worker.pid)
        if self.workers.get(worker.index) is not worker:
            return
        del self.workers[worker.index]
        if not self.running:
            return
        # A worker that dies at once waits longer each time (up to 30 s),
        # so a broken configuration does not spin.
        lived = self.reactor.seconds() - worker.started
        delay = 0.5 if lived > 30 else min(30.0, 2 * self.backoff.get(worker.index, 0.25))
        self.backoff[worker.index] = delay
        log.warn("worker {index} ended ({reason}); restarting in {delay}s", index=worker.index,
                 reason=reason.getErrorMessage(), delay=delay)
        self.reactor.callLater(delay, self._respawn, worker.index)

    def _respawn(self, index: int) -> None:
        if self.running and index not in self.workers:
            self.spawn(index)

    def reload(self) -> None:
        """SIGHUP: every worker reloads (see mxmrelay/reload.py) and logs
        its own outcome; a worker starting meanwhile reads the files anew."""
        log.info("reload: asking {count} workers", count=len(self.channels))
        for channel in self.channels:
            channel.sendLine(json.dumps(["reload"]).encode())

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        workers = list(self.workers.values())
        for w in workers:
            self._signal(w.index, signal.SIGTERM)
        timer = self.reactor.callLater(self.grace, self._kill, workers)
        for w in workers:
            await w.ended
        if timer.active():
            timer.cancel()
        for _, sock, _ in self.sockets:
            sock.close()

    def _kill(self, workers: list[_Worker]) -> None:
        for w in workers:
            if not w.ended.called:
                self._signal(w.index, signal.SIGKILL)

    def _signal(self, index: int, sig: int) -> None:
        try:
            self.transports[index].signalProcess(sig)
        except Exception:  # noqa: S110 - the process is already gone
            pass


def make_supervised_service(config: Config, config_path: Path, reactor: Any) -> MultiService:
    from mxmrelay.reload import OnSignal
    from mxmrelay.service import InOrder

    top = InOrder()
    # The metrics folder first: the workers inherit it, and it is removed
    # only once they have ended.
    gone = health.shared_folder(top) if config.metrics is not None else None
    supervisor = Supervisor(config_path.resolve(), config, reactor)
    supervisor.setServiceParent(top)
    if gone is not None:
        supervisor.worker_gone = gone
        health.add_listener(config, reactor, top)
    OnSignal(reactor, supervisor.reload).setServiceParent(top)
    return top
