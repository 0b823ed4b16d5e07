"""The relay's configuration: one TOML file, validated whole at start.

Every mistake stops start-up with the file, the key and the reason, so an
operator never meets a half-configured relay at the first message.
Relative paths are taken relative to the configuration file's folder, so
the same file works whatever directory twistd was started from.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

ROLES = ("smtp", "submission", "smtps")
"""Listener roles: ``smtp`` is the port-25 role and ``submission`` the 587
role (both plain, then STARTTLS, which is required), ``smtps`` the 465 role
(TLS from the first byte)."""


class ConfigError(Exception):
    """The configuration is invalid; the message says where and why."""


def read_toml(path: Path, error: type[Exception]) -> dict[str, Any]:
    """A TOML file's contents, or ``error`` naming the file and the reason."""
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise error(f"{path}: cannot read: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise error(f"{path}: not valid TOML: {e}") from e


@attrs.frozen
class Listener:
    role: str
    #: A Twisted server endpoint string: ``tcp:587``, ``systemd:domain=INET:index=0``,
    #: ``haproxy:tcp:587``...
    endpoint: str


@attrs.frozen
class TLSConfig:
    certificate: Path
    private_key: Path


@attrs.frozen
class AuthConfig:
    #: Failed AUTHs after which one connection is closed with 421.
    max_failures_per_connection: int = 3
    #: Failures allowed per client address, and per user, within ``window``.
    max_failures_per_address: int = 10
    max_failures_per_user: int = 5
    window: float = 600.0
    #: Seconds a successful login is remembered (0: never).
    cache_ttl: float = 300.0


@attrs.frozen
class DeliveryAPIConfig:
    #: The full URL that sends are POSTed to.
    url: str
    token: str
    #: Seconds for the whole API call, well under a client's DATA timeout.
    timeout: float = 30.0
    #: A PEM file of CA certificates for a private PKI; the system store otherwise.
    ca_file: Path | None = None


@attrs.frozen
class ReferenceAPIConfig:
    endpoint: str
    database: Path
    token: str


@attrs.frozen
class Config:
    hostname: str
    directory: Path
    listeners: tuple[Listener, ...]
    tls: TLSConfig
    bounce_template: str
    delivery_api: DeliveryAPIConfig | None
    reference_api: ReferenceAPIConfig | None = None
    auth: AuthConfig = AuthConfig()
    max_message_size: int = 25 * 1024 * 1024
    max_recipients: int = 100
    idle_timeout: float = 300.0
    #: Simultaneous connections from one client address (per process).
    max_connections_per_address: int = 100
    #: Messages larger than this are spooled to a temporary file.
    spool_memory: int = 512 * 1024
    #: Relay processes sharing the listening sockets (see mxmrelay/workers.py).
    workers: int = 1

    @classmethod
    def from_file(cls, path: Path) -> Config:
        return cls.from_dict(read_toml(path, ConfigError), path.parent, str(path))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base: Path, where: str) -> Config:
        r = _Reader(data, base, where)
        listeners = []
        for i, item in enumerate(r.tables("listener")):
            lr = r.sub(item, f"listener[{i}]")
            role = lr.string("role")
            if role not in ROLES:
                raise lr.error("role", f"must be one of {', '.join(ROLES)}")
            listeners.append(Listener(role=role, endpoint=lr.string("endpoint")))
        # What only the relay needs; a configuration that runs the
        # reference API alone (no listeners) may leave it out.
        relay = bool(listeners) or any(k in data for k in ("hostname", "directory", "tls"))
        hostname, directory = ("localhost", base) if not relay else (
            r.string("hostname"), r.path("directory"))
        tls = TLSConfig(base, base)
        if relay:
            t = r.sub(r.table("tls"), "tls")
            tls = TLSConfig(certificate=t.path("certificate"), private_key=t.path("private_key"))
        bounce = "{id}@unused.invalid"
        if relay or "bounce_address" in data:
            bounce = r.string("bounce_address")
            if "{id}" not in bounce or "@" not in bounce:
                raise r.error("bounce_address", "must be an address containing {id}")
            try:
                bounce.format(id="x")
            except (KeyError, ValueError, IndexError) as e:
                raise r.error("bounce_address", f"bad template: {e}") from e
        delivery = None
        if "delivery_api" in data:
            d = r.sub(r.table("delivery_api"), "delivery_api")
            url = d.string("url")
            if not url.startswith(("https://", "http://")):
                raise d.error("url", "must be an http:// or https:// URL")
            delivery = DeliveryAPIConfig(
                url=url,
                token=d.string("token"),
                timeout=d.number("timeout", 30.0, low=0.1, high=600),
                ca_file=d.path("ca_file") if "ca_file" in d.data else None,
            )
        reference = None
        if "reference_api" in data:
            a = r.sub(r.table("reference_api"), "reference_api")
            reference = ReferenceAPIConfig(
                endpoint=a.string("endpoint"),
                database=a.path("database"),
                token=a.string("token"),
            )
        if not listeners and reference is None:
            raise r.error("listener", "no [[listener]] and no [reference_api]: nothing to run")
        if listeners and delivery is None:
            raise r.error("delivery_api", "listeners need a [delivery_api] to forward to")
        auth = AuthConfig()
        if "auth" in data:
            a = r.sub(r.table("auth"), "auth")
            auth = AuthConfig(
                max_failures_per_connection=a.integer("max_failures_per_connection", 3, low=1),
                max_failures_per_address=a.integer("max_failures_per_address", 10, low=1),
                max_failures_per_user=a.integer("max_failures_per_user", 5, low=1),
                window=a.number("window", 600.0, low=1),
                cache_ttl=a.number("cache_ttl", 300.0, low=0),
            )
        return cls(
            hostname=hostname,
            directory=directory,
            listeners=tuple(listeners),
            tls=tls,
            bounce_template=bounce,
            delivery_api=delivery,
            reference_api=reference,
            auth=auth,
            max_message_size=r.integer("max_message_size", 25 * 1024 * 1024, low=1024),
            max_recipients=r.integer("max_recipients", 100, low=1, high=10_000),
            idle_timeout=r.number("idle_timeout", 300.0, low=1),
            max_connections_per_address=r.integer("max_connections_per_address", 100, low=1),
            spool_memory=r.integer("spool_memory", 512 * 1024, low=1),
            workers=r.workers(),
        )


@attrs.frozen
class _Reader:
    """Typed access to one TOML table, with errors that name the key."""

    data: Mapping[str, Any]
    base: Path
    where: str
    prefix: str = ""

    def error(self, key: str, reason: str) -> ConfigError:
        return ConfigError(f"{self.where}: {self.prefix}{key}: {reason}")

    def sub(self, data: Mapping[str, Any], name: str) -> _Reader:
        return _Reader(data, self.base, self.where, f"{self.prefix}{name}.")

    def table(self, key: str) -> Mapping[str, Any]:
        value = self.data.get(key)
        if not isinstance(value, dict):
            raise self.error(key, "missing table")
        return value

    def tables(self, key: str) -> list[Mapping[str, Any]]:
        value = self.data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.error(key, f"must be an array of tables ([[{key}]])")
        return value

    def string(self, key: str) -> str:
        value = self.data.get(key)
        if not isinstance(value, str) or not value.strip():
            raise self.error(key, "missing or not a non-empty string")
        return value.strip()

    def path(self, key: str) -> Path:
        return self.base / Path(self.string(key))

    def integer(self, key: str, default: int, low: int = 0, high: int | None = None) -> int:
        value = self.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, "must be an integer")
        if value < low or (high is not None and value > high):
            raise self.error(key, f"must be between {low} and {high or 'any'}")
        return value

    def workers(self) -> int:
        """``workers``: a count, or "auto" for one per core."""
        if self.data.get("workers") == "auto":
            return max(1, min(256, len(os.sched_getaffinity(0))))
        return self.integer("workers", 1, low=1, high=256)

    def number(self, key: str, default: float, low: float = 0, high: float | None = None) -> float:
        value = self.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(key, "must be a number")
        if value < low or (high is not None and value > high):
            raise self.error(key, f"must be between {low} and {high or 'any'}")
        return float(value)
