"""The limits' counters in a real redis-server (Debian's), on a loopback
port of its own: shared by two states as two relays share them, exact
retry times, and mail flowing while Redis is gone, shared again after."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from mxmrelay.limiter import Reservation, SharedState
from mxmrelay.limits import Limits, LocalState, Refusal
from mxmrelay.redis_state import RedisState

REDIS = shutil.which("redis-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    """A redis-server of the test's own (no persistence), stopped by it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.dir = tempfile.mkdtemp(prefix="mxmrelay-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert REDIS is not None
        self.proc = subprocess.Popen(
            [REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


class Shared(TestCase):
    if REDIS is None:
        skip = "redis-server not installed (make tools installs it)"

    def setUp(self) -> None:
        self.server = RedisServer(free_port())
        self.server.start()
        self.addCleanup(self.server.stop)
        self.states = [self._state() for _ in range(2)]

    def _state(self) -> SharedState:
        redis = RedisState(f"redis://127.0.0.1:{self.server.port}/0", reactor, timeout=0.25,
                           probe_every=0.2)
        self.addCleanup(redis.close)
        return SharedState(LocalState(reactor), redis)

    async def _race(self, limits: Limits, space: str, n: int) -> list[Refusal | Reservation]:
        ds: list[Deferred[Refusal | Reservation]] = [
            self.states[i % 2].reserve(space, limits) for i in range(n)]
        return list(await gatherResults(ds))

    async def test_quota_shared_exactly(self) -> None:
        """Two relays racing for a quota of 3: exactly 3 sends between them."""
        results = await self._race(Limits(daily=3), "quota", 10)
        self.assertEqual(sum(isinstance(r, Reservation) for r in results), 3)
        refusal = next(r for r in results if isinstance(r, Refusal))
        self.assertEqual(refusal.limit, "daily")
        # One given back is one more allowed, to either relay.
        next(r for r in results if isinstance(r, Reservation)).give_back()
        await deferLater(reactor, 0.05, lambda: None)
        again = await self._race(Limits(daily=3), "quota", 2)
        self.assertEqual(sum(isinstance(r, Reservation) for r in again), 1)

    async def test_rate_shared_and_retry_after_is_exact(self) -> None:
        limits = Limits(rate=5)
        results = await self._race(limits, "rate", 10)
        self.assertEqual(sum(isinstance(r, Reservation) for r in results), 5)
        refusals = [r for r in results if isinstance(r, Refusal)]
        self.assertTrue(all(r.limit == "rate" and 0 < r.retry_after <= 0.2 for r in refusals))
        wait = max(r.retry_after for r in refusals[:1])
        await deferLater(reactor, wait, lambda: None)
        back = await self.states[1].reserve("rate", limits)
        self.assertIsInstance(back, Reservation)

    async def test_redis_gone_then_back(self) -> None:
        """Killed: no send refused that the limits allow (each counts alone);
        restarted: shared again, without a restart of the relay."""
        state = self.states[0]
        assert state.redis is not None
        self.server.stop()
        for _ in range(3):
            self.assertIsInstance(await state.reserve("gone", Limits(daily=3)), Reservation)
        self.assertFalse(state.shared)
        self.server.start()
        deadline = time.monotonic() + 15
        while not state.shared and time.monotonic() < deadline:
            await deferLater(reactor, 0.1, lambda: None)
        self.assertTrue(state.shared)
        results = await self._race(Limits(daily=2), "back", 4)
        self.assertEqual(sum(isinstance(r, Reservation) for r in results), 2)

    async def test_sessions_shared(self) -> None:
        a = await self.states[0].open_session("u@x", 1)
        b = await self.states[1].open_session("u@x", 1)
        self.assertIsNotNone(a)
        self.assertIsNone(b)
        assert a is not None
        a()
        await deferLater(reactor, 0.05, lambda: None)
        self.assertIsNotNone(await self.states[1].open_session("u@x", 1))
