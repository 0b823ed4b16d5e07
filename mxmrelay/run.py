"""Start-up: configuration errors become one line and exit status 1.

twistd would otherwise print a traceback for a missing certificate; an
operator needs the file and the reason instead.

Everything that can be wrong is checked *before* the service is built:
building it with a ``[reference_api]`` starts that API's database worker
thread, which is not a daemon, so a failure after it (a bad certificate, a
bad directory, a bad endpoint string) used to print its message and then
leave the process hanging instead of exiting 1.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from twisted.application.service import IService
from twisted.internet import endpoints

from mxmrelay.config import Config, ConfigError
from mxmrelay.directory import InvalidDirectory, TomlDirectory
from mxmrelay.tls import TLSConfigError, server_context


def service_from_options(config_path: str) -> IService:
    from twisted.internet import reactor

    from mxmrelay.service import make_service

    try:
        config = Config.from_file(Path(config_path))
        check(config, config_path, reactor)
        if config.workers > 1:
            from mxmrelay.workers import make_supervised_service

            return make_supervised_service(config, Path(config_path), reactor)
        return make_service(config, reactor)
    except (ConfigError, InvalidDirectory, TLSConfigError, OSError) as e:
        _fail(str(e))


def check(config: Config, where: str, reactor: Any) -> None:
    """Load what the service will load, and parse every endpoint string,
    without starting or binding anything."""
    named = [(f"listener[{i}].endpoint", x.endpoint) for i, x in enumerate(config.listeners)]
    if config.reference_api is not None:
        named.append(("reference_api.endpoint", config.reference_api.endpoint))
    for key, description in named:
        try:
            endpoints.serverFromString(reactor, description)
        except IndexError:
            # systemd:domain=INET:index=N without that many inherited sockets.
            raise ConfigError(
                f"{where}: {key}: {description!r}: no such socket passed by systemd "
                "(start the service through its .socket unit)") from None
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{where}: {key}: {description!r}: {e}") from e
    if config.listeners:
        server_context(config.tls.certificate, config.tls.private_key)
        TomlDirectory.from_file(config.directory)


def _fail(message: str) -> NoReturn:
    print(f"mxmrelay: cannot start: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    # os._exit, not SystemExit: a half-built service may already have started
    # a non-daemon thread (the reference API's database worker, opened before
    # the workers' supervisor binds its sockets), and the interpreter would
    # wait for it forever: a start-up error must end the process.
    os._exit(1)
