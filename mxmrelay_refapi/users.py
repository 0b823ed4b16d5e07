"""The platform's customer users, as ``GET /v1/smtp-users/{email}`` serves them.

They are read from a directory TOML file in the relay's file format
(``[[customer]]`` and ``[[user]]`` tables; see etc/directory.dev.toml),
read here anew, without the relay's code: the reference API is an
independent reading of the contract in docs/delivery-api.yaml.

The file is read again when it changes (its size or modification time), so
that a test or a developer can add a user or change a password "on the
platform" by editing it.  A file that no longer reads keeps the users read
last, with a log line saying why.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
from twisted.logger import Logger

__all__ = ["UserFileError", "Users"]

_log = Logger()

_CUSTOMER_FIELDS = ("id", "name", "domains", "flags", "from_flags", "allow_subdomains")
#: A space's keys answered only when the file sets them: ``explain`` and
#: the sending limits over the relay's ``[limits]``, as written (the relay
#: judges the values, as it judges the platform's).
_CUSTOMER_OPTIONAL = ("explain", "sends_per_second", "burst", "sends_per_day",
                      "sessions_per_user", "allowed_networks")
#: A user's keys answered only when the file sets them.
_USER_OPTIONAL = ("allowed_networks", "sandbox")


class UserFileError(Exception):
    """The directory file cannot be served; the message names file and key."""


def _read(path: Path) -> dict[str, dict[str, Any]]:
    """Each user's answer (a JSON-ready dict), by lower-cased address."""
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise UserFileError(f"{path}: cannot read: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise UserFileError(f"{path}: not valid TOML: {e}") from e
    spaces: dict[str, dict[str, Any]] = {}
    for i, c in enumerate(_tables(data, "customer", path)):
        spaces[_text(c, "id", f"customer[{i}]", path)] = _space(c, f"customer[{i}]", path)
    users: dict[str, dict[str, Any]] = {}
    for i, u in enumerate(_tables(data, "user", path)):
        where = f"user[{i}]"
        email = _text(u, "email", where, path)
        space = spaces.get(_text(u, "customer", where, path))
        if space is None:
            raise UserFileError(f"{path}: {where}.customer: names no customer space")
        users[email.lower()] = {"email": email,
                                "password_hash": _text(u, "password", where, path),
                                "customer": space,
                                **_optional(u, _USER_OPTIONAL)}
    return users


def _tables(data: Mapping[str, Any], name: str, path: Path) -> list[Mapping[str, Any]]:
    value = data.get(name, [])
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise UserFileError(f"{path}: {name}: must be an array of tables")
    return value


def _text(table: Mapping[str, Any], key: str, where: str, path: Path) -> str:
    value = table.get(key)
    if not isinstance(value, str) or not value.strip():
        raise UserFileError(f"{path}: {where}.{key}: missing or not a string")
    return value.strip()


def _space(c: Mapping[str, Any], where: str, path: Path) -> dict[str, Any]:
    unknown = sorted(set(c) - set(_CUSTOMER_FIELDS) - set(_CUSTOMER_OPTIONAL))
    if unknown:
        raise UserFileError(f"{path}: {where}.{unknown[0]}: unknown key")
    domains = c.get("domains")
    if not isinstance(domains, list) or not domains or not all(
            isinstance(d, str) and d for d in domains):
        raise UserFileError(f"{path}: {where}.domains: must be a non-empty list of names")
    from_flags = c.get("from_flags", {})
    if not isinstance(from_flags, dict):
        raise UserFileError(f"{path}: {where}.from_flags: must be a table")
    return {
        "id": _text(c, "id", where, path),
        "name": str(c.get("name", c["id"])),
        "domains": list(domains),
        "allow_subdomains": bool(c.get("allow_subdomains", False)),
        "flags": c.get("flags", 0),
        "from_flags": dict(from_flags),
        **_optional(c, _CUSTOMER_OPTIONAL),
    }


def _optional(table: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: table[k] for k in keys if k in table}


@attrs.define
class Users:
    """The users of one directory file, re-read when the file changes."""

    path: Path
    _users: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    _seen: tuple[int, int] | None = None

    @classmethod
    def open(cls, path: Path) -> Users:
        """Read the file now: a file that does not read stops start-up."""
        users = cls(path)
        users._users = _read(path)
        users._seen = users._stamp()
        return users

    def _stamp(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def find(self, email: str) -> dict[str, Any] | None:
        """The answer for ``email`` (case-insensitive), or None."""
        stamp = self._stamp()
        if stamp != self._seen:
            self._seen = stamp
            try:
                self._users = _read(self.path)
            except UserFileError as e:
                _log.error("directory file not re-read, the last users stay: {reason}",
                           reason=str(e))
        return self._users.get(email.lower())
