"""The limits as the session meets them: a send reserved at MAIL FROM and
given back unless its transaction ends in a 250, a session slot taken at
AUTH, the networks a login may come from; each refusal logged and counted.

Where the counters live is :class:`SharedState`'s business: in the process
(the default), or in Redis with the process's own counters whenever Redis
does not answer (see :mod:`mxmrelay.redis_state`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any, Protocol

import attrs
from prometheus_client import Counter, Gauge
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from mxmrelay.auth import FailureLimiter
from mxmrelay.config import Config
from mxmrelay.directory import User
from mxmrelay.limits import Limits, LocalState, Refusal, allowed_from, number
from mxmrelay.redis_state import RedisState
from mxmrelay.reply import Reply

log = Logger(namespace="mxmrelay.limits")

REFUSALS = Counter(
    "mxmrelay_limit_refusals", "Sends and logins refused by a sending limit, by customer "
    "space and limit (rate, daily, sessions, network).", ["customer", "limit"])
STATE_SHARED = Gauge(
    "mxmrelay_state_shared", "1 while the limits' counters are shared through Redis, 0 "
    "while this process counts alone (Redis configured but not answering).",
    multiprocess_mode="min")


@attrs.define
class Reservation:
    """One send taken at MAIL FROM: kept by a 250, given back otherwise
    (whichever comes first counts; the other is a no-op)."""

    _give_back: Callable[[], None]
    settled: bool = False

    def keep(self) -> None:
        self.settled = True

    def give_back(self) -> None:
        if not self.settled:
            self.settled = True
            self._give_back()


class Counters(Protocol):
    """Counters kept outside this process: Redis (shared by every relay),
    or the supervisor (shared by one relay's workers)."""

    up: bool
    on_health: list[Callable[[bool], None]]

    def reserve(self, space: str, limits: Limits) -> Deferred[Refusal | Callable[[], None]]: ...

    def open_session(self, user: str, sid: str, limit: float) -> Deferred[bool]: ...

    def close_session(self, user: str, sid: str) -> None: ...


@attrs.define
class SharedState:
    """The counters: in ``local``, or in ``redis`` (Redis, or the
    supervisor's with ``workers = N``) while it answers."""

    local: LocalState
    redis: Counters | None = None

    @property
    def shared(self) -> bool:
        """Are the counters shared right now (False: counted alone)?"""
        return self.redis is not None and self.redis.up

    def reserve(self, space: str, limits: Limits) -> Deferred[Refusal | Reservation]:
        def here(_: object = None) -> Refusal | Reservation:
            taken = self.local.reserve(space, limits)
            if isinstance(taken, Refusal):
                return taken
            day, interval = taken
            return Reservation(lambda: self.local.give_back(space, day, interval))

        if not self.shared:
            return succeed(here())
        assert self.redis is not None

        def there(result: Refusal | Callable[[], None]) -> Refusal | Reservation:
            return result if isinstance(result, Refusal) else Reservation(result)

        return self.redis.reserve(space, limits).addCallbacks(there, here)

    def open_session(self, user: str, limit: float) -> Deferred[Callable[[], None] | None]:
        """A slot for one more session of ``user``, as the function that
        frees it; None if the user has ``limit`` open already."""
        sid = os.urandom(12).hex()

        def here(_: object = None) -> Callable[[], None] | None:
            if not self.local.open_session(user, sid, limit):
                return None
            return lambda: self.local.close_session(user, sid)

        if not self.shared:
            return succeed(here())
        redis = self.redis
        assert redis is not None

        def there(ok: bool) -> Callable[[], None] | None:
            return (lambda: redis.close_session(user, sid)) if ok else None

        return redis.open_session(user, sid, limit).addCallbacks(there, here)


@attrs.define
class Limiter:
    """The configuration's defaults, each space's overrides, and the state."""

    defaults: Limits
    state: SharedState

    def limits_for(self, user: User) -> Limits:
        return self.defaults.override(user.customer.limits)

    def reserve(self, user: User, client: str) -> Deferred[Reservation | None]:
        """At MAIL FROM: one send taken (None: this space has no send
        limit), or the ``451 4.7.1`` that says which limit and when."""
        limits = self.limits_for(user)
        if math.isinf(limits.rate) and math.isinf(limits.daily):
            return succeed(None)
        space = user.customer.id

        def decided(outcome: Refusal | Reservation) -> Reservation:
            if isinstance(outcome, Refusal):
                refuse(space, user.email, client, outcome.limit, outcome.text())
                raise Reply(451, "4.7.1", outcome.text())
            return outcome

        return self.state.reserve(space, limits).addCallback(decided)

    def login(self, user: User, client: str) -> Deferred[Callable[[], None]]:
        """After a correct password: the client's network, then a session
        slot; fires with what frees the slot at logout."""
        limits = self.limits_for(user)
        space = user.customer.id
        networks = (user.allowed_networks if user.allowed_networks is not None
                    else limits.allowed_networks)
        if not allowed_from(client, networks):
            refuse(space, user.email, client, "network", "login from outside allowed_networks")
            return _fail(Reply(535, "5.7.8", "Authentication credentials invalid"))
        if math.isinf(limits.sessions):
            return succeed(_nothing)
        n = number(limits.sessions)

        def opened(free: Callable[[], None] | None) -> Callable[[], None]:
            if free is None:
                refuse(space, user.email, client, "sessions", f"{n} sessions")
                raise Reply(421, "4.7.0", f"Too many sessions for this user (limit {n})")
            return free

        return self.state.open_session(user.email.lower(), limits.sessions).addCallback(opened)


def _nothing() -> None:
    pass


def _fail(reply: Reply) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(Failure(reply))
    return d


def refuse(space: str, user: str, client: str, limit: str, detail: str) -> None:
    """One log line per refusal (space, user, limit), and its count."""
    log.warn("limit refused limit={limit} customer={customer} user={user} client={client} "
             "detail={detail}", limit=limit, customer=space, user=user, client=client,
             detail=detail)
    REFUSALS.labels(space, limit).inc()


@attrs.define
class SharedFailureLimiter(FailureLimiter):
    """An AUTH failure limiter whose counts are also kept in Redis for
    every relay; a relay that sees a key cross the limit announces the
    block, and every relay (this one too) applies it locally.  Without
    Redis (or while it is down) it is the plain per-process limiter."""

    redis: RedisState | None = None
    kind: str = ""

    def record(self, key: str) -> float | None:
        until = super().record(key)
        if self.redis is not None:
            self.redis.failure(self.kind, key, self.limit, self.window)
        return until


def share_failures(redis: RedisState, limiters: dict[str, FailureLimiter]) -> None:
    """Count these limiters' failures in Redis and hear every relay's blocks."""
    for kind, limiter in limiters.items():
        if isinstance(limiter, SharedFailureLimiter):
            limiter.redis, limiter.kind = redis, kind

    def block(kind: str, key: str, until: float) -> None:
        limiter = limiters.get(kind)
        if limiter is not None:
            limiter.block(key, until)

    redis.subscribe(block)


def watch(state: SharedState) -> None:
    """Keep :data:`STATE_SHARED` true to the state's health."""
    if state.redis is None:
        return
    STATE_SHARED.set(1)
    state.redis.on_health.append(lambda up: STATE_SHARED.set(1 if up else 0))


def build(config: Config, clock: Any) -> Limiter:
    """The relay's limiter: its defaults from ``[limits]``, its counters
    where ``[state]`` says (Redis connects in the background; until it
    answers, this process counts)."""
    redis = None
    if config.state.redis is not None:
        redis = RedisState(config.state.redis, clock, config.state.timeout)
    state = SharedState(LocalState(clock), redis)
    watch(state)
    return Limiter(config.limits, state)


class _CloseRedis(Service):
    def __init__(self, redis: RedisState) -> None:
        self.redis = redis

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        return self.redis.close()


def share(settings: Any, parent: MultiService) -> None:
    """With Redis: the AUTH failure limiters of ``settings`` count in it
    and hear every relay's blocks; Redis is let go when ``parent`` stops."""
    limiter: Limiter | None = settings.portal.realm.outbound.limiter
    redis = limiter.state.redis if limiter is not None else None
    if not isinstance(redis, RedisState):
        return
    share_failures(redis, {"address": settings.address_limiter, "user": settings.user_limiter})
    _CloseRedis(redis).setServiceParent(parent)
