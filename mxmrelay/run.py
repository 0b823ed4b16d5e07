"""Start-up: every failure becomes one line and exit status 1.

twistd would otherwise print a traceback for a missing certificate or a
port in use; an operator needs the file, the key and the reason instead.

Everything that can be wrong in the files is checked *before* the service
is built, by the checks ``mxmrelay-check`` runs (see mxmrelay/check.py).
What can only fail as the service starts (a port in use) is turned into
one line by :class:`_OneLine`.  Nothing is started before then (and
:class:`~mxmrelay.service.InOrder` releases what a service started when a
later one fails), so a plain ``SystemExit`` ends the process: no thread is
left to keep it alive.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, NoReturn

from twisted.application.service import IService, MultiService
from twisted.python.components import Componentized

from mxmrelay.config import ConfigError
from mxmrelay.directory import InvalidDirectory
from mxmrelay.tls import TLSConfigError


def service_from_options(config_path: str) -> IService:
    from twisted.internet import reactor

    from mxmrelay.check import check
    from mxmrelay.service import make_service

    report = check(Path(config_path), reactor, activated=True)
    for warning in report.warnings:
        _say(f"mxmrelay: warning: {warning}")
    if report.config is None:
        _fail(*map(str, report.errors))
    config = report.config
    try:
        if config.workers > 1:
            from mxmrelay.workers import make_supervised_service

            top = make_supervised_service(config, Path(config_path), reactor)
        else:
            top = make_service(config, reactor)
    except (ConfigError, InvalidDirectory, TLSConfigError) as e:
        _fail(f"{config_path}: {e}")
    except OSError as e:
        # The supervisor of workers = N binds its listeners as it is built.
        _fail(f"{config_path}: listener: {e.strerror or e}")
    return _OneLine(top, config.log_format)


class _OneLine(MultiService):
    """Ends a start that fails (a port in use, say) with one line and exit
    status 1 instead of twistd's traceback.

    The service under it has already released what it had started (see
    :class:`~mxmrelay.service.InOrder`), so the process can simply exit.
    """

    def __init__(self, service: IService, log_format: str = "text") -> None:
        super().__init__()
        self.log_format = log_format
        service.setServiceParent(self)

    def setServiceParent(self, parent: Any) -> None:
        # twistd logs through the application's ILogObserver when it has
        # one (set before twistd starts logging): the JSON format, to the
        # standard output of now (later it is redirected into the log).
        if self.log_format == "json" and isinstance(parent, Componentized):
            from twisted.logger import ILogObserver

            from mxmrelay.logs import json_observer

            parent.setComponent(ILogObserver, json_observer(sys.stdout))
        super().setServiceParent(parent)

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except Exception as e:
            _fail(str(e))

    def startService(self) -> None:
        try:
            super().startService()
        except Exception as e:
            _fail(str(e))


def _say(line: str) -> None:
    # The real stderr: twistd sends sys.stderr to its log once started,
    # which would wrap the line in a timestamp and a log prefix.
    stream = sys.__stderr__ or sys.stderr
    print(line, file=stream, flush=True)


def _fail(*lines: str) -> NoReturn:
    for line in lines:
        _say(f"mxmrelay: cannot start: {line}")
    sys.stdout.flush()
    raise SystemExit(1)
