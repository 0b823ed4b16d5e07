"""``python -m bench`` (``make bench``): run the scenarios, print one table.

    python -m bench              # all scenarios, 5 interleaved repetitions (minutes)
    python -m bench --quick      # 1 repetition, smaller counts (under a minute)
    python -m bench --only 2     # one scenario (or --only 1,3)
    python -m bench --only 1,2 --profile   # py-spy on the relay: top self/cumulative costs

The table also goes to ``var/bench-results.txt``.  See ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench import loadgen, pairs, procs, resumption
from bench.limits import scenario_7
from bench.scenarios import SCENARIOS, Bench, Interference, Row

SCENARIOS[7] = scenario_7

COLUMNS = [
    ("#", 2, "<"), ("scenario", 42, "<"), ("server", 12, "<"), ("msgs/s", 7, ">"),
    ("p50 ms", 7, ">"), ("p99 ms", 7, ">"), ("errors", 6, ">"), ("CPU us/msg", 10, ">"),
    ("peak RSS MB", 11, ">"), ("x floor", 7, ">"), ("spread", 11, ">"), ("target", 24, "<"),
    ("result", 0, "<"),
]


def _num(value: float, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def table(rows: list[Row]) -> str:
    def line(cells: list[str]) -> str:
        out = []
        for (_, width, align), cell in zip(COLUMNS, cells, strict=True):
            out.append(f"{cell:{align}{width}}" if width else cell)
        return "  ".join(out).rstrip()

    lines = [line([c[0] for c in COLUMNS]), line(["-" * max(w, len(n)) for n, w, _ in COLUMNS])]
    last = None
    for r in rows:
        same = r.scenario == last
        last = r.scenario
        rate_digits = 2 if r.rate < 10 else 0
        lines.append(line([
            "" if same else r.scenario,
            "" if same else r.title,
            r.server,
            _num(r.rate, rate_digits),
            _num(r.p50 * 1000, 2),
            _num(r.p99 * 1000, 2),
            str(r.errors),
            _num(r.cpu_us),
            _num(r.rss_mb, 1),
            "-" if r.ratio is None else f"{r.ratio:.2f}",
            pairs.spread(r.ratios),
            r.target,
            r.verdict,
        ]))
    notes = []
    for r in rows:
        for n in r.notes:
            notes.append(f"  {r.scenario} {r.server}: {n}")
        for s in r.samples:
            notes.append(f"  {r.scenario} {r.server}: error: {s}")
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines)


def profile_summary(path: Path, top: int = 15) -> str:
    """Top self and cumulative costs from py-spy's raw (collapsed) output,
    for the reactor's thread (the one whose stacks hold ``mainLoop``)."""
    threads: dict[str, list[tuple[list[str], int]]] = {}
    for raw in path.read_text(errors="replace").splitlines():
        stack, _, count = raw.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        thread = frames[0] if frames[0].startswith(("thread ", "process ")) else ""
        while frames and frames[0].startswith(("thread ", "process ")):
            frames = frames[1:]
        threads.setdefault(thread, []).append(([_short(f) for f in frames], int(count)))
    if not threads:
        return f"{path}: no samples"

    def reactor_samples(item: tuple[str, list[tuple[list[str], int]]]) -> int:
        return sum(n for frames, n in item[1] if any(f.startswith("ReactorBase.mainLoop")
                                                       for f in frames))

    name, stacks = max(threads.items(), key=reactor_samples)
    own: Counter[str] = Counter()
    by_file: Counter[str] = Counter()
    cumulative: Counter[str] = Counter()
    total = 0
    for frames, n in stacks:
        total += n
        if frames:
            own[frames[-1]] += n
            by_file[frames[-1].partition(" (")[2].rstrip(")")] += n
        for f in set(frames):
            if not f.startswith(_DISPATCH) and "(twisted/scripts/" not in f:
                cumulative[f] += n
    others = sum(n for t, st in threads.items() if t != name for _, n in st)
    out = [f"{path.name}: {total} samples of the reactor thread "
           f"({others} of other threads left out)"]
    for title, counter in (("self", own), ("self, by file", by_file),
                           ("cumulative (reactor dispatch frames left out)", cumulative)):
        out.append(f"  top {top} by {title} time:")
        for fn, n in counter.most_common(top):
            out.append(f"    {100 * n / total:5.1f}%  {fn}")
    return "\n".join(out)


#: Frames every reactor callback runs under: left out of the cumulative list.
_DISPATCH = (
    "<module> (twistd)", "run (twisted/", "runApp ", "ApplicationRunner.", "runReactorWithLogging",
    "UnixApplicationRunner.", "ReactorBase.run ", "ReactorBase.mainLoop", "EPollReactor.doPoll",
    "_PollLikeMixin._doReadOrWrite", "callWithLogger", "callWithContext",
    "ContextTracker.callWithContext", "ThreadedContextTracker.callWithContext",
)


def _short(frame: str) -> str:
    """``func (path/to/pkg/module.py:123)`` -> ``func (pkg/module.py)``."""
    name, _, where = frame.strip().partition(" (")
    filename = where.rstrip(")").rsplit(":", 1)[0]
    parts = Path(filename).parts
    for anchor in ("site-packages", "python3.11", "lib"):
        if anchor in parts:
            parts = parts[len(parts) - parts[::-1].index(anchor):]
            break
    return f"{name} ({'/'.join(parts[-3:]) if parts else filename})"


def git_revision() -> str:
    try:
        out = subprocess.run(["git", "-C", str(procs.ROOT), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "?"
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="1 repetition, smaller counts")
    p.add_argument("--only", default="", help="scenario numbers, e.g. 2 or 1,3")
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 5, quick 1)")
    p.add_argument("--profile", action="store_true",
                   help="after scenarios 1-3's measured runs, one more with py-spy on the relay")
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    p.add_argument("--output", type=Path, default=procs.ROOT / "var" / "bench-results.txt")
    a = p.parse_args(argv)
    try:
        wanted = [int(x) for x in a.only.replace(" ", "").split(",") if x] or sorted(SCENARIOS)
    except ValueError:
        p.error("--only takes scenario numbers: --only 2 or --only 1,3")
    if any(n not in SCENARIOS for n in wanted):
        p.error(f"--only: scenarios are {', '.join(map(str, SCENARIOS))}")

    started = time.monotonic()
    procs.raise_fd_limit()
    procs.pin_self(procs.CLIENT_CPU)
    work = Path(tempfile.mkdtemp(prefix="mxmrelay-bench-"))

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    cert, key = procs.make_certificate(work)
    api_port = procs.free_port()
    api = procs.Process(
        "nullapi", procs.pinned(procs.CLIENT_CPU, [sys.executable, "-m", "bench.nullapi",
                                                   "--port", str(api_port)]),
        work / "nullapi.log", [api_port], cwd=procs.ROOT).start()
    bench = Bench(work=work, cert=cert, key=key, api_url=f"http://127.0.0.1:{api_port}/v1/sends",
                  quick=a.quick, reps=a.reps or (1 if a.quick else 5), log=log,
                  profile=a.profile)
    cores = procs.cpus()
    log(f"bench: work folder {work}; {cores} cores; server on CPU {procs.SERVER_CPU}, "
        f"load generator ({loadgen.loop_name()}) and null API on CPU {procs.CLIENT_CPU}")
    rows: list[Row] = []
    clients = ""
    try:
        for n in wanted:
            t0 = time.monotonic()
            log(f"scenario {n}: ...")
            interference = Interference(bench, [api])
            got = loadgen.run(SCENARIOS[n](bench))
            load = interference.measure()
            got[-1].notes.append(load)
            rows += got
            log(f"scenario {n}: {time.monotonic() - t0:.0f} s; {load}")
        if not a.only:
            log("clients: TLS session resumption across connections ...")
            clients = ("\nTLS session resumption across connections, per client "
                       "(bench/resumption.py):\n"
                       + resumption.table(resumption.measure(cert, key, work)) + "\n")
    finally:
        api.stop()
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    took = time.monotonic() - started
    header = (
        f"mxmrelay bench {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, "
        f"{git_revision()}, Python {platform.python_version()}, {loadgen.loop_name()}, "
        f"{cores} cores, {'quick, ' if a.quick else ''}{bench.reps} repetition(s) "
        f"(medians), {took:.0f} s")
    report = header + "\n\n" + table(rows) + "\n" + clients
    print(report)
    for name, path in bench.profiles.items():
        summary = profile_summary(path)
        top = path.with_name(path.stem + "-top.txt")
        top.write_text(summary + "\n")
        print(f"py-spy profile of the relay, scenario {name[1:]} "
              f"(raw stacks in {path}):\n{summary}\n")
    a.output.parent.mkdir(parents=True, exist_ok=True)
    a.output.write_text(report)
    print(f"(written to {a.output})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
