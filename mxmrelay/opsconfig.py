"""The configuration keys of what an operator watches: ``[metrics]`` and
``log_format``.

Read by :mod:`mxmrelay.config` with its own reader, so that a mistake here
is one more line naming the file and the key, like any other.
"""

from __future__ import annotations

from typing import Any

import attrs

METRICS_KEYS = ("endpoint", "api_answered_within")
LOG_FORMATS = ("text", "json")


@attrs.frozen
class MetricsConfig:
    #: A Twisted server endpoint for ``/metrics``, ``/healthz``, ``/readyz``.
    endpoint: str
    #: Seconds since the delivery API's last answer for which ``/readyz``
    #: takes it as up without probing it.
    api_answered_within: float = 60.0


def metrics(r: Any) -> MetricsConfig | None:
    """``[metrics]``, or None when absent (no metrics listener)."""
    if "metrics" not in r.data:
        return None
    m = r.section("metrics", METRICS_KEYS)
    if m is None:
        return None
    return MetricsConfig(endpoint=m.string("endpoint"),
                         api_answered_within=m.number("api_answered_within", 60.0, low=1,
                                                      high=86400))


def log_format(r: Any) -> str:
    """``log_format``: ``text`` (the default) or ``json``."""
    value = r.data.get("log_format", "text")
    if value not in LOG_FORMATS:
        r.problem("log_format", f"must be one of {', '.join(LOG_FORMATS)}")
        return "text"
    return str(value)
