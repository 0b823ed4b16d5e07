"""The relay as a real ``twistd -n mxmrelay`` process with its metrics
listener, the reference delivery API in this process (started and stopped
at will, so that ``/readyz`` can see it come and go), and blocking smtplib
clients run on threads.  Waiting is polling against a deadline.
"""

from __future__ import annotations

import base64
import os
import smtplib
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial import unittest

from mxmrelay_refapi.api import ReferenceAPI
from tests.helpers import ROOT, free_ports
from tests.helpers import ProcessOutput as Output
from tests.process_support import SupervisedTwistd
from tests.support import in_thread, make_certificate, message

TOKEN = "metrics-token"
DEMO = ("demo@example.com", "demo-password")
WRONG = "not-the-password"



class API:
    """The reference delivery API on a fixed loopback port, up or down."""

    def __init__(self, testcase: unittest.TestCase, folder: Path, port: int) -> None:
        self.port = port
        self.api = ReferenceAPI.open(folder / "api.sqlite3", TOKEN, reactor=reactor)
        testcase.addCleanup(self.api.close)
        testcase.addCleanup(self.down)
        self.listening: Any = None

    def up(self) -> None:
        site: Any = self.api.site()
        self.listening = reactor.listenTCP(self.port, site, interface="127.0.0.1")

    def down(self) -> Any:
        listening, self.listening = self.listening, None
        return listening.stopListening() if listening is not None else None


class Relay:
    """``twistd -n mxmrelay`` with one submission listener and metrics."""

    def __init__(self, testcase: unittest.TestCase, *, workers: int = 1,
                 log_format: str = "text", api_up: bool = True,
                 directory: Path = ROOT / "etc" / "directory.dev.toml") -> None:
        self.testcase = testcase
        self.folder = Path(testcase.mktemp()).resolve()
        self.folder.mkdir(parents=True)
        self.smtp_port, self.metrics_port, api_port = free_ports(3)
        self.workers = workers
        self.api = API(testcase, self.folder, api_port)
        if api_up:
            self.api.up()
        cert, key = make_certificate(self.folder / "tls")
        self.config = self.folder / "relay.toml"
        self.config.write_text(f"""
hostname = "relay.test"
directory = "{directory}"
bounce_address = "bounce+{{id}}@bounces.test"
workers = {workers}
log_format = "{log_format}"
[tls]
certificate = "{cert}"
private_key = "{key}"
[[listener]]
role = "submission"
endpoint = "tcp:{self.smtp_port}:interface=127.0.0.1"
[delivery_api]
url = "http://127.0.0.1:{api_port}/v1/sends"
token = "{TOKEN}"
timeout = 10
[metrics]
endpoint = "tcp:{self.metrics_port}:interface=127.0.0.1"
api_answered_within = 2
""")
        self.out = Output()

    async def start(self) -> None:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("LISTEN_") and k != "PROMETHEUS_MULTIPROC_DIR"}
        env["PYTHONPATH"] = str(ROOT)
        self.twistd = SupervisedTwistd(self.testcase, self.config, env=env, out=self.out)
        self.process = self.twistd.process
        await self.until(lambda: self.out.text.count("starting on") >= self.workers + 1
                         and len(self.pids()) >= (self.workers if self.workers > 1 else 0),
                         "the relay to listen")

    async def stop(self) -> None:
        await self.twistd.stop()

    def pids(self) -> dict[int, int]:
        """The live pid of each worker, from the supervisor's log."""
        return self.twistd.pids()

    def only(self, index: int) -> None:
        """Let only worker ``index`` run (a stopped process cannot accept)."""
        self.twistd.only(index)

    async def until(self, condition: Callable[[], bool], what: str,
                    deadline: float = 30) -> None:
        end = reactor.seconds() + deadline
        while not condition():
            if reactor.seconds() > end or self.out.ended.called:
                raise AssertionError(f"timed out waiting for {what}; output:\n"
                                     f"{self.out.text[-3000:]}")
            await deferLater(reactor, 0.05, lambda: None)

    async def get(self, path: str) -> tuple[int, str]:
        response = await treq.get(f"http://127.0.0.1:{self.metrics_port}{path}",
                                  persistent=False)
        return response.code, (await treq.content(response)).decode()

    async def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample, parsed by prometheus-client's own parser."""
        code, text = await self.get("/metrics")
        assert code == 200, (code, text)
        samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return samples

    def send(self, password: str = DEMO[1], to: str = "someone@example.org",
             header_to: str | None = None) -> str:
        """One connection: STARTTLS, AUTH PLAIN, one message; the reply
        code (and text) it ended with.  Blocking: call on a thread."""
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        client = smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=20,
                              local_hostname="client.test")
        try:
            client.starttls(context=ctx)
            client.ehlo()
            client.user, client.password = DEMO[0], password
            try:
                # one mechanism: smtplib.login() would try LOGIN after PLAIN
                client.auth("PLAIN", client.auth_plain)
            except smtplib.SMTPAuthenticationError as e:
                return f"{e.smtp_code} {_text(e.smtp_error)}"
            try:
                client.sendmail("shop@example.com", [to],
                                message(to=header_to or to, subject=f"m {os.urandom(4).hex()}"))
            except smtplib.SMTPDataError as e:
                return f"{e.smtp_code} {_text(e.smtp_error)}"
            return "250"
        finally:
            client.close()

    async def sent(self, *args: Any, **kwargs: Any) -> str:
        return await in_thread(lambda: self.send(*args, **kwargs))


def _text(error: bytes | str) -> str:
    return error.decode() if isinstance(error, bytes) else error


def plain_payload(user: str, password: str) -> str:
    """The AUTH PLAIN initial response smtplib sends for these credentials."""
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(v for (n, ls), v in samples.items()
               if n == name and all(dict(ls).get(k) == x for k, x in labels.items()))


def failed_handshake(port: int) -> str:
    """STARTTLS, then a TLS 1.2 ClientHello offering only a cipher the
    relay refuses (no forward secrecy): the handshake fails.  Blocking."""
    client = smtplib.SMTP("127.0.0.1", port, timeout=20, local_hostname="client.test")
    try:
        client.ehlo()
        code, _ = client.docmd("STARTTLS")
        assert code == 220, code
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers("AES128-SHA")
        assert client.sock is not None
        try:
            ctx.wrap_socket(client.sock, server_hostname="localhost")
        except (ssl.SSLError, OSError) as e:
            return type(e).__name__
        return "handshake succeeded"
    finally:
        client.close()
