"""Twisted endpoint description strings, as the configuration holds them.

One reading of ``kind:arg:key=value`` for the check command, the workers'
supervisor (which binds some endpoints itself) and the listeners' default
backlog, so that the three never disagree on what a string means.
"""

from __future__ import annotations

#: The listen queue of every TCP listener, unless its endpoint string says
#: ``backlog=``: Twisted's default of 50 drops the SYNs of a burst of
#: clients (each then waits 1 s, 3 s, ... to retry).  The kernel caps it
#: at net.core.somaxconn.  ``workers = N`` binds with the same value.
LISTEN_BACKLOG = 1024
_BACKLOG_KINDS = ("tcp", "tcp6", "ssl")


def split_endpoint(description: str) -> tuple[str, list[str], dict[str, str]]:
    """An endpoint description's type, positional and keyword arguments
    (``\\:`` escapes a colon, as in Twisted's own parser)."""
    parts, current, escaped = [], "", False
    for c in description:
        if escaped:
            current, escaped = current + c, False
        elif c == "\\":
            escaped = True
        elif c == ":":
            parts.append(current)
            current = ""
        else:
            current += c
    parts.append(current)
    args = [p for p in parts[1:] if "=" not in p]
    kwargs = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    return parts[0], args, kwargs


def without_proxy(description: str) -> tuple[str, bool]:
    """The endpoint behind a ``haproxy:`` prefix, and whether there was one."""
    if description.startswith("haproxy:"):
        return description[len("haproxy:"):], True
    return description, False


def with_backlog(endpoint: str, backlog: int = LISTEN_BACKLOG) -> str:
    """``endpoint`` with ``:backlog=N`` added if it is a ``tcp:``,
    ``tcp6:`` or ``ssl:`` endpoint (also behind ``haproxy:``) that sets
    none.  (``systemd:`` sockets come with the .socket unit's Backlog=.)"""
    kind, _, kwargs = split_endpoint(without_proxy(endpoint)[0])
    if kind not in _BACKLOG_KINDS or "backlog" in kwargs:
        return endpoint
    return f"{endpoint}:backlog={backlog}"
