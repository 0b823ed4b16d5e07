"""Several relays behind a real HAProxy, sharing a real Redis.

Debian's ``haproxy`` (TCP mode, ``send-proxy-v2``, round robin), run from
etc/haproxy.cfg with its addresses swapped for loopback ports, in front of
two ``twistd mxmrelay`` processes (``haproxy:`` listeners, one
``redis-server``, one ``twistd mxmrelay-refapi``), all started and stopped
by each test.  Clients bind source addresses of their own (127.0.0.5 ...),
so the real client address is one HAProxy's own connections never have.
"""

from __future__ import annotations

import base64
import itertools
import re
import shutil
import smtplib
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.python.failure import Failure
from twisted.trial import unittest

from mxmrelay.proxy import HEADER_TIMEOUT, HeaderFirstFactory
from tests.helpers import ETC, free_ports, until, write
from tests.process_support import DEV_DIRECTORY, TOKEN, Twistd, base_config, refapi_process
from tests.support import fetch_json, in_thread, message
from tests.test_redis_state import RedisServer

HAPROXY = shutil.which("haproxy")
EXAMPLE = ETC / "haproxy.cfg"
DEMO = ("demo@example.com", "demo-password")
ACME = ("ops@acme.test", "acme-password")
RETRY = re.compile(r"retry-after=([\d.]+)")
_serial = itertools.count()


class Program(ProcessProtocol):
    """A process of the test's own (haproxy): its output and its end."""

    def __init__(self, testcase: unittest.TestCase, argv: list[str]) -> None:
        self.data = bytearray()
        self.ended: Deferred[None] = Deferred()
        self.process = reactor.spawnProcess(self, argv[0], argv, env={})
        testcase.addCleanup(self.stop)

    def outReceived(self, data: bytes) -> None:
        self.data += data

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)

    async def stop(self) -> None:
        if not self.ended.called:
            self.process.signalProcess("KILL")
            await self.ended


def haproxy_config(ports: dict[str, int]) -> str:
    """etc/haproxy.cfg with its public ports and relay addresses on loopback."""
    text = EXAMPLE.read_text()
    swaps = {"bind :587": f"bind 127.0.0.1:{ports['submission']}",
             "bind :465": f"bind 127.0.0.1:{ports['smtps']}",
             "192.0.2.11:10587": f"127.0.0.1:{ports['sub1']}",
             "192.0.2.12:10587": f"127.0.0.1:{ports['sub2']}",
             "192.0.2.11:10465": f"127.0.0.1:{ports['tls1']}",
             "192.0.2.12:10465": f"127.0.0.1:{ports['tls2']}"}
    lines = text.splitlines(keepends=True)
    for old, new in swaps.items():
        found = [i for i, line in enumerate(lines) if old in line and
                 not line.lstrip().startswith("#")]
        assert len(found) == 1, old
        lines[found[0]] = lines[found[0]].replace(old, new)
    return "".join(lines)


class Client:
    """One blocking SMTP session through HAProxy, from a source address."""

    def __init__(self, port: int, ca: Path, source: str, *, implicit: bool = False,
                 login: tuple[str, str] = DEMO) -> None:
        ctx = ssl.create_default_context(cafile=str(ca))
        ctx.check_hostname = False
        self.smtp: smtplib.SMTP
        if implicit:
            self.smtp = smtplib.SMTP_SSL("127.0.0.1", port, timeout=20, context=ctx,
                                         local_hostname="client.test", source_address=(source, 0))
        else:
            self.smtp = smtplib.SMTP("127.0.0.1", port, timeout=20, local_hostname="client.test",
                                     source_address=(source, 0))
            self.smtp.starttls(context=ctx)
        self.smtp.ehlo()
        self.login = login

    def auth(self, password: str | None = None) -> int:
        s = self.smtp
        s.user, s.password = self.login[0], password or self.login[1]
        plain = base64.b64encode(s.auth_plain().encode()).decode()
        code, _ = s.docmd("AUTH", "PLAIN " + plain)
        return code

    def mail(self) -> str:
        code, text = self.smtp.mail("app@" + self.login[0].split("@")[1])
        return f"{code} {text.decode()}"

    def finish(self) -> str:
        """RCPT and DATA after an accepted MAIL FROM: DATA's reply."""
        self.smtp.rcpt("someone@example.org")
        # A subject of its own: the same message twice is one send (a retry).
        code, text = self.smtp.data(message(subject=f"n{next(_serial)}",
                                            sender=f"<{self.login[0]}>"))
        return f"{code} {text.decode()}"

    def send(self) -> str:
        """MAIL FROM's refusal, or DATA's reply."""
        answer = self.mail()
        return self.finish() if answer.startswith("250") else answer

    def close(self) -> None:
        try:
            self.smtp.quit()
        except (smtplib.SMTPException, OSError):
            self.smtp.close()


class BehindHAProxy(unittest.TestCase):
    timeout = 150
    if HAPROXY is None or RedisServer is None or shutil.which("redis-server") is None:
        skip = "haproxy or redis-server not installed (make tools installs them)"

    async def start(self, **auth: int) -> None:
        folder = Path(self.mktemp()).resolve()
        folder.mkdir(parents=True)
        names = ["submission", "smtps", "sub1", "sub2", "tls1", "tls2", "api", "redis"]
        self.ports = dict(zip(names, free_ports(len(names)), strict=True))
        self.redis = RedisServer(self.ports["redis"])
        self.redis.start()
        self.addCleanup(self.redis.stop)
        self.api_port = self.ports["api"]
        api = refapi_process(self, folder, self.api_port)
        data = base_config(folder)
        self.ca = Path(data["tls"]["certificate"])
        directory = DEV_DIRECTORY.read_text()
        directory = directory.replace('id = "demo"\n', 'id = "demo"\nsends_per_second = 5\n'
                                      'burst = 5\nsends_per_day = 100\n', 1)
        directory = directory.replace('id = "acme"\n', 'id = "acme"\nsends_per_day = 3\n', 1)
        data["directory"] = str(write(folder, "directory.toml", directory))
        data["delivery_api"] = {"url": f"http://127.0.0.1:{self.api_port}/v1/sends",
                                "token": TOKEN, "timeout": 10}
        # A Redis slower than the timeout is one the relay counts without
        # (by design): on a busy test machine, give it time, so the limits
        # stay shared unless Redis is really gone.
        data["state"] = {"redis": f"redis://127.0.0.1:{self.ports['redis']}/0", "timeout": 3}
        data["auth"] = {"max_failures_per_connection": 5, "max_failures_per_user": 100, **auth}
        self.relays = []
        for n in (1, 2):
            data["listener"] = [
                {"role": "submission",
                 "endpoint": f"haproxy:tcp:{self.ports[f'sub{n}']}:interface=127.0.0.1"},
                {"role": "smtps",
                 "endpoint": f"haproxy:tcp:{self.ports[f'tls{n}']}:interface=127.0.0.1"}]
            self.relays.append(Twistd(self, write(folder / f"relay{n}", "relay.toml", data)))
        await api
        for n, relay in enumerate(self.relays, 1):
            await until(lambda r=relay: (  # type: ignore[misc]
                r.text.count("starting on") >= 2 or r.ended.called), f"relay {n} listening", 30)
            self.assertFalse(relay.ended.called, relay.text)
        cfg = write(folder, "haproxy.cfg", haproxy_config(self.ports))
        assert HAPROXY is not None
        self.haproxy = Program(self, [HAPROXY, "-db", "-f", str(cfg)])
        for port in (self.ports["submission"], self.ports["smtps"]):
            await until(lambda p=port: _accepts(p),  # type: ignore[misc]
                        f"haproxy on {port}", 15)

    def client(self, source: str, *, implicit: bool = False,
               login: tuple[str, str] = DEMO) -> Deferred[Client]:
        port = self.ports["smtps" if implicit else "submission"]
        return in_thread(lambda: Client(port, self.ca, source, implicit=implicit, login=login))

    def logs(self) -> str:
        return "".join(r.text for r in self.relays)

    async def stored_client(self, reply: str) -> Any:
        send_id = reply.split()[-1]
        stored = await fetch_json(f"http://127.0.0.1:{self.api_port}/v1/sends/{send_id}")
        return stored["client"]

    # -- the tests ---------------------------------------------------------------

    async def test_real_address_and_tls_at_the_relays(self) -> None:
        """STARTTLS on the submission port and implicit TLS on 465, ended
        by the relays; each relay logs and records the client's own
        address, and round robin gives each relay one of each."""
        await self.start()
        for implicit in (False, False, True, True):
            source = "127.0.0.6" if implicit else "127.0.0.5"
            c = await self.client(source, implicit=implicit)
            self.assertEqual(await in_thread(c.auth), 235)
            reply = await in_thread(c.send)
            await in_thread(c.close)
            self.assertTrue(reply.startswith("250"), reply)
            stored = await self.stored_client(reply)
            self.assertEqual(stored["address"], source)
            self.assertEqual(stored["listener"], "smtps" if implicit else "submission")
            self.assertTrue(stored["tls_version"].startswith("TLSv1."), stored)
        for relay in self.relays:
            self.assertRegex(relay.text, r"connect client=127\.0\.0\.5 listener=submission")
            self.assertRegex(relay.text, r"connect client=127\.0\.0\.6 listener=smtps")
            self.assertRegex(relay.text, r"tls client=127\.0\.0\.5 version=TLSv1\.[23]")
            self.assertNotRegex(relay.text, r"auth ok client=127\.0\.0\.1 ")

    async def test_rate_and_daily_quota_across_both_relays(self) -> None:
        """5 a second (burst 5) and 100 a day for the space, over 8 and
        then 4 connections spread by round robin: exactly 5 at once, every
        refused client told when, the one that comes back then accepted,
        and exactly 100 in the day."""
        await self.start()
        clients = [await self.client(f"127.0.0.{10 + i}") for i in range(8)]
        for c in clients:
            self.assertEqual(await in_thread(c.auth), 235)
        # Eight MAIL FROMs, each transaction held open: five are taken.
        answers = [await in_thread(c.mail) for c in clients]
        taken = [c for c, a in zip(clients, answers, strict=True) if a.startswith("250")]
        refused = [a for a in answers if not a.startswith("250")]
        self.assertEqual(len(taken), 5, answers)
        for a in refused:
            self.assertRegex(a, r"^451 4\.7\.1 Sending rate limit reached \(5 per second, "
                                r"burst 5\); retry-after=0\.\d+$")
        for c in taken:
            self.assertTrue((await in_thread(c.finish)).startswith("250"))
        late = clients[answers.index(refused[0])]
        wait = float(RETRY.findall(refused[0])[0])
        self.assertLessEqual(wait, 0.2)
        await in_thread(late.smtp.rset)
        await in_thread(time.sleep, wait)  # the client waits as it was told
        self.assertTrue((await in_thread(late.send)).startswith("250"))
        # Both relays took part in the five.
        for relay in self.relays:
            self.assertIn("sent id=", relay.text)
        # The rest of the day's 100, four clients paced by retry-after.
        accepted = [6]
        lock = threading.Lock()
        daily: list[str] = []

        def pace(c: Client) -> None:
            while True:
                answer = c.send()
                if answer.startswith("250"):
                    with lock:
                        accepted[0] += 1
                    continue
                assert answer.startswith("451 4.7.1 "), answer
                if "Daily" in answer:
                    daily.append(answer)
                    return
                c.smtp.rset()
                time.sleep(float(RETRY.findall(answer)[0]))

        await gatherResults([in_thread(pace, c) for c in clients[:4]])
        self.assertNotIn("unreachable", self.logs())
        self.assertEqual(accepted[0], 100)
        midnight = (time.time() // 86400 + 1) * 86400
        for answer in daily:
            self.assertIn("Daily sending quota reached (100 per day, UTC)", answer)
            self.assertLess(abs(float(RETRY.findall(answer)[0]) - (midnight - time.time())), 30)
        self.assertEqual(len(re.findall(r"\] sent id=", self.logs())), 100)
        for c in clients:
            await in_thread(c.close)

    async def test_auth_blocks_count_the_real_address_on_both_relays(self) -> None:
        """Three failures from 127.0.0.7, spread over both relays, block
        that address on both; 127.0.0.8, behind the same HAProxy, is not
        blocked."""
        await self.start(max_failures_per_address=3)
        for _ in range(3):
            c = await self.client("127.0.0.7")
            self.assertEqual(await in_thread(c.auth, "wrong"), 535)
            await in_thread(c.close)
        for relay in self.relays:
            self.assertIn("auth failure rhost=127.0.0.7 ", relay.text)
        # Round robin: two connections in a row meet both relays.
        for source, code in [("127.0.0.7", 454)] * 2 + [("127.0.0.8", 235)] * 2:
            c = await self.client(source)
            self.assertEqual(await in_thread(c.auth), code, source)
            await in_thread(c.close)
        for relay in self.relays:
            self.assertIn("auth rate limited rhost=127.0.0.7", relay.text)

    async def test_redis_gone_refuses_no_mail_and_shares_again(self) -> None:
        """A quota of 3: Redis killed mid-run, every send is accepted (each
        relay counts alone); Redis back, the two relays share one count
        again: exactly 3 more, however the sends are spread."""
        await self.start()
        c = await self.client("127.0.0.20", login=ACME)
        self.assertEqual(await in_thread(c.auth), 235)
        self.assertTrue((await in_thread(c.send)).startswith("250"))
        await in_thread(c.close)
        self.redis.stop()
        for i in range(4):
            c = await self.client(f"127.0.0.{21 + i}", login=ACME)
            self.assertEqual(await in_thread(c.auth), 235)
            reply = await in_thread(c.send)
            await in_thread(c.close)
            self.assertTrue(reply.startswith("250"), reply)
        for relay in self.relays:
            await until(lambda r=relay: "unreachable" in r.text,  # type: ignore[misc]
                        "the relay to notice", 10)
            self.assertEqual(relay.text.count("unreachable"), 1)
        self.redis.start()
        for relay in self.relays:
            await until(lambda r=relay: "answers again" in r.text,  # type: ignore[misc]
                        "the relay to recover", 15)
        answers = []
        for i in range(6):
            c = await self.client(f"127.0.0.{30 + i}", login=ACME)
            self.assertEqual(await in_thread(c.auth), 235)
            answers.append(await in_thread(c.send))
            await in_thread(c.close)
        self.assertEqual([a[:3] for a in answers].count("250"), 3, answers)
        for answer in answers[3:]:
            self.assertRegex(answer, r"^451 4\.7\.1 Daily sending quota reached \(3 per day, "
                                     r"UTC\); retry-after=\d")

    async def test_no_proxy_header_no_greeting(self) -> None:
        """Straight to a relay's haproxy: port: a client's first line is no
        PROXY header, and the connection closes without a byte; a forged
        header from a client the proxy never saw is the same as a real one,
        which is why the port must only be reachable from the proxy."""
        await self.start()
        for port in (self.ports["sub1"], self.ports["tls2"]):
            got = await in_thread(_talk, port, b"EHLO spoofer\r\n")
            self.assertEqual(got, b"")
        self.assertIn("proxy refused peer=127.0.0.1 reason=no PROXY header", self.logs())
        got = await in_thread(_talk, self.ports["sub1"],
                              b"PROXY TCP4 198.51.100.9 127.0.0.1 5000 25\r\n")
        self.assertTrue(got.startswith(b"220 "), got)


class HeaderFirstUnit(unittest.SynchronousTestCase):
    """The wrapper alone, on a Clock: nothing reaches SMTP before the header."""

    def connect(self) -> tuple[Any, StringTransport, Clock, list[bytes]]:
        from twisted.internet.address import IPv4Address
        from twisted.internet.protocol import Factory, Protocol

        seen: list[bytes] = []

        class Greeter(Protocol):
            def connectionMade(self) -> None:
                peer: Any = self.transport.getPeer()  # type: ignore[union-attr]
                seen.append(f"greet {peer.host}".encode())

            def dataReceived(self, data: bytes) -> None:
                seen.append(data)

        clock = Clock()
        factory = HeaderFirstFactory(Factory.forProtocol(Greeter), clock)
        proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 2))
        proto.makeConnection(transport)
        return proto, transport, clock, seen

    def test_v2_header_then_greeting(self) -> None:
        proto, _, _, seen = self.connect()
        header = V2Parser.PREFIX + bytes([0x21, 0x11, 0, 12]) + socket.inet_aton(
            "192.0.2.9") + socket.inet_aton("127.0.0.1") + (5000).to_bytes(2, "big") + (
            25).to_bytes(2, "big")
        proto.dataReceived(header[:7])
        self.assertEqual(seen, [])
        proto.dataReceived(header[7:] + b"EHLO x\r\n")
        self.assertEqual(seen, [b"greet 192.0.2.9", b"EHLO x\r\n"])

    def test_no_header_in_time(self) -> None:
        _, transport, clock, seen = self.connect()
        clock.advance(HEADER_TIMEOUT)
        self.assertTrue(transport.disconnecting or transport.disconnected)
        self.assertEqual((seen, transport.value()), ([], b""))

    def test_garbage_closes(self) -> None:
        proto, transport, clock, seen = self.connect()
        proto.dataReceived(b"EHLO x\r\n")
        self.assertTrue(transport.disconnecting or transport.disconnected)
        self.assertEqual((seen, transport.value()), ([], b""))
        self.assertFalse(clock.getDelayedCalls())


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 1).close()
        return True
    except OSError:
        return False


def _talk(port: int, data: bytes) -> bytes:
    """Connect straight to ``port``, send ``data``: what comes back before
    the server closes (or 5 s pass)."""
    with socket.create_connection(("127.0.0.1", port), 5) as s:
        s.sendall(data)
        s.settimeout(5)
        got = b""
        try:
            while chunk := s.recv(4096):
                got += chunk
                if b"\r\n" in got and not data.startswith(b"EHLO"):
                    break
        except (ConnectionResetError, TimeoutError):
            pass
        return got


