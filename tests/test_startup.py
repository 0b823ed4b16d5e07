"""Start-up failures of the real programs: one line, exit 1, no hang.

``twistd -n mxmrelay`` runs as a separate process (with ``PYTHONPATH`` =
the project, so it runs these sources); the test waits for it to end, with
a deadline after which it is killed and the test fails (a start-up that
hangs).  ``mxmrelay-passwd`` meets the end of its input at a real prompt,
on a pseudo-terminal.
"""

from __future__ import annotations

import os
import pty
import select
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial import unittest

from tests.helpers import ROOT, TWISTD, child_env, toml
from tests.test_check import good_config


class _Process(ProcessProtocol):
    """A child's stdout and stderr, apart, and how it ended."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.err = bytearray()
        self.ended: Deferred[None] = Deferred()
        self.code: int | None = None
        self.signal: int | None = None

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Failure) -> None:
        self.code = getattr(reason.value, "exitCode", None)
        self.signal = getattr(reason.value, "signal", None)
        self.ended.callback(None)


async def twistd(testcase: unittest.TestCase, config: Path, within: float = 20.0) -> _Process:
    """Run ``twistd -n mxmrelay --config CONFIG`` until it exits; kill it and
    fail if it is still running after ``within`` seconds."""
    proc = _Process()
    argv = [str(TWISTD), "-n", "--pidfile=", "mxmrelay", "--config", str(config)]
    transport = reactor.spawnProcess(proc, str(TWISTD), argv, env=child_env(),
                                     path=str(config.parent))
    timer = reactor.callLater(within, transport.signalProcess, "KILL")
    await proc.ended
    if timer.active():
        timer.cancel()
    else:
        testcase.fail(f"twistd still running after {within} s, killed:\n"
                      f"{proc.out.decode()}{proc.err.decode()}")
    return proc


def busy_port(testcase: unittest.TestCase) -> int:
    """A loopback port that something else is listening on."""
    s = socket.socket()
    testcase.addCleanup(s.close)
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    port: int = s.getsockname()[1]
    return port


class Twistd(unittest.TestCase):
    timeout = 60

    def folder(self) -> Path:
        p = Path(self.mktemp()).resolve()
        p.mkdir(parents=True)
        return p

    def write(self, folder: Path, data: dict[str, Any]) -> Path:
        path = folder / "relay.toml"
        path.write_text(toml(data))
        return path

    def assertOneLine(self, proc: _Process, line: str) -> None:
        """Exit status 1, and the one line on stderr; no traceback."""
        text = (proc.out + proc.err).decode("utf-8", "replace")
        self.assertEqual((proc.code, proc.signal), (1, None), text)
        self.assertEqual(proc.err.decode(), line + "\n", text)
        self.assertNotIn("Traceback", text)

    async def test_unknown_key(self) -> None:
        folder = self.folder()
        data = good_config(folder)
        data["listener"] = [{"role": "submission", "endpoint": "tcp:0:interface=127.0.0.1"}]
        del data["max_recipients"]
        data["max_recipient"] = 5
        config = self.write(folder, data)
        proc = await twistd(self, config)
        self.assertOneLine(proc, f"mxmrelay: cannot start: {config}: max_recipient: "
                                 "unknown key (did you mean 'max_recipients'?)")

    async def test_missing_certificate_names_the_key(self) -> None:
        folder = self.folder()
        data = good_config(folder)
        missing = folder / "no-such-cert.pem"
        data["tls"]["certificate"] = str(missing)
        config = self.write(folder, data)
        proc = await twistd(self, config)
        self.assertOneLine(proc, f"mxmrelay: cannot start: {config}: tls.certificate: "
                                 f"{missing}: cannot read certificate: No such file or directory")

    def busy(self, folder: Path) -> tuple[Path, int]:
        port = busy_port(self)
        data = good_config(folder)
        data["listener"] = [
            {"role": "smtp", "endpoint": "tcp:0:interface=127.0.0.1"},
            {"role": "submission", "endpoint": f"tcp:{port}:interface=127.0.0.1"},
        ]
        return self.write(folder, data), port

    async def test_port_in_use(self) -> None:
        config, port = self.busy(self.folder())
        proc = await twistd(self, config)
        self.assertOneLine(proc, f"mxmrelay: cannot start: listener[1] "
                                 f"tcp:{port}:interface=127.0.0.1: address already in use")

    async def test_a_reference_api_table_is_one_line(self) -> None:
        """The table the reference API had before it ran on its own."""
        folder = self.folder()
        data = good_config(folder)
        data["reference_api"] = {"endpoint": "tcp:0:interface=127.0.0.1",
                                 "database": "api.sqlite3", "token": "t"}
        config = self.write(folder, data)
        proc = await twistd(self, config)
        self.assertOneLine(proc, f"mxmrelay: cannot start: {config}: reference_api: the "
                                 "reference API now runs on its own, as `twistd "
                                 "mxmrelay-refapi --config FILE` (see the README)")


class Passwd(unittest.SynchronousTestCase):
    """``mxmrelay-passwd`` (as ``python -m mxmrelay.passwords``)."""

    ARGV = [sys.executable, "-m", "mxmrelay.passwords"]

    def at_the_prompt(self) -> tuple[subprocess.Popen[bytes], int]:
        """The command reading from a terminal, once it shows its prompt.

        It runs in a session of its own, without a controlling terminal,
        so getpass reads the terminal on stdin (never the terminal the
        tests may run in)."""
        master, slave = pty.openpty()
        self.addCleanup(os.close, master)
        proc = subprocess.Popen(self.ARGV, stdin=slave, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=child_env(), cwd=ROOT,
                                start_new_session=True)
        os.close(slave)
        self.addCleanup(self.reap, proc)
        assert proc.stderr is not None
        seen = b""
        # getpass flushes the terminal's input before it prompts: wait for
        # the prompt before typing anything.
        while not seen.endswith(b"Password: "):
            ready, _, _ = select.select([proc.stderr], [], [], 30)
            if not ready:
                self.fail(f"no prompt after 30 s: {seen!r}")
            chunk = os.read(proc.stderr.fileno(), 1024)
            if not chunk:
                self.fail(f"ended before its prompt: {seen!r}")
            seen += chunk
        return proc, master

    def reap(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()

    def finish(self, proc: subprocess.Popen[bytes]) -> tuple[int, str]:
        out, err = proc.communicate(timeout=30)
        self.assertEqual(out, b"")
        return proc.returncode, err.decode()

    def test_end_of_input_at_the_prompt(self) -> None:
        proc, master = self.at_the_prompt()
        os.write(master, b"\x04")  # Ctrl-D
        code, err = self.finish(proc)
        self.assertEqual((code, err), (1, "\nmxmrelay-passwd: no password given (end of input)\n"))

    def test_interrupt_at_the_prompt(self) -> None:
        proc, _ = self.at_the_prompt()
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        code, err = self.finish(proc)
        self.assertEqual((code, err), (1, "\nmxmrelay-passwd: interrupted\n"))

    def test_empty_or_closed_stdin(self) -> None:
        closed = ["/bin/sh", "-c", 'exec "$0" "$@" <&-', *self.ARGV]
        for argv, stdin in ((self.ARGV, subprocess.DEVNULL), (closed, None)):
            done = subprocess.run(argv, stdin=stdin, capture_output=True, env=child_env(),
                                  cwd=ROOT, timeout=30, check=False)
            self.assertEqual((done.returncode, done.stdout, done.stderr),
                             (1, b"", b"mxmrelay-passwd: no password given (end of input)\n"))
