"""Reload without a restart, in the real ``twistd -n mxmrelay`` process.

SIGHUP (what ``systemctl reload mxmrelay`` sends) re-reads the directory
file and the certificate and key.  The relay runs as its own process on
loopback ports and forwards to the reference delivery API over real HTTP;
clients are blocking sockets on threads.  Waiting is polling the process's
log against a deadline.
"""

from __future__ import annotations

import os
import signal
import ssl
import sys
from pathlib import Path
from typing import Any

from cryptography import x509
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial import unittest

from mxmrelay.auth import hash_password
from mxmrelay.check import check
from tests.process_support import SupervisedTwistd
from tests.support import API, TOKEN, RawClient, in_thread, make_certificate, message

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def directory_toml(users: dict[str, str], customer: dict[str, str] | None = None) -> str:
    """A directory file: two customer spaces, and ``users`` (address:
    password, hashed cheaply) in the space their domain names."""
    spaces = customer or {"example.com": "demo", "acme.test": "acme"}
    text = "".join(f'[[customer]]\nid = "{space}"\ndomains = ["{domain}"]\n\n'
                   for domain, space in spaces.items())
    for email, password in users.items():
        space = spaces[email.split("@")[1]]
        text += (f'[[user]]\nemail = "{email}"\npassword = "{hash_password(password, n=2**10)}"\n'
                 f'customer = "{space}"\n\n')
    return text


def replace(path: Path, text: str | bytes) -> None:
    """Write a file as a careful operator does: whole, then renamed over."""
    tmp = path.with_name(path.name + ".new")
    if isinstance(text, str):
        tmp.write_text(text)
    else:
        tmp.write_bytes(text)
    os.replace(tmp, path)


class ConfigMap:
    """A folder as Kubernetes mounts a ConfigMap: ``directory.toml`` is a
    symlink to ``..data/directory.toml``, ``..data`` a symlink to the
    current version's folder; an update writes a new version and swaps
    ``..data`` in one rename.  The files themselves never change."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.version = 0
        folder.mkdir(parents=True)

    def publish(self, text: str) -> Path:
        self.version += 1
        version = self.folder / f"..v{self.version}"
        version.mkdir()
        (version / "directory.toml").write_text(text)
        link = self.folder / "..data_tmp"
        link.symlink_to(version.name)
        os.replace(link, self.folder / "..data")
        path = self.folder / "directory.toml"
        if not path.is_symlink():
            path.symlink_to("..data/directory.toml")
        return path



def context() -> ssl.SSLContext:
    """Accept any certificate: the tests look at which one they got."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def serial_of(client: RawClient) -> int:
    sock = client.sock
    assert isinstance(sock, ssl.SSLSocket)
    der = sock.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def accepted(reply: str) -> bool:
    """Is this the end of DATA's ``250``?  (Its last line: the reply may
    say more on lines before it.)"""
    return reply.splitlines()[-1].startswith("250 2.0.0 Ok: queued as ")


def file_serial(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


class RelayProcess:
    """``twistd -n mxmrelay`` with a submission and an smtps listener."""

    def __init__(self, testcase: unittest.TestCase, users: dict[str, str],
                 workers: int = 1, reload_poll: float = 0, configmap: bool = False) -> None:
        self.testcase = testcase
        self.folder = Path(testcase.mktemp()).resolve()
        self.folder.mkdir(parents=True)
        self.api = API(testcase, self.folder)
        self.cert, self.key = make_certificate(self.folder / "tls")
        self.configmap = ConfigMap(self.folder / "cm")
        if configmap:
            self.directory = self.configmap.publish(directory_toml(users))
        else:
            self.directory = self.folder / "directory.toml"
            self.directory.write_text(directory_toml(users))
        self.ports = {"submission": free_port(), "smtps": free_port()}
        self.workers = workers
        listeners = "".join(
            f'[[listener]]\nrole = "{role}"\nendpoint = "tcp:{port}:interface=127.0.0.1"\n'
            for role, port in self.ports.items())
        self.config = self.folder / "relay.toml"
        self.config.write_text(f"""
hostname = "relay.test"
directory = "{self.directory}"
bounce_address = "bounce+{{id}}@bounces.test"
workers = {workers}
reload_poll = {reload_poll}
[tls]
certificate = "{self.cert}"
private_key = "{self.key}"
{listeners}
[delivery_api]
url = "{self.api.url}"
token = "{TOKEN}"
timeout = 10
[auth]
max_failures_per_user = 50
max_failures_per_address = 100
""")
        self.twistd = SupervisedTwistd(testcase, self.config)
        self.out, self.process = self.twistd.out, self.twistd.process

    async def started(self) -> None:
        await self.until(lambda: self.out.text.count("starting on")
                         >= len(self.ports) * self.workers)

    async def until(self, condition: Any, deadline: float = 30) -> None:
        end = reactor.seconds() + deadline
        while not condition():
            if reactor.seconds() > end or self.out.ended.called:
                self.testcase.fail(f"condition not met; output:\n{self.out.text[-4000:]}")
            await deferLater(reactor, 0.05)

    async def hup(self, expect: str, count: int = 1) -> None:
        """SIGHUP, then wait until ``expect`` is in the log ``count`` more times."""
        before = self.out.text.count(expect)
        self.process.signalProcess("HUP")
        await self.until(lambda: self.out.text.count(expect) >= before + count)

    def pids(self) -> dict[int, int]:
        return self.twistd.pids()

    def only(self, index: int) -> None:
        """Let only worker ``index`` run (a stopped worker cannot accept)."""
        self.twistd.only(index)

    # -- blocking clients (call on a thread) ---------------------------------

    def client(self, role: str = "submission") -> RawClient:
        c = RawClient(self.ports[role], context(), tls=(role == "smtps"))
        self.testcase.addCleanup(c.close)
        return c.ready(login=False)

    def login(self, user: str, password: str, role: str = "submission") -> str:
        """The AUTH reply's code, on a new connection."""
        c = self.client(role)
        try:
            return c.login(user, password)[:3]
        finally:
            c.close()

    def send(self, user: str, password: str) -> str:
        """Log in and send one message from ``user``'s domain: the DATA reply."""
        c = self.client()
        try:
            answer = c.login(user, password)
            if not answer.startswith("235"):
                return answer
            return self.send_on(c, user)
        finally:
            c.close()

    @staticmethod
    def send_on(c: RawClient, user: str) -> str:
        domain = user.split("@")[1]
        for line in (f"MAIL FROM:<shop@{domain}>", "RCPT TO:<someone@example.org>", "DATA"):
            answer = c.cmd(line)
            if not answer.startswith(("250", "354")):
                return answer
        c.send(message(sender=f"<shop@{domain}>") + b".\r\n")
        return c.reply()


class DirectoryReload(unittest.TestCase):
    timeout = 120

    async def test_add_change_remove_users(self) -> None:
        relay = RelayProcess(self, {"demo@example.com": "old-password",
                                    "ops@acme.test": "ops-password"})
        await relay.started()
        # A login that succeeds is remembered (the login cache)...
        self.assertEqual(await in_thread(relay.login, "demo@example.com", "old-password"), "235")
        self.assertEqual(await in_thread(relay.login, "new@example.com", "new-user"), "535")
        # ...and a session logged in before the reload goes on after it.
        open_session = await in_thread(relay.client)
        self.assertTrue((await in_thread(open_session.login, "ops@acme.test",
                                         "ops-password")).startswith("235"))

        replace(relay.directory, directory_toml({"demo@example.com": "new-password",
                                                 "new@example.com": "new-user"}))
        await relay.hup("reload ok: directory")
        self.assertIn(f"reload ok: directory {relay.directory} users=2 customer_spaces=2",
                      relay.out.text)
        # The old password is refused at once, cache or not.
        self.assertEqual(await in_thread(relay.login, "demo@example.com", "old-password"), "535")
        for user, password in (("demo@example.com", "new-password"),
                               ("new@example.com", "new-user")):
            answer = await in_thread(relay.send, user, password)
            self.assertTrue(accepted(answer), answer)
        # A removed user cannot log in any more...
        self.assertEqual(await in_thread(relay.login, "ops@acme.test", "ops-password"), "535")
        # ...but the session it opened before the reload is not disturbed.
        self.assertTrue(accepted(await in_thread(relay.send_on, open_session, "ops@acme.test")))
        self.assertNotIn("Traceback", relay.out.text)

    async def test_a_broken_directory_keeps_the_old_one(self) -> None:
        relay = RelayProcess(self, {"demo@example.com": "demo-password"})
        await relay.started()
        good = relay.directory.read_text()
        replace(relay.directory, good + '[[user]]\nemail = "x@example.com"\n'
                'password = "clear-text"\ncustomer = "demo"\n')
        await relay.hup("reload failed, keeping the old directory")
        # Named as start-up (and mxmrelay-check) names it: file, key, reason.
        expected = check(relay.config, reactor).errors
        self.assertEqual(len(expected), 1)
        self.assertIn(str(expected[0]), relay.out.text)
        self.assertIn(f"{relay.directory}: user[1].password:", str(expected[0]))
        self.assertFalse(relay.out.ended.called)
        self.assertEqual(await in_thread(relay.login, "demo@example.com", "demo-password"), "235")
        self.assertEqual(await in_thread(relay.login, "x@example.com", "clear-text"), "535")
        # Fixed, it loads.
        replace(relay.directory, directory_toml({"x@example.com": "x-password"}))
        await relay.hup("reload ok: directory")
        self.assertEqual(await in_thread(relay.login, "x@example.com", "x-password"), "235")
        self.assertEqual(await in_thread(relay.login, "demo@example.com", "demo-password"), "535")


class SystemctlReload(unittest.TestCase):
    """``ExecReload=mxmrelay-check --config FILE --reload $MAINPID``."""

    timeout = 120

    async def check_and_reload(self, relay: RelayProcess) -> tuple[str, int]:
        from twisted.internet.utils import getProcessOutputAndValue

        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-m", "mxmrelay.check", "--config", str(relay.config),
                             "--reload", str(relay.process.pid)], env=env, path=str(ROOT))
        return (out + err).decode(), code

    async def test_the_check_then_the_signal(self) -> None:
        relay = RelayProcess(self, {"demo@example.com": "old-password"})
        await relay.started()
        replace(relay.directory, directory_toml({"demo@example.com": "new-password"}))
        output, code = await self.check_and_reload(relay)
        self.assertEqual((output, code), (f"ok\nreload asked of process {relay.process.pid}\n", 0))
        await relay.until(lambda: "reload ok: directory" in relay.out.text)
        self.assertEqual(await in_thread(relay.login, "demo@example.com", "new-password"), "235")
        # A broken file fails the reload with the check's reasons, and the
        # relay is not even asked...
        replace(relay.directory, "nonsense = [")
        output, code = await self.check_and_reload(relay)
        self.assertEqual(code, 1)
        self.assertIn(f"{relay.config}: directory: {relay.directory}: not valid TOML", output)
        # ...as the next good reload shows: its line is the only new one.
        replace(relay.directory, directory_toml({"demo@example.com": "third-password"}))
        output, code = await self.check_and_reload(relay)
        self.assertEqual(code, 0, output)
        await relay.until(lambda: relay.out.text.count("reload ok: directory") == 2)
        self.assertNotIn("reload failed", relay.out.text)
        self.assertEqual(await in_thread(relay.login, "demo@example.com", "third-password"),
                         "235")


class WatchedFiles(unittest.TestCase):
    """``reload_poll``: a replaced ConfigMap is loaded with no signal."""

    timeout = 120

    async def test_a_configmap_update_is_loaded(self) -> None:
        relay = RelayProcess(self, {"demo@example.com": "old-password"}, reload_poll=0.1,
                             configmap=True)
        await relay.started()
        self.assertEqual(await in_thread(relay.login, "demo@example.com", "old-password"), "235")
        relay.configmap.publish(
            directory_toml({"demo@example.com": "new-password"}))
        await relay.until(lambda: "reload ok: directory" in relay.out.text)
        self.assertIn("reload: a watched file changed", relay.out.text)
        self.assertEqual(await in_thread(relay.login, "demo@example.com", "old-password"), "535")
        self.assertEqual(await in_thread(relay.login, "demo@example.com", "new-password"), "235")


class CertificateReload(unittest.TestCase):
    timeout = 120

    async def test_new_handshakes_see_the_new_certificate(self) -> None:
        relay = RelayProcess(self, {"demo@example.com": "demo-password"})
        await relay.started()
        old = file_serial(relay.cert)
        session = await in_thread(relay.client)
        self.assertEqual(serial_of(session), old)
        self.assertTrue((await in_thread(session.login, "demo@example.com", "demo-password"))
                        .startswith("235"))

        new_cert, new_key = make_certificate(relay.folder / "renewed")
        # The key first would not match the old certificate for a moment:
        # the reload after both are in place is what counts.
        replace(relay.key, new_key.read_bytes())
        replace(relay.cert, new_cert.read_bytes())
        await relay.hup("reload ok: certificate")
        new = file_serial(relay.cert)
        self.assertNotEqual(new, old)
        self.assertIn(f"reload ok: certificate {relay.cert} serial={new:x}", relay.out.text)
        for role in ("submission", "smtps"):
            fresh = await in_thread(relay.client, role)
            self.assertEqual(serial_of(fresh), new, role)
            await in_thread(fresh.close)
        # The session opened before goes on, on its own handshake.
        self.assertEqual(serial_of(session), old)
        self.assertTrue(accepted(await in_thread(relay.send_on, session, "demo@example.com")))

    async def test_a_broken_certificate_keeps_the_old_one(self) -> None:
        relay = RelayProcess(self, {"demo@example.com": "demo-password"})
        await relay.started()
        old = file_serial(relay.cert)
        good = relay.cert.read_bytes()
        replace(relay.cert, b"not a certificate\n")
        await relay.hup("reload failed, keeping the old certificate")
        expected = [str(p) for p in check(relay.config, reactor).errors]
        self.assertEqual(expected, [f"{relay.config}: tls.certificate: {relay.cert}: "
                                    "no PEM certificate in the file"])
        self.assertIn(f"reload failed, keeping the old certificate: {expected[0]}",
                      relay.out.text)
        # A certificate that does not match the key is refused too.
        other, _ = make_certificate(relay.folder / "other")
        replace(relay.cert, other.read_bytes())
        await relay.hup("reload failed, keeping the old certificate")
        self.assertIn(f"{relay.config}: tls.private_key: {relay.key}: the key does not match "
                      f"the certificate in {relay.cert}", relay.out.text)
        self.assertFalse(relay.out.ended.called)
        for role in ("submission", "smtps"):
            client = await in_thread(relay.client, role)
            self.assertEqual(serial_of(client), old, role)
            await in_thread(client.close)
        replace(relay.cert, good)
        await relay.hup("reload ok: certificate")


class WorkersReload(unittest.TestCase):
    timeout = 120

    async def test_one_sighup_reloads_every_worker(self) -> None:
        relay = RelayProcess(self, {"demo@example.com": "old-password"}, workers=2)
        await relay.started()
        await relay.until(lambda: len(relay.pids()) == 2)
        for index in (0, 1):
            relay.only(index)
            self.assertEqual(await in_thread(relay.login, "demo@example.com", "old-password"),
                             "235")
        for pid in relay.pids().values():
            os.kill(pid, signal.SIGCONT)
        replace(relay.directory, directory_toml({"demo@example.com": "new-password"}))
        await relay.hup("reload ok: directory", count=2)
        self.assertIn("reload: asking 2 workers", relay.out.text)
        for index in (0, 1):
            self.assertIn(f"[worker {index}] reload ok: directory", relay.out.text)
        for index in (0, 1):
            relay.only(index)
            self.assertEqual(await in_thread(relay.login, "demo@example.com", "old-password"),
                             "535", f"worker {index}")
            answer = await in_thread(relay.send, "demo@example.com", "new-password")
            self.assertTrue(accepted(answer), f"worker {index}: {answer}")
