"""The reference API's configuration: one small TOML file.

::

    endpoint = "tcp:8025:interface=127.0.0.1"   # a Twisted server endpoint
    database = "../var/refapi.sqlite3"          # relative to this file's folder
    token = "dev-token"                         # the bearer token POSTs need
    directory = "directory.dev.toml"            # optional: the users GET /v1/smtp-users serves

Every mistake is reported with the file and the key, all of them at once,
and a key it does not know is one (a misspelled key must not be ignored).
This reads TOML itself rather than with the relay's helpers: the reference
API imports nothing of the relay, so that it stays an independent reading
of the delivery API contract.
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

__all__ = ["KEYS", "ConfigError", "RefAPIConfig"]

KEYS = ("endpoint", "database", "token")
#: Keys that may be left out.
OPTIONAL = ("directory",)


class ConfigError(Exception):
    """The configuration is unusable: one line per problem, each ``FILE: KEY: reason``."""


@attrs.frozen
class RefAPIConfig:
    endpoint: str
    database: Path
    token: str
    #: The directory TOML file of the platform's users, if served.
    directory: Path | None = None

    @classmethod
    def from_file(cls, path: Path) -> RefAPIConfig:
        try:
            with path.open("rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"{path}: cannot read: {e.strerror}") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from e
        return cls.from_dict(data, path.parent, str(path))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base: Path, where: str) -> RefAPIConfig:
        """The configuration, or :class:`ConfigError` listing every problem."""
        problems = []
        for key in data:
            if key not in KEYS + OPTIONAL:
                close = difflib.get_close_matches(str(key), KEYS + OPTIONAL, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(f"{where}: {key}: unknown key{hint}")
        values = {}
        for key in KEYS + OPTIONAL:
            value = data.get(key)
            if key in OPTIONAL and key not in data:
                continue
            if not isinstance(value, str) or not value.strip():
                problems.append(f"{where}: {key}: missing or not a non-empty string")
            else:
                values[key] = value.strip()
        if problems:
            raise ConfigError("\n".join(problems))
        return cls(endpoint=values["endpoint"], database=base / values["database"],
                   token=values["token"],
                   directory=base / values["directory"] if "directory" in values else None)
