"""The scenarios of ``bench/README.md``, each against the relay and the floor.

Each scenario starts the server under test on CPU 0 (one at a time: the
floor first, then the relay), warms it up, measures, and stops it; the
load generator (this process) and the null API share CPU 1.  A scenario
returns :class:`Row` objects, one per server, for the table that
:mod:`bench.__main__` prints.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench import pairs, procs
from bench.loadgen import (
    Load,
    MessageFactory,
    Stats,
    Target,
    close_sessions,
    open_sessions,
    run_load,
    run_transactions,
)

TOKEN = "bench-token"
MB = 1024 * 1024
#: Scenario 3 counts transactions this slow: a 40 ms delayed-ACK stall
#: (Nagle's algorithm meeting a delayed ACK) would land here.
STALL = 0.035


# -- measurements -----------------------------------------------------------------


@dataclass(frozen=True)
class CpuMark:
    """A process's CPU time at one moment, two ways."""

    ticks: float  # utime + stime of /proc/PID/stat (every thread ever), 10 ms steps
    sched: float  # sum of /proc/PID/task/*/schedstat (live threads), nanoseconds
    tids: frozenset[int] | None  # None: a thread came or went while reading


def cpu_mark(pid: int) -> CpuMark:
    """The CPU time of ``pid`` and its descendants, if any."""
    pids = procs.tree(pid)
    ticks = 0.0
    total = 0
    tids: set[int] = set()
    try:
        for p in pids:
            ticks += procs.cpu_seconds(p)
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
                tids.add(int(tid))
    except (OSError, ValueError, IndexError):
        return CpuMark(procs.tree_cpu_seconds(pid), 0.0, None)
    return CpuMark(ticks, total / 1e9, frozenset(tids))


def cpu_used(a: CpuMark, b: CpuMark) -> float:
    """Seconds of CPU between two marks: the nanosecond per-thread counters
    when the same threads lived at both marks, else the clock ticks."""
    if a.tids is not None and a.tids == b.tids:
        return b.sched - a.sched
    return b.ticks - a.ticks


def median(values: list[float]) -> float:
    values = [v for v in values if v == v]  # drop NaN
    return statistics.median(values) if values else float("nan")


@dataclass
class Rep:
    """One repetition: transactions and the server's CPU time over them."""

    stats: Stats
    cpu: float

    @property
    def cpu_per_msg(self) -> float:
        return self.cpu / self.stats.ok if self.stats.ok else float("nan")


@dataclass
class Row:
    """One line of the results table."""

    scenario: str
    title: str
    server: str
    rate: float = float("nan")
    p50: float = float("nan")  # seconds
    p99: float = float("nan")
    errors: int = 0
    cpu_us: float = float("nan")
    rss_mb: float = float("nan")
    ratio: float | None = None
    #: One ratio to the floor per repetition (``ratio`` is their median).
    ratios: list[float] = field(default_factory=list)
    target: str = "-"
    verdict: str = "-"
    notes: list[str] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)

    @classmethod
    def from_reps(cls, scenario: str, title: str, server: str, reps: list[Rep]) -> Row:
        stats = [r.stats for r in reps]
        samples: list[str] = []
        for s in stats:
            samples += s.samples
        return cls(
            scenario, title, server,
            rate=median([s.rate() for s in stats]),
            p50=median([s.percentile(50) for s in stats]),
            p99=median([s.percentile(99) for s in stats]),
            errors=sum(s.errors for s in stats),
            cpu_us=median([r.cpu_per_msg for r in reps]) * 1e6,
            samples=samples[:5],
        )


# -- the servers ---------------------------------------------------------------------


@dataclass
class Bench:
    """What every scenario shares."""

    work: Path
    cert: Path
    key: Path
    api_url: str
    quick: bool
    reps: int
    log: Callable[[str], None]
    profile: bool = False
    profiles: dict[str, Path] = field(default_factory=dict)
    #: What :func:`pairs.check_keys` found for the last servers started.
    key_note: str = ""
    #: Processes started for the current scenario, on each CPU (for the
    #: estimate of other processes' load, see :class:`Interference`).
    started: dict[int, list[procs.Process]] = field(default_factory=dict)

    def track(self, cpu: int, process: procs.Process) -> procs.Process:
        self.started.setdefault(cpu, []).append(process)
        return process


class Interference:
    """How busy each CPU was with *other* processes while a scenario ran:
    ``/proc/stat``'s busy time minus the bench's own processes' CPU time.
    Loopback networking's softirq work is not charged to any process, so a
    few per cent is the bench itself; much more means someone else shared
    the machine and the figures are less trustworthy."""

    def __init__(self, bench: Bench, resident: list[procs.Process]) -> None:
        self.bench = bench
        self.resident = resident  # on the client CPU across scenarios
        bench.started = {}
        self.t0 = time.monotonic()
        self.busy0 = procs.busy_per_cpu()
        self.self0 = procs.self_cpu()
        self.res0 = sum(p.cpu() for p in resident if p.alive())

    def measure(self) -> str:
        elapsed = time.monotonic() - self.t0
        busy = procs.busy_per_cpu()
        own = {procs.SERVER_CPU: 0.0, procs.CLIENT_CPU: 0.0}
        for cpu, started in self.bench.started.items():
            own[cpu] = own.get(cpu, 0.0) + sum(
                p.cpu() if p.alive() else p.final_cpu for p in started)
        own[procs.CLIENT_CPU] += procs.self_cpu() - self.self0
        own[procs.CLIENT_CPU] += sum(p.cpu() for p in self.resident if p.alive()) - self.res0
        parts = []
        for cpu in sorted(busy):
            if cpu not in self.busy0:
                continue
            total = busy[cpu][0] - self.busy0[cpu][0]
            steal = busy[cpu][1] - self.busy0[cpu][1]
            other = max(0.0, total - own.get(cpu, 0.0))
            parts.append(f"CPU {cpu} {100 * other / elapsed:.0f}%"
                         + (f" (steal {100 * steal / elapsed:.0f}%)" if steal > 0.01 else ""))
        return "load not the bench's own: " + ", ".join(parts)


class Server:
    """A server under test: the relay or the floor, pinned to CPU 0."""

    label = "server"

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.proc: procs.Process | None = None
        self.starttls_port = procs.free_port()
        self.smtps_port = procs.free_port()

    def argv(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> Server:
        # From the project root, where ``-m bench.floor`` finds this package.
        self.proc = self.bench.track(procs.SERVER_CPU, procs.Process(
            self.label, procs.pinned(procs.SERVER_CPU, self.argv()),
            self.bench.work / f"{self.label}-{self.starttls_port}.log",
            [self.starttls_port, self.smtps_port],
            cwd=procs.ROOT, env={**os.environ, "TMPDIR": str(self.bench.work)},
        )).start()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def pids(self) -> list[int]:
        """The processes whose CPU a measurement counts."""
        return [self.pid]

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def target(self, tls: str = "starttls") -> Target:
        port = self.smtps_port if tls == "implicit" else self.starttls_port
        return Target(port=port, tls=tls)

    def peak_mb(self) -> float:
        return procs.tree_memory(self.pid)["VmHWM"] / MB

    def rss_mb(self) -> float:
        return procs.tree_memory(self.pid)["VmRSS"] / MB


class Floor(Server):
    label = "floor"

    def argv(self) -> list[str]:
        b = self.bench
        return [sys.executable, "-m", "bench.floor", "--port", str(self.starttls_port),
                "--smtps-port", str(self.smtps_port), "--cert", str(b.cert), "--key", str(b.key),
                "--log", str(b.work / f"floor-{self.starttls_port}-twisted.log")]


class Relay(Server):
    label = "relay"

    def __init__(self, bench: Bench, api_url: str | None = None,
                 reference_api: bool = False) -> None:
        super().__init__(bench)
        self.api_url = api_url or bench.api_url
        self.reference_port = procs.free_port() if reference_api else None
        if reference_api:
            self.label = "relay+refapi"

        self.refapi: procs.Process | None = None

    def start(self) -> Server:
        """With the reference API, that first: its own process, pinned with
        the relay, so that the end-to-end figure counts both."""
        if self.reference_port is not None:
            b = self.bench
            config = procs.refapi_config(
                b.work / f"refapi-{self.starttls_port}.toml", port=self.reference_port,
                database=b.work / f"refapi-{self.starttls_port}.sqlite3", token=TOKEN)
            argv = [str(procs.BIN / "twistd"), "-n", "--pidfile=", "mxmrelay-refapi",
                    "--config", str(config)]
            self.refapi = b.track(procs.SERVER_CPU, procs.Process(
                "refapi", procs.pinned(procs.SERVER_CPU, argv),
                b.work / f"refapi-{self.starttls_port}.log", [self.reference_port],
                cwd=procs.ROOT)).start()
        return super().start()

    def stop(self) -> None:
        super().stop()
        if self.refapi is not None:
            self.refapi.stop()

    @property
    def pids(self) -> list[int]:
        return [self.pid] + ([self.refapi.pid] if self.refapi is not None else [])

    def argv(self) -> list[str]:
        b = self.bench
        api_url = self.api_url
        if self.reference_port is not None:
            api_url = f"http://127.0.0.1:{self.reference_port}/v1/sends"
        config = procs.relay_config(
            b.work / f"relay-{self.starttls_port}.toml", cert=b.cert, key=b.key,
            submission=self.starttls_port, smtps=self.smtps_port, api_url=api_url, token=TOKEN)
        return [str(procs.BIN / "twistd"), "-n", "--pidfile=", "mxmrelay", "--config",
                str(config)]


def start(bench: Bench, kind: str) -> Server:
    if kind == "floor":
        return Floor(bench).start()
    if kind == "relay+refapi":
        return Relay(bench, reference_api=True).start()
    if kind in ("haraka", "haraka-discard"):
        # Imported here: bench.haraka builds on this module's Server.
        from bench.haraka import Haraka

        return Haraka(bench, "post" if kind == "haraka" else "discard").start()
    return Relay(bench).start()


def start_all(bench: Bench, kinds: list[str], rows: dict[str, Row], scenario: str,
              title: str) -> dict[str, Server]:
    """Start every server of a scenario (they wait, idle, for their turn).
    A peer that cannot be had here (Haraka without Node) gets a row that
    says so instead; the floor and the relay must start."""
    from bench.haraka import Unavailable

    started: dict[str, Server] = {}
    try:
        for kind in kinds:
            try:
                started[kind] = start(bench, kind)
            except Unavailable as e:
                rows[kind] = Row(scenario, title, kind, target="same-work peer",
                                 verdict=f"skipped: {e}")
                bench.log(f"  {kind}: skipped: {e}")
        bench.key_note = pairs.check_keys(
            bench.cert, {k: s.target().port for k, s in started.items()})
    except BaseException:
        for server in started.values():
            server.stop()
        raise
    return started


def compare_to_floor(rows: dict[str, Row], reps: dict[str, list[Rep]]) -> None:
    """Each row's ratios to the floor, repetition by repetition, and their
    median as the row's ``x floor``."""
    floor = [r.cpu_per_msg for r in reps.get("floor", [])]
    for kind, row in rows.items():
        if kind != "floor" and kind in reps and floor:
            row.ratios = pairs.ratios([r.cpu_per_msg for r in reps[kind]], floor)
            row.ratio = pairs.median_ratio(row.ratios)
            if len(row.ratios) > 1:
                row.notes.append("x floor of each repetition: "
                                 + ", ".join(f"{x:.2f}" for x in row.ratios))


def judge_ratio(row: Row, limit: float) -> None:
    """``met`` only when the median of the per-repetition ratios is within
    ``limit`` (and nothing failed); the spread is printed beside it."""
    row.target = f"CPU <= {limit}x floor"
    if row.ratio is not None:
        row.verdict = met(row.ratio <= limit and row.errors == 0,
                          pairs.verdict_detail(row.ratio, row.ratios))


# -- profiling -----------------------------------------------------------------------


class Profiler:
    """py-spy attached to the relay while it runs transactions (``--profile``).

    Only the transaction phase is sampled (sessions are opened before
    py-spy attaches), with ``--threads`` so that the summary can keep the
    reactor's thread: the password hashes of AUTH run on the thread pool
    and would otherwise drown everything else.
    """

    def __init__(self, bench: Bench, name: str, pid: int) -> None:
        self.out = procs.ROOT / "var" / f"bench-profile-{name}.txt"
        self.proc: procs.Process | None = None
        spy = procs.BIN / "py-spy"
        if not spy.exists():
            bench.log("  (--profile: py-spy is not installed: .venv/bin/pip install py-spy)")
            return
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.proc = bench.track(procs.CLIENT_CPU, procs.Process(
            "py-spy", [str(spy), "record", "--pid", str(pid), "--rate", "1000", "--format",
                       "raw", "--threads", "--nonblocking", "--output", str(self.out)],
            bench.work / f"py-spy-{name}.log", []))
        self.proc.start()
        time.sleep(1.0)  # attached
        bench.profiles[name] = self.out

    def stop(self) -> None:
        if self.proc is not None and self.proc.proc is not None:
            self.proc.proc.send_signal(signal.SIGINT)
            try:
                self.proc.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.stop()


async def profile_transactions(bench: Bench, server: Server, load: Load, name: str) -> None:
    """A separate, longer run of ``load`` with py-spy attached to the
    server for its transactions only (the table's figures come from the
    runs before, without the profiler)."""
    spy: list[Profiler] = []

    async def attach() -> None:
        await settle()
        spy.append(Profiler(bench, name, server.pid))

    async def detach() -> None:
        await settle()
        for p in spy:
            p.stop()

    longer = dataclasses.replace(load, messages=load.messages * 25)
    stats = await run_load(server.target(), longer, before=attach, after=detach)
    bench.log(f"  profiled {stats.ok} transactions of the relay")


# -- helpers -------------------------------------------------------------------------


async def settle(seconds: float = 0.05) -> None:
    """Let the server finish the work that follows its last reply."""
    await asyncio.sleep(seconds)


async def measured(server: Server, target: Target, load: Load,
                   factory: MessageFactory | None = None) -> Rep:
    """Open the sessions, then measure the server's CPU over the
    transactions only (connecting, TLS and AUTH are outside)."""
    marks: list[list[CpuMark]] = []

    async def mark() -> None:
        await settle()
        marks.append([cpu_mark(pid) for pid in server.pids])

    stats = await run_load(target, load, before=mark, after=mark, factory=factory)
    if len(marks) != 2:
        return Rep(stats, float("nan"))
    return Rep(stats, sum(cpu_used(a, b) for a, b in zip(*marks, strict=True)))


async def warm_up(server: Server, target: Target, body_size: int = 2048,
                  messages: int = 40) -> None:
    """Load every code path once before measuring (imports, caches, pools)."""
    stats = await run_load(target, Load(connections=2, messages=messages // 2,
                                        body_size=body_size))
    if stats.errors:
        raise RuntimeError(f"{server.label}: warm-up failed: {stats.samples}")


def ratio(value: float, floor: float) -> float | None:
    if floor and floor == floor and value == value:
        return value / floor
    return None


def met(ok: bool, detail: str) -> str:
    return f"{'met' if ok else 'MISSED'} ({detail})"


class RssSampler:
    """Samples a server's RSS every 20 ms while a transaction runs (a
    cross-check of ``VmHWM``, and the measure where it cannot be reset)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.peak = 0.0
        self._done = asyncio.Event()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, self.server.rss_mb())
            await asyncio.sleep(0.02)

    async def stop(self) -> float:
        self._done.set()
        await self._task
        return self.peak


# -- scenarios 1-3: throughput ------------------------------------------------------


async def throughput(bench: Bench, scenario: str, title: str, servers: list[str],
                     load: Load, rounds: int) -> dict[str, Row]:
    """``bench.reps`` repetitions, interleaved: in each, every server in
    turn (the floor first, so the relay's measurement is next to it) runs
    ``rounds`` rounds of ``load`` (fresh sessions each round).  Every server
    is started up front and waits, idle, for its turn; a row's ``x floor``
    is the median of its per-repetition ratios (see :mod:`bench.pairs`)."""
    rows: dict[str, Row] = {}
    started = start_all(bench, servers, rows, scenario, title)
    reps: dict[str, list[Rep]] = {kind: [] for kind in started}
    try:
        for kind, server in started.items():
            # The peers run on V8: its compiler wants more before it settles.
            await warm_up(server, server.target(), load.body_size,
                          messages=400 if kind in PEERS else 40)
        for i in range(bench.reps):
            for kind, server in started.items():
                total = Rep(Stats(), 0.0)
                for _ in range(rounds):
                    rep = await measured(server, server.target(), load)
                    total.stats.merge(rep.stats)
                    total.cpu += rep.cpu
                reps[kind].append(total)
            bench.log(f"  repetition {i + 1}: " + ", ".join(
                f"{k} {r[-1].cpu_per_msg * 1e6:.0f}" for k, r in reps.items()) + " us/msg")
        if bench.profile and "relay" in started:
            await profile_transactions(bench, started["relay"], load, f"s{scenario}")
        for kind, server in started.items():
            row = Row.from_reps(scenario, title, kind, reps[kind])
            row.rss_mb = server.peak_mb()
            if load.pipelining == "on":
                stalls = sum(1 for r in reps[kind] for x in r.stats.latencies if x >= STALL)
                count = sum(len(r.stats.latencies) for r in reps[kind])
                row.notes.append(f"{stalls} of {count} transactions took >= "
                                 f"{STALL * 1000:.0f} ms (where 40 ms delayed-ACK stalls "
                                 "would show)")
            rows[kind] = row
            each = ", ".join(f"{r.cpu_per_msg * 1e6:.0f}" for r in reps[kind])
            if len(reps[kind]) > 1:
                row.notes.append(f"CPU us/msg of each repetition: {each}")
            bench.log(f"  {kind}: {row.rate:.0f} msgs/s, {row.cpu_us:.0f} us/msg ({each}), "
                      f"p50 {row.p50 * 1000:.2f} ms, errors {row.errors}")
    finally:
        for server in started.values():
            server.stop()
    compare_to_floor(rows, reps)
    if "floor" in rows:
        rows["floor"].notes.append(bench.key_note)
    return {kind: rows[kind] for kind in servers if kind in rows}


async def scenario_1(bench: Bench) -> list[Row]:
    title = "STARTTLS+AUTH, 2 KB, 8 conn x 20"
    rows = await throughput(bench, "1", title, ["floor", "relay", "relay+refapi", *PEERS],
                            Load(connections=8, messages=20, body_size=2048, pipelining="off"),
                            rounds=1 if bench.quick else 5)
    judge_ratio(rows["relay"], 1.6)
    rows["relay+refapi"].target = "end-to-end figure"
    beside_peers(rows)
    return list(rows.values())


#: Haraka doing the relay's job, and Haraka accepting and discarding.
PEERS = ["haraka", "haraka-discard"]


def beside_peers(rows: dict[str, Row]) -> None:
    """The peers' targets, and the relay's CPU and throughput beside
    Haraka doing the same work."""
    for kind, what in (("haraka", "same-work peer"), ("haraka-discard", "peer, discards")):
        if kind in rows and rows[kind].verdict == "-":
            rows[kind].target = what
    relay, peer = rows.get("relay"), rows.get("haraka")
    if relay is not None and peer is not None and peer.cpu_us == peer.cpu_us:
        relay.notes.append(
            f"beside Haraka doing the same work: {relay.cpu_us / peer.cpu_us:.2f}x its CPU "
            f"per message, {relay.rate / peer.rate:.2f}x its msgs/s")


async def scenario_2(bench: Bench) -> list[Row]:
    title = "STARTTLS+AUTH, 100 KB, 8 conn x 20"
    rows = await throughput(bench, "2", title, ["floor", "relay"],
                            Load(connections=8, messages=20, body_size=100 * 1024,
                                 pipelining="off"),
                            rounds=1 if bench.quick else 3)
    judge_ratio(rows["relay"], 1.0)
    return list(rows.values())


async def scenario_3(bench: Bench) -> list[Row]:
    title = "PIPELINING, 2 KB, 8 conn x 20"
    rows = await throughput(bench, "3", title, ["floor", "relay"],
                            Load(connections=8, messages=20, body_size=2048, pipelining="on"),
                            rounds=1 if bench.quick else 5)
    relay = rows["relay"]
    relay.target = "p50 < 5 ms"
    relay.verdict = met(relay.p50 < 0.005 and relay.errors == 0, f"{relay.p50 * 1000:.2f} ms")
    rows["floor"].notes.append("the floor does not advertise PIPELINING; "
                               "the generator pipelines anyway here")
    return list(rows.values())


# -- scenario 4: many idle connections ----------------------------------------------


async def scenario_4(bench: Bench) -> list[Row]:
    n = 200 if bench.quick else 1000
    title = f"{n:,} idle STARTTLS+AUTH conns, 1 msg each"
    rows: list[Row] = []
    floor_cpu = float("nan")
    for kind in ("floor", "relay"):
        server = start(bench, kind)
        try:
            target = server.target()
            await warm_up(server, target)
            # Many clients: spread over loopback addresses, at most 50 each
            # (the relay refuses more than 100 at once from one address).
            target.sources = [f"127.0.0.{2 + i}" for i in range(max(1, n // 50))]
            load = Load(connections=n, messages=1, body_size=2048, pipelining="off",
                        connect_concurrency=50, timeout=300)
            idle_before = server.rss_mb()
            t0 = time.perf_counter()
            c0 = cpu_mark(server.pid)
            sessions, failures = await open_sessions(target, load)
            opened = time.perf_counter() - t0
            await asyncio.sleep(2.0)  # idle
            c1 = cpu_mark(server.pid)
            idle_rss = server.rss_mb()
            factory = MessageFactory(load.body_size, 1)
            stats = await run_transactions(sessions, [1] * len(sessions), factory, load)
            await settle()
            c2 = cpu_mark(server.pid)
            await close_sessions(sessions)
            lost = n - len(sessions)
            stats.attempted += lost
            stats.errors += lost
            stats.samples = (failures + stats.samples)[:5]
            row = Row.from_reps("4", title, kind, [Rep(stats, cpu_used(c1, c2))])
            row.rss_mb = server.peak_mb()
            per_conn = cpu_used(c0, c1) / max(1, len(sessions)) * 1000
            row.notes.append(
                f"{len(sessions)}/{n} sessions open in {opened:.1f} s "
                f"({per_conn:.2f} ms CPU each for TCP+TLS+AUTH); RSS {idle_before:.0f} MB "
                f"before, {idle_rss:.0f} MB with all sessions idle "
                f"({(idle_rss - idle_before) * 1024 / max(1, len(sessions)):.0f} KB each), "
                f"peak {row.rss_mb:.0f} MB")
            if kind == "floor":
                floor_cpu = row.cpu_us
            else:
                row.ratio = ratio(row.cpu_us, floor_cpu)
                row.target = "all ok, RSS < 150 MB"
                row.verdict = met(row.errors == 0 and row.rss_mb < 150,
                                  f"{row.errors} err, {row.rss_mb:.0f} MB")
            rows.append(row)
            bench.log(f"  {kind}: {row.notes[-1]}")
        finally:
            server.stop()
    return rows


# -- scenario 5: one 50 MB message --------------------------------------------------


def api_stats(url: str) -> dict[str, object]:
    with urllib.request.urlopen(url, timeout=10) as response:
        data: dict[str, object] = json.loads(response.read())
        return data


async def scenario_5(bench: Bench) -> list[Row]:
    size = 50 * 1000 * 1000
    title = "one 50 MB message"
    rows: list[Row] = []
    api_port = procs.free_port()
    hashing_api = bench.track(procs.CLIENT_CPU, procs.Process(
        "nullapi-hash", procs.pinned(procs.CLIENT_CPU, [sys.executable, "-m", "bench.nullapi",
                                                        "--port", str(api_port), "--hash"]),
        bench.work / "nullapi-hash.log", [api_port], cwd=procs.ROOT)).start()
    factory = MessageFactory(size, 1)
    floor_cpu = float("nan")
    try:
        for kind in ("floor", "relay"):
            if kind == "relay":
                server: Server = Relay(bench, f"http://127.0.0.1:{api_port}/v1/sends").start()
            else:
                server = Floor(bench).start()
            try:
                target = server.target()
                await warm_up(server, target, messages=10)
                load = Load(connections=1, messages=1, body_size=size, pipelining="off",
                            timeout=300)
                sessions, failures = await open_sessions(target, load)
                await settle(0.5)
                idle = server.rss_mb()
                reset = procs.reset_peak(server.pid)
                sampler = RssSampler(server)
                c0 = cpu_mark(server.pid)
                stats = await run_transactions(sessions, [1] * len(sessions), factory, load)
                await settle()
                c1 = cpu_mark(server.pid)
                sampled = max(idle, await sampler.stop())
                await close_sessions(sessions)
                stats.errors += 1 - len(sessions)
                stats.samples = (failures + stats.samples)[:5]
                peak = max(sampled, server.peak_mb() if reset else sampled)
                growth = peak - idle
                row = Row.from_reps("5", title, kind, [Rep(stats, cpu_used(c0, c1))])
                row.rss_mb = server.peak_mb()
                row.notes.append(f"RSS {idle:.1f} MB idle, {peak:.1f} MB peak during the "
                                 f"message: +{growth:.1f} MB"
                                 + ("" if reset else " (sampled every 20 ms)"))
                if kind == "floor":
                    floor_cpu = row.cpu_us
                else:
                    row.ratio = ratio(row.cpu_us, floor_cpu)
                    got = api_stats(f"http://127.0.0.1:{api_port}/stats")
                    exact = (got.get("last_body_sha256") == factory.body_sha256
                             and got.get("last_body_size") == len(factory.body))
                    row.notes.append(
                        f"body at the API: {got.get('last_body_size')} bytes, sha256 "
                        f"{'equal to' if exact else 'DIFFERENT from'} what was sent"
                        + (f" ({got.get('last_error')})" if got.get("last_error") else ""))
                    row.target = "RSS +< 20 MB, byte-exact"
                    row.verdict = met(growth < 20 and exact and row.errors == 0,
                                      f"+{growth:.1f} MB, {'exact' if exact else 'NOT exact'}")
                rows.append(row)
                bench.log(f"  {kind}: " + "; ".join(row.notes))
            finally:
                server.stop()
    finally:
        hashing_api.stop()
    return rows


# -- scenario 6: 10,000 messages on one connection ----------------------------------


async def scenario_6(bench: Bench) -> list[Row]:
    n, window = (3000, 500) if bench.quick else (10_000, 1000)
    title = f"{n:,} msgs on 1 conn (implicit TLS)"
    rows: list[Row] = []
    for kind in ("floor", "relay"):
        server = start(bench, kind)
        try:
            row = await _one_connection(server, title, n, window)
        finally:
            server.stop()
        if kind == "relay":
            row.ratio = ratio(row.cpu_us, rows[0].cpu_us)
            row.target = "last/first <= 1.10"
        rows.append(row)
        bench.log(f"  {kind}: " + row.notes[-1])
    return rows


async def _one_connection(server: Server, title: str, n: int, window: int) -> Row:
    target = server.target("implicit")
    await warm_up(server, target)
    marks: dict[int, tuple[CpuMark, float]] = {}

    def at(done: int) -> None:
        if done in (window, n - window, n):
            marks[done] = (cpu_mark(server.pid), server.rss_mb())

    async def before() -> None:
        await settle()
        marks[0] = (cpu_mark(server.pid), server.rss_mb())

    load = Load(connections=1, messages=n, body_size=2048, pipelining="off")
    stats = await run_load(target, load, before=before, on_message=at)
    if not all(k in marks for k in (0, window, n - window, n)):
        raise RuntimeError(f"{server.label}: scenario 6 did not reach every mark: "
                           f"{stats.samples}")
    first = cpu_used(marks[0][0], marks[window][0]) / window
    last = cpu_used(marks[n - window][0], marks[n][0]) / window
    row = Row.from_reps("6", title, server.label,
                        [Rep(stats, cpu_used(marks[0][0], marks[n][0]))])
    row.rss_mb = server.peak_mb()
    row.notes.append(
        f"CPU per message: first {window:,} {first * 1e6:.0f} us, last {window:,} "
        f"{last * 1e6:.0f} us ({last / first:.2f}x); RSS {marks[0][1]:.1f} MB at the "
        f"start, {marks[n][1]:.1f} MB at the end")
    if server.label == "relay":
        row.verdict = met(last / first <= 1.10 and row.errors == 0, f"{last / first:.2f}x")
    return row


async def scenario_8(bench: Bench) -> list[Row]:
    """One message per connection: :mod:`bench.perconn` (imported here,
    as it builds on this module)."""
    from bench import perconn

    return await perconn.scenario(bench)


SCENARIOS = {
    1: scenario_1,
    2: scenario_2,
    3: scenario_3,
    4: scenario_4,
    5: scenario_5,
    6: scenario_6,
    8: scenario_8,
}
