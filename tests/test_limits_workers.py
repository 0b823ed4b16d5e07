"""``workers = N`` without Redis: the sending limits' counters live in the
supervisor, so two workers enforce one quota, not one each.

The real twistd process with two workers and the real reference API in
its own process.  As in tests/test_workers.py, all workers but one are
stopped (SIGSTOP) for each send, so the test chooses which worker serves.
"""

from __future__ import annotations

import os
import re
import signal
import smtplib
import ssl
from pathlib import Path

from twisted.trial import unittest

from tests.helpers import free_ports, until, write
from tests.process_support import TOKEN, Twistd, base_config, refapi_process
from tests.support import in_thread, message


class SupervisorCounts(unittest.TestCase):
    timeout = 90

    async def test_two_workers_one_quota(self) -> None:
        """A quota of 3 a day: worker 0, 1, 0 accept one each, then the
        fourth send is refused whichever worker takes it (counted apart,
        each worker would accept 3: 6 in all)."""
        folder = Path(self.mktemp()).resolve()
        folder.mkdir(parents=True)
        port, api_port = free_ports(2)
        await refapi_process(self, folder, api_port)
        data = base_config(folder)
        data.update(
            workers=2,
            listener=[{"role": "submission", "endpoint": f"tcp:{port}:interface=127.0.0.1"}],
            delivery_api={"url": f"http://127.0.0.1:{api_port}/v1/sends", "token": TOKEN},
            limits={"sends_per_day": 3})
        relay = Twistd(self, write(folder, "relay.toml", data))
        self.relay = relay
        await until(lambda: len(self.pids()) == 2 and relay.text.count("starting on") >= 2,
                    "two workers listening", 30)
        self.addCleanup(self.resume)
        answers = []
        for index in (0, 1, 0, 1, 0):
            self.only(index)
            answers.append(await in_thread(self.send, port))
        self.assertEqual([a[:3] for a in answers], ["250", "250", "250", "451", "451"],
                         relay.text[-3000:])
        self.assertRegex(answers[3], r"^451 4\.7\.1 Daily sending quota reached \(3 per day, "
                                     r"UTC\); retry-after=\d+")
        self.assertIn("[worker 1] ", relay.text)

    def pids(self) -> dict[int, int]:
        return {int(i): int(p) for i, p in
                re.findall(r"worker (\d+) started pid=(\d+)", self.relay.text)}

    def only(self, index: int) -> None:
        for i, pid in self.pids().items():
            os.kill(pid, signal.SIGCONT if i == index else signal.SIGSTOP)

    def resume(self) -> None:
        for pid in self.pids().values():
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    @staticmethod
    def send(port: int) -> str:
        """One send: the MAIL FROM reply if it is not 250, else DATA's."""
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        c = smtplib.SMTP("127.0.0.1", port, timeout=20, local_hostname="client.test")
        try:
            c.starttls(context=ctx)
            c.login("demo@example.com", "demo-password")
            code, text = c.mail("app@example.com")
            if code != 250:
                return f"{code} {text.decode()}"
            c.rcpt("someone@example.org")
            code, text = c.data(message())
            return f"{code} {text.decode()}"
        finally:
            c.close()
