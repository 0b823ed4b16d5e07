"""The reference API as a twistd service: ``twistd -n mxmrelay-refapi --config FILE``.

Start-up fails with one line per problem and exit status 1, never a
traceback: the configuration and the endpoint are checked before anything
starts, and a start that fails later (a port in use) closes the database
thread it opened before it exits, so no thread keeps the process alive.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, NoReturn

from twisted.application import strports
from twisted.application.service import IService, MultiService
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.error import CannotListenError

from mxmrelay_refapi.api import ReferenceAPI
from mxmrelay_refapi.config import ConfigError, RefAPIConfig
from mxmrelay_refapi.users import UserFileError, Users

__all__ = ["ReferenceAPIService", "service_from_options"]

PROGRAM = "mxmrelay-refapi"


class ReferenceAPIService(MultiService):
    """The reference API and its port.

    The database and its worker thread (not a daemon) are opened as the
    service starts, not when it is built, and closed again if the port
    cannot be had.
    """

    def __init__(self, config: RefAPIConfig, reactor: Any) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.api: ReferenceAPI | None = None

    def privilegedStartService(self) -> None:
        config = self.config
        config.database.parent.mkdir(parents=True, exist_ok=True)
        api = self.api = ReferenceAPI.open(config.database, config.token, reactor=self.reactor,
                                           directory=config.directory)
        strports.service(config.endpoint, api.site(), reactor=self.reactor).setServiceParent(self)
        try:
            super().privilegedStartService()
        except BaseException:
            api.close()
            raise

    def stopService(self) -> Deferred[None]:
        d: Deferred[None] = maybeDeferred(super().stopService)
        return d.addBoth(self._closed)

    def _closed(self, result: Any) -> Any:
        if self.api is not None:
            self.api.close()
        return result


class _OneLine(MultiService):
    """Ends a start that fails (a port in use) with one line and exit 1."""

    def __init__(self, service: IService, where: str) -> None:
        super().__init__()
        self.where = where
        service.setServiceParent(self)

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            reason = e.socketError.strerror if isinstance(e.socketError, OSError) else e
            _fail(f"{self.where}: endpoint: {str(reason).lower()}")
        except Exception as e:
            _fail(f"{self.where}: {e}")


def service_from_options(config_path: str | None, reactor: Any = None) -> IService:
    """The service for ``--config``, or one line per problem and exit 1."""
    if reactor is None:
        from twisted.internet import reactor
    if not config_path:
        _fail("--config FILE is required")
    try:
        config = RefAPIConfig.from_file(Path(config_path))
    except ConfigError as e:
        _fail(*str(e).splitlines())
    if config.directory is not None:
        try:
            Users.open(config.directory)
        except UserFileError as e:
            _fail(f"{config_path}: directory: {e}")
    try:
        endpoints.serverFromString(reactor, config.endpoint)
    except (ValueError, TypeError, KeyError) as e:
        _fail(f"{config_path}: endpoint: {config.endpoint!r}: {e or type(e).__name__}")
    return _OneLine(ReferenceAPIService(config, reactor), f"{config_path}")


def _fail(*lines: str) -> NoReturn:
    # The real stderr: twistd sends sys.stderr to its log once started.
    stream = sys.__stderr__ or sys.stderr
    for line in lines:
        print(f"{PROGRAM}: cannot start: {line}", file=stream, flush=True)
    raise SystemExit(1)
