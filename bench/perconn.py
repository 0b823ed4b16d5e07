"""Scenario 8: one message per connection, the web shop's pattern.

PHPMailer, .NET's SmtpClient and cron scripts connect once per message:
TCP, ``STARTTLS``, ``AUTH``, one 2 KB message, ``QUIT``.  The other
scenarios leave the handshake out of the CPU figure; this one counts all
of it: the server's CPU is read before the first connection and after the
last one closed, and a "transaction" (its latency) is the whole session,
from connecting to the reply to ``QUIT``.  Eight clients at once, each
opening its sessions one after the other.  The load generator's client
does not resume TLS sessions (every handshake is a full one), except in the
row "relay, resumed": each client there keeps the session of its previous
connection and offers it (as PHP, .NET and a Python script that keeps its
``SSLContext`` do), so that a resumption skips the full handshake.

Interleaved like scenarios 1-3: every server is started up front, and each
repetition measures the floor, then the relay, then the peers.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from typing import Any

from bench.loadgen import (
    Load,
    MessageFactory,
    Session,
    SMTPFailure,
    Stats,
    Target,
    tls_context,
)
from bench.scenarios import (
    PEERS,
    Bench,
    Rep,
    Row,
    Server,
    beside_peers,
    compare_to_floor,
    cpu_mark,
    cpu_used,
    judge_ratio,
    settle,
    start_all,
)

#: The goal for this pattern: CPU per message at most this times the floor's.
LIMIT = 1.3
#: The relay's row whose clients resume their TLS sessions.
RESUMED = "relay, resumed"


class Resuming(ssl.SSLContext):
    """A client context that offers the session of its last connection
    (asyncio's ``start_tls`` takes no session; its ``wrap_bio`` call does)."""

    session: ssl.SSLSession | None = None

    def wrap_bio(self, incoming: Any, outgoing: Any, server_side: bool = False,
                 server_hostname: Any = None, session: Any = None) -> ssl.SSLObject:
        return super().wrap_bio(incoming, outgoing, server_side, server_hostname,
                                session or self.session)


def resuming_context() -> Resuming:
    ctx = Resuming(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def one_message_sessions(target: Target, clients: int, each: int,
                               factory: MessageFactory, timeout: float = 60.0,
                               resumed: list[bool] | None = None) -> Stats:
    """``clients`` clients at once, each opening ``each`` sessions in turn:
    connect, STARTTLS, AUTH, one message, QUIT.  With ``resumed`` (a list
    that gets whether each session resumed), each client offers the TLS
    session of its previous connection."""
    stats = Stats()
    shared = tls_context()
    load = Load(connections=1, messages=1, body_size=len(factory.body), pipelining="off",
                timeout=timeout)

    async def client() -> None:
        ctx = resuming_context() if resumed is not None else shared
        for _ in range(each):
            stats.attempted += 1
            session = Session(target, load, ctx)
            t0 = time.perf_counter()
            try:
                async with asyncio.timeout(timeout):
                    await session.open()
                    head, body = factory.next()
                    await session.transaction(head, body, factory.recipients)
                    if resumed is not None and session.writer is not None:
                        tls = session.writer.get_extra_info("ssl_object")
                        resumed.append(bool(tls.session_reused))
                        assert isinstance(ctx, Resuming)
                        ctx.session = tls.session
                    await session.quit()
            except (OSError, SMTPFailure, TimeoutError) as e:
                stats.fail(f"{type(e).__name__}: {e}")
                session.broken = True
                await session.quit()
            else:
                stats.latencies.append(time.perf_counter() - t0)
                stats.ok += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    stats.elapsed = time.perf_counter() - t0
    return stats


async def measured(server: Server, clients: int, each: int,
                   resumed: list[bool] | None = None) -> Rep:
    factory = MessageFactory(2048, 1)
    await settle()
    before = [cpu_mark(pid) for pid in server.pids]
    stats = await one_message_sessions(server.target(), clients, each, factory,
                                       resumed=resumed)
    await settle()
    after = [cpu_mark(pid) for pid in server.pids]
    return Rep(stats, sum(cpu_used(a, b) for a, b in zip(before, after, strict=True)))


async def scenario(bench: Bench) -> list[Row]:
    clients, each = (8, 5) if bench.quick else (8, 20)
    title = "1 msg per conn (TCP+STARTTLS+AUTH), 2 KB"
    kinds = ["floor", "relay", *PEERS]
    rows: dict[str, Row] = {}
    started = start_all(bench, kinds, rows, "8", title)
    reps: dict[str, list[Rep]] = {kind: [] for kind in started}
    try:
        # Warm: imports, the relay's login cache, the peers' compiler (V8).
        for kind, server in started.items():
            await measured(server, 2, 100 if kind in PEERS else 10)
        resumed: list[bool] = []
        if "relay" in started:
            reps[RESUMED] = []
            await measured(started["relay"], 2, 10, [])
        for i in range(bench.reps):
            for kind, server in started.items():
                reps[kind].append(await measured(server, clients, each))
                if kind == "relay":
                    reps[RESUMED].append(await measured(server, clients, each, resumed))
            bench.log(f"  repetition {i + 1}: " + ", ".join(
                f"{k} {r[-1].cpu_per_msg * 1e6:.0f}" for k, r in reps.items()) + " us/msg")
        for kind in reps:
            server = started[kind if kind != RESUMED else "relay"]
            row = Row.from_reps("8", title, kind, reps[kind])
            row.rss_mb = server.peak_mb()
            if len(reps[kind]) > 1:
                row.notes.append("CPU us/msg of each repetition: "
                                 + ", ".join(f"{r.cpu_per_msg * 1e6:.0f}" for r in reps[kind]))
            rows[kind] = row
    finally:
        for server in started.values():
            server.stop()
    compare_to_floor(rows, reps)
    judge_ratio(rows["relay"], LIMIT)
    if RESUMED in rows:
        judge_ratio(rows[RESUMED], LIMIT)
        rows[RESUMED].notes.append(
            f"{sum(resumed)} of {len(resumed)} sessions resumed TLS (each client offers the "
            "session of its previous connection; the floor offers no resumption, so its "
            "figure is a full handshake's)")
        kinds.insert(kinds.index("relay") + 1, RESUMED)
    beside_peers(rows)
    rows["floor"].notes += [
        f"{clients} clients at once, {each} sessions each per repetition; p50/p99 are of the "
        "whole session (connect to QUIT's reply), the CPU counts the handshakes",
        bench.key_note]
    return [rows[kind] for kind in kinds if kind in rows]
