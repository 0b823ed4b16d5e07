"""The limits' counters in the supervisor, for ``workers = N`` without
Redis: the workers ask it over their control channel (the socket pair the
AUTH failure counts already use), so N workers enforce one limit, not N.

One JSON array a line, as the rest of the channel.  A worker asks
``["limit", ID, "reserve", SPACE, RATE, BURST, DAILY]`` (``null`` for
unlimited) and is answered ``["limited", ID, 0, DAY, INTERVAL]`` (taken)
or ``["limited", ID, 1|2, WAIT]`` (refused by the rate or the quota);
``["limit", ID, "open", USER, SID, LIMIT]`` is answered ``["limited", ID,
true|false]``; ``give_back`` and ``close`` are not answered.  The
supervisor's answer is computed at once, so a check is one local round
trip.  A worker whose supervisor does not answer within the timeout
counts alone until it does (the same fallback as with Redis), and the
sessions a worker held are freed when its channel closes (it died).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from itertools import count
from typing import Any

import attrs
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mxmrelay.limits import Limits, LocalState, Refusal, daily_refusal, rate_refusal

log = Logger(namespace="mxmrelay.state")

#: The first bytes of a line of this protocol (the rest of the channel
#: never starts so).
ASK = b'["limit"'
ANSWER = b'["limited"'


def _num(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _inf(value: Any) -> float:
    return math.inf if value is None else float(value)


@attrs.define
class SupervisorCounters:
    """The supervisor's side: one :class:`LocalState` for every worker."""

    clock: IReactorTime
    local: LocalState = attrs.field(default=attrs.Factory(
        lambda self: LocalState(self.clock), takes_self=True))
    #: channel -> {sid: user}: the sessions each worker holds.
    _held: dict[object, dict[str, str]] = attrs.field(factory=dict)

    def answer(self, channel: object, line: bytes) -> bytes | None:
        """The answer to one worker's line (None: nothing to say)."""
        try:
            _, ident, verb, *args = json.loads(line)
            return self._answer(channel, int(ident), str(verb), args)
        except (ValueError, TypeError, KeyError):
            return None

    def _answer(self, channel: object, ident: int, verb: str, args: list[Any]) -> bytes | None:
        if verb == "reserve":
            space, rate, burst, daily = args
            limits = Limits(rate=_inf(rate), burst=int(burst), daily=_inf(daily))
            taken = self.local.reserve(str(space), limits)
            if isinstance(taken, Refusal):
                kind = 1 if taken.limit == "rate" else 2
                return json.dumps(["limited", ident, kind, taken.retry_after]).encode()
            return json.dumps(["limited", ident, 0, *taken]).encode()
        if verb == "give_back":
            space, day, interval = args
            self.local.give_back(str(space), int(day), float(interval))
        elif verb == "open":
            user, sid, limit = str(args[0]), str(args[1]), _inf(args[2])
            ok = self.local.open_session(user, sid, limit)
            if ok:
                self._held.setdefault(channel, {})[sid] = user
            return json.dumps(["limited", ident, ok]).encode()
        elif verb == "close":
            user, sid = str(args[0]), str(args[1])
            self._held.get(channel, {}).pop(sid, None)
            self.local.close_session(user, sid)
        return None

    def forget(self, channel: object) -> None:
        """A worker's channel closed (it ended): its sessions end with it."""
        for sid, user in self._held.pop(channel, {}).items():
            self.local.close_session(user, sid)


class SupervisorDown(Exception):
    """No channel to the supervisor: the worker counts alone."""


class WorkerCounters:
    """A worker's side: the same calls as :class:`~mxmrelay.redis_state.
    RedisState`'s for sends and sessions, answered by the supervisor."""

    def __init__(self, send: Callable[[bytes], None], clock: IReactorTime,
                 timeout: float = 0.25) -> None:
        self.send = send
        self.clock = clock
        self.timeout = timeout
        self.up = True
        self.on_health: list[Callable[[bool], None]] = []
        self._ids = count(1)
        self._waiting: dict[int, Deferred[list[Any]]] = {}

    def _ask(self, verb: str, *args: Any) -> Deferred[list[Any]]:
        if not self.up:
            return fail(SupervisorDown())
        ident = next(self._ids)

        def forget(_: object) -> None:
            self._waiting.pop(ident, None)

        d: Deferred[list[Any]] = Deferred(forget)
        self._waiting[ident] = d
        self.send(json.dumps(["limit", ident, verb, *args]).encode())
        d.addTimeout(self.timeout, self.clock)
        return d

    def _tell(self, verb: str, *args: Any) -> None:
        if self.up:
            self.send(json.dumps(["limit", 0, verb, *args]).encode())

    def answered(self, line: bytes) -> None:
        try:
            _, ident, *rest = json.loads(line)
        except (ValueError, TypeError):
            return
        d = self._waiting.pop(ident, None) if isinstance(ident, int) else None
        if d is not None:
            d.callback(rest)

    def lost(self) -> None:
        """The channel closed: count alone (the worker is ending anyway)."""
        self.up = False

    def reserve(self, space: str, limits: Limits) -> Deferred[Refusal | Callable[[], None]]:
        def decided(rest: list[Any]) -> Refusal | Callable[[], None]:
            if rest[0] == 1:
                return rate_refusal(limits, float(rest[1]))
            if rest[0] == 2:
                return daily_refusal(limits, float(rest[1]))
            day, interval = rest[1], rest[2]
            return lambda: self._tell("give_back", space, day, interval)

        return self._ask("reserve", space, _num(limits.rate), limits.bucket,
                         _num(limits.daily)).addCallback(decided)

    def open_session(self, user: str, sid: str, limit: float) -> Deferred[bool]:
        return self._ask("open", user, sid, _num(limit)).addCallback(lambda rest: rest[0] is True)

    def close_session(self, user: str, sid: str) -> None:
        self._tell("close", user, sid)


def attach(settings: Any, control: Any, clock: IReactorTime, timeout: float) -> None:
    """In a worker without Redis: its limiter's counters are the
    supervisor's, asked over ``control`` (a ``WorkerControl``)."""
    limiter = settings.portal.realm.outbound.limiter
    if limiter is not None and limiter.state.redis is None:
        control.counters = limiter.state.redis = WorkerCounters(control.sendLine, clock, timeout)
