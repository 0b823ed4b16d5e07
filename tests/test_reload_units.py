"""The reload's parts without a process: what a reload swaps and what it
keeps, the login cache's rule, the SIGHUP hook and the workers' channel.

Files are real (a temporary folder); password checks run inline; the
clock is a :class:`~twisted.internet.task.Clock`.
"""

from __future__ import annotations

import datetime
import io
import os
import signal
from pathlib import Path
from typing import Any

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.trial import unittest

from mxmrelay.auth import CredentialCache, DirectoryChecker
from mxmrelay.check import check
from mxmrelay.config import Config
from mxmrelay.directory import CustomerSpace, TomlDirectory, User
from mxmrelay.reload import (
    OnSignal,
    ReloadableDirectory,
    Reloader,
    Watcher,
    ask_to_reload,
    hooks,
)
from mxmrelay.tls import ReloadableTLS, server_context
from mxmrelay.worker import WorkerControl
from mxmrelay.workers import Supervisor, SupervisorControl
from tests.support import make_certificate
from tests.test_reload import ConfigMap, directory_toml, replace


def inline(f: Any, *args: Any) -> Deferred[Any]:
    return succeed(f(*args))


class Setup:
    """A configuration file, its directory file, certificate and key, and
    the reloadable parts built from them as :class:`Relay.build` does."""

    def __init__(self, testcase: unittest.TestCase, users: dict[str, str]) -> None:
        folder = Path(testcase.mktemp()).resolve()
        folder.mkdir(parents=True)
        self.folder = folder
        self.cert, self.key = make_certificate(folder / "tls")
        self.directory_file = folder / "directory.toml"
        self.directory_file.write_text(directory_toml(users))
        self.config_file = folder / "relay.toml"
        self.config_file.write_text(f"""
hostname = "relay.test"
directory = "directory.toml"
bounce_address = "bounce+{{id}}@bounces.test"
[tls]
certificate = "{self.cert}"
private_key = "{self.key}"
[[listener]]
role = "submission"
endpoint = "tcp:2587"
[delivery_api]
url = "http://127.0.0.1:1/v1/sends"
token = "t"
""")
        self.config = Config.from_file(self.config_file)
        self.tls = ReloadableTLS(server_context(self.cert, self.key))
        self.directory = ReloadableDirectory(self.directory_file,
                                             TomlDirectory.from_file(self.directory_file))
        self.clock = Clock()
        self.cache = CredentialCache(self.clock, 300)
        self.checker = DirectoryChecker(self.directory, run=inline, cache=self.cache)
        self.reloader = Reloader(self.config, self.tls, self.directory, self.cache)

    def login(self, testcase: unittest.TestCase, user: str, password: str) -> bool:
        d = self.checker.requestAvatarId(UsernamePassword(user.encode(), password.encode()))
        failures: list[Any] = []
        d.addErrback(lambda f: failures.append(f.trap(UnauthorizedLogin)))
        result = testcase.successResultOf(d)
        return not failures and isinstance(result, User)


class ReloaderTests(unittest.TestCase):
    def test_directory_swapped_and_logged(self) -> None:
        s = Setup(self, {"demo@example.com": "one"})
        old = s.directory.current
        replace(s.directory_file, directory_toml({"demo@example.com": "two",
                                                  "new@acme.test": "three"}))
        with capturedLogs() as events:
            self.assertTrue(s.reloader.reload())
        self.assertIsNot(s.directory.current, old)
        self.assertEqual(sorted(s.directory.current.users), ["demo@example.com", "new@acme.test"])
        texts = [e["log_format"].format(**e) for e in events]
        self.assertIn(f"reload ok: directory {s.directory_file} users=2 customer_spaces=2",
                      texts)

    def test_broken_directory_keeps_the_old_and_says_what_start_up_says(self) -> None:
        s = Setup(self, {"demo@example.com": "one"})
        old = s.directory.current
        replace(s.directory_file, '[[user]]\nemail = "x"\n')
        with capturedLogs() as events:
            self.assertFalse(s.reloader.reload())
        self.assertIs(s.directory.current, old)
        start_up = [str(p) for p in check(s.config_file, None).errors]
        self.assertTrue(start_up)
        said = [e["problem"] for e in events if e.get("what") == "directory"]
        self.assertEqual(said, start_up)
        # The certificate, which is fine, was reloaded all the same.
        self.assertTrue(any("reload ok: certificate" in e["log_format"] for e in events))

    def test_unreadable_directory_keeps_the_old(self) -> None:
        s = Setup(self, {"demo@example.com": "one"})
        old = s.directory.current
        s.directory_file.unlink()
        with capturedLogs() as events:
            self.assertFalse(s.reloader.reload())
        self.assertIs(s.directory.current, old)
        self.assertIn(f"{s.config_file}: directory: {s.directory_file}: cannot read: "
                      "No such file or directory", [e.get("problem") for e in events])

    def test_certificate_swapped(self) -> None:
        s = Setup(self, {"demo@example.com": "one"})
        old = s.tls.options
        new_cert, new_key = make_certificate(s.folder / "new")
        replace(s.cert, new_cert.read_bytes())
        replace(s.key, new_key.read_bytes())
        self.assertTrue(s.reloader.reload())
        self.assertIsNot(s.tls.options, old)
        # New handshakes take the new context.
        connection = s.tls.serverConnectionForTLS(None)
        self.assertIs(connection.get_context(), s.tls.options.getContext())
        assert s.tls.options.certificate is not None
        expected = server_context(new_cert, new_key).certificate
        assert expected is not None
        self.assertEqual(s.tls.options.certificate.to_cryptography().serial_number,
                         expected.to_cryptography().serial_number)

    def test_expired_certificate_refused_as_at_start(self) -> None:
        s = Setup(self, {"demo@example.com": "one"})
        old = s.tls.options
        later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=365)
        s.reloader.now = lambda: later
        with capturedLogs() as events:
            self.assertFalse(s.reloader.reload())
        self.assertIs(s.tls.options, old)
        start_up = [str(p) for p in check(s.config_file, None, now=later).errors]
        self.assertEqual(len(start_up), 1)
        self.assertIn("expired on", start_up[0])
        self.assertEqual([e["problem"] for e in events if e.get("what") == "certificate"],
                         start_up)

    def test_a_reload_never_raises(self) -> None:
        s = Setup(self, {"demo@example.com": "one"})

        def boom() -> bool:
            raise RuntimeError("unexpected")

        s.reloader.reload_tls = boom  # type: ignore[method-assign]
        with capturedLogs():
            self.assertFalse(s.reloader.reload())
        self.flushLoggedErrors(RuntimeError)

    def test_without_a_file_directory_only_the_certificate(self) -> None:
        s = Setup(self, {"demo@example.com": "one"})
        reloader = Reloader(s.config, s.tls, None, None)
        with capturedLogs() as events:
            self.assertTrue(reloader.reload())
        self.assertFalse(any("directory" in e["log_format"] for e in events))


class LoginAfterReload(unittest.TestCase):
    """The login cache never lets an old password through a reload."""

    def test_changed_password_refused_at_once(self) -> None:
        s = Setup(self, {"demo@example.com": "old"})
        self.assertTrue(s.login(self, "demo@example.com", "old"))
        self.assertTrue(s.cache.hit(s.directory.current.users["demo@example.com"], "old"))
        replace(s.directory_file, directory_toml({"demo@example.com": "new"}))
        with capturedLogs():
            s.reloader.reload()
        self.assertFalse(s.login(self, "demo@example.com", "old"))
        self.assertTrue(s.login(self, "demo@example.com", "new"))

    def test_removed_user_refused_at_once(self) -> None:
        s = Setup(self, {"demo@example.com": "pw", "ops@acme.test": "pw2"})
        self.assertTrue(s.login(self, "ops@acme.test", "pw2"))
        replace(s.directory_file, directory_toml({"demo@example.com": "pw"}))
        with capturedLogs():
            s.reloader.reload()
        self.assertFalse(s.login(self, "ops@acme.test", "pw2"))
        self.assertTrue(s.login(self, "demo@example.com", "pw"))

    def test_reload_empties_the_cache(self) -> None:
        s = Setup(self, {"demo@example.com": "pw"})
        self.assertTrue(s.login(self, "demo@example.com", "pw"))
        with capturedLogs():
            s.reloader.reload()
        self.assertFalse(s.cache.hit(s.directory.current.users["demo@example.com"], "pw"))


class CacheRule(unittest.TestCase):
    """Whatever the backend: an entry counts only while the user record the
    directory gives now has the same password hash."""

    space = CustomerSpace(id="c", name="C", domains=frozenset({"example.com"}))

    def user(self, password_hash: str) -> User:
        return User(email="Demo@example.com", password_hash=password_hash, customer=self.space)

    def test_a_new_hash_misses(self) -> None:
        cache = CredentialCache(Clock(), 300)
        cache.remember(self.user("scrypt$a"), "pw")
        self.assertTrue(cache.hit(self.user("scrypt$a"), "pw"))
        self.assertFalse(cache.hit(self.user("scrypt$b"), "pw"))
        self.assertFalse(cache.hit(self.user("scrypt$a"), "other"))

    def test_clear(self) -> None:
        cache = CredentialCache(Clock(), 300)
        cache.remember(self.user("scrypt$a"), "pw")
        cache.clear()
        self.assertFalse(cache.hit(self.user("scrypt$a"), "pw"))


class Channel(unittest.TestCase):
    def test_worker_reloads_on_the_supervisors_word(self) -> None:
        calls: list[None] = []
        control = WorkerControl({}, Clock(), lambda: calls.append(None))
        control.makeConnection(StringTransport())
        control.dataReceived(b'["reload"]\n')
        self.assertEqual(len(calls), 1)
        control.dataReceived(b'["reload", 1]\n["nonsense"]\nnot json\n')
        self.assertEqual(len(calls), 1)

    def test_supervisor_asks_every_worker(self) -> None:
        class Fake:
            channels: set[SupervisorControl] = set()

        fake: Any = Fake()
        transports = []
        for _ in range(3):
            transport = StringTransport()
            SupervisorControl(fake).makeConnection(transport)
            transports.append(transport)
        with capturedLogs():
            Supervisor.reload(fake)
        self.assertEqual([t.value() for t in transports], [b'["reload"]\n'] * 3)


class Signal(unittest.TestCase):
    def test_sighup_queues_the_action_and_is_put_back(self) -> None:
        queued: list[Any] = []

        class Reactor:
            def callFromThread(self, f: Any) -> None:
                queued.append(f)

        before = signal.getsignal(signal.SIGHUP)

        def action() -> None:
            pass

        service = OnSignal(Reactor(), action)
        service.startService()
        try:
            os.kill(os.getpid(), signal.SIGHUP)
            # The handler runs at the next bytecode boundary of this thread.
            for _ in range(1000):
                if queued:
                    break
            self.assertEqual(queued, [action])
        finally:
            service.stopService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), before)


class AskToReload(unittest.TestCase):
    def test_never_a_process_group(self) -> None:
        for pid in (0, -1, 1):
            out = io.StringIO()
            self.assertEqual(ask_to_reload(pid, out), 2)
            self.assertEqual(out.getvalue(), f"mxmrelay-check: --reload {pid}: "
                             "not a relay's process id\n")

    def test_no_such_process(self) -> None:
        beyond = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
        out = io.StringIO()
        self.assertEqual(ask_to_reload(beyond, out), 1)
        self.assertEqual(out.getvalue(), f"mxmrelay-check: --reload {beyond}: No such process\n")


class Watching(unittest.TestCase):
    """``reload_poll``: a change on disk reloads, on a Clock."""

    def watcher(self, s: Setup) -> Watcher:
        watcher = Watcher(s.clock, s.reloader, 5.0)
        watcher.startService()
        self.addCleanup(watcher.stopService)
        return watcher

    def test_a_change_reloads_once_it_stands_still(self) -> None:
        s = Setup(self, {"demo@example.com": "one"})
        first = s.directory.current
        self.watcher(s)
        with capturedLogs() as events:
            s.clock.advance(5)
            self.assertIs(s.directory.current, first)  # nothing changed
            replace(s.directory_file, directory_toml({"demo@example.com": "two"}))
            s.clock.advance(5)
            self.assertIs(s.directory.current, first)  # seen once: maybe half-written
            s.clock.advance(5)
            self.assertIsNot(s.directory.current, first)
            second = s.directory.current
            s.clock.advance(50)
            self.assertIs(s.directory.current, second)  # no change, no reload
        self.assertEqual(sum("a watched file changed" in e["log_format"] for e in events), 1)

    def test_a_broken_file_is_tried_once_per_change(self) -> None:
        s = Setup(self, {"demo@example.com": "one"})
        first = s.directory.current
        self.watcher(s)
        with capturedLogs() as events:
            replace(s.directory_file, "nonsense = [")
            s.clock.pump([5] * 10)
        failed = [e for e in events if e.get("what") == "directory"]
        self.assertEqual(len(failed), 1)
        self.assertIs(s.directory.current, first)
        with capturedLogs():
            replace(s.directory_file, directory_toml({"demo@example.com": "two"}))
            s.clock.pump([5, 5])
        self.assertIsNot(s.directory.current, first)

    def test_a_configmap_swap(self) -> None:
        """The files never change: a symlink comes to lead elsewhere."""
        s = Setup(self, {"demo@example.com": "one"})
        configmap = ConfigMap(s.folder / "cm")
        path = configmap.publish(directory_toml({"demo@example.com": "one"}))
        reloadable = ReloadableDirectory(path, TomlDirectory.from_file(path))
        config = Config.from_dict({**_data(s), "directory": str(path)}, s.folder, "relay.toml")
        reloader = Reloader(config, s.tls, reloadable, s.cache)
        watcher = Watcher(s.clock, reloader, 5.0)
        watcher.startService()
        self.addCleanup(watcher.stopService)
        first = reloadable.current
        configmap.publish(directory_toml({"demo@example.com": "two", "new@acme.test": "x"}))
        with capturedLogs():
            s.clock.pump([5, 5])
        self.assertIsNot(reloadable.current, first)
        self.assertIn("new@acme.test", reloadable.current.users)

    def test_the_certificate_is_watched_too(self) -> None:
        s = Setup(self, {"demo@example.com": "one"})
        old = s.tls.options
        self.watcher(s)
        new_cert, new_key = make_certificate(s.folder / "new")
        replace(s.key, new_key.read_bytes())
        replace(s.cert, new_cert.read_bytes())
        with capturedLogs():
            s.clock.pump([5, 5])
        self.assertIsNot(s.tls.options, old)

    def test_off_by_default(self) -> None:
        s = Setup(self, {"demo@example.com": "one"})
        self.assertEqual(s.config.reload_poll, 0)
        self.assertEqual([type(h) for h in hooks(s.clock, s.reloader, 0)], [OnSignal])
        self.assertEqual([type(h) for h in hooks(s.clock, s.reloader, 5)], [OnSignal, Watcher])


def _data(s: Setup) -> dict[str, Any]:
    import tomllib

    return tomllib.loads(s.config_file.read_text())
