"""The configuration refuses what it does not know, and the README's
configuration reference says exactly what the code accepts."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from mxmrelay import config as cfg
from mxmrelay import limits_keys, opsconfig
from mxmrelay.config import Config, ConfigError
from mxmrelay.directory import InvalidDirectory, TomlDirectory
from tests.test_check import good_config

README = Path(__file__).resolve().parent.parent / "README.md"

#: The keys of each table, as the configuration module knows them.
TABLES = {"": cfg.TOP_KEYS, "tls": cfg.TLS_KEYS, "listener": cfg.LISTENER_KEYS,
          "delivery_api": cfg.DELIVERY_KEYS, "auth": cfg.AUTH_KEYS,
          "directory": cfg.DIRECTORY_KEYS, "metrics": opsconfig.METRICS_KEYS,
          "limits": limits_keys.LIMITS_KEYS, "state": limits_keys.STATE_KEYS}


def reference_rows() -> list[tuple[str, list[str], str]]:
    """``(table, keys, limits)`` for each row of the README's table."""
    text = README.read_text()
    section = text[text.index("## Configuration reference"):text.index("### The customer")]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[0].startswith("`"):
            continue
        names = re.findall(r"`([^`]+)`", cells[0])
        table = ""
        first = re.fullmatch(r"\[\[?(\w+)\]\]? (\w+)", names[0])
        if first:
            table, names[0] = first.group(1), first.group(2)
        rows.append((table, names, cells[2]))
    return rows


class Reference(SynchronousTestCase):
    def folder(self) -> Path:
        p = Path(self.mktemp()).resolve()
        p.mkdir(parents=True)
        return p

    def test_every_key_is_documented(self) -> None:
        documented = {(t, k) for t, keys, _ in reference_rows() for k in keys}
        known = {(t, k) for t, keys in TABLES.items() for k in keys}
        # Tables are documented through their keys.
        # (``directory`` is both: a file name, or a table.)
        known -= {("", t) for t in TABLES if t and t != "directory"}
        self.assertEqual(documented, known)

    def test_documented_limits_are_enforced(self) -> None:
        folder = self.folder()
        good = good_config(folder)
        good["auth"] = {}
        good["limits"], good["state"] = {}, {}
        good["metrics"] = {"endpoint": "tcp:9125"}
        good["directory"] = {"url": "http://127.0.0.1:1/v1/smtp-users", "token": "t"}
        limited = [(t, keys[0], limits) for t, keys, limits in reference_rows() if limits]
        self.assertGreaterEqual(len(limited), 10)
        for table, key, limits in limited:
            bounds = re.match(r"(?:at least ([\d.]+)|([\d.]+) to ([\d.]+))", limits)
            assert bounds is not None, limits
            low = _number(bounds.group(1) or bounds.group(2))
            high = None if bounds.group(3) is None else _number(bounds.group(3))

            def accepts(value: Any, table: str = table, key: str = key) -> bool:
                data = {**good}
                if table:
                    data[table] = {**data[table], key: value}
                else:
                    data[key] = value
                try:
                    Config.from_dict(data, folder, "x.toml")
                except ConfigError as e:
                    self.assertEqual(len(e.problems), 1, str(e))
                    self.assertEqual(e.problems[0].key, f"{table}.{key}".lstrip("."))
                    return False
                return True

            what = f"{table}.{key} ({limits})"
            self.assertTrue(accepts(low), what)
            self.assertFalse(accepts(low - 1), what)
            self.assertFalse(accepts(low - 0.01), what)
            if high is None:
                self.assertTrue(accepts(10**9), what)
            else:
                self.assertTrue(accepts(high), what)
                self.assertFalse(accepts(high + 0.01), what)
                self.assertFalse(accepts(high + 1), what)
            self.assertFalse(accepts(True), what)
            self.assertFalse(accepts("5"), what)


def _number(text: str) -> int | float:
    return float(text) if "." in text else int(text)


class UnknownKeys(SynchronousTestCase):
    def folder(self) -> Path:
        p = Path(self.mktemp()).resolve()
        p.mkdir(parents=True)
        return p

    def problems(self, data: dict[str, Any]) -> list[str]:
        with self.assertRaises(ConfigError) as e:
            Config.from_dict(data, self.folder(), "x.toml")
        self.assertEqual(str(e.exception).splitlines(), [str(p) for p in e.exception.problems])
        return [str(p) for p in e.exception.problems]

    def test_everywhere(self) -> None:
        good = good_config(self.folder())
        data = {**good, "max_recipient": 5, "Hostname": "x",
                "tls": {**good["tls"], "private-key": "k"},
                "auth": {"max_failure_per_user": 1},
                "delivery_api": {**good["delivery_api"], "timout": 5}}
        data["listener"] = [{"role": "smtp", "endpoint": "tcp:0", "backlog": 10}]
        self.assertEqual(self.problems(data), [
            "x.toml: max_recipient: unknown key (did you mean 'max_recipients'?)",
            "x.toml: Hostname: unknown key (did you mean 'hostname'?)",
            "x.toml: listener[0].backlog: unknown key",
            "x.toml: tls.private-key: unknown key (did you mean 'private_key'?)",
            "x.toml: delivery_api.timout: unknown key (did you mean 'timeout'?)",
            "x.toml: auth.max_failure_per_user: unknown key "
            "(did you mean 'max_failures_per_user'?)",
        ])

    def test_every_mistake_at_once_and_what_could_be_read(self) -> None:
        folder = self.folder()
        good = good_config(folder)
        with self.assertRaises(ConfigError) as e:
            Config.from_dict({**good, "hostname": "", "max_recipients": 0, "colour": 1,
                              "tls": "cert.pem"}, folder, "x.toml")
        self.assertEqual([p.key for p in e.exception.problems],
                         ["colour", "hostname", "tls", "max_recipients"])
        partial = e.exception.partial
        assert partial is not None
        self.assertEqual(partial.listeners, Config.from_dict(good, folder, "x.toml").listeners)

    def test_directory(self) -> None:
        customer = {"id": "c", "domains": ["example.com"], "flag": 1, "from_flags": {"a@b": 2}}
        user = {"email": "u@example.com", "password": "scrypt$x", "customer": "c",
                "passwd": "x"}
        with self.assertRaises(InvalidDirectory) as e:
            TomlDirectory.from_dict({"customer": [customer], "user": [user], "users": []},
                                    "dir.toml")
        self.assertEqual(str(e.exception).splitlines(), [
            "dir.toml: users: unknown key (did you mean 'user'?)",
            "dir.toml: customer[0].flag: unknown key (did you mean 'flags'?)",
            "dir.toml: user[0].passwd: unknown key (did you mean 'password'?)",
        ])
