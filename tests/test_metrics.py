"""What an operator watches: ``/metrics``, ``/healthz`` and ``/readyz``.

End to end, the real ``twistd -n mxmrelay`` process over real sockets
(real TLS, the real reference API over real HTTP), scraped and parsed with
prometheus-client's own parser, the counts checked against what was sent;
with ``workers = 2`` one scrape sums both workers.  The readiness rule and
the helpers, without a process: tests/test_metrics_units.py.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from twisted.trial import unittest

from tests.metrics_support import WRONG, Relay, failed_handshake, value
from tests.process_support import SupervisedTwistd
from tests.support import fetch_json, in_thread


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
        relay.process = SupervisedTwistd(self, relay.config, env=env, out=relay.out).process
        await relay.out.ended
        self.assertIn(f"mxmrelay: cannot start: metrics.endpoint tcp:{relay.metrics_port}:"
                      "interface=127.0.0.1: address already in use", relay.out.text)
        self.assertNotIn("Traceback", relay.out.text)

