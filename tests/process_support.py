"""The relay and the reference API as real processes: ``twistd -n
mxmrelay`` and ``twistd -n mxmrelay-refapi``, their configuration files,
smtplib sends to them, and what their logs and units say.

Processes run under the reactor (``spawnProcess``), never blocking, since
a relay under test may share it; their environment is
:func:`tests.helpers.child_env`, so they run the code under test.
Waiting is polling against a deadline, never a fixed sleep.
"""

from __future__ import annotations

import configparser
import os
import re
import signal
import smtplib
import socket
import ssl
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IProcessTransport
from twisted.internet.protocol import ProcessProtocol, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.trial import unittest

from tests.helpers import ETC, ROOT, TWISTD, ProcessOutput, child_env, until, write
from tests.support import make_certificate, message

DEV_DIRECTORY = ETC / "directory.dev.toml"
DEMO = ("demo@example.com", "demo-password")
TOKEN = "process-token"
#: The well-known port of each role, as in the socket unit.
ROLE_PORTS = {25: "smtp", 587: "submission", 465: "smtps"}


class _FirstBytes(Protocol):
    def __init__(self) -> None:
        self.received: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        if not self.received.called:
            self.received.callback(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.received.called:
            self.received.callback(b"")


async def accepts(port: int, greeting: bool = False) -> bool:
    """Does a server accept on the loopback ``port``, and (``greeting``)
    answer with an SMTP banner?  A socket passed by "systemd" accepts into
    its backlog before any process serves it: only the banner tells."""
    try:
        proto = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=2),
                                      _FirstBytes())
    except ConnectError:
        return False
    try:
        if not greeting:
            return True
        try:
            first: bytes = await proto.received.addTimeout(0.5, reactor)
        except TimeoutError:
            return False
        return first.startswith(b"220 ")
    finally:
        proto.transport.abortConnection()


class Twistd(ProcessProtocol):
    """One ``twistd -n mxmrelay`` (or ``plugin``) process: its output, its end."""

    def __init__(self, testcase: unittest.TestCase, config: Path, *,
                 sockets: list[socket.socket] | None = None, plugin: str = "mxmrelay") -> None:
        self.data = bytearray()
        self.ended: Deferred[None] = Deferred()
        self.code: int | None = None
        self.signal: int | None = None
        argv = [str(TWISTD), "-n", "--pidfile=", plugin, "--config", str(config)]
        env = child_env()
        fds: dict[int, Any] = {0: "w", 1: "r", 2: "r"}
        executable = str(TWISTD)
        if sockets:
            # As systemd passes them: fds 3, 4, ..., LISTEN_FDS/FDNAMES, and
            # LISTEN_PID naming the process itself (a shell that then execs).
            fds.update({3 + i: s.fileno() for i, s in enumerate(sockets)})
            env["LISTEN_FDS"] = str(len(sockets))
            env["LISTEN_FDNAMES"] = ":".join(["mxmrelay.socket"] * len(sockets))
            executable = "/bin/sh"
            argv = ["sh", "-c", 'LISTEN_PID=$$; export LISTEN_PID; exec "$0" "$@"', *argv]
        self.process = reactor.spawnProcess(self, executable, argv, env=env,
                                            path=str(config.parent), childFDs=fds)
        testcase.addCleanup(self.kill)

    def outReceived(self, data: bytes) -> None:
        self.data += data

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.code = getattr(reason.value, "exitCode", None)
        self.signal = getattr(reason.value, "signal", None)
        self.ended.callback(None)

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", "replace")

    async def listening(self, port: int, greeting: bool = False) -> None:
        def check() -> Awaitable[bool]:
            if self.ended.called:
                raise AssertionError(f"twistd exited ({self.code}) before listening on "
                                     f"{port}:\n{self.text}")
            return accepts(port, greeting)

        await until(check, f"twistd to accept on port {port}")

    async def exit(self, timeout: float = 20.0) -> int | None:
        """Wait for the process to end on its own; its exit code."""
        try:
            await until(lambda: self.ended.called, "twistd to exit", timeout)
        except AssertionError:
            raise AssertionError(f"twistd still running after {timeout} s:\n{self.text}") from None
        return self.code

    async def stop(self, testcase: unittest.TestCase) -> None:
        """SIGTERM, as systemd stops the service: a clean shutdown.

        twistd ends by re-raising the signal that stopped it (so its
        status says why it stopped): the status is "killed by SIGTERM",
        which systemd counts as a clean stop like exit 0, after the
        whole shutdown has run."""
        self.process.signalProcess("TERM")
        await self.exit()
        testcase.assertIn((self.code, self.signal), [(0, None), (None, signal.SIGTERM)],
                          self.text)
        testcase.assertIn("Received SIGTERM, shutting down.", self.text)
        testcase.assertIn("Server Shut Down.", self.text)
        testcase.assertNotIn("Traceback", self.text)

    async def kill(self) -> None:
        """Cleanup: SIGTERM (a supervisor then stops its workers), SIGKILL
        if that does not end it within 10 s."""
        if self.ended.called:
            return
        self.process.signalProcess("TERM")
        try:
            await until(lambda: self.ended.called, "twistd to exit", 10)
        except AssertionError:
            if not self.ended.called:
                self.process.signalProcess("KILL")
            await self.ended


class SupervisedTwistd:
    """``twistd -n mxmrelay --config FILE`` run from the configuration's
    folder, its output collected in ``out``: with ``workers = N`` a
    supervisor, whose log names each worker's pid.  Stopped at cleanup."""

    def __init__(self, testcase: unittest.TestCase, config: Path, *,
                 env: dict[str, str] | None = None, out: ProcessOutput | None = None) -> None:
        self.out = out if out is not None else ProcessOutput()
        if env is None:
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.process: IProcessTransport = reactor.spawnProcess(
            self.out, str(TWISTD),
            [str(TWISTD), "-n", "--pidfile=", "mxmrelay", "--config", str(config)],
            env=env, path=str(config.parent))
        testcase.addCleanup(self.stop)

    def pids(self) -> dict[int, int]:
        """The live pid of each worker, from the supervisor's log."""
        return {int(i): int(p) for i, p in re.findall(r"worker (\d+) started pid=(\d+)",
                                                      self.out.text)}

    def only(self, index: int) -> None:
        """Let only worker ``index`` run (a stopped process cannot accept)."""
        for i, pid in self.pids().items():
            os.kill(pid, signal.SIGCONT if i == index else signal.SIGSTOP)

    async def stop(self) -> None:
        """Wake every worker (a stopped one could not end), then SIGTERM
        the supervisor and wait for its end."""
        for pid in self.pids().values():
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        if not self.out.ended.called:
            self.process.signalProcess("TERM")
            await self.out.ended


def base_config(folder: Path) -> dict[str, Any]:
    cert, key = make_certificate(folder / "tls")
    return {
        "hostname": "relay.test",
        "directory": str(DEV_DIRECTORY),
        "bounce_address": "bounce+{id}@bounces.test",
        "tls": {"certificate": str(cert), "private_key": str(key)},
    }


def relay_config(folder: Path, ports: dict[str, int], api_url: str) -> dict[str, Any]:
    data = base_config(folder)
    data["listener"] = [{"role": role, "endpoint": f"tcp:{port}:interface=127.0.0.1"}
                        for role, port in ports.items()]
    data["delivery_api"] = {"url": api_url, "token": TOKEN, "timeout": 10}
    return data


def refapi_config(folder: Path, port: int) -> dict[str, Any]:
    """A configuration of ``twistd mxmrelay-refapi`` on ``port``."""
    return {"endpoint": f"tcp:{port}:interface=127.0.0.1",
            "database": str(folder / "refapi.sqlite3"), "token": TOKEN}


async def refapi_process(testcase: unittest.TestCase, folder: Path, port: int) -> Twistd:
    """The reference API in its own process, accepting on ``port``."""
    api = Twistd(testcase, write(folder / "api", "refapi.toml", refapi_config(folder, port)),
                 plugin="mxmrelay-refapi")
    await api.listening(port)
    return api


def smtp_send(host: str, port: int, ca: Path, subject: str, implicit: bool = False,
              password: str = DEMO[1]) -> tuple[int, str]:
    """A blocking smtplib send (run it on a thread): STARTTLS or implicit TLS,
    AUTH, one message; the DATA reply."""
    ctx = ssl.create_default_context(cafile=str(ca))
    client: smtplib.SMTP
    if implicit:
        client = smtplib.SMTP_SSL(host, port, timeout=10, context=ctx,
                                  local_hostname="client.test")
    else:
        client = smtplib.SMTP(host, port, timeout=10, local_hostname="client.test")
        client.starttls(context=ctx)
    try:
        client.login(DEMO[0], password)
        client.mail("app@example.com")
        client.rcpt("someone@example.org")
        code, text = client.data(message(subject=subject, extra="X-Mxm-Tag: process\r\n"))
        return code, text.decode()
    finally:
        client.quit()


def smtp_wrong_password(port: int, ca: Path) -> int:
    try:
        smtp_send("127.0.0.1", port, ca, "never", password="not-the-password")
    except smtplib.SMTPAuthenticationError as e:
        return e.smtp_code
    raise AssertionError("a wrong password was accepted")


def fail2ban_regexes() -> list[re.Pattern[str]]:
    """The filter's failregex lines, <HOST> made a named group as fail2ban does."""
    parser = configparser.ConfigParser()  # fail2ban's %-interpolation, too
    parser.read(ETC / "fail2ban" / "mxmrelay.conf")
    lines = [x.strip() for x in parser["Definition"]["failregex"].splitlines() if x.strip()]
    assert lines
    return [re.compile(x.replace("<HOST>", r"(?P<host>\S+)")) for x in lines]


def banned_hosts(log_text: str) -> list[str]:
    """The host of every log line the fail2ban filter counts as a failure."""
    hosts = []
    for line in log_text.splitlines():
        for regex in fail2ban_regexes():
            m = regex.search(line)
            if m:
                hosts.append(m.group("host"))
                break
    return hosts


def unit_settings(path: Path) -> dict[str, list[str]]:
    """Every ``Key=value`` of a systemd unit, all sections, in order."""
    settings: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings
