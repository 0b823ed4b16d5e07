"""Refusals must not keep connections alive.

An exception instance raised a second time chains the new frames onto its
``__traceback__``; a refusal kept in a module-level constant therefore
held on to every protocol (and its buffers) that ever got that reply.
These tests run the refusals over real sockets and then look at what is
still alive.  ``MXMRELAY_MEASURE_RSS=1`` adds the RSS figure over 10,000
such commands (printed; too slow and too noisy to assert on in CI).
"""

from __future__ import annotations

import gc
import os
import sys
import types
import weakref

from twisted.python.failure import Failure
from twisted.trial import unittest

import mxmrelay
from mxmrelay.smtp import SMTPServer
from tests.helpers import until
from tests.support import RawClient, RelayUnderTest, in_thread

#: Commands that each end in a refusal raised as an exception.
REFUSED = [
    "MAIL FROM:<jörg@example.com>",   # 553 5.6.7, no SMTPUTF8
    "MAIL FROM:<a@@example.com>",     # 501 5.1.7
]
REFUSED_IN_TRANSACTION = [
    "RCPT TO:<jörg@example.org>",     # 553 5.6.7
    "RCPT TO:<a b@example.org>",      # 501 5.1.3
]


def _connections(relay: RelayUnderTest) -> list[SMTPServer]:
    return [c for f in relay.relay.factories for c in f.connections]


def _refuse(c: RawClient, times: int = 1) -> list[str]:
    """Send every refused command ``times`` times, pipelined."""
    out = []
    assert c.cmd("RSET").startswith("250")
    batch = "".join(f"{x}\r\n" for x in REFUSED) * times
    c.send(batch.encode())
    out += [c.reply() for _ in range(len(REFUSED) * times)]
    assert c.cmd("MAIL FROM:<app@example.com>").startswith("250")
    batch = "".join(f"{x}\r\n" for x in REFUSED_IN_TRANSACTION) * times
    c.send(batch.encode())
    out += [c.reply() for _ in range(len(REFUSED_IN_TRANSACTION) * times)]
    return out


def _live_servers() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, SMTPServer))


def _live_tracebacks() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, types.TracebackType))


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Refusals(unittest.TestCase):
    async def test_closed_connection_is_collected(self) -> None:
        relay = RelayUnderTest(self)
        c: RawClient = await in_thread(lambda: relay.raw().ready())
        answers = await in_thread(_refuse, c)
        self.assertEqual([a[:9] for a in answers],
                         ["553 5.6.7", "501 5.1.7", "553 5.6.7", "501 5.1.3"])
        [server] = _connections(relay)
        ref = weakref.ref(server)
        del server
        await in_thread(c.close)
        await until(lambda: not _connections(relay), "the connection to close", 10.0, 0.01)
        gc.collect()
        self.assertIsNone(ref(), "the closed connection's protocol is still referenced")

    async def test_no_growth_across_connections(self) -> None:
        relay = RelayUnderTest(self)

        def one() -> None:
            c = relay.raw().ready()
            _refuse(c)
            c.close()

        await in_thread(one)
        await until(lambda: not _connections(relay), "the connections to close", 10.0, 0.01)
        before = _live_servers()
        for _ in range(10):
            await in_thread(one)
        await until(lambda: not _connections(relay), "the connections to close", 10.0, 0.01)
        self.assertLessEqual(_live_servers(), before)
        self.assertEqual(_live_servers(), 0)

    async def test_no_growth_within_a_connection(self) -> None:
        """Refusals on one open connection leave no traceback behind each."""
        relay = RelayUnderTest(self)
        c: RawClient = await in_thread(lambda: relay.raw().ready())
        self.addCleanup(c.close)
        await in_thread(_refuse, c, 10)
        before = _live_tracebacks()
        await in_thread(_refuse, c, 250)   # 1,000 refusals
        self.assertLess(_live_tracebacks() - before, 50)

    async def test_no_exception_instances_at_module_level(self) -> None:
        """No module of the relay keeps an exception instance to raise."""
        import importlib
        import pkgutil

        found = []
        for info in pkgutil.iter_modules(mxmrelay.__path__, "mxmrelay."):
            if info.name in ("mxmrelay.worker",):
                continue  # a program: importing it is harmless, but skip it
            module = importlib.import_module(info.name)
            for name, value in vars(module).items():
                # (Twisted's ``connectionDone`` is a Failure passed as a
                # default argument, never raised.)
                if isinstance(value, BaseException) and not isinstance(value, Failure):
                    found.append(f"{info.name}.{name}")
        self.assertEqual(found, [])

    async def test_rss_over_10000_refusals(self) -> None:
        """Manual measurement: ``MXMRELAY_MEASURE_RSS=1``."""
        if not os.environ.get("MXMRELAY_MEASURE_RSS"):
            raise unittest.SkipTest("set MXMRELAY_MEASURE_RSS=1 to measure")
        relay = RelayUnderTest(self)

        def one(times: int) -> None:
            c = relay.raw().ready()
            _refuse(c, times)
            c.close()

        await in_thread(one, 5)  # warm up: TLS, the login cache, imports
        await until(lambda: not _connections(relay), "the connections to close", 10.0, 0.01)
        gc.collect()
        start = _rss_kib()
        per_connection = 25  # 4 refusals each: 100 commands a connection
        for _ in range(100):
            await in_thread(one, per_connection)
        await until(lambda: not _connections(relay), "the connections to close", 10.0, 0.01)
        gc.collect()
        end = _rss_kib()
        sys.stderr.write(f"\nRSS over 10,000 refused commands on 100 connections: "
                         f"{start} KiB -> {end} KiB ({end - start:+d} KiB); "
                         f"live SMTPServer objects: {_live_servers()}\n")
