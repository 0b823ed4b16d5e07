"""Scenario 7: what the sending limits cost on every send's path.

Scenario 1's load (STARTTLS+AUTH, 2 KB, 8 connections x 20, no
pipelining) against three relays: without limits, with limits counted in
the process, and with limits in a Redis of the bench's own
(``redis-server`` on the client CPU, so its work is not charged to the
relay; its CPU per message is noted beside).  The limits are set so high
that nothing is refused: every send is checked, reserved and kept, which
is the common case.  CPU per message is the relay's, transactions only.
"""

from __future__ import annotations

import re
import shutil
import socket
import tempfile

from bench import procs
from bench.loadgen import Load, Stats
from bench.scenarios import (
    Bench,
    Relay,
    Rep,
    Row,
    cpu_mark,
    cpu_used,
    measured,
    ratio,
    warm_up,
)

LIMITS = """
[limits]
sends_per_second = 1000000
burst = 1000000
sends_per_day = 1000000000
"""


class LimitedRelay(Relay):
    """The relay with ``[limits]`` on, and ``[state] redis`` if given."""

    def __init__(self, bench: Bench, label: str, redis_port: int | None) -> None:
        super().__init__(bench)
        self.label = label
        self.redis_port = redis_port

    def argv(self) -> list[str]:
        argv = super().argv()
        extra = LIMITS
        if self.redis_port is not None:
            extra += f'\n[state]\nredis = "redis://127.0.0.1:{self.redis_port}/0"\n'
        with open(argv[-1], "a") as config:
            config.write(extra)
        return argv


def redis_server(bench: Bench) -> tuple[procs.Process, int] | None:
    """A redis-server of the bench's own on the client CPU (None: not installed)."""
    program = shutil.which("redis-server")
    if program is None:
        return None
    port = procs.free_port()
    folder = tempfile.mkdtemp(prefix="redis-", dir=bench.work)
    argv = [program, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", folder]
    process = bench.track(procs.CLIENT_CPU, procs.Process(
        "redis", procs.pinned(procs.CLIENT_CPU, argv), bench.work / "redis.log", [port]))
    return process.start(), port


def redis_calls(port: int) -> int:
    """Scripts Redis has been asked to run (EVAL and EVALSHA in INFO
    commandstats): the relay's round trips for the limits.  (The commands
    the scripts run inside Redis count there too, under their own names.)"""
    with socket.create_connection(("127.0.0.1", port), 5) as s:
        s.sendall(b"INFO commandstats\r\n")
        data = b""
        while not data.endswith(b"\r\n") or data.count(b"\r\n") < 2:
            data += s.recv(65536)
    return sum(int(n) for name, n in re.findall(r"cmdstat_(\w+):calls=(\d+)", data.decode())
               if name in ("eval", "evalsha"))


async def scenario_7(bench: Bench) -> list[Row]:
    title = "2 KB, 8 conn x 20: limits off / in-process / Redis"
    load = Load(connections=8, messages=20, body_size=2048, pipelining="off")
    rounds = 1 if bench.quick else 5
    redis = redis_server(bench)
    servers: list[tuple[str, int | None]] = [("relay", None), ("limits:local", None)]
    if redis is not None:
        servers.append(("limits:redis", redis[1]))
    else:
        bench.log("  redis-server is not installed (make tools installs it): no Redis row")
    rows: list[Row] = []
    try:
        for label, redis_port in servers:
            server = (Relay(bench) if label == "relay"
                      else LimitedRelay(bench, label, redis_port)).start()
            try:
                target = server.target()
                await warm_up(server, target)
                reps: list[Rep] = []
                redis_cpu = 0.0
                calls = 0
                for _ in range(bench.reps):
                    total = Rep(Stats(), 0.0)
                    for _ in range(rounds):
                        before = cpu_mark(redis[0].pid) if redis and redis_port else None
                        called = redis_calls(redis_port) if redis_port else 0
                        rep = await measured(server, target, load)
                        if before is not None and redis is not None and redis_port:
                            redis_cpu += cpu_used(before, cpu_mark(redis[0].pid))
                            calls += redis_calls(redis_port) - called
                        total.stats.merge(rep.stats)
                        total.cpu += rep.cpu
                    reps.append(total)
                row = Row.from_reps("7", title, label, reps)
                row.rss_mb = server.peak_mb()
                if rows:
                    row.ratio = ratio(row.cpu_us, rows[0].cpu_us)
                    row.target = "x of the relay without limits"
                    row.notes.append(f"{row.cpu_us - rows[0].cpu_us:+.0f} us/msg over the "
                                     "relay without limits")
                ok = sum(r.stats.ok for r in reps)
                if redis_port is not None and ok:
                    row.notes.append(f"redis-server: {redis_cpu / ok * 1e6:.0f} us/msg of its "
                                     f"own (on the client CPU); {calls / ok:.2f} round trips "
                                     "(EVALSHA) per message")
                rows.append(row)
                bench.log(f"  {label}: {row.rate:.0f} msgs/s, {row.cpu_us:.0f} us/msg, "
                          f"errors {row.errors}")
            finally:
                server.stop()
    finally:
        if redis is not None:
            redis[0].stop()
    return rows
