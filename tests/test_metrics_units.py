"""What an operator watches, without a relay process: the readiness rule on
a Clock, the probe against a real HTTP server, the metric helpers, the
configuration keys, the directory cache's counts, and `make run`'s fifth
port.  (The relay process itself: tests/test_metrics.py.)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial import unittest
from twisted.web.resource import Resource
from twisted.web.server import Site

from mxmrelay import metrics
from mxmrelay.check import check
from mxmrelay.config import Config, ConfigError
from mxmrelay.health import Readiness
from tests.support import config_dict


def _done(value: str | None) -> Deferred[str | None]:
    d: Deferred[str | None] = Deferred()
    d.callback(value)
    return d


class ReadinessRule(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.serving = True
        self.answered: float | None = None
        self.probes: list[Deferred[str | None]] = []

        def probe() -> Deferred[str | None]:
            d: Deferred[str | None] = Deferred()
            self.probes.append(d)
            return d

        self.readiness = Readiness(self.clock, lambda: self.serving, lambda: self.answered,
                                   probe, 60)

    def test_not_serving(self) -> None:
        self.serving = False
        reason = self.successResultOf(self.readiness.check())
        self.assertIn("no relay process is listening", reason or "")
        self.assertEqual(self.probes, [])

    def test_a_fresh_answer_needs_no_probe(self) -> None:
        self.answered = 1000 - 59
        self.assertIsNone(self.successResultOf(self.readiness.check()))
        self.assertEqual(self.probes, [])

    def test_a_stale_answer_probes_once_for_everyone(self) -> None:
        self.answered = 1000 - 61
        first, second = self.readiness.check(), self.readiness.check()
        self.assertNoResult(first)
        self.assertEqual(len(self.probes), 1)
        self.probes[0].callback("delivery API answered 503")
        self.assertEqual(self.successResultOf(first), "delivery API answered 503")
        self.assertEqual(self.successResultOf(second), "delivery API answered 503")
        # a failed probe is not remembered: the next check probes again
        third = self.readiness.check()
        self.assertEqual(len(self.probes), 2)
        self.probes[1].callback(None)
        self.assertIsNone(self.successResultOf(third))
        # a good one is, for the window
        self.clock.advance(59)
        self.assertIsNone(self.successResultOf(self.readiness.check()))
        self.assertEqual(len(self.probes), 2)
        self.clock.advance(2)
        self.assertNoResult(self.readiness.check())
        self.assertEqual(len(self.probes), 3)


class Helpers(unittest.TestCase):
    def delta(self, name: str, labels: dict[str, str], act: Any) -> float:
        before = REGISTRY.get_sample_value(name, labels) or 0
        act()
        return (REGISTRY.get_sample_value(name, labels) or 0) - before

    def test_transaction_outcomes(self) -> None:
        name = "mxmrelay_transactions_total"
        self.assertEqual(self.delta(name, {"outcome": "accepted", "code": "250"},
                                    lambda: metrics.transaction_ended(250, 10)), 1)
        self.assertEqual(self.delta(name, {"outcome": "deferred", "code": "451"},
                                    lambda: metrics.transaction_ended(451)), 1)
        self.assertEqual(self.delta(name, {"outcome": "rejected", "code": "552"},
                                    lambda: metrics.transaction_ended(552, 10)), 1)

    def test_send_results(self) -> None:
        name = "mxmrelay_sends_total"
        for code, result in ((250, "forwarded"), (451, "deferred"), (554, "refused")):
            self.assertEqual(self.delta(name, {"customer": "acme", "result": result},
                                        lambda c=code: metrics.send_result("acme", c)), 1)

    def test_only_a_working_answer_is_a_fresh_answer(self) -> None:
        name = "mxmrelay_delivery_api_last_answer_timestamp_seconds"
        metrics.api_answered(201, now=100.0)
        self.assertEqual(REGISTRY.get_sample_value(name), 100.0)
        for status in (500, 503, 401, 403):
            metrics.api_answered(status, now=200.0)
            self.assertEqual(REGISTRY.get_sample_value(name), 100.0)
        metrics.api_answered(422, now=300.0)
        self.assertEqual(REGISTRY.get_sample_value(name), 300.0)

    def test_auth_blocks_are_attempts_too(self) -> None:
        self.assertEqual(self.delta("mxmrelay_auth_attempts_total", {"result": "blocked"},
                                    lambda: metrics.auth_blocked("user")), 1)


class Configuration(unittest.TestCase):
    def test_keys_checked(self) -> None:
        folder = Path(self.mktemp()).resolve()
        data = config_dict(folder, "http://127.0.0.1:1/v1/sends",
                           metrics={"endpoint": "tcp:9125", "api_answered_within": 0,
                                    "endpiont": "x"}, log_format="yaml")
        with self.assertRaises(ConfigError) as caught:
            Config.from_dict(data, folder, "x.toml")
        self.assertEqual(sorted(str(p) for p in caught.exception.problems), [
            "x.toml: log_format: must be one of text, json",
            "x.toml: metrics.api_answered_within: must be a number from 1 to 86400",
            "x.toml: metrics.endpiont: unknown key (did you mean 'endpoint'?)"])
        data = config_dict(folder, "http://127.0.0.1:1/v1/sends", metrics={})
        with self.assertRaises(ConfigError) as caught:
            Config.from_dict(data, folder, "x.toml")
        self.assertEqual([str(p) for p in caught.exception.problems],
                         ["x.toml: metrics.endpoint: missing or not a non-empty string"])

    def test_defaults(self) -> None:
        folder = Path(self.mktemp()).resolve()
        config = Config.from_dict(config_dict(folder, "http://127.0.0.1:1/v1/sends"), folder,
                                  "x.toml")
        self.assertIsNone(config.metrics)
        self.assertEqual(config.log_format, "text")


class CheckEndpoint(unittest.TestCase):
    def test_check_parses_the_endpoint(self) -> None:
        from twisted.internet import reactor

        folder = Path(self.mktemp()).resolve()
        folder.mkdir(parents=True)
        directory = Path(__file__).resolve().parent.parent / "etc" / "directory.dev.toml"
        data = config_dict(folder, "http://127.0.0.1:1/v1/sends",
                           metrics={"endpoint": "tcp:notaport"}, directory=str(directory))
        path = folder / "relay.toml"
        path.write_text(_toml(data))
        report = check(path, reactor)
        self.assertEqual([p.key for p in report.errors], ["metrics.endpoint"])


def _toml(data: dict[str, Any], prefix: str = "") -> str:
    """Enough TOML for config_dict's tables (no third-party writer)."""
    import json

    lines, tables = [], []
    for key, val in data.items():
        if isinstance(val, dict):
            tables.append((key, val))
        elif isinstance(val, list) and val and isinstance(val[0], dict):
            for item in val:
                lines.append(f"[[{key}]]")
                lines += [f"{k} = {json.dumps(v)}" for k, v in item.items()]
        else:
            lines.insert(0, f"{key} = {json.dumps(val)}")
    for key, table in tables:
        lines.append(f"[{key}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


class CacheCounts(unittest.TestCase):
    def test_cache_lookups(self) -> None:
        from twisted.internet.defer import fail, succeed

        from mxmrelay.directory import CustomerSpace, User
        from mxmrelay.directory_cache import DirectoryCache

        clock = Clock()
        cache = DirectoryCache(clock, ttl=60, negative_ttl=10, stale_ttl=600)
        user = User("a@b.test", "x", CustomerSpace("s", "S", frozenset({"b.test"})))
        name = "mxmrelay_directory_cache_lookups_total"

        def count(result: str) -> float:
            return REGISTRY.get_sample_value(name, {"result": result}) or 0

        before = {r: count(r) for r in ("hit", "negative_hit", "miss", "stale", "failed")}
        cache.lookup("a@b.test", lambda: succeed(user))
        cache.lookup("a@b.test", lambda: succeed(user))
        cache.lookup("x@b.test", lambda: succeed(None))
        cache.lookup("x@b.test", lambda: succeed(None))
        clock.advance(61)
        cache.lookup("a@b.test", lambda: fail(RuntimeError("down")))
        clock.advance(600)
        self.failureResultOf(cache.lookup("a@b.test", lambda: fail(RuntimeError("down"))))
        after = {r: count(r) - before[r] for r in before}
        self.assertEqual(after, {"hit": 1, "negative_hit": 1, "miss": 4, "stale": 1,
                                 "failed": 1})


class _Answer(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.code = 200
        self.seen: list[tuple[bytes, bytes | None]] = []

    def render(self, request: Any) -> bytes:
        self.seen.append((request.method, request.getHeader(b"authorization")))
        request.setResponseCode(self.code)
        return b""


class Probe(unittest.TestCase):
    """The readiness probe against a real HTTP server on loopback."""

    async def test_answers(self) -> None:
        from twisted.internet import reactor

        from mxmrelay.forwarder import Forwarder

        answer = _Answer()
        site: Any = Site(answer)
        port: Any = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        url = f"http://127.0.0.1:{port.getHost().port}/v1/sends"
        forwarder = Forwarder(reactor, url, "tok", 5)
        forwarder.pool.persistent = False
        self.addCleanup(forwarder.close)
        results = {}
        for code in (200, 405, 404, 401, 403, 500, 503):
            answer.code = code
            results[code] = await forwarder.probe()
        self.assertEqual(results, {
            200: None, 405: None, 404: None,
            401: "delivery API rejects the relay's token (401)",
            403: "delivery API rejects the relay's token (403)",
            500: "delivery API answered 500", 503: "delivery API answered 503"})
        self.assertEqual(set(answer.seen), {(b"HEAD", b"Bearer tok")})
        await port.stopListening()
        reason = await forwarder.probe()
        self.assertTrue((reason or "").startswith("delivery API unreachable: "), reason)


class DevConfig(unittest.TestCase):
    """``make run PORTS=...``: a fifth port moves the metrics listener."""

    timeout = 60

    async def test_fifth_port(self) -> None:
        import shutil
        import sys

        from twisted.internet import reactor
        from twisted.internet.utils import getProcessOutputAndValue

        make = shutil.which("make")
        if make is None:
            raise unittest.SkipTest("make is not installed")
        root = Path(__file__).resolve().parent.parent
        folder = Path(self.mktemp()).resolve()
        folder.mkdir(parents=True)
        env = {k: v for k, v in os.environ.items()
               if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEFILES")}
        endpoints = []
        for ports in ("3525,3587,3465,3025,3125", "3525,3587,3465,3025"):
            out, err, code = await getProcessOutputAndValue(
                make, ["-s", "--no-print-directory", f"PYTHON={sys.executable}", "dev-config",
                       f"PORTS={ports}", f"DEV_CONFIG={folder / 'dev.toml'}",
                       f"REFAPI_CONFIG={folder / 'refapi.toml'}"],
                env=env, path=str(root), reactor=reactor)
            self.assertEqual(code, 0, out + err)
            config = Config.from_file(folder / "dev.toml")
            assert config.metrics is not None
            endpoints.append(config.metrics.endpoint)
        self.assertEqual(endpoints, ["tcp:3125:interface=127.0.0.1",
                                     "tcp:9125:interface=127.0.0.1"])
        original = Config.from_file(root / "etc" / "mxmrelay.dev.toml")
        assert original.metrics is not None
        self.assertEqual(original.metrics.endpoint, "tcp:9125:interface=127.0.0.1")
        out, err, code = await getProcessOutputAndValue(
            make, ["-s", "--no-print-directory", f"PYTHON={sys.executable}", "dev-config",
                   "PORTS=3525,3587,3465,3025,3025", f"DEV_CONFIG={folder / 'x.toml'}"],
            env=env, path=str(root), reactor=reactor)
        self.assertNotEqual(code, 0)
        self.assertIn(b"want four different ports", out + err)
