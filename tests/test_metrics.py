"""What an operator watches: ``/metrics``, ``/healthz`` and ``/readyz``.

End to end, the real ``twistd -n mxmrelay`` process over real sockets
(real TLS, the real reference API over real HTTP), scraped and parsed with
prometheus-client's own parser, the counts checked against what was sent;
with ``workers = 2`` one scrape sums both workers.  The readiness rule and
the helpers are tested pure, on a Clock.
"""

from __future__ import annotations

import os
import signal
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
from tests.metrics_support import WRONG, Relay, failed_handshake, value
from tests.support import config_dict, fetch_json, in_thread


class Scrape(unittest.TestCase):
    timeout = 90

    async def test_counts_match_what_was_sent(self) -> None:
        relay = Relay(self)
        await relay.start()
        self.assertEqual((await relay.sent())[:3], "250")
        self.assertEqual((await relay.sent())[:3], "250")
        # a rule refuses it: the To header is not among the RCPT TOs
        refused = await relay.sent(header_to="other@example.org")
        self.assertEqual(refused[:9], "550 5.6.0", refused)
        wrong = await relay.sent(password=WRONG)
        self.assertEqual(wrong[:3], "535")
        self.assertEqual(await in_thread(failed_handshake, relay.smtp_port), "SSLError")
        stored = await fetch_json(f"http://127.0.0.1:{relay.api.port}/v1/sends")
        self.assertEqual(len(stored["sends"]), 2)

        s: dict[Any, float] = {}

        async def closed() -> bool:
            s.update(await relay.scrape())
            return value(s, "mxmrelay_connections_open") == 0

        await self._poll(closed)
        self.assertEqual(value(s, "mxmrelay_auth_attempts_total", result="success"), 3)
        self.assertEqual(value(s, "mxmrelay_auth_attempts_total", result="failure"), 1)
        self.assertEqual(value(s, "mxmrelay_transactions_total", outcome="accepted",
                               code="250"), 2)
        self.assertEqual(value(s, "mxmrelay_transactions_total", outcome="rejected",
                               code="550"), 1)
        self.assertEqual(value(s, "mxmrelay_sends_total", customer="demo",
                               result="forwarded"), 2)
        self.assertEqual(value(s, "mxmrelay_sends_total", customer="demo",
                               result="refused"), 1)
        self.assertEqual(value(s, "mxmrelay_message_size_bytes_count"), 3)
        self.assertGreater(value(s, "mxmrelay_message_size_bytes_sum"), 3 * 100)
        self.assertEqual(value(s, "mxmrelay_delivery_api_requests_total", result="2xx"), 2)
        self.assertEqual(value(s, "mxmrelay_delivery_api_request_duration_seconds_count"), 2)
        self.assertEqual(value(s, "mxmrelay_sends_in_flight"), 0)
        self.assertEqual(value(s, "mxmrelay_connections_total", listener="submission"), 5)
        self.assertEqual(value(s, "mxmrelay_tls_handshakes_total", listener="submission"), 4)
        self.assertEqual(value(s, "mxmrelay_tls_handshake_failures_total",
                               listener="submission"), 1)
        self.assertEqual(value(s, "mxmrelay_connections_open"), 0)
        self.assertEqual(value(s, "mxmrelay_directory_lookups_total", result="found"), 4)
        self.assertEqual(value(s, "mxmrelay_processes_serving"), 1)
        self.assertGreater(value(s, "mxmrelay_delivery_api_last_answer_timestamp_seconds"), 0)
        # No address, user name or free text is a label value.
        labels = {v for (_, ls) in s for _, v in ls}
        for secret in ("127.0.0.1", "demo@example.com", "shop@example.com", "someone"):
            self.assertFalse([x for x in labels if secret in x], secret)

    async def test_workers_sum_in_one_scrape(self) -> None:
        relay = Relay(self, workers=2)
        await relay.start()
        # Each worker in turn (the other one stopped cannot accept).
        for index in (0, 1, 0, 1):
            relay.only(index)
            self.assertEqual((await relay.sent())[:3], "250")
        relay.only(1)
        self.assertEqual((await relay.sent(password=WRONG))[:3], "535")
        for index in (0, 1):
            self.assertIn(f"[worker {index}] auth ok", relay.out.text)
        for pid in relay.pids().values():
            os.kill(pid, signal.SIGCONT)
        s = await relay.scrape()
        self.assertEqual(value(s, "mxmrelay_sends_total", result="forwarded"), 4)
        self.assertEqual(value(s, "mxmrelay_auth_attempts_total", result="success"), 4)
        self.assertEqual(value(s, "mxmrelay_auth_attempts_total", result="failure"), 1)
        self.assertEqual(value(s, "mxmrelay_connections_total"), 5)
        self.assertEqual(value(s, "mxmrelay_processes_serving"), 2)
        # A worker that dies takes its live gauges with it, not its counts.
        old = relay.pids()[0]
        os.kill(old, signal.SIGKILL)
        await relay.until(lambda: relay.pids().get(0) not in (None, old), "a new worker 0")
        # The new worker 0 serves (it alone can accept) ...
        relay.only(0)
        self.assertEqual((await relay.sent())[:3], "250")
        for pid in relay.pids().values():
            os.kill(pid, signal.SIGCONT)
        after = await relay.scrape()
        # ... and the dead one is no longer counted as serving.
        self.assertEqual(value(after, "mxmrelay_processes_serving"), 2)
        self.assertEqual(value(after, "mxmrelay_sends_total", result="forwarded"), 5)
        self.assertEqual(value(after, "mxmrelay_connections_open"), 0)

    async def _poll(self, check: Any, deadline: float = 20) -> None:
        from twisted.internet import reactor
        from twisted.internet.task import deferLater

        end = reactor.seconds() + deadline
        while not await check():
            self.assertLess(reactor.seconds(), end, "timed out")
            await deferLater(reactor, 0.1, lambda: None)


class Health(unittest.TestCase):
    timeout = 60

    async def test_readyz_follows_the_delivery_api(self) -> None:
        from twisted.internet import reactor
        from twisted.internet.task import deferLater

        relay = Relay(self, api_up=False)
        await relay.start()
        self.assertEqual(await relay.get("/healthz"), (200, "ok\n"))
        code, text = await relay.get("/readyz")
        self.assertEqual(code, 503)
        self.assertTrue(text.startswith("not ready: delivery API unreachable"), text)
        self.assertEqual((await relay.sent())[:9], "451 4.4.1")

        relay.api.up()
        answers: list[tuple[int, str]] = []

        async def ready() -> bool:
            answers.append(await relay.get("/readyz"))
            return answers[-1] == (200, "ready\n")

        end = reactor.seconds() + 20
        while not await ready():
            self.assertLess(reactor.seconds(), end, answers[-1])
            await deferLater(reactor, 0.1, lambda: None)
        self.assertEqual((await relay.sent())[:3], "250")

        await relay.api.down()
        # The last answer stays good for api_answered_within (2 s), then
        # the probe finds nobody.
        end = reactor.seconds() + 20
        while (await relay.get("/readyz"))[0] != 503:
            self.assertLess(reactor.seconds(), end)
            await deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(await relay.get("/healthz"), (200, "ok\n"))
        self.assertEqual((await relay.get("/nothing"))[0], 404)


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


class Reloads(unittest.TestCase):
    timeout = 60

    async def test_reloads_counted(self) -> None:
        import shutil

        folder = Path(self.mktemp()).resolve()
        folder.mkdir(parents=True)
        directory = folder / "directory.toml"
        shutil.copy(Path(__file__).resolve().parent.parent / "etc" / "directory.dev.toml",
                    directory)
        relay = Relay(self, directory=directory)
        await relay.start()
        s = await relay.scrape()
        started = value(s, "mxmrelay_reload_last_success_timestamp_seconds", what="directory")
        self.assertGreater(started, 0)
        relay.process.signalProcess("HUP")
        await relay.until(lambda: "reload ok: directory" in relay.out.text, "a reload")
        s = await relay.scrape()
        for what in ("directory", "certificate"):
            self.assertEqual(value(s, "mxmrelay_reloads_total", what=what, result="ok"), 1)
        good = value(s, "mxmrelay_reload_last_success_timestamp_seconds", what="directory")
        self.assertGreaterEqual(good, started)
        directory.write_text(directory.read_text() + "\n[[user]]\nemial = 1\n")
        relay.process.signalProcess("HUP")
        await relay.until(lambda: "reload failed" in relay.out.text, "a failed reload")
        s = await relay.scrape()
        self.assertEqual(value(s, "mxmrelay_reloads_total", what="directory", result="failed"),
                         1)
        self.assertEqual(value(s, "mxmrelay_reloads_total", what="certificate", result="ok"), 2)
        self.assertEqual(
            value(s, "mxmrelay_reload_last_success_timestamp_seconds", what="directory"), good)


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


class StartUp(unittest.TestCase):
    timeout = 60

    async def test_metrics_port_in_use_is_one_line(self) -> None:
        import socket

        relay = Relay(self)
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", relay.metrics_port))
        taken.listen(1)
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        relay.process = reactor_spawn(relay, env)
        await relay.out.ended
        self.assertIn(f"mxmrelay: cannot start: metrics.endpoint tcp:{relay.metrics_port}:"
                      "interface=127.0.0.1: address already in use", relay.out.text)
        self.assertNotIn("Traceback", relay.out.text)


def reactor_spawn(relay: Relay, env: dict[str, str]) -> Any:
    from twisted.internet import reactor

    from tests.metrics_support import TWISTD

    return reactor.spawnProcess(
        relay.out, str(TWISTD), [str(TWISTD), "-n", "--pidfile=", "mxmrelay", "--config",
                                 str(relay.config)], env=env, path=str(relay.folder))


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
