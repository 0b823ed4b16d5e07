"""``mxmrelay-check --config FILE``: is this configuration ready to start?

It loads what start-up loads (the configuration, the directory file, the
certificate and key, the delivery API's CA file) and parses every
endpoint string, without binding anything, and prints every problem at
once, one line each naming the file and the key, or ``ok``.  Run before
the relay starts (``ExecStartPre=``), a mistake stops the start with the
whole list rather than one error per restart.

Start-up runs the same checks (:func:`check` with ``activated=True``), so
the command and the relay never disagree, except about ``systemd:``
endpoints: at check time their syntax is checked but no socket is needed
(systemd passes the sockets to the relay, not to the check).
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path
from typing import Any, TextIO

import attrs
from cryptography import x509
from twisted.internet import ssl

from mxmrelay.config import Config, ConfigError, Problem
from mxmrelay.directory import InvalidDirectory, TomlDirectory
from mxmrelay.endpoints import split_endpoint
from mxmrelay.tls import TLSConfigError, server_context

#: A certificate closer than this to its expiry gets a warning.
EXPIRY_WARNING = datetime.timedelta(days=14)

SYSTEMD_DOMAINS = ("INET", "INET6", "UNIX")


@attrs.define
class Report:
    """What a check found: ``errors`` stop start-up, ``warnings`` do not."""

    errors: list[Problem] = attrs.Factory(list)
    warnings: list[Problem] = attrs.Factory(list)
    #: The configuration, when it could be read without error.
    config: Config | None = None


def check(path: Path, reactor: Any, *, activated: bool = False,
          now: datetime.datetime | None = None) -> Report:
    """Check the configuration at ``path`` and everything it points to.

    ``activated``: the process is the relay itself, so a ``systemd:``
    endpoint needs its socket to have been passed in.
    """
    report = Report()
    where = str(path)
    try:
        config = Config.from_file(path)
    except ConfigError as e:
        report.errors.extend(e.problems)
        if e.partial is None:
            return report
        config = e.partial
    failed = {p.key for p in report.errors}

    def ok(prefix: str) -> bool:
        return not any(k == prefix or k.startswith((prefix + ".", prefix + "["))
                       for k in failed)

    named = [(f"listener[{i}]", x.endpoint) for i, x in enumerate(config.listeners)]
    for key, description in named:
        if ok(key):
            _endpoint(report, where, f"{key}.endpoint", description, reactor, activated,
                      config.workers > 1)
    if config.metrics is not None and ok("metrics"):
        # Bound by the one process that serves it (the supervisor with
        # workers): any endpoint will do.
        _endpoint(report, where, "metrics.endpoint", config.metrics.endpoint, reactor,
                  activated, False)
    if config.listeners and ok("tls"):
        check_tls(report, where, config.tls.certificate, config.tls.private_key,
                  now or datetime.datetime.now(datetime.UTC))
    platform = config.platform_directory
    if platform is not None and platform.ca_file is not None and ok("directory"):
        _ca_file(report, where, platform.ca_file, "directory.ca_file")
    if config.listeners and config.directory is not None and ok("directory"):
        try:
            TomlDirectory.from_file(config.directory)
        except InvalidDirectory as e:
            report.errors.extend(Problem(where, "directory", str(p)) for p in e.problems)
    api = config.delivery_api
    if api is not None and api.ca_file is not None and ok("delivery_api"):
        _ca_file(report, where, api.ca_file, "delivery_api.ca_file")
    if not report.errors:
        report.config = config
    return report


def _endpoint(report: Report, where: str, key: str, description: str, reactor: Any,
              activated: bool, workers: bool) -> None:
    """Parse one endpoint string as twistd will (without listening)."""
    from twisted.internet import endpoints

    inner = description.removeprefix("haproxy:")
    kind, args, kwargs = split_endpoint(inner)
    if workers and not ((kind == "tcp" and args) or kind == "systemd"):
        report.errors.append(Problem(where, key, (
            f"{description!r}: with workers > 1 an endpoint must be tcp:PORT, "
            "systemd:domain=...:index=N, or either behind haproxy:")))
        return
    if kind == "systemd" and not activated:
        reason = _systemd_syntax(args, kwargs)
        if reason:
            report.errors.append(Problem(where, key, f"{description!r}: {reason}"))
        return
    try:
        endpoints.serverFromString(reactor, description)
    except IndexError:
        # systemd:domain=INET:index=N without that many inherited sockets.
        report.errors.append(Problem(where, key, (
            f"{description!r}: no such socket passed by systemd "
            "(start the service through its .socket unit)")))
    except (ValueError, KeyError, TypeError) as e:
        report.errors.append(Problem(where, key, f"{description!r}: {e}"))


def _systemd_syntax(args: list[str], kwargs: dict[str, str]) -> str | None:
    """Why a ``systemd:`` description is malformed, or None: Twisted's own
    parser would need the inherited socket to say."""
    if args or set(kwargs) - {"domain", "index", "name"}:
        return "only domain=, index= and name= are allowed"
    if kwargs.get("domain") not in SYSTEMD_DOMAINS:
        return f"domain= must be one of {', '.join(SYSTEMD_DOMAINS)}"
    if ("index" in kwargs) == ("name" in kwargs):
        return "give exactly one of index= and name="
    if "index" in kwargs and not kwargs["index"].isdigit():
        return "index= must be a number"
    return None


def check_tls(report: Report, where: str, certificate: Path, private_key: Path,
              now: datetime.datetime) -> ssl.CertificateOptions | None:
    """The certificate and key load and match, and the certificate is in
    date: the options built from them, or None (a reload swaps in what this
    returns, so start-up and reload accept and refuse the same files)."""
    try:
        options = server_context(certificate, private_key)
    except TLSConfigError as e:
        report.errors.append(Problem(where, f"tls.{e.key}", str(e)))
        return None
    # The certificate as loaded (the file may have changed since).
    assert options.certificate is not None
    leaf: x509.Certificate = options.certificate.to_cryptography()
    expires = leaf.not_valid_after_utc
    when = expires.strftime("%Y-%m-%d %H:%M UTC")
    if expires <= now:
        report.errors.append(Problem(where, "tls.certificate",
                                     f"{certificate}: expired on {when}"))
        return None
    elif expires - now < EXPIRY_WARNING:
        days = (expires - now).days
        report.warnings.append(Problem(where, "tls.certificate",
                                       f"{certificate}: expires in {days} days, on {when}"))
    return options


def _ca_file(report: Report, where: str, path: Path, key: str) -> None:
    from OpenSSL import crypto

    try:
        crypto.load_certificate(crypto.FILETYPE_PEM, path.read_bytes())
    except OSError as e:
        report.errors.append(Problem(where, key,
                                     f"{path}: cannot read: {e.strerror}"))
    except crypto.Error as e:
        report.errors.append(Problem(where, key,
                                     f"{path}: not a valid PEM certificate: {e}"))


def main(argv: list[str] | None = None, out: TextIO | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mxmrelay-check",
        description="Check the relay's configuration and what it points to; bind nothing.")
    parser.add_argument("--config", "-c", default="/etc/mxmrelay/mxmrelay.toml",
                        help="the relay's TOML configuration file")
    parser.add_argument("--reload", type=int, metavar="PID",
                        help="then, if nothing is wrong, ask the relay running as PID to "
                             "reload (SIGHUP): what `systemctl reload mxmrelay` runs")
    args = parser.parse_args(argv)
    out = sys.stdout if out is None else out
    from twisted.internet import reactor

    report = check(Path(args.config), reactor)
    for problem in report.errors:
        print(problem, file=out)
    for problem in report.warnings:
        print(f"warning: {problem}", file=out)
    if report.errors:
        return 1
    print("ok", file=out)
    if args.reload is not None:
        from mxmrelay.reload import ask_to_reload

        return ask_to_reload(args.reload, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
