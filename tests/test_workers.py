"""``workers = N``: the real twistd process, its workers sharing the
listening sockets, restarts, and the one shared AUTH failure count.

Which worker accepts a connection is the kernel's choice; to make it
deterministic the tests stop all workers but one (SIGSTOP): a stopped
process cannot accept, so the connection waits for the running one.
"""

from __future__ import annotations

import os
import signal
import smtplib
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial import unittest

from tests.helpers import ROOT, free_ports
from tests.process_support import SupervisedTwistd
from tests.support import in_thread, make_certificate


class Workers(unittest.TestCase):
    timeout = 60

    async def start(self, workers: int = 2, **auth: int) -> None:
        folder = Path(self.mktemp()).resolve()
        folder.mkdir(parents=True)
        cert, key = make_certificate(folder / "tls")
        self.port, api = free_ports(2)
        auth_lines = "".join(f"{k} = {v}\n" for k, v in auth.items())
        config = folder / "relay.toml"
        config.write_text(f"""
hostname = "relay.test"
directory = "{ROOT / 'etc' / 'directory.dev.toml'}"
bounce_address = "bounce+{{id}}@bounces.test"
workers = {workers}
[tls]
certificate = "{cert}"
private_key = "{key}"
[[listener]]
role = "submission"
endpoint = "tcp:{self.port}:interface=127.0.0.1"
[delivery_api]
url = "http://127.0.0.1:{api}/v1/sends"
token = "t"
[auth]
{auth_lines}""")
        self.twistd = SupervisedTwistd(self, config)
        self.out, self.process = self.twistd.out, self.twistd.process
        await self.until(lambda: len(self.pids()) == workers and
                         self.out.text.count("starting on") >= workers)

    def pids(self) -> dict[int, int]:
        """The live pid of each worker, from the supervisor's log."""
        return self.twistd.pids()

    async def until(self, condition: Any, deadline: float = 30) -> None:
        end = reactor.seconds() + deadline
        while not condition():
            if reactor.seconds() > end or self.out.ended.called:
                self.fail(f"condition not met; output:\n{self.out.text[-3000:]}")
            await deferLater(reactor, 0.05)

    def only(self, index: int) -> None:
        """Let only worker ``index`` run."""
        self.twistd.only(index)

    def login(self, password: str = "demo-password") -> str:
        import ssl

        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        c = smtplib.SMTP("127.0.0.1", self.port, timeout=20, local_hostname="client.test")
        try:
            c.starttls(context=ctx)
            c.ehlo()
            c.user, c.password = "demo@example.com", password
            try:
                # one mechanism: smtplib.login() would try LOGIN after PLAIN
                c.auth("PLAIN", c.auth_plain)
                return "235"
            except smtplib.SMTPAuthenticationError as e:
                return str(e.smtp_code)
        finally:
            c.close()

    async def test_every_worker_accepts(self) -> None:
        await self.start(workers=2)
        for index in (0, 1, 0):
            self.only(index)
            self.assertEqual(await in_thread(self.login), "235")
            await self.until(lambda i=index: f"[worker {i}] auth ok" in self.out.text)
        self.assertIn("[worker 1] auth ok", self.out.text)

    async def test_a_dead_worker_is_restarted(self) -> None:
        await self.start(workers=2)
        old = self.pids()[0]
        os.kill(old, signal.SIGKILL)
        await self.until(lambda: self.pids().get(0) not in (None, old))
        self.assertIn("worker 0 ended", self.out.text)
        self.only(0)
        self.assertEqual(await in_thread(self.login), "235")

    async def test_failure_count_is_shared(self) -> None:
        await self.start(workers=2, max_failures_per_user=2, max_failures_per_connection=5)
        self.only(0)
        self.assertEqual(await in_thread(self.login, "wrong"), "535")
        self.only(1)
        self.assertEqual(await in_thread(self.login, "wrong"), "535")
        # The supervisor has now told both workers: the right password is
        # not even checked, on either worker.
        for index in (0, 1):
            self.only(index)
            await self.until(lambda: self.out.text.count("auth failure") >= 2)
            answer = ""
            end = reactor.seconds() + 10
            while answer != "454" and reactor.seconds() < end:
                answer = await in_thread(self.login)
            self.assertEqual(answer, "454")

    async def test_clean_stop(self) -> None:
        await self.start(workers=2)
        pids = list(self.pids().values())
        self.process.signalProcess("TERM")
        await self.out.ended
        # twistd ends itself with the signal that stopped it (so systemd
        # sees a clean SIGTERM stop), after a clean shutdown.
        self.assertIn((self.out.status.exitCode, self.out.status.signal), [(0, None), (None, 15)])
        self.assertIn("Server Shut Down.", self.out.text)
        for pid in pids:
            self.assertFalse(os.path.exists(f"/proc/{pid}") and
                             "zombie" not in Path(f"/proc/{pid}/status").read_text().lower(),
                             f"worker {pid} outlived the supervisor")
