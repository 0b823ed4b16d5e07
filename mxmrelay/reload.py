"""Reload without a restart: the directory file and the TLS certificate.

An operator adds, changes and removes customer users and renews the
certificate (every 60 to 90 days with ACME) on a running relay: ``SIGHUP``
(``systemctl reload mxmrelay``) re-reads both.  Each is loaded and checked
whole, by the very code start-up uses (:func:`mxmrelay.check.check_tls`,
:meth:`mxmrelay.directory.TomlDirectory.from_file`), before it replaces
the old one in a single assignment; when anything is wrong the old one
stays and the log says why in the words start-up would have used (file,
key, reason).  The two are independent: a typo in the directory does not
hold back a renewed certificate, nor the reverse.

Sessions in progress are not disturbed: a logged-in session keeps the
user it logged in as, an established TLS session its context; new AUTHs
look users up in the new directory and new handshakes take the new
certificate.  The login cache is emptied, so a changed or removed
password stops working at the reload (see :class:`~mxmrelay.auth.CredentialCache`).
Everything else in the configuration (listeners, the delivery API, the
limits, the paths themselves) is read at start only.
"""

from __future__ import annotations

import datetime
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from mxmrelay import metrics
from mxmrelay.auth import CredentialCache
from mxmrelay.config import Config, Problem
from mxmrelay.directory import IDirectory, InvalidDirectory, TomlDirectory, User
from mxmrelay.tls import ReloadableTLS

log = Logger(namespace="mxmrelay.reload")


@implementer(IDirectory)
class ReloadableDirectory:
    """The file directory the checker asks; a reload swaps :attr:`current`
    in one assignment, so a lookup sees the old file or the new, never a
    mixture."""

    def __init__(self, path: Path, current: TomlDirectory) -> None:
        self.path = path
        self.current = current

    def find_user(self, email: str) -> Deferred[User | None]:
        return self.current.find_user(email)


class Reloader:
    """Re-reads the directory file and the certificate and key of one
    relay process, and swaps in what is valid."""

    def __init__(self, config: Config, tls: ReloadableTLS,
                 directory: ReloadableDirectory | None, cache: CredentialCache | None,
                 now: Callable[[], datetime.datetime] | None = None) -> None:
        self.config = config
        self.tls = tls
        #: None when the directory is not a file of ours (nothing to re-read).
        self.directory = directory
        self.cache = cache
        self.now = now or (lambda: datetime.datetime.now(datetime.UTC))
        # What start-up loaded counts as the first good load.
        metrics.loaded("certificate")
        if directory is not None:
            metrics.loaded("directory")

    def reload(self) -> bool:
        """Reload both; True if both are now the files' current contents."""
        tls_ok = self._guarded("certificate", self.reload_tls)
        directory_ok = self._guarded("directory", self.reload_directory)
        if self.cache is not None:
            self.cache.clear()
        return tls_ok and directory_ok

    def _guarded(self, what: str, step: Callable[[], bool]) -> bool:
        # A reload must never take the process down, whatever it meets.
        try:
            return step()
        except Exception:
            log.failure("reload failed, keeping the old {what}", what=what)
            metrics.reloaded(what, False)
            return False

    def reload_tls(self) -> bool:
        from mxmrelay.check import Report, check_tls

        where, tls = self.config.source, self.config.tls
        report = Report()
        options = check_tls(report, where, tls.certificate, tls.private_key, self.now())
        for problem in report.warnings:
            log.warn("reload: warning: {problem}", problem=str(problem))
        if options is None:
            _failed("certificate", report.errors)
            metrics.reloaded("certificate", False)
            return False
        self.tls.options = options
        metrics.reloaded("certificate", True)
        assert options.certificate is not None
        cert = options.certificate.to_cryptography()
        log.info("reload ok: certificate {path} serial={serial} expires={expires}",
                 path=str(tls.certificate), serial=f"{cert.serial_number:x}",
                 expires=cert.not_valid_after_utc.strftime("%Y-%m-%d %H:%M UTC"))
        return True

    def reload_directory(self) -> bool:
        if self.directory is None:
            return True
        where, path = self.config.source, self.directory.path
        try:
            new = TomlDirectory.from_file(path)
        except InvalidDirectory as e:
            # As start-up (mxmrelay.check) words it: the key is "directory".
            _failed("directory", [Problem(where, "directory", str(p)) for p in e.problems])
            metrics.reloaded("directory", False)
            return False
        except (ValueError, UnicodeError) as e:
            _failed("directory", [Problem(where, "directory", f"{path}: cannot read: {e}")])
            metrics.reloaded("directory", False)
            return False
        self.directory.current = new
        metrics.reloaded("directory", True)
        log.info("reload ok: directory {path} users={users} customer_spaces={spaces}",
                 path=str(path), users=len(new.users), spaces=len(new.spaces))
        return True


def _failed(what: str, problems: list[Problem]) -> None:
    for problem in problems:
        log.error("reload failed, keeping the old {what}: {problem}", what=what,
                  problem=str(problem))


class OnSignal(Service):
    """Runs ``action`` in the reactor each time the process gets ``signum``
    (SIGHUP: what ``systemctl reload`` sends); the handler it replaced is
    put back as the service stops."""

    def __init__(self, reactor: Any, action: Callable[[], Any],
                 signum: int = signal.SIGHUP) -> None:
        self.reactor = reactor
        self.action = action
        self.signum = signum
        self._previous: Any = None
        self._installed = False

    def startService(self) -> None:
        super().startService()
        self._previous = signal.signal(self.signum, self._received)
        self._installed = True

    def _received(self, signum: int, frame: Any) -> None:
        # A signal handler may interrupt the reactor anywhere: only queue.
        self.reactor.callFromThread(self.action)

    def stopService(self) -> None:
        super().stopService()
        if self._installed:
            signal.signal(self.signum, self._previous or signal.SIG_DFL)
            self._installed = False


#: What says a file changed: the file its path leads to now (a ConfigMap
#: swaps a symlink), and that file's inode, size and modification time.
Signature = tuple[str, int, int, int, int] | None


def signature(path: Path) -> Signature:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class Watcher(Service):
    """``reload_poll = SECONDS``: reload when the directory file or the
    certificate or key changes on disk, for where nobody sends a signal
    (a Kubernetes ConfigMap or Secret is replaced by swapping a symlink).

    Every ``interval`` it compares each file's :func:`signature` with the
    one it last loaded; a change reloads once the file has stood still for
    one more look, so a file being written in place is not read half-way.
    A file that is broken is tried once per change, not at every look."""

    def __init__(self, clock: Any, reloader: Reloader, interval: float) -> None:
        from twisted.internet.task import LoopingCall

        self.reloader = reloader
        self.interval = interval
        self.paths = [reloader.config.tls.certificate, reloader.config.tls.private_key]
        if reloader.directory is not None:
            self.paths.append(reloader.directory.path)
        self.loaded = self.seen = self._look()
        self.loop = LoopingCall(self.tick)
        self.loop.clock = clock

    def _look(self) -> list[Signature]:
        return [signature(path) for path in self.paths]

    def tick(self) -> None:
        now = self._look()
        steady, self.seen = now == self.seen, now
        if now != self.loaded and steady:
            self.loaded = now
            log.info("reload: a watched file changed")
            self.reloader.reload()

    def startService(self) -> None:
        super().startService()
        self.loop.start(self.interval, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self.loop.running:
            self.loop.stop()


def hooks(reactor: Any, reloader: Reloader, interval: float) -> list[Service]:
    """What reloads a relay process: SIGHUP, and the watcher if asked for."""
    found: list[Service] = [OnSignal(reactor, reloader.reload)]
    if interval > 0:
        found.append(Watcher(reactor, reloader, interval))
    return found


def ask_to_reload(pid: int, out: TextIO) -> int:
    """``mxmrelay-check --reload PID``, once the files passed the check:
    SIGHUP to the relay (to the supervisor, with ``workers = N``).  The
    exit status says whether the signal was delivered; the relay logs how
    the reload went."""
    if pid <= 1:
        # 0 and -1 would signal whole process groups; 1 is init.
        print(f"mxmrelay-check: --reload {pid}: not a relay's process id", file=out)
        return 2
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as e:
        print(f"mxmrelay-check: --reload {pid}: {e.strerror}", file=out)
        return 1
    print(f"reload asked of process {pid}", file=out)
    return 0
