"""Sending limits: per customer space, sends per second with a burst and
sends per UTC day; per user, simultaneous sessions and the networks a
login may come from.

This module is the arithmetic and the in-process state, without I/O, on
an injected clock.  The same arithmetic runs in Redis when several relays
share their counters (:mod:`mxmrelay.redis_state`, whose Lua scripts
follow these functions line for line).

The rate is a GCRA (generic cell rate algorithm, the token bucket written
as one timestamp): each space keeps a *theoretical arrival time* (TAT);
a send is allowed while ``TAT - now <= tau``, where ``T = 1 / rate`` and
``tau = (burst - 1) * T``, and moves the TAT ``T`` later.  One number per
space, and the time to wait when refused is exact: ``TAT - tau - now``.

The daily quota counts sends per calendar day in UTC (not a rolling 24
hours): one counter per space and day, so the check is one increment and
the retry time is exact and the same for every client (the next 00:00
UTC).  A rolling window would need every send's time kept, up to the
whole quota per space.  The price, documented in the README: a customer
can send its quota before midnight and again after it; the per-second
rate still bounds how fast.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Sequence
from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime

#: What a configuration or a directory says for "no limit".
UNLIMITED = "unlimited"
DAY = 86_400
#: Slack for float rounding when a client comes back after exactly the
#: retry time it was given (the in-process clock is a float).
EPSILON = 1e-6

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@attrs.frozen
class Limits:
    """The limits in force for one customer space.  ``math.inf``: none."""

    #: Sends per second, in the long run.
    rate: float = math.inf
    #: Sends allowed at once (back to back); 0: one second's worth.
    burst: int = 0
    #: Sends per calendar day, UTC.
    daily: float = math.inf
    #: Simultaneous sessions per user.
    sessions: float = math.inf
    #: The networks a login may come from; None: anywhere.
    allowed_networks: tuple[Network, ...] | None = None

    @property
    def bucket(self) -> int:
        """The burst in force: as given, else one second's worth (at least 1)."""
        if self.burst > 0:
            return self.burst
        return max(1, math.ceil(self.rate)) if math.isfinite(self.rate) else 1

    def override(self, other: Overrides) -> Limits:
        """These defaults, with what a customer space sets in the directory."""
        return Limits(
            rate=self.rate if other.rate is None else other.rate,
            burst=self.burst if other.burst is None else other.burst,
            daily=self.daily if other.daily is None else other.daily,
            sessions=self.sessions if other.sessions is None else other.sessions,
            allowed_networks=(self.allowed_networks if other.allowed_networks is None
                              else other.allowed_networks))

    def describe_rate(self) -> str:
        return f"{number(self.rate)} per second, burst {self.bucket}"


@attrs.frozen
class Overrides:
    """What one customer space (or user) sets; None: the configuration's
    default.  ``math.inf`` is "unlimited", a value like any other."""

    rate: float | None = None
    burst: int | None = None
    daily: float | None = None
    sessions: float | None = None
    allowed_networks: tuple[Network, ...] | None = None


NO_OVERRIDES = Overrides()


def number(value: float) -> str:
    """``5``, ``0.5`` or ``unlimited``."""
    if not math.isfinite(value):
        return UNLIMITED
    return str(int(value)) if value == int(value) else f"{value:g}"


def seconds(value: float) -> str:
    """A retry time, rounded *up* to the millisecond (so a client that
    waits exactly that long is allowed): ``0.2``, ``3``, ``43199.5``."""
    ms = math.ceil(round(value * 1000, 3))
    return f"{ms / 1000:.3f}".rstrip("0").rstrip(".") if ms % 1000 else str(ms // 1000)


@attrs.frozen
class Refusal:
    """A limit was hit: which, its value, and seconds until it frees up."""

    limit: str
    value: str
    retry_after: float

    def text(self) -> str:
        return f"{self.value}; retry-after={seconds(self.retry_after)}"


def parse_limit(value: Any, *, integer: bool, low: float) -> float | None:
    """A limit from TOML or JSON: a number of at least ``low`` (a whole
    one if ``integer``) or ``"unlimited"``; None if it is neither."""
    if value == UNLIMITED:
        return math.inf
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if integer and not isinstance(value, int):
        return None
    if not math.isfinite(value) or value < low:
        return None
    return value


def parse_networks(value: Any) -> tuple[Network, ...] | str:
    """``["192.0.2.0/24", "2001:db8::/32"]`` (a bare address is its /32 or
    /128), or why not."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return "must be a list of networks such as \"192.0.2.0/24\""
    found = []
    for v in value:
        try:
            found.append(ipaddress.ip_network(v.strip(), strict=False))
        except ValueError:
            return f"{v!r} is not a network such as 192.0.2.0/24 or 2001:db8::/32"
    return tuple(found)


def allowed_from(client: str, networks: Sequence[Network] | None) -> bool:
    """Is ``client`` (an address, IPv4-mapped IPv6 included) in ``networks``?"""
    if networks is None:
        return True
    try:
        ip = ipaddress.ip_address(client)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in n for n in networks)


# -- the arithmetic, shared with the Lua scripts -----------------------------------


def gcra(tat: float | None, now: float, limits: Limits) -> tuple[float | None, float]:
    """The rate check: ``(new TAT, 0)`` if a send is allowed now, else
    ``(None, seconds to wait)``."""
    interval = 1 / limits.rate
    tau = (limits.bucket - 1) * interval
    tat = now if tat is None or tat < now else tat
    if tat - now > tau + EPSILON:
        return None, tat - tau - now
    return tat + interval, 0.0


def rate_refusal(limits: Limits, wait: float) -> Refusal:
    return Refusal("rate", f"Sending rate limit reached ({limits.describe_rate()})", wait)


def daily_refusal(limits: Limits, wait: float) -> Refusal:
    return Refusal("daily", f"Daily sending quota reached ({number(limits.daily)} per day, "
                            "UTC)", wait)


# -- the in-process state ---------------------------------------------------------


@attrs.define
class LocalState:
    """Every counter in this process: the embedded default, and what each
    relay falls back to while Redis does not answer.  Bounded by the
    number of customer spaces and users with open sessions."""

    clock: IReactorTime
    _tat: dict[str, float] = attrs.field(factory=dict)
    _days: dict[str, tuple[int, int]] = attrs.field(factory=dict)
    _sessions: dict[str, set[str]] = attrs.field(factory=dict)

    def reserve(self, space: str, limits: Limits) -> Refusal | tuple[int, float]:
        """Take one send, or say which limit refuses it; the rate and the
        quota are both checked before either is touched.  Returns the day
        and the interval the send took, to give it back with."""
        now = self.clock.seconds()
        new_tat: float | None = None
        interval = 0.0
        if math.isfinite(limits.rate):
            new_tat, wait = gcra(self._tat.get(space), now, limits)
            if new_tat is None:
                return rate_refusal(limits, wait)
            interval = 1 / limits.rate
        day = int(now // DAY)
        if math.isfinite(limits.daily):
            counted_day, used = self._days.get(space, (day, 0))
            used = used if counted_day == day else 0
            if used >= limits.daily:
                return daily_refusal(limits, (day + 1) * DAY - now)
            self._days[space] = (day, used + 1)
        if new_tat is not None:
            self._tat[space] = new_tat
            if len(self._tat) > 10_000:
                self._tat = {k: t for k, t in self._tat.items() if t > now}
        return day, interval

    def give_back(self, space: str, day: int, interval: float) -> None:
        """A reserved send that did not end in a 250 uses nothing."""
        if interval and space in self._tat:
            self._tat[space] -= interval
        counted_day, used = self._days.get(space, (-1, 0))
        if counted_day == day and used > 0:
            self._days[space] = (day, used - 1)

    def open_session(self, user: str, sid: str, limit: float) -> bool:
        sids = self._sessions.setdefault(user, set())
        if len(sids) >= limit:
            return False
        sids.add(sid)
        return True

    def close_session(self, user: str, sid: str) -> None:
        sids = self._sessions.get(user)
        if sids is not None:
            sids.discard(sid)
            if not sids:
                del self._sessions[user]

    def sessions(self, user: str) -> int:
        return len(self._sessions.get(user, ()))
