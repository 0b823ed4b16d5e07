"""The sending limits' keys, read the same way wherever they are written:
the configuration's ``[limits]`` (the defaults) and ``[state]`` tables,
and each ``[[customer]]`` of the directory (file or platform API), which
may override a default with another value or with ``"unlimited"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import attrs

from mxmrelay.limits import Limits, Network, Overrides, parse_limit, parse_networks

if TYPE_CHECKING:
    from mxmrelay.config import _Reader

#: The keys of ``[limits]``, and of a customer space that overrides them.
SPACE_KEYS = ("sends_per_second", "burst", "sends_per_day", "sessions_per_user",
              "allowed_networks")
LIMITS_KEYS = SPACE_KEYS
STATE_KEYS = ("redis", "timeout")

#: key -> (whole numbers only, lowest value)
_NUMBERS = {"sends_per_second": (False, 0.001), "sends_per_day": (True, 1),
            "sessions_per_user": (True, 1)}

Bad = Callable[[str, str], None]


@attrs.frozen
class StateConfig:
    """``[state]``: where the counters live."""

    #: ``redis://HOST:PORT/DB``; None: in this process (the supervisor's
    #: with ``workers = N``).
    redis: str | None = None
    #: Seconds any one Redis call may take before the relay counts alone.
    timeout: float = 0.25


def overrides(table: Mapping[str, Any], bad: Bad) -> Overrides:
    """The limit keys ``table`` sets (each problem reported to ``bad``)."""
    found: dict[str, Any] = {}
    for key, (integer, low) in _NUMBERS.items():
        if key in table:
            value = table[key]
            if isinstance(value, float) and integer and value.is_integer():
                value = int(value)  # JSON has one number type
            parsed = parse_limit(value, integer=integer, low=low)
            if parsed is None:
                kind = "a whole number" if integer else "a number"
                bad(key, f'must be {kind} of at least {low:g}, or "unlimited"')
            found[key] = parsed
    burst = None
    if "burst" in table:  # a JSON null is not a burst (TOML has none)
        burst = table["burst"]
        if isinstance(burst, float) and burst.is_integer():
            burst = int(burst)
        if isinstance(burst, bool) or not isinstance(burst, int) or not 1 <= burst <= 1_000_000:
            bad("burst", "must be a whole number from 1 to 1000000")
            burst = None
    return Overrides(rate=found.get("sends_per_second"), burst=burst,
                     daily=found.get("sends_per_day"),
                     sessions=found.get("sessions_per_user"),
                     allowed_networks=networks(table, bad))


def networks(table: Mapping[str, Any], bad: Bad) -> tuple[Network, ...] | None:
    if "allowed_networks" not in table:
        return None
    parsed = parse_networks(table["allowed_networks"])
    if isinstance(parsed, str):
        bad("allowed_networks", parsed)
        return None
    return parsed


def limits(r: _Reader) -> Limits:
    """``[limits]``: the defaults (no table: no limits)."""
    if "limits" not in r.data:
        return Limits()
    section = r.section("limits", LIMITS_KEYS)
    if section is None:
        return Limits()
    found = overrides(section.data, section.problem)
    return Limits().override(found)


def state(r: _Reader) -> StateConfig:
    """``[state]``: the counters' home (no table: this process)."""
    if "state" not in r.data:
        return StateConfig()
    section = r.section("state", STATE_KEYS)
    if section is None:
        return StateConfig()
    from mxmrelay.redis_state import url_problem

    url = None
    if "redis" in section.data:
        url = section.string("redis")
        reason = url_problem(url) if url else None
        if reason:
            section.problem("redis", reason)
    timeout = section.number("timeout", 0.25, low=0.01, high=5)
    return StateConfig(redis=url or None, timeout=timeout)


def describe(value: float) -> str:
    return "unlimited" if math.isinf(value) else f"{value:g}"
