"""The limits' counters in Redis, shared by every relay that names it in
``[state] redis = "redis://HOST:PORT/DB"``.

Each check is one Lua script (EVALSHA, and EVAL when Redis answers
NOSCRIPT, as after a restart), so it is atomic and one round trip: two
relays racing for the last send of a quota never both get it.  The
scripts read Redis' own clock (TIME), so relays whose clocks disagree
still share one rate.  The client is txredisapi: Twisted-native (no
thread per call), maintained, and it reconnects by itself.

Redis is never needed for mail to flow.  Every call has a short timeout;
the first that fails marks Redis down (logged once), and until a probe
(a PING every second) answers again, every limit is counted by this
relay's own :class:`~mxmrelay.limits.LocalState`; recovery is logged
once too, and the shared counters are used again without a restart.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import txredisapi  # type: ignore[import-untyped]
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from mxmrelay.limits import Limits, Refusal, daily_refusal, rate_refusal

log = Logger(namespace="mxmrelay.state")

PREFIX = "mxmrelay:"
#: Where a relay announces an AUTH block to the others.
BLOCKS = PREFIX + "blocks"
US = 1_000_000
#: Seconds a session stays counted without a heartbeat (a relay that died
#: leaves it counted this long at most); heartbeats come every third of it.
SESSION_TTL = 60.0

RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tau = tonumber(ARGV[2])
local quota = tonumber(ARGV[3])
local day = math.floor(now / 86400000000)
local new_tat = nil
if interval > 0 then
  local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
  if tat < now then tat = now end
  if tat - now > tau then return {1, string.format('%.0f', tat - tau - now), day} end
  new_tat = tat + interval
end
if quota >= 0 then
  local key = KEYS[2] .. ':' .. day
  local used = tonumber(redis.call('GET', key) or '0')
  if used >= quota then
    return {2, string.format('%.0f', (day + 1) * 86400000000 - now), day}
  end
  redis.call('INCR', key)
  redis.call('EXPIRE', key, 172800)
end
if new_tat then
  redis.call('SET', KEYS[1], string.format('%.0f', new_tat),
             'PX', math.ceil((new_tat - now) / 1000) + 1000)
end
return {0, '0', day}
"""

GIVE_BACK = """
local interval = tonumber(ARGV[1])
if interval > 0 then
  local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
  if tat > 0 then
    redis.call('SET', KEYS[1], string.format('%.0f', tat - interval), 'KEEPTTL')
  end
end
if ARGV[2] ~= '' then
  local key = KEYS[2] .. ':' .. ARGV[2]
  if tonumber(redis.call('GET', key) or '0') > 0 then redis.call('DECR', key) end
end
return 0
"""

OPEN_SESSION = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[1])
   and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
"""

HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, 'XX', now + tonumber(ARGV[1]), ARGV[i + 1])
  redis.call('PEXPIRE', key, tonumber(ARGV[1]))
end
return 0
"""

FAILURE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('PEXPIRE', KEYS[1], window)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  local until_ms = tonumber(first[2]) + window
  redis.call('PUBLISH', ARGV[4], cjson.encode({ARGV[5], ARGV[6], until_ms}))
  return until_ms
end
return 0
"""


class RedisDown(Exception):
    """Redis is marked down: the caller counts in the process."""


def address(url: str) -> tuple[str, int, int, str | None]:
    """``redis://[:password@]host[:port][/db]``'s parts (the
    configuration has checked it: see :func:`url_problem`)."""
    parts = urlsplit(url)
    db = int(parts.path.strip("/") or 0)
    return parts.hostname or "127.0.0.1", parts.port or 6379, db, parts.password


def url_problem(url: str) -> str | None:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as e:
        return f"not a valid URL: {e}"
    if parts.scheme != "redis" or not parts.hostname:
        return "must be redis://HOST[:PORT][/DB]"
    if not parts.path.strip("/").isdigit() and parts.path.strip("/"):
        return "the path must be a database number, as in redis://127.0.0.1:6379/0"
    return None


class RedisState:
    """The shared counters, with the watch on Redis' health."""

    def __init__(self, url: str, clock: Any, timeout: float = 0.25,
                 probe_every: float = 1.0) -> None:
        host, port, db, password = address(url)
        self.url = url
        self.clock = clock
        self.timeout = timeout
        self.conn: Any = txredisapi.lazyConnectionPool(
            host, port, db, poolsize=2, reconnect=True, password=password,
            connectTimeout=timeout, replyTimeout=timeout)
        self.conn._factory.maxDelay = probe_every
        self.conn._factory.initialDelay = min(1.0, probe_every)
        self.up = True
        self._probe = LoopingCall(self._ping)
        self._probe.clock = clock
        self._probe_every = probe_every
        #: Called with True/False as Redis comes back or goes away.
        self.on_health: list[Callable[[bool], None]] = []
        self._subscriber: Any = None
        self._sessions: dict[str, str] = {}
        self._beat = LoopingCall(self._heartbeat)
        self._beat.clock = clock

    # -- health ----------------------------------------------------------------

    def _call(self, script: str, keys: list[str], args: list[Any]) -> Deferred[Any]:
        if not self.up:
            return fail(RedisDown())
        d: Deferred[Any] = self.conn.eval(script, keys, args)
        d.addTimeout(self.timeout, self.clock)
        d.addErrback(self._failed)
        return d

    def _failed(self, f: Failure) -> Failure:
        if self.up:
            self.up = False
            log.warn("state: redis {url} unreachable ({reason}); each limit is counted by "
                     "this relay alone until it answers", url=self.url,
                     reason=f.getErrorMessage() or type(f.value).__name__)
            for notify in self.on_health:
                notify(False)
            if not self._probe.running:
                self._probe.start(self._probe_every, now=False)
        return f

    def _ping(self) -> None:
        d: Deferred[Any] = self.conn.ping()
        d.addTimeout(self.timeout, self.clock)
        d.addCallbacks(lambda _: self._back(), lambda _: None)

    def _back(self) -> None:
        if self.up:
            return
        self.up = True
        if self._probe.running:
            self._probe.stop()
        log.info("state: redis {url} answers again; the limits are shared again",
                 url=self.url)
        for notify in self.on_health:
            notify(True)

    # -- sends --------------------------------------------------------------------

    def reserve(self, space: str, limits: Limits) -> Deferred[Refusal | Callable[[], None]]:
        """One send taken, as the function that gives it back; or the refusal."""
        rate = limits.rate < float("inf")
        interval = round(US / limits.rate) if rate else 0
        tau = (limits.bucket - 1) * interval
        quota = int(limits.daily) if limits.daily < float("inf") else -1
        keys = [f"{PREFIX}rate:{{{space}}}", f"{PREFIX}day:{{{space}}}"]

        def decided(result: list[Any]) -> Refusal | Callable[[], None]:
            verdict, wait, day = int(result[0]), int(result[1]) / US, int(result[2])
            if verdict == 1:
                return rate_refusal(limits, wait)
            if verdict == 2:
                return daily_refusal(limits, wait)
            counted = str(day) if quota >= 0 else ""
            return lambda: self._give_back(keys, interval, counted)

        return self._call(RESERVE, keys, [interval, tau, quota]).addCallback(decided)

    def _give_back(self, keys: list[str], interval: int, day: str) -> None:
        self._call(GIVE_BACK, keys, [interval, day]).addErrback(lambda _: None)

    # -- sessions -------------------------------------------------------------------

    def open_session(self, user: str, sid: str, limit: float) -> Deferred[bool]:
        key = f"{PREFIX}sessions:{user}"
        ttl = int(SESSION_TTL * 1000)

        def opened(result: Any) -> bool:
            if int(result) == 1:
                self._sessions[sid] = key
                if not self._beat.running:
                    self._beat.start(SESSION_TTL / 3, now=False)
                return True
            return False

        return self._call(OPEN_SESSION, [key], [sid, int(limit), ttl]).addCallback(opened)

    def close_session(self, user: str, sid: str) -> None:
        key = self._sessions.pop(sid, None)
        if key is not None and self.up:
            d: Deferred[Any] = self.conn.zrem(key, sid)
            d.addTimeout(self.timeout, self.clock)
            d.addErrback(lambda _: None)

    def _heartbeat(self) -> None:
        if not self._sessions:
            self._beat.stop()
            return
        sids = list(self._sessions)
        keys = [self._sessions[s] for s in sids]
        self._call(HEARTBEAT, keys, [int(SESSION_TTL * 1000), *sids]).addErrback(
            lambda _: None)

    # -- AUTH failures ------------------------------------------------------------------

    def failure(self, kind: str, key: str, limit: int, window: float) -> None:
        """Count an AUTH failure for every relay; the one that crosses the
        limit announces the block on :data:`BLOCKS`."""
        args = [limit, int(window * 1000), os.urandom(8).hex(), BLOCKS, kind, key]
        self._call(FAILURE, [f"{PREFIX}fail:{kind}:{key}"], args).addErrback(lambda _: None)

    def subscribe(self, on_block: Callable[[str, str, float], None]) -> None:
        """Hear the blocks other relays announce (and our own), for as long
        as the relay runs; the subscription is renewed on each reconnect."""
        host, port, _, password = address(self.url)

        class Blocks(txredisapi.SubscriberProtocol):  # type: ignore[misc]
            def connectionMade(self) -> None:
                super().connectionMade()
                self.whenConnected().addCallback(lambda _: self.subscribe(BLOCKS))

            def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
                try:
                    kind, key, until_ms = json.loads(message)
                    on_block(str(kind), str(key), float(until_ms) / 1000)
                except (ValueError, TypeError):
                    return

        factory = txredisapi.SubscriberFactory()
        factory.protocol = Blocks
        factory.password = password
        factory.maxDelay = self._probe_every
        factory.initialDelay = min(1.0, self._probe_every)
        factory.startConnecting(txredisapi._makeEndpoint(host, port, self.timeout))
        self._subscriber = factory

    def close(self) -> Deferred[Any]:
        for loop in (self._probe, self._beat):
            if loop.running:
                loop.stop()
        if self._subscriber is not None:
            self._subscriber.disconnect()
        d: Deferred[Any] = self.conn.disconnect()
        return d
