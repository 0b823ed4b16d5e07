"""Start-up: configuration errors become one line and exit status 1.

twistd would otherwise print a traceback for a missing certificate; an
operator needs the file and the reason instead.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NoReturn

from twisted.application.service import IService

from mxmrelay.config import Config, ConfigError
from mxmrelay.directory import InvalidDirectory
from mxmrelay.tls import TLSConfigError


def service_from_options(config_path: str) -> IService:
    from twisted.internet import reactor

    from mxmrelay.service import make_service

    try:
        config = Config.from_file(Path(config_path))
        return make_service(config, reactor)
    except (ConfigError, InvalidDirectory, TLSConfigError) as e:
        _fail(str(e))


def _fail(message: str) -> NoReturn:
    print(f"mxmrelay: cannot start: {message}", file=sys.stderr)
    raise SystemExit(1)
