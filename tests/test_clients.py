"""Real clients and the real process, end to end.

- swaks and curl, the clients customers and operators really use, against
  a relay in this process (real TLS on loopback, the real reference API).
- ``twistd -n mxmrelay`` as a separate process: start, a send, SIGTERM,
  beside ``twistd -n mxmrelay-refapi`` (the reference API's own process);
  systemd socket activation with the production example's endpoints;
  start-up errors of both.
- What ships: the wheel, ``mxmrelay-passwd``, the systemd units, the
  fail2ban filter.

Processes run under the reactor (``getProcessOutputAndValue``,
``spawnProcess``), never blocking, since the relay under test shares it.
Child Python processes get ``PYTHONPATH`` = the project, so they run the
code under test rather than whatever was last installed into the venv.
Waiting is polling against a deadline, never a fixed sleep.
"""

from __future__ import annotations

import configparser
import importlib.util
import json
import os
import re
import shutil
import signal
import smtplib
import socket
import ssl
import sys
import tomllib
import zipfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import attrs
from twisted.internet import reactor
from twisted.internet.defer import Deferred, TimeoutError, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError
from twisted.internet.protocol import ProcessProtocol, Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import ILogObserver, formatEventAsClassicLogText, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest

from mxmrelay.auth import verify_password
from mxmrelay.config import Config
from mxmrelay_refapi.config import RefAPIConfig
from tests.support import RelayUnderTest, fetch_json, in_thread, make_certificate, message

ROOT = Path(__file__).resolve().parent.parent
ETC = ROOT / "etc"
BIN = Path(sys.executable).parent
TWISTD = BIN / "twistd"
DEV_DIRECTORY = ETC / "directory.dev.toml"
DEMO = ("demo@example.com", "demo-password")
TOKEN = "process-token"
#: The well-known port of each role, as in the socket unit.
ROLE_PORTS = {25: "smtp", 587: "submission", 465: "smtps"}
QUEUED = re.compile(r"250 2\.0\.0 Ok: queued as (\S+)")


# -- helpers -----------------------------------------------------------------


def need(program: str) -> str:
    path = shutil.which(program)
    if path is None:
        raise unittest.SkipTest(f"{program} is not installed (make tools installs it)")
    return path


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


async def run(executable: str | Path, *args: str | Path, stdin: bytes | None = None,
              path: Path | None = None) -> tuple[str, int]:
    """A short-lived process: its stdout and stderr together, and its exit code."""
    out, err, code = await getProcessOutputAndValue(
        str(executable), [str(a) for a in args], env=child_env(),
        path=None if path is None else str(path), reactor=reactor, stdinBytes=stdin)
    return out.decode("utf-8", "replace") + err.decode("utf-8", "replace"), code


def free_ports(n: int) -> list[int]:
    """n loopback ports free right now (all bound at once, so distinct)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


async def until(check: Callable[[], bool | Awaitable[bool]], what: str,
                timeout: float = 20.0) -> None:
    """Poll ``check`` every 50 ms until it is true, or fail after ``timeout``."""
    deadline = reactor.seconds() + timeout
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await deferLater(reactor, 0.05, lambda: None)


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


def toml(data: dict[str, Any]) -> str:
    """Just enough TOML: scalars, tables, arrays of tables of scalars."""
    def pairs(d: dict[str, Any]) -> list[str]:
        return [f"{k} = {json.dumps(v)}" for k, v in d.items()]

    lines = pairs({k: v for k, v in data.items() if not isinstance(v, dict | list)})
    for key, value in data.items():
        if isinstance(value, dict):
            lines += [f"[{key}]", *pairs(value)]
        elif isinstance(value, list):
            for item in value:
                lines += [f"[[{key}]]", *pairs(item)]
    return "\n".join(lines) + "\n"


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


def reference_api(folder: Path, port: int) -> dict[str, Any]:
    """A configuration of ``twistd mxmrelay-refapi`` on ``port``."""
    return {"endpoint": f"tcp:{port}:interface=127.0.0.1",
            "database": str(folder / "refapi.sqlite3"), "token": TOKEN}


async def refapi_process(testcase: unittest.TestCase, folder: Path, port: int) -> Twistd:
    """The reference API in its own process, accepting on ``port``."""
    api = Twistd(testcase, write(folder / "api", "refapi.toml", reference_api(folder, port)),
                 plugin="mxmrelay-refapi")
    await api.listening(port)
    return api


def write(folder: Path, name: str, data: dict[str, Any] | str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(data if isinstance(data, str) else toml(data))
    return path


def folder_for(testcase: unittest.TestCase) -> Path:
    folder = Path(testcase.mktemp()).resolve()
    folder.mkdir(parents=True)
    return folder


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


def queued_id(text: str) -> str:
    found = QUEUED.findall(text)
    assert found, f"no '250 ... queued as' in:\n{text}"
    send_id: str = found[-1]
    return send_id


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


# -- swaks and curl ------------------------------------------------------------


class Swaks(unittest.TestCase):
    def setUp(self) -> None:
        self.swaks = need("swaks")
        self.relay = RelayUnderTest(self)

    async def swaks_run(self, role: str, *args: str, password: str = DEMO[1],
                        auth: bool = True) -> tuple[str, int]:
        argv = ["--server", f"127.0.0.1:{self.relay.ports[role]}", "--timeout", "20",
                "--from", "app@example.com", "--to", "someone@example.org",
                "--header", "X-Mxm-Tag: swaks,test", *args]
        if auth:
            argv += ["--auth-user", DEMO[0], "--auth-password", password]
        return await run(self.swaks, *argv)

    async def assert_stored(self, output: str, listener: str) -> None:
        send_id = queued_id(output)
        assert self.relay.api is not None
        stored = await fetch_json(f"{self.relay.api.url}/{send_id}")
        self.assertEqual(stored["id"], send_id)
        self.assertEqual(stored["tags"], ["swaks", "test"])
        self.assertEqual(stored["mail_from"], "app@example.com")
        self.assertEqual(stored["to"], "someone@example.org")
        self.assertEqual(stored["client"]["listener"], listener)
        self.assertIn(stored["client"]["tls_version"], ("TLSv1.2", "TLSv1.3"))

    async def test_starttls_roles(self) -> None:
        for role in ("submission", "smtp"):
            output, code = await self.swaks_run(role, "--tls")
            self.assertEqual(code, 0, output)
            await self.assert_stored(output, role)

    async def test_smtps(self) -> None:
        output, code = await self.swaks_run("smtps", "--tlsc")
        self.assertEqual(code, 0, output)
        await self.assert_stored(output, "smtps")

    async def test_wrong_password(self) -> None:
        output, code = await self.swaks_run("submission", "--tls", password="wrong-password")
        self.assertNotEqual(code, 0, output)
        self.assertIn("535 5.7.8", output)
        self.assertIsNone(QUEUED.search(output), output)

    async def test_foreign_sender_domain(self) -> None:
        output, code = await self.swaks_run("submission", "--tls", "--from", "x@acme.test")
        self.assertNotEqual(code, 0, output)
        self.assertIn("553 5.7.1", output)

    async def test_plaintext(self) -> None:
        # AUTH is not even offered before STARTTLS, so a client that insists
        # on authenticating gives up...
        output, code = await self.swaks_run("submission")
        self.assertNotEqual(code, 0, output)
        self.assertNotRegex(output, r"250[ -]AUTH")
        # ...and one that goes on without meets 530 at MAIL.
        output, code = await self.swaks_run("submission", "--auth-optional")
        self.assertNotEqual(code, 0, output)
        self.assertIn("530 5.7.0", output)
        self.assertIsNone(QUEUED.search(output), output)


class Curl(unittest.TestCase):
    def setUp(self) -> None:
        self.curl = need("curl")
        self.relay = RelayUnderTest(self)
        self.folder = folder_for(self)

    async def curl_send(self, scheme: str, role: str, subject: str,
                        *tls: str) -> tuple[str, int]:
        port = self.relay.ports[role]
        msg = self.folder / f"{subject}.eml"
        msg.write_bytes(message(subject=subject, sender="app@example.com",
                                extra=f"X-Mxm-Tag: curl,{scheme}\r\n"))
        return await run(
            self.curl, "--silent", "--show-error", "--verbose", "--max-time", "20",
            f"{scheme}://localhost:{port}", "--resolve", f"localhost:{port}:127.0.0.1",
            *tls, "--mail-from", "app@example.com", "--mail-rcpt", "someone@example.org",
            "--upload-file", msg, "-u", f"{DEMO[0]}:{DEMO[1]}")

    async def assert_stored(self, output: str, tags: list[str], listener: str) -> None:
        send_id = queued_id(output)
        assert self.relay.api is not None
        stored = await fetch_json(f"{self.relay.api.url}/{send_id}")
        self.assertEqual(stored["id"], send_id)
        self.assertEqual(stored["tags"], tags)
        self.assertEqual(stored["client"]["listener"], listener)

    async def test_starttls(self) -> None:
        output, code = await self.curl_send("smtp", "submission", "curl-starttls", "--ssl-reqd",
                                            "--cacert", str(self.relay.ca_file))
        self.assertEqual(code, 0, output)
        await self.assert_stored(output, ["curl", "smtp"], "submission")

    async def test_smtps(self) -> None:
        output, code = await self.curl_send("smtps", "smtps", "curl-smtps",
                                            "--cacert", str(self.relay.ca_file))
        self.assertEqual(code, 0, output)
        await self.assert_stored(output, ["curl", "smtps"], "smtps")

    async def test_certificate_is_verified(self) -> None:
        # Without the CA, curl refuses the self-signed certificate: the relay
        # really presents it, and nothing is sent.
        output, code = await self.curl_send("smtp", "submission", "curl-unverified",
                                            "--ssl-reqd")
        self.assertEqual(code, 60, output)
        self.assertIsNone(QUEUED.search(output), output)


# -- the real process ------------------------------------------------------------


class Process(unittest.TestCase):
    timeout = 60

    def setUp(self) -> None:
        if not TWISTD.exists():
            raise unittest.SkipTest(f"{TWISTD} is missing")

    async def test_relay_and_api(self) -> None:
        folder = folder_for(self)
        smtp, submission, smtps, api = free_ports(4)
        api_proc = await refapi_process(self, folder, api)
        data = relay_config(folder, {"smtp": smtp, "submission": submission, "smtps": smtps},
                            f"http://127.0.0.1:{api}/v1/sends")
        proc = Twistd(self, write(folder, "relay.toml", data))
        await proc.listening(submission)
        ca = Path(data["tls"]["certificate"])

        code, text = await in_thread(smtp_send, "127.0.0.1", submission, ca, "one process")
        self.assertEqual(code, 250, text)
        send_id = text.split()[-1]
        self.assertEqual(await in_thread(smtp_wrong_password, submission, ca), 535)

        listed = await fetch_json(f"http://127.0.0.1:{api}/v1/sends")
        stored = {s["id"]: s for s in listed["sends"]}
        self.assertIn(send_id, stored)
        self.assertEqual(stored[send_id]["client"]["listener"], "submission")
        self.assertEqual(stored[send_id]["tags"], ["process"])

        await proc.stop(self)
        self.assertIn("connect client=127.0.0.1 listener=submission", proc.text)
        self.assertIn("auth ok client=127.0.0.1 user=demo@example.com", proc.text)
        # The fail2ban filter finds the failed AUTH (smtplib tries two
        # mechanisms: two failures) in twistd's real output.
        self.assertEqual(banned_hosts(proc.text),
                         ["127.0.0.1"] * proc.text.count("] auth failure rhost="))
        self.assertTrue(banned_hosts(proc.text))
        await api_proc.stop(self)

    async def test_relay_and_api_started_together(self) -> None:
        """As `make run` starts them: neither waits for the other."""
        folder = folder_for(self)
        smtps, api = free_ports(2)
        api_proc = Twistd(self, write(folder / "api", "api.toml", reference_api(folder, api)),
                          plugin="mxmrelay-refapi")
        relay = relay_config(folder, {"smtps": smtps}, f"http://127.0.0.1:{api}/v1/sends")
        relay_proc = Twistd(self, write(folder / "relay", "relay.toml", relay))
        await gatherResults([Deferred.fromCoroutine(api_proc.listening(api)),
                             Deferred.fromCoroutine(relay_proc.listening(smtps))])
        self.assertNotIn("SMTPFactory", api_proc.text)  # no listeners there

        ca = Path(relay["tls"]["certificate"])
        code, text = await in_thread(smtp_send, "127.0.0.1", smtps, ca, "two processes", True)
        self.assertEqual(code, 250, text)
        send_id = text.split()[-1]
        stored = await fetch_json(f"http://127.0.0.1:{api}/v1/sends/{send_id}")
        self.assertEqual(stored["client"]["listener"], "smtps")
        self.assertIn('"POST /v1/sends HTTP/1.1" 201', api_proc.text)

        await relay_proc.stop(self)
        await api_proc.stop(self)

    async def test_socket_activation_with_the_production_endpoints(self) -> None:
        await self.socket_activation(workers=1)

    async def test_socket_activation_with_workers(self) -> None:
        await self.socket_activation(workers=2)

    async def socket_activation(self, workers: int) -> None:
        """The production example's [[listener]] endpoints, verbatim, on
        sockets made as mxmrelay.socket makes them (dual-stack IPv6, passed
        in ListenStream= order)."""
        try:
            probe = socket.socket(socket.AF_INET6)
            probe.close()
        except OSError:
            raise unittest.SkipTest("no IPv6 sockets here") from None
        listen_ports = [int(p) for p in unit_settings(ETC / "mxmrelay.socket")["ListenStream"]]
        example = tomllib.loads((ETC / "mxmrelay.toml").read_text())
        sockets = []
        for _ in listen_ports:
            s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # BindIPv6Only=both
            s.bind(("::", 0))
            s.listen(16)
            sockets.append(s)
        for s in sockets:
            self.addCleanup(s.close)
        # socket i stands for ListenStream=listen_ports[i]
        port_of = {ROLE_PORTS[p]: s.getsockname()[1] for p, s in zip(listen_ports, sockets,
                                                                    strict=True)}

        folder = folder_for(self)
        api_port, = free_ports(1)
        data = base_config(folder)
        data["listener"] = example["listener"]
        data["delivery_api"] = {"url": f"http://127.0.0.1:{api_port}/v1/sends", "token": TOKEN}
        api = await refapi_process(self, folder, api_port)
        data["workers"] = workers
        proc = Twistd(self, write(folder, "relay.toml", data), sockets=sockets)
        for s in sockets:
            s.close()  # the child has them now
        await proc.listening(port_of["submission"], greeting=True)
        ca = Path(data["tls"]["certificate"])

        for role, port in port_of.items():
            code, text = await in_thread(smtp_send, "127.0.0.1", port, ca, f"activated {role}",
                                         role == "smtps")
            self.assertEqual(code, 250, text)
            stored = await fetch_json(f"http://127.0.0.1:{api_port}/v1/sends/{text.split()[-1]}")
            self.assertEqual(stored["client"]["listener"], role)
            # The client's real address, as an IPv4-mapped IPv6 address:
            # domain=INET on these sockets would read garbage here.
            self.assertEqual(stored["client"]["address"], "::ffff:127.0.0.1")
        await proc.stop(self)
        await api.stop(self)

    async def test_startup_errors(self) -> None:
        """Each mistake: exit 1 within seconds, one line naming the file and
        the key, no traceback, and no hang."""
        folder = folder_for(self)
        good = relay_config(folder, {"submission": 0}, "http://127.0.0.1:9/v1/sends")
        cases: list[tuple[Path, list[str]]] = []

        missing_cert = {**good, "tls": {**good["tls"],
                                        "certificate": str(folder / "no-such-cert.pem")}}
        cases.append((write(folder / "cert", "relay.toml", missing_cert),
                      [str(folder / "no-such-cert.pem"), "cannot read certificate"]))

        directory = write(folder / "dir", "directory.toml", {
            "customer": [{"id": "demo", "domains": ["example.com"]}],
            "user": [{"email": "a@example.com", "password": "scrypt$x", "customer": "nobody"}],
        })
        cases.append((write(folder / "dir", "relay.toml", {**good, "directory": str(directory)}),
                      [str(directory), "user[0].customer"]))

        bad_toml = folder / "toml" / "relay.toml"
        bad_toml.parent.mkdir()
        bad_toml.write_text('hostname = "relay.test"\n[tls\n')
        cases.append((bad_toml, [str(bad_toml), "not valid TOML"]))

        endpoint = {**good, "listener": [{"role": "submission", "endpoint": "tcpx:25"}]}
        cases.append((write(folder / "endpoint", "relay.toml", endpoint),
                      ["listener[0].endpoint", "tcpx"]))

        activated = {**good, "listener": [{"role": "submission",
                                           "endpoint": "systemd:domain=INET6:index=0"}]}
        cases.append((write(folder / "systemd", "relay.toml", activated),
                      ["listener[0].endpoint", "no such socket passed by systemd"]))

        # workers: the supervisor binds as it is built; a port in use must
        # still end the process.
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        supervised = {**good, "workers": 2, "listener": [{
            "role": "submission",
            "endpoint": f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1"}]}
        cases.append((write(folder / "workers", "relay.toml", supervised),
                      ["Address already in use"]))

        procs = [(Twistd(self, config), expected) for config, expected in cases]
        for proc, expected in procs:
            self.assertEqual(await proc.exit(timeout=15), 1, proc.text)
            self.assertIn("mxmrelay: cannot start: ", proc.text)
            for words in expected:
                self.assertIn(words, proc.text)
            self.assertNotIn("Traceback", proc.text)


# -- what ships ------------------------------------------------------------------


class Packaging(unittest.TestCase):
    timeout = 60

    async def test_wheel(self) -> None:
        """Built from a clean copy of the sources (no stale build/ folder,
        no race with other builds in the working tree)."""
        folder = folder_for(self)
        source = folder / "src"
        shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "dist", "var", "_trial_temp*", "*.egg-info",
            "__pycache__", ".*_cache", ".hypothesis", "dropin.cache"))
        output, code = await run(BIN / "pip", "wheel", "--no-deps", "--quiet", "-w",
                                 folder / "dist", source)
        self.assertEqual(code, 0, output)
        wheels = list((folder / "dist").glob("mxmrelay-*.whl"))
        self.assertEqual(len(wheels), 1, output)
        with zipfile.ZipFile(wheels[0]) as whl:
            names = set(whl.namelist())
            entry_points = next(whl.read(n).decode() for n in names
                                if n.endswith(".dist-info/entry_points.txt"))
        self.assertIn("twisted/plugins/mxmrelay_plugin.py", names)
        self.assertIn("twisted/plugins/mxmrelay_refapi_plugin.py", names)
        self.assertIn("mxmrelay/py.typed", names)
        self.assertIn("mxmrelay_refapi/py.typed", names)
        # twisted/ and twisted/plugins/ belong to Twisted: an __init__.py of
        # ours would shadow it, or hide every other plugin.
        self.assertNotIn("twisted/__init__.py", names)
        self.assertNotIn("twisted/plugins/__init__.py", names)
        # Every module of the package, and nothing else.
        for package in ("mxmrelay", "mxmrelay_refapi"):
            modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / package).rglob("*.py")}
            self.assertEqual({n for n in names
                              if n.startswith(f"{package}/") and n.endswith(".py")}, modules)
        self.assertIn("mxmrelay-passwd = mxmrelay.passwords:main", entry_points)

    async def test_mxmrelay_passwd(self) -> None:
        script = BIN / "mxmrelay-passwd"
        if not script.exists():
            raise unittest.SkipTest(f"{script} is missing: pip install the project")
        output, code = await run(script, stdin=b"correct horse battery\n")
        self.assertEqual(code, 0, output)
        encoded = output.strip()
        self.assertTrue(encoded.startswith("scrypt$"), output)
        self.assertTrue(verify_password("correct horse battery", encoded))
        self.assertFalse(verify_password("correct horse battery ", encoded))
        self.assertFalse(verify_password("wrong", encoded))
        # never from the command line; never empty
        _, code = await run(script, "secret")
        self.assertEqual(code, 2)
        output, code = await run(script, stdin=b"\n")
        self.assertEqual(code, 1, output)

    def test_production_example(self) -> None:
        config = Config.from_file(ETC / "mxmrelay.toml")
        assert config.delivery_api is not None
        self.assertTrue(config.delivery_api.url.startswith("https://"))
        self.assertTrue(str(config.directory).startswith("/etc/mxmrelay/"))
        self.assertTrue(str(config.tls.private_key).startswith("/etc/mxmrelay/"))
        # Each role takes the socket at the position of its port in the
        # socket unit's ListenStream= lines.
        listen = [int(p) for p in unit_settings(ETC / "mxmrelay.socket")["ListenStream"]]
        self.assertEqual(sorted(listen), sorted(ROLE_PORTS))
        self.assertEqual(sorted(x.role for x in config.listeners), sorted(ROLE_PORTS.values()))
        for listener in config.listeners:
            index = listen.index(next(p for p, r in ROLE_PORTS.items() if r == listener.role))
            # INET6: ListenStream=PORT is a dual-stack IPv6 socket.
            self.assertEqual(listener.endpoint, f"systemd:domain=INET6:index={index}")

    def test_service_unit_settings(self) -> None:
        unit = unit_settings(ETC / "mxmrelay.service")

        def one(key: str) -> str:
            self.assertEqual(len(unit.get(key, [])), 1, f"{key}: {unit.get(key)}")
            return unit[key][0]

        self.assertEqual(one("ExecStart"), "/opt/mxmrelay/venv/bin/twistd -n --pidfile= "
                         "mxmrelay --config /etc/mxmrelay/mxmrelay.toml")
        # A broken file fails the start (and systemctl restart) with the
        # reasons, before the relay is stopped for good by StartLimit*.
        self.assertEqual(one("ExecStartPre"), "/opt/mxmrelay/venv/bin/mxmrelay-check "
                         "--config /etc/mxmrelay/mxmrelay.toml")
        # The production example's listeners are systemd: endpoints.
        self.assertEqual(one("Requires"), "mxmrelay.socket")
        self.assertIn("mxmrelay.socket", " ".join(unit["After"]).split())
        self.assertEqual(unit_settings(ETC / "mxmrelay.socket")["Backlog"], ["1024"])
        self.assertEqual(one("User"), "mxmrelay")
        self.assertEqual(one("AmbientCapabilities"), "CAP_NET_BIND_SERVICE")
        self.assertEqual(one("CapabilityBoundingSet"), "CAP_NET_BIND_SERVICE")
        for key in ("NoNewPrivileges", "PrivateTmp", "PrivateDevices", "ProtectHome",
                    "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
                    "ProtectControlGroups", "RestrictNamespaces", "LockPersonality"):
            self.assertEqual(one(key), "yes", key)
        self.assertEqual(one("ProtectSystem"), "strict")
        self.assertEqual(set(one("RestrictAddressFamilies").split()),
                         {"AF_INET", "AF_INET6", "AF_UNIX"})
        self.assertIn("@system-service", unit["SystemCallFilter"])
        self.assertIn("/var/lib/mxmrelay", one("ReadWritePaths"))
        self.assertEqual(one("Restart"), "on-failure")
        # Breaks pyOpenSSL's cffi callbacks (see the comment in the unit).
        self.assertNotIn("MemoryDenyWriteExecute", unit)

    async def test_systemd_analyze_verify(self) -> None:
        """The units exactly as shipped, in a root tree of their own: this
        system's unit files (for the targets they name), the units in
        /etc/systemd/system, and the project's own twistd and mxmrelay-check
        at the paths the service names.  Not a single complaint."""
        analyze = need("systemd-analyze")
        root = folder_for(self) / "root"
        system = next((d for d in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))
                       if (d / "sysinit.target").exists()), None)
        if system is None:
            raise unittest.SkipTest("no systemd unit files on this machine")
        shutil.copytree(system, root / system.relative_to("/"), symlinks=True)
        units = root / "etc/systemd/system"
        units.mkdir(parents=True)
        for name in ("mxmrelay.socket", "mxmrelay.service"):
            shutil.copy(ETC / name, units / name)
        service = unit_settings(ETC / "mxmrelay.service")
        programs = [Path(v.lstrip("-+!@:").split()[0]) for k, vs in service.items()
                    if k.startswith("Exec") for v in vs]
        self.assertEqual({p.parent for p in programs}, {Path("/opt/mxmrelay/venv/bin")})
        for program in programs:
            ours = BIN / program.name
            if not ours.exists():
                raise unittest.SkipTest(f"{ours} is missing: pip install the project")
            installed = root / program.relative_to("/")
            installed.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ours, installed)

        async def verify() -> tuple[str, int]:
            return await run(analyze, "verify", f"--root={root}",
                             "mxmrelay.socket", "mxmrelay.service")

        output, code = await verify()
        self.assertEqual((output, code), ("", 0))
        # The tree is what is checked: without the check, the unit is wrong.
        (root / "opt/mxmrelay/venv/bin/mxmrelay-check").unlink()
        output, code = await verify()
        self.assertNotEqual(code, 0)
        self.assertIn("/opt/mxmrelay/venv/bin/mxmrelay-check is not executable", output)

    async def test_production_example_passes_the_check(self) -> None:
        """etc/mxmrelay.toml as shipped, with /etc/mxmrelay/ moved to a
        folder holding a directory, a certificate for its hostname and the
        key: mxmrelay-check (what ExecStartPre runs) finds nothing wrong."""
        if importlib.util.find_spec("mxmrelay.check") is None:
            raise unittest.SkipTest("mxmrelay/check.py is not there yet")
        folder = folder_for(self)
        text = (ETC / "mxmrelay.toml").read_text()
        self.assertIn('"/etc/mxmrelay/', text)
        config = folder / "mxmrelay.toml"
        config.write_text(text.replace('"/etc/mxmrelay/', f'"{folder}/'))
        shutil.copy(DEV_DIRECTORY, folder / "directory.toml")
        cert, key = make_certificate(folder / "tls", "smtp.example.net")
        cert.rename(folder / "tls" / "fullchain.pem")
        key.rename(folder / "tls" / "privkey.pem")
        output, code = await run(sys.executable, "-m", "mxmrelay.check", "--config", config)
        self.assertEqual((output.strip(), code), ("ok", 0))
        # and it does look: without the key, it says so and fails
        (folder / "tls" / "privkey.pem").unlink()
        output, code = await run(sys.executable, "-m", "mxmrelay.check", "--config", config)
        self.assertEqual(code, 1, output)
        self.assertIn("tls.private_key", output)


class MakeRun(unittest.TestCase):
    """``make run PORTS=smtp,submission,smtps,api``: the development
    configuration on other ports, generated by the Makefile's own step."""

    timeout = 60

    async def make(self, *args: str) -> tuple[str, int]:
        program = need("make")
        # Not the outer make's flags and job server, when `make test` runs us.
        env = {k: v for k, v in child_env().items()
               if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEFILES")}
        out, err, code = await getProcessOutputAndValue(
            program, ["-s", "--no-print-directory", f"PYTHON={sys.executable}", *args],
            env=env, path=str(ROOT), reactor=reactor)
        return out.decode() + err.decode(), code

    async def test_ports(self) -> None:
        folder = folder_for(self)
        generated, api_generated = folder / "dev.toml", folder / "refapi.toml"
        output, code = await self.make("dev-config", "PORTS=3525,3587,3465,3025",
                                       f"DEV_CONFIG={generated}",
                                       f"REFAPI_CONFIG={api_generated}")
        self.assertEqual(code, 0, output)
        config = Config.from_file(generated)
        self.assertEqual({x.role: x.endpoint for x in config.listeners}, {
            "smtp": "tcp:3525:interface=127.0.0.1",
            "submission": "tcp:3587:interface=127.0.0.1",
            "smtps": "tcp:3465:interface=127.0.0.1"})
        api = RefAPIConfig.from_file(api_generated)
        assert config.delivery_api is not None
        self.assertEqual(api.endpoint, "tcp:3025:interface=127.0.0.1")
        # The relay forwards to the reference API where it now listens.
        self.assertEqual(config.delivery_api.url, "http://127.0.0.1:3025/v1/sends")
        # The files are the checkout's, wherever the copy is.
        self.assertEqual(config.directory, DEV_DIRECTORY)
        self.assertEqual(config.tls.certificate, ROOT / "var/tls/localhost.pem")
        self.assertEqual(config.tls.private_key, ROOT / "var/tls/localhost.key")
        self.assertEqual(api.database, ROOT / "var/refapi.sqlite3")
        # Nothing else differs from etc/mxmrelay.dev.toml and etc/refapi.dev.toml.
        original = Config.from_file(ETC / "mxmrelay.dev.toml")
        original_api = RefAPIConfig.from_file(ETC / "refapi.dev.toml")
        self.assertEqual(attrs.evolve(api, endpoint=original_api.endpoint,
                                      database=original_api.database), original_api)
        self.assertEqual(original_api.token, original.delivery_api.token)
        assert original.delivery_api is not None
        self.assertEqual([x.role for x in config.listeners],
                         [x.role for x in original.listeners])
        self.assertEqual(attrs.evolve(config.delivery_api, url=original.delivery_api.url),
                         original.delivery_api)
        self.assertEqual(attrs.evolve(config, listeners=original.listeners,
                                      delivery_api=original.delivery_api,
                                      directory=original.directory, tls=original.tls,
                                      source=original.source),
                         original)

    async def test_run_uses_the_copies_only_with_ports(self) -> None:
        """Two processes: the reference API in the background, stopped
        (trap) when the relay in the foreground ends."""
        output, code = await self.make("-n", "run")
        self.assertEqual(code, 0, output)
        self.assertIn(" mxmrelay-refapi --config etc/refapi.dev.toml & api=$!;", output)
        self.assertIn("trap 'kill $api", output)
        self.assertIn(" mxmrelay --config etc/mxmrelay.dev.toml\n", output)
        output, code = await self.make("-n", "run", "PORTS=3525,3587,3465,3025")
        self.assertEqual(code, 0, output)
        self.assertIn(" mxmrelay-refapi --config var/refapi.dev.3525-3587-3465-3025.toml &",
                      output)
        self.assertIn(" mxmrelay --config var/mxmrelay.dev.3525-3587-3465-3025.toml\n",
                      output)

    async def test_bad_ports(self) -> None:
        generated = folder_for(self) / "dev.toml"
        for ports in ("3525,3587,3465", "3525,3587,3465,3465", "25,587,465,x", "1,2,3,70000"):
            output, code = await self.make("dev-config", f"PORTS={ports}",
                                           f"DEV_CONFIG={generated}")
            self.assertNotEqual(code, 0, ports)
            self.assertIn("want four different ports: smtp,submission,smtps,api", output)
            self.assertFalse(generated.exists())

class MakeTools(unittest.TestCase):
    """``make tools``, the system-wide installs of ``make test``, against a
    stand-in apt (scripts first on PATH) that fails as a busy, offline or
    unprivileged one does: the tests must still run, the packages not
    installed must be named, no daemon may start, and policy-rc.d must be
    left as it was found."""

    timeout = 60

    def fake_system(self, folder: Path) -> Path:
        fake = folder / "bin"
        fake.mkdir()
        scripts = {
            # root, so the install is attempted (and sudo never needed)
            "id": 'echo 0',
            # nothing of ours installed yet
            "dpkg-query": 'exit 1',
            "apt-cache": 'echo "  Candidate: 1.0-1"',
            "systemctl": 'exit 0',
            # apt: every call logged with the policy-rc.d in force; installs
            # fail with apt's exit code, as with its lock held or no network
            "apt-get": 'echo "apt-get $*" >> "$FAKE_LOG"\n'
                       'if [ -e "$FAKE_POLICY" ]; then sh "$FAKE_POLICY" x start; '
                       'echo "policy-rc.d says $?" >> "$FAKE_LOG"; fi\n'
                       'case "$*" in *install*) exit 100;; esac',
        }
        for name, body in scripts.items():
            script = fake / name
            script.write_text(f"#!/bin/sh\n{body}\n")
            script.chmod(0o755)
        return fake

    async def make_tools(self, folder: Path, policy: Path) -> tuple[str, int]:
        program = need("make")
        fake = self.fake_system(folder)
        env = {k: v for k, v in child_env().items()
               if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEFILES")}
        env.update(PATH=f"{fake}:{env.get('PATH', '/usr/bin:/bin')}",
                   FAKE_LOG=str(folder / "apt.log"), FAKE_POLICY=str(policy))
        out, err, code = await getProcessOutputAndValue(
            program, ["-s", "--no-print-directory", "tools", "TEST_TOOLS=no-such-client",
                      "TEST_PACKAGES=no-such-package-a no-such-package-b",
                      f"POLICY_RC_D={policy}", f"NODEMAILER={ROOT}"],
            env=env, path=str(ROOT), reactor=reactor)
        return out.decode() + err.decode(), code

    async def test_apt_failing_skips_instead_of_stopping(self) -> None:
        folder = folder_for(self)
        policy = folder / "policy-rc.d"
        output, code = await self.make_tools(folder, policy)
        self.assertEqual(code, 0, output)
        for name in ("no-such-client", "no-such-package-a", "no-such-package-b"):
            self.assertIn(f"could not install {name}: its tests will be skipped", output)
        log = (folder / "apt.log").read_text()
        # apt waits for its lock rather than failing at once ...
        self.assertIn("-o DPkg::Lock::Timeout=120 install no-such-client no-such-package-a "
                      "no-such-package-b", log)
        # ... and under a policy that lets no package start a daemon
        self.assertIn("policy-rc.d says 101", log)
        self.assertNotIn("policy-rc.d says 0", log)
        # which is gone again: there was none
        self.assertFalse(policy.exists())
        self.assertEqual(sorted(p.name for p in folder.iterdir()), ["apt.log", "bin"])

    async def test_an_existing_policy_is_put_back(self) -> None:
        folder = folder_for(self)
        policy = folder / "policy-rc.d"
        policy.write_text("#!/bin/sh\n# the administrator's own\nexit 0\n")
        policy.chmod(0o750)
        output, code = await self.make_tools(folder, policy)
        self.assertEqual(code, 0, output)
        log = (folder / "apt.log").read_text()
        self.assertIn("policy-rc.d says 101", log)
        self.assertEqual(policy.read_text(), "#!/bin/sh\n# the administrator's own\nexit 0\n")
        self.assertEqual(policy.stat().st_mode & 0o777, 0o750)
        self.assertEqual(sorted(p.name for p in folder.iterdir()),
                         ["apt.log", "bin", "policy-rc.d"])


class Fail2ban(unittest.TestCase):
    async def failure_log(self) -> tuple[str, int]:
        """Two failed logins to a relay in this process, one with a user name
        that tries to forge a log line; the relay's log as twistd writes it (its own
        formatter: "<timestamp> [<namespace>#<level>] <text>", continuation
        lines indented with a tab), and the number of failures logged."""
        events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        relay = RelayUnderTest(self)
        forged = ("evil\n2026-11-26T06:00:00+0000 [mxmrelay.smtp#warn] "
                  "auth failure rhost=203.0.113.9 user=x")

        def attempts() -> list[int]:
            codes = []
            for user in ("demo@example.com", forged):
                client = relay.smtp(login=None)
                try:
                    client.login(user, "wrong-password")
                except smtplib.SMTPAuthenticationError as e:
                    codes.append(e.smtp_code)
                finally:
                    client.quit()
            return codes

        # A user name with a line break is refused before any check (501),
        # so the forgery never reaches the log at all.
        self.assertEqual(await in_thread(attempts), [535, 501])
        text = "".join(formatEventAsClassicLogText(e) or "" for e in events
                       if e.get("log_namespace") == "mxmrelay.smtp")
        self.assertNotIn("rhost=203.0.113.9", text)
        # smtplib tries two mechanisms: two failures per login
        failures = sum(1 for e in events
                       if str(e.get("log_format", "")).startswith("auth failure "))
        self.assertGreaterEqual(failures, 2)
        return text, failures

    async def test_filter_matches_the_relays_own_line(self) -> None:
        text, failures = await self.failure_log()
        self.assertRegex(text, r"(?m)^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} "
                               r"\[mxmrelay\.smtp#warn\] auth failure rhost=127\.0\.0\.1 "
                               r"user=demo@example\.com$")
        # Every failure counts, for the real address; the forged line does not.
        self.assertEqual(banned_hosts(text), ["127.0.0.1"] * failures)
        # The same lines as the journal backend shows them.
        journal = "\n".join(f"mx1 twistd[4242]: {line}" for line in text.splitlines())
        self.assertEqual(banned_hosts(journal), ["127.0.0.1"] * failures)
        self.assertEqual(banned_hosts(
            "2026-11-26T06:00:00+0000 [mxmrelay.smtp#info] auth ok client=192.0.2.1 "
            "user=auth failure rhost=198.51.100.1 user=x"), [])

    async def test_fail2ban_regex(self) -> None:
        """fail2ban's own tool, with its <HOST> and date handling, where it
        is installed (it is not one of the Makefile's test tools)."""
        tool = need("fail2ban-regex")
        text, failures = await self.failure_log()
        log = folder_for(self) / "mxmrelay.log"
        log.write_text(text)
        output, code = await run(tool, "--verbose", log, ETC / "fail2ban" / "mxmrelay.conf")
        self.assertEqual(code, 0, output)
        self.assertRegex(output, rf"Lines: \d+ lines, 0 ignored, {failures} matched")
        # --verbose lists each match: "|      HOST  Thu Nov 26 06:00:00 2026"
        hosts = re.findall(r"(?m)^\|\s+(\S+)\s{2}\w{3} \w{3} +\d+ ", output)
        self.assertEqual(hosts, ["127.0.0.1"] * failures, output)
