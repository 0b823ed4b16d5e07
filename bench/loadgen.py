"""An SMTP load generator: asyncio (uvloop when importable), many sessions.

Each session reads the banner, says EHLO, upgrades with STARTTLS (or
speaks TLS from the first byte), says EHLO again, authenticates with
``AUTH PLAIN`` and then runs transactions: ``MAIL FROM`` / ``RCPT TO``
(one or more) / ``DATA`` / the message / ``.``.  With PIPELINING (when the
server advertises it, or forced) MAIL, every RCPT and DATA go in one write
and their replies are read after.  Every reply code is checked; a
transaction counts as done only on ``250`` after the dot.

Each message is unique (its Message-ID), because the relay's idempotency
key would otherwise fold identical messages into one send.  The body is
built once per size: lines of 76 characters and CRLF.

Used by :mod:`bench.scenarios` in-process, and on its own against any
server (``make run`` starts one on 2587)::

    python -m bench.loadgen --port 2587 --connections 8 --messages 20
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import importlib
import math
import os
import random
import ssl
import statistics
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, TypeVar

uvloop: ModuleType | None
try:  # pragma: no cover - depends on the environment
    uvloop = importlib.import_module("uvloop")
except ImportError:  # pragma: no cover
    uvloop = None

T = TypeVar("T")

USER = "demo@example.com"
PASSWORD = "demo-password"  # the development directory's demo user
MAIL_FROM = "app@example.com"
#: Largest chunk handed to the transport at once for big messages.
WRITE_CHUNK = 1024 * 1024


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on uvloop when it is installed, else on asyncio's loop."""
    if uvloop is not None:
        result: T = uvloop.run(coro)
        return result
    return asyncio.run(coro)


def loop_name() -> str:
    return "uvloop" if uvloop is not None else "asyncio"


class SMTPFailure(Exception):
    """An unexpected reply, or the connection broke."""


def tls_context() -> ssl.SSLContext:
    """A client context that accepts the bench's self-signed certificate."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def make_body(size: int, seed: int = 5321) -> bytes:
    """``size`` bytes of text: lines of 76 characters and CRLF (the last
    one shorter), ending with CRLF; no line starts with a dot."""
    if size < 2:
        return b"\r\n"
    rng = random.Random(seed)
    need = size
    lines: list[bytes] = []
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    # One random block, reused with an offset per line: cheap for 50 MB.
    block = bytes(rng.choice(alphabet) for _ in range(4096))
    i = 0
    while need > 0:
        n = min(76, need - 2)
        if n <= 0:
            lines.append(b"\r\n")
            break
        start = (i * 77) % (len(block) - 80)
        lines.append(block[start:start + n] + b"\r\n")
        need -= n + 2
        i += 1
    return b"".join(lines)


def dot_stuff(body: bytes) -> bytes:
    stuffed = body.replace(b"\r\n.", b"\r\n..")
    return b"." + stuffed if stuffed.startswith(b".") else stuffed


@dataclass
class Target:
    """Where to connect and how to get to an authenticated session."""

    host: str = "127.0.0.1"
    port: int = 2587
    #: ``starttls``, ``implicit`` (TLS from the first byte) or ``plain``.
    tls: str = "starttls"
    user: str | None = USER
    password: str | None = PASSWORD
    #: Local addresses to connect from, in turn (e.g. 127.0.0.2, 127.0.0.3,
    #: ...: many clients); None: the system's choice.
    sources: list[str] | None = None


@dataclass
class Load:
    """The shape of the traffic."""

    connections: int = 8
    #: Transactions per connection.
    messages: int = 20
    #: Stop after this many transactions in all (None: connections x messages).
    total: int | None = None
    body_size: int = 2048
    recipients: int = 1
    #: ``auto`` (when advertised), ``on`` (even when not) or ``off``.
    pipelining: str = "auto"
    #: Sessions being opened (connect, TLS, AUTH) at the same time.
    connect_concurrency: int = 50
    #: Seconds for one transaction, and for opening one session.
    timeout: float = 120.0

    def per_connection(self) -> list[int]:
        counts = [self.messages] * self.connections
        if self.total is not None:
            left = self.total
            for i in range(len(counts)):
                counts[i] = min(counts[i], max(left, 0))
                left -= counts[i]
        return counts


@dataclass
class Stats:
    """What a phase did: transactions, failures, latencies."""

    attempted: int = 0
    ok: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    samples: list[str] = field(default_factory=list)
    elapsed: float = 0.0

    def fail(self, what: str, count: int = 1) -> None:
        self.errors += count
        if len(self.samples) < 5:
            self.samples.append(what)

    def merge(self, other: Stats) -> None:
        self.attempted += other.attempted
        self.ok += other.ok
        self.errors += other.errors
        self.latencies += other.latencies
        self.samples += other.samples[: max(0, 5 - len(self.samples))]
        self.elapsed += other.elapsed

    def rate(self) -> float:
        return self.ok / self.elapsed if self.elapsed > 0 else 0.0

    def percentile(self, p: float) -> float:
        """The ``p``-th percentile latency in seconds (nearest rank)."""
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        k = max(0, min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1))
        return ordered[k]


class MessageFactory:
    """Unique messages sharing one body: only the header section differs."""

    def __init__(self, body_size: int, recipients: int) -> None:
        self.body = make_body(body_size)
        self.body_sha256 = hashlib.sha256(self.body).hexdigest()
        self._stuffed = dot_stuff(self.body)
        self.recipients = [f"rcpt{i}@example.org" for i in range(max(1, recipients))]
        self._prefix = os.urandom(6).hex()
        self._counter = 0

    def next(self) -> tuple[bytes, bytes]:
        """The header section (with its blank line) and the stuffed body
        with the terminating dot."""
        self._counter += 1
        head = (
            f"From: Bench <{MAIL_FROM}>\r\n"
            f"To: <{self.recipients[0]}>\r\n"
            f"Subject: bench message {self._counter}\r\n"
            f"Message-ID: <{self._prefix}.{self._counter}@bench.example.com>\r\n"
            "Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
            "MIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=us-ascii\r\n"
            "\r\n"
        ).encode()
        return head, self._stuffed


class Session:
    """One SMTP connection, opened to an authenticated state."""

    def __init__(self, target: Target, load: Load, ctx: ssl.SSLContext,
                 source: str | None = None) -> None:
        self.target = target
        self.source = source
        self.load = load
        self.ctx = ctx
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.pipelining = False
        self.broken = False

    async def _reply(self) -> tuple[int, bytes]:
        assert self.reader is not None
        readline = self.reader.readline
        while True:
            line = await readline()
            if not line:
                raise SMTPFailure("connection closed by server")
            if line[3:4] != b"-":
                try:
                    return int(line[:3]), line.rstrip()
                except ValueError:
                    raise SMTPFailure(f"bad reply {line[:80]!r}") from None

    async def _expect(self, code: int, what: str) -> bytes:
        got, line = await self._reply()
        if got != code:
            raise SMTPFailure(f"{what}: {line.decode('ascii', 'replace')[:120]}")
        return line

    async def _ehlo(self) -> set[str]:
        assert self.reader is not None and self.writer is not None
        self.writer.write(b"EHLO bench.example.com\r\n")
        keywords: set[str] = set()
        while True:
            line = await self.reader.readline()
            if not line:
                raise SMTPFailure("connection closed during EHLO")
            if line[:3] != b"250":
                raise SMTPFailure(f"EHLO: {line.decode('ascii', 'replace')[:120]}")
            keywords.add(line[4:].split(b" ", 1)[0].strip().upper().decode("ascii", "replace"))
            if line[3:4] != b"-":
                return keywords

    async def open(self) -> None:
        t = self.target
        implicit = t.tls == "implicit"
        self.reader, self.writer = await asyncio.open_connection(
            t.host, t.port, ssl=self.ctx if implicit else None,
            server_hostname="localhost" if implicit else None,
            local_addr=(self.source, 0) if self.source else None)
        await self._expect(220, "banner")
        keywords = await self._ehlo()
        if t.tls == "starttls":
            if "STARTTLS" not in keywords:
                raise SMTPFailure("STARTTLS not advertised")
            self.writer.write(b"STARTTLS\r\n")
            await self._expect(220, "STARTTLS")
            await self.writer.start_tls(self.ctx, server_hostname="localhost")
            keywords = await self._ehlo()
        if t.user is not None and t.password is not None:
            token = base64.b64encode(f"\0{t.user}\0{t.password}".encode()).decode()
            self.writer.write(f"AUTH PLAIN {token}\r\n".encode())
            await self._expect(235, "AUTH")
        mode = self.load.pipelining
        self.pipelining = mode == "on" or (mode == "auto" and "PIPELINING" in keywords)

    async def transaction(self, head: bytes, body: bytes, recipients: list[str]) -> bytes:
        """One transaction; returns the final reply line, raises on any
        unexpected reply (the session is then still in step, unless
        ``broken`` is set)."""
        assert self.writer is not None
        w = self.writer
        commands = [f"MAIL FROM:<{MAIL_FROM}>\r\n".encode()]
        commands += [f"RCPT TO:<{r}>\r\n".encode() for r in recipients]
        commands.append(b"DATA\r\n")
        expected = [250] * (len(commands) - 1) + [354]
        failure: str | None = None
        if self.pipelining:
            w.write(b"".join(commands))
            for code in expected:
                got, line = await self._reply()
                if got != code and failure is None:
                    failure = line.decode("ascii", "replace")
        else:
            for command, code in zip(commands, expected, strict=True):
                w.write(command)
                got, line = await self._reply()
                if got != code:
                    failure = line.decode("ascii", "replace")
                    break
        if failure is not None:
            # No message follows (a 354 despite an earlier refusal gets an
            # empty one); RSET puts the session back in step either way.
            if got == 354:
                w.write(b".\r\n")
                await self._reply()
            w.write(b"RSET\r\n")
            await self._reply()
            raise SMTPFailure(failure[:160])
        if len(body) <= WRITE_CHUNK:
            w.write(head + body + b".\r\n")
        else:
            w.write(head)
            view = memoryview(body)
            for i in range(0, len(body), WRITE_CHUNK):
                w.write(view[i:i + WRITE_CHUNK])
                await w.drain()
            w.write(b".\r\n")
        got, line = await self._reply()
        if got != 250:
            raise SMTPFailure(line.decode("ascii", "replace")[:160])
        return line

    async def quit(self) -> None:
        if self.writer is None:
            return
        with contextlib.suppress(Exception):
            if not self.broken:
                self.writer.write(b"QUIT\r\n")
                await asyncio.wait_for(self._reply(), 5)
        self.writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.writer.wait_closed(), 5)


async def open_sessions(target: Target, load: Load,
                        count: int | None = None) -> tuple[list[Session], list[str]]:
    """Open ``count`` (default ``load.connections``) sessions, at most
    ``load.connect_concurrency`` at a time.  Returns the open sessions and
    a description of each failure."""
    ctx = tls_context()
    gate = asyncio.Semaphore(load.connect_concurrency)
    n = load.connections if count is None else count
    failures: list[str] = []

    async def one(i: int) -> Session | None:
        async with gate:
            source = target.sources[i % len(target.sources)] if target.sources else None
            s = Session(target, load, ctx, source)
            try:
                await asyncio.wait_for(s.open(), load.timeout)
                return s
            except (OSError, SMTPFailure, TimeoutError) as e:
                failures.append(f"open: {type(e).__name__}: {e}")
                s.broken = True
                await s.quit()
                return None

    opened = await asyncio.gather(*(one(i) for i in range(n)))
    return [s for s in opened if s is not None], failures


OnMessage = Callable[[int], None]


async def run_transactions(sessions: list[Session], counts: list[int],
                           factory: MessageFactory, load: Load,
                           on_message: OnMessage | None = None) -> Stats:
    """Every session sends its count of messages, all sessions at once.
    ``on_message(n)`` is called after each transaction with the number done
    in all (scenario 6 reads the server's CPU at given counts)."""
    stats = Stats()
    done = 0
    recipients = factory.recipients

    async def one(session: Session, count: int) -> None:
        nonlocal done
        for i in range(count):
            head, body = factory.next()
            stats.attempted += 1
            t0 = time.perf_counter()
            try:
                async with asyncio.timeout(load.timeout):
                    await session.transaction(head, body, recipients)
            except SMTPFailure as e:
                stats.fail(str(e))
                if "closed" in str(e):
                    session.broken = True
            except (OSError, TimeoutError) as e:
                session.broken = True
                stats.fail(f"{type(e).__name__}: {e}")
            else:
                stats.latencies.append(time.perf_counter() - t0)
                stats.ok += 1
            done += 1
            if on_message is not None:
                on_message(done)
            if session.broken:
                left = count - i - 1
                if left:
                    stats.attempted += left
                    stats.fail("session broken", left)
                return

    t0 = time.perf_counter()
    await asyncio.gather(*(one(s, c) for s, c in zip(sessions, counts, strict=False)))
    stats.elapsed = time.perf_counter() - t0
    return stats


async def close_sessions(sessions: list[Session]) -> None:
    await asyncio.gather(*(s.quit() for s in sessions))


async def run_load(target: Target, load: Load,
                   before: Callable[[], Awaitable[None] | None] | None = None,
                   after: Callable[[], Awaitable[None] | None] | None = None,
                   factory: MessageFactory | None = None,
                   on_message: OnMessage | None = None) -> Stats:
    """Open every session, call ``before``, run the transactions, call
    ``after``, close.  The returned stats' ``elapsed`` and latencies cover
    the transactions only (not connecting, TLS or AUTH)."""
    factory = factory or MessageFactory(load.body_size, load.recipients)
    counts = load.per_connection()
    sessions, failures = await open_sessions(target, load)
    if before is not None:
        r = before()
        if r is not None:
            await r
    stats = await run_transactions(sessions, counts[: len(sessions)], factory, load, on_message)
    if after is not None:
        r = after()
        if r is not None:
            await r
    await close_sessions(sessions)
    # The messages of sessions that did not open are failures too.
    lost = sum(counts[len(sessions):])
    stats.attempted += lost
    stats.errors += lost
    stats.samples = (failures + stats.samples)[:5]
    return stats


def _main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=2587)
    p.add_argument("--tls", choices=["starttls", "implicit", "plain"], default="starttls")
    p.add_argument("--user", default=USER)
    p.add_argument("--password", default=PASSWORD)
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--messages", type=int, default=20, help="per connection")
    p.add_argument("--total", type=int, default=None, help="messages in all (a cap)")
    p.add_argument("--body-size", type=int, default=2048)
    p.add_argument("--recipients", type=int, default=1)
    p.add_argument("--pipelining", choices=["auto", "on", "off"], default="auto")
    a = p.parse_args()
    target = Target(a.host, a.port, a.tls, a.user or None, a.password or None)
    load = Load(a.connections, a.messages, a.total, a.body_size, a.recipients, a.pipelining)
    stats = run(run_load(target, load))
    lat = stats.latencies
    print(f"{loop_name()}: {stats.ok}/{stats.attempted} ok, {stats.errors} errors, "
          f"{stats.rate():.0f} msgs/s, p50 {stats.percentile(50) * 1000:.2f} ms, "
          f"p99 {stats.percentile(99) * 1000:.2f} ms, "
          f"mean {statistics.fmean(lat) * 1000 if lat else float('nan'):.2f} ms")
    for s in stats.samples:
        print("  error:", s)


if __name__ == "__main__":
    _main()
