"""Processes for the bench: start them pinned, wait for their ports, read
their CPU time and memory from ``/proc``, stop them.

CPU time is ``utime + stime`` of ``/proc/PID/stat`` (every thread of the
process, including finished ones), in clock ticks.  Memory is ``VmRSS``
(now) and ``VmHWM`` (the peak) of ``/proc/PID/status``; the peak can be
reset by writing ``5`` to ``/proc/PID/clear_refs`` (Linux 4.0+), which
scenario 5 does to measure the growth over a message alone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CLK_TCK = os.sysconf("SC_CLK_TCK")

#: The server under test and the floor run here; the load generator and the
#: null API on the other core.
SERVER_CPU = 0
CLIENT_CPU = 1


def cpus() -> int:
    return os.cpu_count() or 1


def pin_self(cpu: int) -> None:
    """Pin this process (and so its future children) to ``cpu``."""
    if cpus() > 1:
        os.sched_setaffinity(0, {cpu})


def pinned(cpu: int, argv: list[str]) -> list[str]:
    if cpus() > 1:
        return ["taskset", "-c", str(cpu), *argv]
    return argv


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def raise_fd_limit(want: int = 16384) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the whole process so far."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    # Field 2 (comm) may hold spaces: split after its closing parenthesis.
    fields = stat[stat.rindex(")") + 2:].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / CLK_TCK


def tree(pid: int) -> list[int]:
    """``pid`` and its descendants (a relay with ``workers = N`` is a
    supervisor and N children), from ``/proc/PID/task/TID/children``."""
    out = [pid]
    i = 0
    while i < len(out):
        p = out[i]
        i += 1
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    out += [int(x) for x in f.read().split()]
        except OSError:
            continue
    return out


def tree_cpu_seconds(pid: int) -> float:
    total = 0.0
    for p in tree(pid):
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += cpu_seconds(p)
    return total


def tree_memory(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` summed over the process tree (the sum of
    peaks is an upper bound of the tree's peak when there are several)."""
    out = {"VmRSS": 0, "VmHWM": 0}
    for p in tree(pid):
        with contextlib.suppress(OSError, ValueError):
            for k, v in memory(p).items():
                out[k] += v
    return out


def memory(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` in bytes."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, value = line.split(":", 1)
                out[name] = int(value.split()[0]) * 1024
    return out


def busy_per_cpu() -> dict[int, tuple[float, float]]:
    """Per CPU: seconds busy (user, nice, system, irq, softirq, steal) and
    of those stolen by the hypervisor, from ``/proc/stat``."""
    out: dict[int, tuple[float, float]] = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *values = line.split()
            if not name.startswith("cpu") or name == "cpu":
                continue
            v = [int(x) for x in values[:8]]
            busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
            out[int(name[3:])] = (busy / CLK_TCK, v[7] / CLK_TCK)
    return out


def self_cpu() -> float:
    t = os.times()
    return t.user + t.system


def reset_peak(pid: int) -> bool:
    """Reset ``VmHWM`` to the current RSS (of the whole tree); False where
    not permitted."""
    try:
        for p in tree(pid):
            with open(f"/proc/{p}/clear_refs", "w") as f:
                f.write("5")
        return True
    except OSError:
        return False


class Process:
    """A child process, with its output in a log file."""

    def __init__(self, name: str, argv: list[str], log: Path, ports: list[int],
                 cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = argv
        self.log = log
        self.ports = ports
        self.cwd = cwd
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        #: CPU seconds used, read just before it was told to stop.
        self.final_cpu = 0.0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 30.0) -> Process:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=self.cwd, env=self.env)
        deadline = time.monotonic() + timeout
        for port in self.ports:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n"
                                       + self.tail())
                with socket.socket() as s:
                    s.settimeout(1)
                    try:
                        s.connect(("127.0.0.1", port))
                        break
                    except OSError:
                        pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"{self.name}: port {port} not open after {timeout} s:\n"
                                       + self.tail())
                time.sleep(0.05)
        return self

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cpu(self) -> float:
        """CPU seconds of the process and its descendants."""
        return tree_cpu_seconds(self.pid)

    def memory(self) -> dict[str, int]:
        return tree_memory(self.pid)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, ValueError, IndexError):
                self.final_cpu = tree_cpu_seconds(self.proc.pid)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(5)
        return self.proc.returncode


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed EC certificate for localhost, as the Makefile makes."""
    cert, key = directory / "bench.pem", directory / "bench.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "30", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True)
    return cert, key


def relay_config(path: Path, *, cert: Path, key: Path, submission: int, smtps: int,
                 api_url: str, token: str, max_message_size: int = 64 * 1024 * 1024) -> Path:
    """Write the relay's TOML configuration for one run."""
    directory = ROOT / "etc" / "directory.dev.toml"
    text = f"""\
hostname = "localhost"
directory = "{directory}"
bounce_address = "bounce+{{id}}@bounces.example.net"
max_message_size = {max_message_size}
max_recipients = 100
idle_timeout = 300

[tls]
certificate = "{cert}"
private_key = "{key}"

[[listener]]
role = "submission"
endpoint = "tcp:{submission}:interface=127.0.0.1"

[[listener]]
role = "smtps"
endpoint = "tcp:{smtps}:interface=127.0.0.1"

[delivery_api]
url = "{api_url}"
token = "{token}"
timeout = 30
"""
    path.write_text(text)
    return path


def refapi_config(path: Path, *, port: int, database: Path, token: str) -> Path:
    """Write the reference API's TOML configuration (``twistd mxmrelay-refapi``)."""
    path.write_text(f"""\
endpoint = "tcp:{port}:interface=127.0.0.1"
database = "{database}"
token = "{token}"
""")
    return path
