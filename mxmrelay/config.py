"""The relay's configuration: one TOML file, validated whole at start.

Every mistake stops start-up with the file, the key and the reason, so an
operator never meets a half-configured relay at the first message.  Every
mistake is collected, not just the first, so that ``mxmrelay-check`` can
list them all in one run; a key the relay does not know is a mistake too
(a misspelled limit would otherwise silently keep its default).
Relative paths are taken relative to the configuration file's folder, so
the same file works whatever directory twistd was started from.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from mxmrelay import limits_keys, opsconfig
from mxmrelay.limits import Limits

ROLES = ("smtp", "submission", "smtps")
"""Listener roles: ``smtp`` is the port-25 role and ``submission`` the 587
role (both plain, then STARTTLS, which is required), ``smtps`` the 465 role
(TLS from the first byte)."""

#: The keys of each table; anything else is refused (see :func:`unknown_keys`).
TOP_KEYS = ("hostname", "directory", "bounce_address", "max_message_size", "max_recipients",
            "idle_timeout", "max_connections_per_address", "spool_memory", "workers",
            "tls", "listener", "delivery_api", "auth", "metrics", "log_format",
            "limits", "state", "reload_poll")
TLS_KEYS = ("certificate", "private_key")
LISTENER_KEYS = ("role", "endpoint")
DELIVERY_KEYS = ("url", "token", "timeout", "ca_file", "refusals_url")
#: ``[directory]``: ``file``, or ``url`` and the keys after it.
DIRECTORY_KEYS = ("file", "url", "token", "timeout", "ca_file", "ttl", "negative_ttl",
                  "stale_ttl", "cache_entries")
#: A table this file once had: the reference API is a program of its own now.
MOVED = {"reference_api": "the reference API now runs on its own, as "
                          "`twistd mxmrelay-refapi --config FILE` (see the README)"}
AUTH_KEYS = ("max_failures_per_connection", "max_failures_per_address",
             "max_failures_per_user", "window", "cache_ttl")


@attrs.frozen
class Problem:
    """One mistake: the file, the key (dotted, ``listener[1].role``), why."""

    file: str
    key: str
    reason: str

    def __str__(self) -> str:
        return ": ".join(x for x in (self.file, self.key, self.reason) if x)


class ConfigError(Exception):
    """The configuration is invalid; the message says where and why.

    ``problems`` holds every mistake found (one per line of the message);
    ``partial`` what could be read anyway, for ``mxmrelay-check`` to go on
    checking the files that valid keys point to.
    """

    def __init__(self, message: str, problems: Sequence[Problem] = (),
                 partial: Config | None = None) -> None:
        super().__init__(message)
        self.problems = tuple(problems)
        self.partial = partial

    @classmethod
    def of(cls, problems: Sequence[Problem], partial: Config | None = None) -> ConfigError:
        return cls("\n".join(map(str, problems)), problems, partial)


def read_toml(path: Path, error: type[Exception]) -> dict[str, Any]:
    """A TOML file's contents, or ``error`` naming the file and the reason."""
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise error(f"{path}: cannot read: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise error(f"{path}: not valid TOML: {e}") from e


def unknown_keys(data: Mapping[str, Any], known: Collection[str]) -> list[tuple[str, str]]:
    """``(key, reason)`` for each key of ``data`` not in ``known``, with the
    closest known key as a suggestion when one is close enough."""
    found = []
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            found.append((str(key), f"unknown key{hint}"))
    return found


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
    #: Where refusal records are POSTed (mxmrelay/refusals.py): None for
    #: beside ``url``'s ``/sends``, "" for nowhere.
    refusals_url: str | None = None


@attrs.frozen
class PlatformDirectoryConfig:
    """``[directory] url = ...``: users from the platform's API (see
    mxmrelay/platform_directory.py), with the cache's timings."""

    url: str
    token: str
    #: Seconds for one lookup; the client waits for its AUTH reply meanwhile.
    timeout: float = 5.0
    ca_file: Path | None = None
    #: Seconds a found user, and an unknown address, are reused.
    ttl: float = 60.0
    negative_ttl: float = 10.0
    #: Seconds after the platform's answer that it still serves while the
    #: platform fails.
    stale_ttl: float = 3600.0
    cache_entries: int = 100_000


@attrs.frozen
class Config:
    hostname: str
    #: The directory file; None when the directory is the platform's.
    directory: Path | None
    listeners: tuple[Listener, ...]
    tls: TLSConfig
    bounce_template: str
    delivery_api: DeliveryAPIConfig | None
    auth: AuthConfig = AuthConfig()
    platform_directory: PlatformDirectoryConfig | None = None
    max_message_size: int = 25 * 1024 * 1024
    max_recipients: int = 100
    idle_timeout: float = 300.0
    #: Simultaneous connections from one client address (per process).
    max_connections_per_address: int = 100
    #: Messages larger than this are spooled to a temporary file.
    spool_memory: int = 512 * 1024
    #: Relay processes sharing the listening sockets (see mxmrelay/workers.py).
    workers: int = 1
    #: Seconds between looks at the directory file and the certificate and
    #: key for a change, which then reloads them (mxmrelay/reload.py); 0: never.
    reload_poll: float = 0.0
    #: The file it was read from, as given: start-up errors name it.
    source: str = "config"
    #: ``[metrics]``: the operator's listener; None: none.
    metrics: opsconfig.MetricsConfig | None = None
    #: ``text`` (the default) or ``json`` (one object a line).
    log_format: str = "text"
    #: ``[limits]``: the sending limits' defaults (each space may override them).
    limits: Limits = attrs.Factory(Limits)
    #: ``[state]``: where the limits' and AUTH failures' counters live.
    state: limits_keys.StateConfig = attrs.Factory(limits_keys.StateConfig)

    @classmethod
    def from_file(cls, path: Path) -> Config:
        try:
            data = read_toml(path, ConfigError)
        except ConfigError as e:
            raise ConfigError.of([Problem(str(path), "", str(e).split(": ", 1)[1])]) from e
        return cls.from_dict(data, path.parent, str(path))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base: Path, where: str) -> Config:
        """The configuration, or :class:`ConfigError` with every problem.

        A table that moved elsewhere is the one problem reported: the rest
        of such a file was written for another layout.
        """
        moved = [Problem(where, key, reason) for key, reason in MOVED.items() if key in data]
        if moved:
            raise ConfigError.of(moved)
        r = _Reader(data, base, where, [])
        config = _parse(r)
        if r.problems:
            raise ConfigError.of(r.problems, config)
        return config


def _parse(r: _Reader) -> Config:
    data = r.data
    r.known(TOP_KEYS)
    listeners = []
    for i, item in enumerate(r.tables("listener")):
        lr = r.sub(item, f"listener[{i}]", LISTENER_KEYS)
        role = lr.string("role")
        if role and role not in ROLES:
            lr.problem("role", f"must be one of {', '.join(ROLES)}")
        listeners.append(Listener(role=role, endpoint=lr.string("endpoint")))
    if not listeners:
        r.problem("listener", "no [[listener]]: nothing to run")
    hostname = r.string("hostname")
    directory, platform_directory = _directory(r)
    tls = TLSConfig(r.base, r.base)
    t = r.section("tls", TLS_KEYS)
    if t is not None:
        tls = TLSConfig(certificate=t.path("certificate"), private_key=t.path("private_key"))
    bounce = _bounce(r)
    delivery = None
    d = r.section("delivery_api", DELIVERY_KEYS) if "delivery_api" in data else None
    if "delivery_api" not in data:
        r.problem("delivery_api", "listeners need a [delivery_api] to forward to")
    if d is not None:
        url = d.string("url")
        if url and not url.startswith(("https://", "http://")):
            d.problem("url", "must be an http:// or https:// URL")
        delivery = DeliveryAPIConfig(
            url=url,
            token=d.string("token"),
            timeout=d.number("timeout", 30.0, low=0.1, high=600),
            ca_file=d.path("ca_file") if "ca_file" in d.data else None,
            refusals_url=_refusals_url(d),
        )
    auth = AuthConfig()
    a = r.section("auth", AUTH_KEYS) if "auth" in data else None
    if a is not None:
        auth = AuthConfig(
            max_failures_per_connection=a.integer("max_failures_per_connection", 3, low=1),
            max_failures_per_address=a.integer("max_failures_per_address", 10, low=1),
            max_failures_per_user=a.integer("max_failures_per_user", 5, low=1),
            window=a.number("window", 600.0, low=1),
            cache_ttl=a.number("cache_ttl", 300.0, low=0),
        )
    return Config(
        hostname=hostname,
        directory=directory,
        listeners=tuple(listeners),
        tls=tls,
        bounce_template=bounce,
        delivery_api=delivery,
        auth=auth,
        platform_directory=platform_directory,
        max_message_size=r.integer("max_message_size", 25 * 1024 * 1024, low=1024),
        max_recipients=r.integer("max_recipients", 100, low=1, high=10_000),
        idle_timeout=r.number("idle_timeout", 300.0, low=1),
        max_connections_per_address=r.integer("max_connections_per_address", 100, low=1),
        spool_memory=r.integer("spool_memory", 512 * 1024, low=1),
        workers=r.workers(),
        reload_poll=r.number("reload_poll", 0.0, low=0, high=3600),
        source=r.where,
        metrics=opsconfig.metrics(r),
        log_format=opsconfig.log_format(r),
        limits=limits_keys.limits(r),
        state=limits_keys.state(r),
    )


def _directory(r: _Reader) -> tuple[Path | None, PlatformDirectoryConfig | None]:
    """``directory = "FILE"``, or a ``[directory]`` table with ``file`` or
    with ``url`` (the platform's API) and its keys."""
    value = r.data.get("directory")
    if not isinstance(value, dict):
        return r.path("directory"), None
    d = r.sub(value, "directory", DIRECTORY_KEYS)
    if ("file" in value) == ("url" in value):
        r.problem("directory", "give exactly one of file and url")
        return None, None
    if "file" in value:
        for key in DIRECTORY_KEYS[2:]:
            if key in value:
                d.problem(key, "only with url (a directory file has no cache)")
        return d.path("file"), None
    url = d.string("url")
    reason = url_problem(url) if url else None
    if reason:
        d.problem("url", reason)
    token = d.string("token")
    if token and not (token.isascii() and token.isprintable() and " " not in token):
        d.problem("token", "must be printable ASCII without spaces")
    ttl = d.number("ttl", 60.0, low=0, high=86_400)
    return None, PlatformDirectoryConfig(
        url=url.rstrip("/"),
        token=token,
        timeout=d.number("timeout", 5.0, low=0.1, high=60),
        ca_file=d.path("ca_file") if "ca_file" in value else None,
        ttl=ttl,
        negative_ttl=d.number("negative_ttl", 10.0, low=0, high=3_600),
        stale_ttl=d.number("stale_ttl", 3600.0, low=0, high=7 * 86_400),
        cache_entries=d.integer("cache_entries", 100_000, low=1, high=10_000_000),
    )


def url_problem(url: str) -> str | None:
    """Why ``url`` is no base URL to append ``/{email}`` to, or None."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        return f"not a valid URL: {e}"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http:// or https:// URL with a host"
    if parts.query or parts.fragment or "?" in url or "#" in url:
        return "must have no ?query or #fragment (the address is appended as a path segment)"
    if parts.username is not None or port == 0:
        return "must have no user:password@ and no port 0"
    return None


def _bounce(r: _Reader) -> str:
    bounce = r.string("bounce_address")
    if not bounce:
        return "{id}@unused.invalid"
    if "{id}" not in bounce or "@" not in bounce:
        r.problem("bounce_address", "must be an address containing {id}")
        return bounce
    try:
        bounce.format(id="x")
    except (KeyError, ValueError, IndexError) as e:
        r.problem("bounce_address", f"bad template: {e}")
    return bounce


@attrs.frozen
class _Reader:
    """Typed access to one TOML table.  A mistake is recorded as a
    :class:`Problem` naming the key, and reading goes on with a stand-in
    value, so that one pass finds every mistake."""

    data: Mapping[str, Any]
    base: Path
    where: str
    problems: list[Problem]
    prefix: str = ""

    def problem(self, key: str, reason: str) -> None:
        self.problems.append(Problem(self.where, f"{self.prefix}{key}", reason))

    def known(self, keys: Collection[str]) -> None:
        for key, reason in unknown_keys(self.data, keys):
            self.problem(key, reason)

    def sub(self, data: Mapping[str, Any], name: str, keys: Collection[str]) -> _Reader:
        reader = _Reader(data, self.base, self.where, self.problems, f"{self.prefix}{name}.")
        reader.known(keys)
        return reader

    def section(self, key: str, keys: Collection[str]) -> _Reader | None:
        """The reader of table ``key`` (its unknown keys reported), or None."""
        value = self.data.get(key)
        if not isinstance(value, dict):
            self.problem(key, "missing table" if value is None else "must be a table")
            return None
        return self.sub(value, key, keys)

    def tables(self, key: str) -> list[Mapping[str, Any]]:
        value = self.data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            self.problem(key, f"must be an array of tables ([[{key}]])")
            return []
        return value

    def string(self, key: str) -> str:
        value = self.data.get(key)
        if not isinstance(value, str) or not value.strip():
            self.problem(key, "missing or not a non-empty string")
            return ""
        return value.strip()

    def path(self, key: str) -> Path:
        return self.base / Path(self.string(key))

    def integer(self, key: str, default: int, low: int, high: int | None = None) -> int:
        value = self.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not _within(value, low, high):
            self.problem(key, f"must be an integer {_limits(low, high)}")
            return default
        return value

    def workers(self) -> int:
        """``workers``: a count, or "auto" for one per core."""
        if self.data.get("workers") == "auto":
            return max(1, min(256, len(os.sched_getaffinity(0))))
        value = self.data.get("workers", 1)
        if isinstance(value, bool) or not isinstance(value, int) or not _within(value, 1, 256):
            self.problem("workers", f'must be an integer {_limits(1, 256)}, or "auto"')
            return 1
        return value

    def number(self, key: str, default: float, low: float, high: float | None = None) -> float:
        value = self.data.get(key, default)
        if (isinstance(value, bool) or not isinstance(value, int | float)
                or not _within(value, low, high)):
            self.problem(key, f"must be a number {_limits(low, high)}")
            return default
        return float(value)


def _within(value: float, low: float, high: float | None) -> bool:
    return low <= value and (high is None or value <= high)


def _limits(low: float, high: float | None) -> str:
    return f"of at least {low}" if high is None else f"from {low} to {high}"


def _refusals_url(d: Any) -> str | None:
    """``[delivery_api] refusals_url``: an http(s) URL, or "" for none."""
    if "refusals_url" not in d.data:
        return None
    value = d.data["refusals_url"]
    if not isinstance(value, str) or (value and not value.startswith(("https://", "http://"))):
        d.problem("refusals_url", 'must be an http:// or https:// URL, or "" for none')
        return None
    return str(value)
