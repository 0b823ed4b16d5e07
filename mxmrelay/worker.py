"""One worker process of ``workers = N`` (started by mxmrelay.workers).

``python -m mxmrelay.worker CONFIG --index I --listen ROLE:FD:HAPROXY ...
--control FD``: serve SMTP on inherited listening sockets until SIGTERM or
until the supervisor goes away (its end of the control socket closes).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from pathlib import Path
from typing import Any

from twisted.internet.endpoints import AdoptedStreamServerEndpoint
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import FileLogObserver, formatEventAsClassicLogText, globalLogBeginner
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure

from mxmrelay.config import Config
from mxmrelay.proxy import HeaderFirstEndpoint


class WorkerControl(LineOnlyReceiver):
    """Our end of the control channel: report failures, apply blocks; and
    stop when the supervisor is gone (its end closes)."""

    delimiter = b"\n"
    #: The limits' counters the supervisor keeps (see mxmrelay.supervised_state).
    counters: Any = None

    def __init__(self, limiters: dict[str, Any], reactor: Any,
                 on_reload: Any = None) -> None:
        self.limiters = limiters
        self.reactor = reactor
        #: What ``["reload"]`` (the supervisor's SIGHUP) runs.
        self.on_reload = on_reload

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.counters is not None:
            self.counters.lost()
        if self.reactor.running:
            self.reactor.stop()

    def lineReceived(self, line: bytes) -> None:
        if line.startswith(b'["limited"'):
            if self.counters is not None:
                self.counters.answered(line)
            return
        if line == b'["reload"]':
            if self.on_reload is not None:
                self.on_reload()
            return
        try:
            verb, kind, key, until = json.loads(line)
        except (ValueError, TypeError):
            return
        if verb == "block" and kind in self.limiters:
            self.limiters[kind].block(str(key), float(until))

    def report(self, kind: str, key: str) -> None:
        self.sendLine(json.dumps(["fail", kind, key]).encode())


def tagged(text: str | None, index: int) -> str | None:
    """A classic log line with the worker's number after the namespace
    (``[mxmrelay.smtp#warn] [worker 0] auth failure ...``: the fail2ban
    filter allows for it)."""
    return text and text.replace("] ", f"] [worker {index}] ", 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mxmrelay.worker")
    parser.add_argument("config")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--listen", action="append", default=[])
    parser.add_argument("--control", type=int, required=True)
    args = parser.parse_args(argv)

    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor

    from mxmrelay.reload import hooks
    from mxmrelay.service import InOrder, relay_service

    index = args.index

    def fmt(event: dict[str, Any]) -> str | None:
        return tagged(formatEventAsClassicLogText(event), index)

    config = Config.from_file(Path(args.config))
    observer: Any = FileLogObserver(sys.stdout, fmt)
    if config.log_format == "json":
        from mxmrelay.logs import json_observer

        observer = json_observer(sys.stdout, worker=index)
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    top = InOrder()
    relay = relay_service(config, reactor, top)
    settings = relay.settings
    control = WorkerControl({"address": settings.address_limiter, "user": settings.user_limiter},
                       reactor, relay.reloader.reload)
    # A SIGHUP sent to the worker itself (to the whole process group, say)
    # reloads it too, rather than ending it; each worker watches the files
    # itself when reload_poll asks for it.
    for hook in hooks(reactor, relay.reloader, config.reload_poll):
        hook.setServiceParent(top)
    if config.state.redis is None:
        from mxmrelay.supervised_state import attach

        attach(settings, control, reactor, config.state.timeout)
    settings.address_limiter.on_record = lambda key: control.report("address", key)
    settings.user_limiter.on_record = lambda key: control.report("user", key)
    reactor.adoptStreamConnection(args.control, socket.AF_UNIX,
                                  Factory.forProtocol(lambda: control))
    for spec in args.listen:
        role, fd_text, haproxy = spec.split(":")
        fd = int(fd_text)
        probe = socket.socket(fileno=fd)
        family = probe.family
        probe.detach()  # only looked at: the fd stays open for the port
        endpoint: Any = AdoptedStreamServerEndpoint(reactor, fd, family)
        if haproxy == "1":
            endpoint = HeaderFirstEndpoint(endpoint, reactor)
        endpoint.listen(relay.factory(role, haproxy == "1"))
    from mxmrelay.health import add_serving

    add_serving(top)
    top.startService()
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    reactor.run()


if __name__ == "__main__":
    main()
